"""``train rm``: a Bradley-Terry reward model on a pairs dataset.

The model is a one-label sequence classifier (from a causal LM directory a new
scalar head is added); its input for a (prompt, response) is exactly what
``offline-rlhf score`` feeds it (``rm_input_ids``) and the reward is read at the last
real token (``last_token_rewards``), so the saved ``OUTPUT/final`` scores shards the
way it was trained. A deterministic held-out split (by pair id) reports pairwise
accuracy at the end of training.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from ..batching import pad
from ..config import opt
from ..errors import InputError
from ..losses.reward import bradley_terry_loss
from ..pairs import check_pairs_source, read_pairs
from ..rewards.reward_model import last_token_rewards, rm_input_ids
from .loop import TrainConfig, fit
from .values import check_finite


@dataclasses.dataclass
class RMTrainConfig(TrainConfig):
    data: str = opt(help="pairs dataset, or a preference file (JSONL/JSON/Parquet in any layout "
                    "`import-pairs` reads) imported on the fly")
    use_margin: bool = opt(False, "subtract the pairs' margin column inside the sigmoid (Llama 2)")
    center_coef: float = opt(0.0, "reward-centering weight: c * (r_chosen + r_rejected)^2")
    max_length: int = opt(2048, "input tokens kept (the last ones), as `score` does")
    eval_fraction: float = opt(0.1, "share of pairs held out (by pair id) for pairwise accuracy")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.eval_fraction < 1:
            raise InputError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")


def held_out(pair_id: str, fraction: float) -> bool:
    return int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def load_reward_for_training(path, *, dtype="float32", bits=None, lora=None, device=None,
                             train=True, trust_remote_code=False):
    """A one-label sequence classifier from a reward-model or causal-LM directory."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..models import _load, check_model_dir, load_tokenizer
    check_model_dir(path, "policy")
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    cfg.num_labels = 1  # transformers 5 refuses from_pretrained(..., num_labels=1) with id2label set
    if cfg.pad_token_id is None:
        cfg.pad_token_id = load_tokenizer(path, trust_remote_code).pad_token_id

    class _WithConfig:  # _load passes kwargs through to from_pretrained
        @staticmethod
        def from_pretrained(p, **kw):
            return AutoModelForSequenceClassification.from_pretrained(p, config=cfg, **kw)
    return _load(_WithConfig, path, dtype=dtype, bits=bits, lora=lora, device=device, train=train,
                 trust_remote_code=trust_remote_code, what="reward model")


class RMTask:
    name = "rm"

    def __init__(self, cfg: RMTrainConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        rows = read_pairs(cfg.data, tokenizer, ["pair_id", "prompt", "chosen", "rejected", "margin"],
                          "train rm")
        if cfg.use_margin and any(r["margin"] is None for r in rows):
            raise InputError(f"{cfg.data}: use_margin is set but some pairs have no margin")
        train, self.eval_rows = [], []
        for r in rows:
            (self.eval_rows if held_out(r["pair_id"], cfg.eval_fraction) else train).append(r)
        if not train:
            raise InputError(f"{cfg.data}: no training pairs left after the held-out split")
        self.chosen, cut_c = rm_input_ids(tokenizer, [r["prompt"] for r in train],
                                          [r["chosen"] for r in train], cfg.max_length)
        self.rejected, cut_r = rm_input_ids(tokenizer, [r["prompt"] for r in train],
                                            [r["rejected"] for r in train], cfg.max_length)
        self.margin = np.array([r["margin"] or 0.0 for r in train], dtype=np.float32)
        self.stats = {"train_pairs": len(train), "eval_pairs": len(self.eval_rows),
                      "inputs_truncated": cut_c + cut_r}

    def lengths(self) -> np.ndarray:
        return np.array([2 * max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)])

    def collate(self, indices: list[int], device) -> dict:
        ids, mask = pad([self.chosen[i] for i in indices] + [self.rejected[i] for i in indices],
                        self.tokenizer.pad_token_id, "right", device)
        return {"input_ids": ids, "attention_mask": mask,
                "margin": torch.tensor(self.margin[indices], device=device)}

    def loss(self, model, batch):
        r = last_token_rewards(model, batch["input_ids"], batch["attention_mask"]).float()
        n = len(batch["margin"])
        return bradley_terry_loss(r[:n], r[n:], batch["margin"] if self.cfg.use_margin else None,
                                  self.cfg.center_coef)

    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        if not self.eval_rows:
            return {}
        model.eval()
        prompts = [r["prompt"] for r in self.eval_rows]
        out = {}
        for side in ("chosen", "rejected"):
            seqs, _ = rm_input_ids(self.tokenizer, prompts, [r[side] for r in self.eval_rows],
                                   self.cfg.max_length)
            scores = []
            for i in range(0, len(seqs), self.cfg.micro_batch_size):
                ids, mask = pad(seqs[i:i + self.cfg.micro_batch_size], self.tokenizer.pad_token_id,
                                "right", device)
                scores.append(last_token_rewards(model, ids, mask).float().cpu())
            out[side] = torch.cat(scores).numpy()
        return {"eval/accuracy": float((out["chosen"] > out["rejected"]).mean()),
                "eval/rewards_chosen_mean": float(out["chosen"].mean()),
                "eval/rewards_rejected_mean": float(out["rejected"].mean()),
                "eval/rewards_std": float(np.concatenate([out["chosen"], out["rejected"]]).std())}


def check_start_model(path, trust_remote_code: bool = False) -> None:
    """Before any model loads: a sequence classifier to continue training must be a scalar
    reward model (one label), as ``score`` requires; a causal LM gets a new head."""
    from ..models import check_model_dir, check_reward_model, load_config
    check_model_dir(path, "policy")
    archs = load_config(path, trust_remote_code).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        check_reward_model(path, trust_remote_code)


def train_rm(cfg: RMTrainConfig) -> dict:
    check_start_model(cfg.policy, cfg.trust_remote_code)
    check_pairs_source(cfg.data, "train rm")
    check_finite(cfg.data, "pairs", ["margin"] if cfg.use_margin else [], "train rm")
    holder = {}

    def factory(model, tokenizer, acc):
        holder["task"] = RMTask(cfg, tokenizer)
        return holder["task"]

    # the summary's "data" is the task's stats
    return fit(cfg, factory, model_loader=load_reward_for_training,
               evaluate=lambda model, acc: holder["task"].evaluate(model, acc.device))
