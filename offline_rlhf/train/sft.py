"""``train sft``: NLL on response tokens, from filtered generations (rejection-sampling
fine-tuning) or from plain prompt/completion data.

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
from ..losses.common import token_logps
from ..losses.sft import sft_loss
from ..shards import is_dataset, open_dataset, read_rows
from .loop import TrainConfig, fit

GEN_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "sample_index", "response",
               "response_token_ids", "reward", "reward_normalized"]


@dataclasses.dataclass
class SFTTrainConfig(TrainConfig):
    top_k: int = opt(0, "generations: keep the k best samples per prompt (0: all)")
    threshold: float | None = opt(None, "generations: keep samples with reward >= this")
    percentile: float | None = opt(None, "generations: keep samples at or above this per-prompt "
                                   "reward percentile (0-100)")
    max_per_prompt: int = opt(0, "generations: at most this many samples per prompt (0: no cap)")
    reward_column: str = opt("reward", "reward | reward_normalized")
    prompt_column: str = opt("prompt", "plain data: the prompt column")
    completion_column: str = opt("completion", "plain data: the completion column")
    max_tokens: int = opt(2048, "prompt + response tokens kept (prompt cut from the left)")


def _examples_from_generations(cfg, tokenizer):
    ds = open_dataset(cfg.data, require_complete=True)
    rows = ds.read(columns=GEN_COLUMNS).to_pylist()
    kept, stats = select(rows, SampleFilter(top_k=cfg.top_k, threshold=cfg.threshold,
                                            percentile=cfg.percentile,
                                            max_per_prompt=cfg.max_per_prompt,
                                            reward_column=cfg.reward_column))
    prompts = [rows[i]["prompt_token_ids"] or tokenizer(rows[i]["prompt"])["input_ids"] for i in kept]
    return prompts, [rows[i]["response_token_ids"] for i in kept], stats


def _examples_from_text(cfg, tokenizer):
    rows, columns = read_rows(cfg.data)
    for col in (cfg.prompt_column, cfg.completion_column):
        if col not in columns:
            raise InputError(f"{cfg.data}, column '{col}': missing (set --prompt-column / --completion-column)")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = tokenizer([str(r[cfg.prompt_column]) for r in rows])["input_ids"]
    responses = [x + eos for x in tokenizer([str(r[cfg.completion_column]) for r in rows],
                                            add_special_tokens=False)["input_ids"]]
    return prompts, responses, {"rows": len(rows), "kept": len(rows)}


class SFTTask:
    name = "sft"

    def __init__(self, cfg: SFTTrainConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        from_gens = is_dataset(cfg.data) and open_dataset(cfg.data).schema_name == "generations"
        prompts, responses, self.stats = (_examples_from_generations if from_gens
                                          else _examples_from_text)(cfg, tokenizer)
        if not prompts:
            raise InputError(f"{cfg.data}: no examples left after filtering ({self.stats})")
        truncated = 0
        self.prompts, self.responses = [], []
        for p, full in zip(prompts, responses):
            r = full[:cfg.max_tokens - 1]
            room = cfg.max_tokens - len(r)
            truncated += len(r) < len(full) or len(p) > room
            self.prompts.append(p[-room:] if room < len(p) else p)
            self.responses.append(r)
        self.stats["truncated"] = truncated

    def lengths(self) -> np.ndarray:
        return np.array([len(p) + len(r) for p, r in zip(self.prompts, self.responses)])

    def collate(self, indices: list[int], device) -> dict:
        seqs = [self.prompts[i] + self.responses[i] for i in indices]
        masks = [[0] * len(self.prompts[i]) + [1] * len(self.responses[i]) for i in indices]
        ids, attn = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        resp, _ = pad(masks, 0, "right", device)
        return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss(token_logps(logits, batch["input_ids"]), batch["response_mask"])


def train_sft(cfg: SFTTrainConfig) -> dict:
    holder = {}

    def factory(model, tokenizer, acc):
        holder["task"] = SFTTask(cfg, tokenizer)
        return holder["task"]

    summary = fit(cfg, factory)
    summary["data"] = holder["task"].stats
    return summary
