"""``train sft``: NLL on response tokens, from filtered generations (rejection-sampling
fine-tuning) or from a file in one of TRL's layouts (see :mod:`offline_rlhf.layouts`:
prompt/completion, messages, text; chat through the policy's chat template, the loss
on the answer turns only).

Examples are grouped by length into token-budget micro-batches by the shared loop, so
short samples do not pay for long ones' padding (see bench/sft.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..batching import pad
from ..config import opt
from ..errors import InputError
from ..filters import SampleFilter, select
from ..layouts import SFT_LAYOUTS, column_names, column_opt, encode_prompt, sft_examples, sft_tokens
from ..losses.common import token_logps
from ..losses.sft import sft_loss
from ..shards import is_dataset, open_dataset_of, read_rows
from .loop import TrainConfig, fit
from .values import check_finite

GEN_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "sample_index", "response",
               "response_token_ids", "reward", "reward_normalized"]


@dataclasses.dataclass
class SFTTrainConfig(TrainConfig):
    data: str = opt(help="a scored generations dataset (filtered by the options below: "
                    "rejection sampling), or a JSONL/JSON/Parquet file in a TRL layout: "
                    f"{SFT_LAYOUTS} (text or chat messages; chat goes through the policy's chat "
                    "template and only the answer turns are trained)")
    top_k: int = opt(0, "generations: keep the k best samples per prompt (0: all)")
    threshold: float | None = opt(None, "generations: keep samples with reward >= this")
    percentile: float | None = opt(None, "generations: keep samples at or above this per-prompt "
                                   "reward percentile (0-100)")
    max_per_prompt: int = opt(0, "generations: at most this many samples per prompt (0: no cap)")
    reward_column: str = opt("reward", "reward | reward_normalized")
    prompt_column: str = column_opt("prompt")
    completion_column: str = column_opt("completion")
    messages_column: str = column_opt("messages")
    max_tokens: int = opt(2048, "prompt + response tokens kept (prompt cut from the left)")


def _examples_from_generations(cfg, tokenizer):
    ds = open_dataset_of(cfg.data, "generations", "train sft")
    rows = ds.read(columns=GEN_COLUMNS).to_pylist()
    kept, stats = select(rows, SampleFilter(top_k=cfg.top_k, threshold=cfg.threshold,
                                            percentile=cfg.percentile,
                                            max_per_prompt=cfg.max_per_prompt,
                                            reward_column=cfg.reward_column))
    prompts = [rows[i]["prompt_token_ids"] or encode_prompt(tokenizer, rows[i]["prompt"]) for i in kept]
    responses = [rows[i]["response_token_ids"] for i in kept]
    return prompts, responses, [[1] * len(r) for r in responses], stats


def check_sft_source(cfg) -> list[dict] | None:
    """Before any model loads: a generations dataset (None), or a file's checked examples."""
    if is_dataset(cfg.data):
        open_dataset_of(cfg.data, "generations", "train sft")
        return None
    rows, columns = read_rows(cfg.data)
    return sft_examples(rows, columns, cfg.data, column_names(cfg))


def _examples_from_file(cfg, tokenizer, examples):
    prompts, responses, masks = [], [], []
    for i, ex in enumerate(examples):
        p, r, m = sft_tokens(tokenizer, ex, cfg.data, i)
        prompts.append(p)
        responses.append(r)
        masks.append(m)
    layout = ("prompt_completion" if "prompt" in examples[0] else next(iter(examples[0]))) \
        if examples else "none"
    return prompts, responses, masks, {"rows": len(examples), "kept": len(examples), "layout": layout}


class SFTTask:
    name = "sft"

    def __init__(self, cfg: SFTTrainConfig, tokenizer, examples: list[dict] | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        if examples is None and not is_dataset(cfg.data):
            examples = check_sft_source(cfg)
        prompts, responses, masks, self.stats = (
            _examples_from_generations(cfg, tokenizer) if examples is None
            else _examples_from_file(cfg, tokenizer, examples))
        if not prompts:
            raise InputError(f"{cfg.data}: no examples left after filtering ({self.stats})")
        truncated = 0
        self.prompts, self.responses, self.masks = [], [], []
        for p, full, mask in zip(prompts, responses, masks):
            r = full[:cfg.max_tokens - 1]
            room = cfg.max_tokens - len(r)
            truncated += len(r) < len(full) or len(p) > room
            self.prompts.append(p[-room:] if room < len(p) else p)
            self.responses.append(r)
            self.masks.append(mask[:len(r)])
        self.stats["truncated"] = truncated

    def lengths(self) -> np.ndarray:
        return np.array([len(p) + len(r) for p, r in zip(self.prompts, self.responses)])

    def collate(self, indices: list[int], device) -> dict:
        seqs = [self.prompts[i] + self.responses[i] for i in indices]
        masks = [[0] * len(self.prompts[i]) + self.masks[i] for i in indices]
        ids, attn = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        resp, _ = pad(masks, 0, "right", device)
        return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss(token_logps(logits, batch["input_ids"]), batch["response_mask"])


def train_sft(cfg: SFTTrainConfig) -> dict:
    examples = check_sft_source(cfg)
    check_finite(cfg.data, "generations", [cfg.reward_column], "train sft")
    # the summary's "data" is the task's stats
    return fit(cfg, lambda model, tokenizer, acc: SFTTask(cfg, tokenizer, examples))
