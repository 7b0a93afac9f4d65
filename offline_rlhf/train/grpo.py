"""``train grpo``: off-policy group policy gradient (GRPO, Dr. GRPO, RLOO,
REINFORCE++-baseline) on stored, scored generations.

A group is the K samples of one prompt in one dataset. Everything the objective needs
is in the shard: rewards (for advantages), the behaviour log-prob of every sampled
token (for the importance ratio) and, when the KL term is on, the reference log-probs
(no reference model is ever loaded). Rows without behaviour log-probs are refused:
assuming a ratio of 1 would silently turn stale data into plain REINFORCE.

Advantages are computed once, over the whole dataset, before training. For stored
data this is exact: an advantage depends only on the rewards of its group (and, for
REINFORCE++, on statistics of the whole rollout batch, here the training set), and the
rewards do not change during training. So batches need not keep groups whole: every
response is an example of its own, and the shared loop's seeded, length-grouped
batching, accumulation and DDP apply unchanged. Groups whose rewards are all equal are
dropped up front (DAPO's dynamic sampling) and counted.

The policy's log-probs are taken at each row's sampling temperature (from its
``decoding`` column), the distribution ``behaviour_logps`` describes, so a freshly
sampled dataset starts at ratio 1. Top-k / top-p truncation is not re-applied: the
ratio of a truncated sample then includes the mass the sampler cut away (documented,
warned). Rows longer than ``max_tokens`` are left out, never cut: cutting the prompt
would change every log-prob the ratio compares.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pyarrow.compute as pc
import torch

from ..batching import pad
from ..config import opt
from ..errors import InputError, located
from ..losses.grpo import (
    ADVANTAGES,
    AGGREGATIONS,
    IMPORTANCE,
    OBJECTIVES,
    advantages,
    grpo_loss,
    informative_groups,
)
from ..shards import open_dataset
from .loop import TrainConfig, fit
from .values import check_finite

COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "response_token_ids", "behaviour_logps",
           "reward", "ref_logps", "decoding"]


@dataclasses.dataclass
class GRPOTrainConfig(TrainConfig):
    previous_data: list[str] = opt([], "more scored generations datasets (earlier nights) trained on "
                                   "with data; their staleness is corrected with their own stored "
                                   "behaviour log-probs")
    replay: str | None = opt(None, "human data mixed in as an SFT term (a file train sft reads: "
                             "prompt/completion, messages or text); see train/replay.py")
    replay_fraction: float = opt(0.1, "with replay: the share of the examples that are replay rows")
    advantage: str = opt("grpo", f"advantage estimator: {' | '.join(ADVANTAGES)}")
    advantage_eps: float = opt(1e-4, "added to the std in grpo and reinforce_pp advantages")
    drop_equal_groups: bool = opt(True, "leave out groups whose rewards are all equal (DAPO dynamic "
                                  "sampling); off, they still add their KL term")
    objective: str = opt("clip", "clip (PPO clipped surrogate) | truncate (policy gradient with "
                         "truncated importance weights min(ratio, ratio_cap))")
    importance: str = opt("token", "token | sequence (GSPO: length-normalised sequence ratio) | none "
                          "(ratio held at 1: treats the data as on-policy; for ablations)")
    clip_low: float = opt(0.2, "clip: lower bound 1 - clip_low")
    clip_high: float = opt(0.2, "clip: upper bound 1 + clip_high (DAPO's clip-higher: 0.28)")
    ratio_cap: float | None = opt(None, "C: clip: cap of the unclipped ratio (dual clip; none when "
                                  "unset); truncate: cap of the importance weights (1 when unset)")
    band_low: float = opt(0.0, "tokens whose ratio is below this leave the policy term")
    band_high: float | None = opt(None, "tokens whose ratio is above this leave the policy term")
    kl_coef: float = opt(0.0, "beta of the k3 KL to the reference, from the stored ref_logps "
                         "(0: off; > 0 needs the column, filled by `offline-rlhf logprobs`)")
    aggregation: str = opt("token_mean", f"loss aggregation: {' | '.join(AGGREGATIONS)} (constant: "
                           "Dr. GRPO's sum over normalizer_tokens)")
    normalizer_tokens: int = opt(0, "L of the constant aggregation (0: the largest max_new_tokens "
                                 "of the rows' decoding settings)")
    temperature: float | None = opt(None, "divide the policy's logits by this (unset: each row's "
                                    "sampling temperature, under which behaviour_logps were taken)")
    max_tokens: int = opt(2048, "prompt + response tokens; longer rows are left out (counted)")

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("advantage", ADVANTAGES), ("objective", OBJECTIVES),
                              ("importance", IMPORTANCE), ("aggregation", AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        checks = [("clip_low", 0 <= self.clip_low < 1, "must be in [0, 1)"),
                  ("clip_high", self.clip_high >= 0, "must be >= 0"),
                  ("ratio_cap", self.ratio_cap is None or self.ratio_cap > 0, "must be > 0"),
                  ("band_high", self.band_high is None or self.band_high > self.band_low,
                   "must be > band_low"),
                  ("band_low", self.band_low >= 0, "must be >= 0"),
                  ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
                  ("advantage_eps", self.advantage_eps >= 0, "must be >= 0"),
                  ("normalizer_tokens", self.normalizer_tokens >= 0, "must be >= 0"),
                  ("temperature", self.temperature is None or self.temperature > 0, "must be > 0"),
                  ("max_tokens", self.max_tokens >= 2, "must be >= 2"),
                  ("replay_fraction", 0 < self.replay_fraction < 1, "must be in (0, 1)")]
        for name, ok, why in checks:
            if not ok:
                raise InputError(f"{name}: {why}, got {getattr(self, name)!r}")

    @property
    def cap(self) -> float:
        if self.ratio_cap is not None:
            return self.ratio_cap
        return 1.0 if self.objective == "truncate" else math.inf


def _first_null(table, column: str) -> int | None:
    nulls = pc.is_null(table.column(column))
    return int(pc.index(nulls, True).as_py()) if pc.any(nulls).as_py() else None


def read_source(path: str, source: int, cfg: GRPOTrainConfig, tokenizer) -> list[dict]:
    """The rows of one scored generations dataset, checked: each a dict with ``source``."""
    ds = open_dataset(path, require_complete=True)
    if ds.schema_name != "generations":
        raise InputError(f"{path}: is a {ds.schema_name} dataset; train grpo reads scored generations")
    rows = []
    for entry, file in zip(ds.shards, ds.files()):
        table = ds.read_shard(entry["chunk"], columns=COLUMNS)
        needs = [("reward", "unscored: run `offline-rlhf score` first"),
                 ("behaviour_logps", "no behaviour log-probs: off-policy training needs the sampling "
                  "policy's per-token log-probs (written by `offline-rlhf generate`); a ratio of 1 "
                  "is never assumed")]
        if cfg.kl_coef > 0:
            needs.append(("ref_logps", "no reference log-probs for kl_coef > 0: run the reference "
                          "log-probs stage (`offline-rlhf logprobs`) on it, or set kl_coef 0"))
        if cfg.temperature is None:
            needs.append(("decoding", "no decoding settings, so the sampling temperature is unknown: "
                          "set --temperature"))
        for column, why in needs:
            bad = _first_null(table, column)
            if bad is not None:
                raise InputError(located(why, file, bad, column))
        for r in table.to_pylist():
            if r["prompt_token_ids"] is None:
                r["prompt_token_ids"] = tokenizer(r["prompt"])["input_ids"]
            r["source"] = source
            rows.append(r)
    return rows


def _temperature(row: dict, cfg: GRPOTrainConfig) -> float:
    if cfg.temperature is not None:
        return cfg.temperature
    d = row["decoding"]
    return 1.0 if d["greedy"] else float(d["temperature"])


def plan_examples(rows: list[dict], cfg: GRPOTrainConfig) -> tuple[list[int], np.ndarray, dict]:
    """Group ids, advantages over the whole dataset, the rows kept, and counts."""
    keys: dict[tuple, int] = {}
    group = torch.tensor([keys.setdefault((r["source"], r["prompt_id"]), len(keys)) for r in rows])
    rewards = torch.tensor([float(r["reward"]) for r in rows], dtype=torch.float64)
    informative = informative_groups(rewards, group).numpy()
    use = informative if cfg.drop_equal_groups else np.ones(len(rows), dtype=bool)
    adv = np.zeros(len(rows))
    if use.any():
        idx = np.flatnonzero(use)
        dense = torch.unique(group[idx], return_inverse=True)[1]
        adv[idx] = advantages(rewards[idx], dense, cfg.advantage, cfg.advantage_eps).numpy()
    fits = np.array([len(r["prompt_token_ids"]) + len(r["response_token_ids"]) <= cfg.max_tokens
                     and len(r["response_token_ids"]) > 0 for r in rows])
    kept = np.flatnonzero(use & fits).tolist()
    groups_informative = len(set(group[informative].tolist()))
    stats = {"rows": len(rows), "groups": len(keys), "groups_informative": groups_informative,
             "groups_dropped": len(keys) - groups_informative if cfg.drop_equal_groups else 0,
             "rows_dropped_overlong": int((use & ~fits).sum()), "examples": len(kept),
             "sources": len({r["source"] for r in rows}),
             "advantage_mean": float(adv[kept].mean()) if kept else 0.0,
             "advantage_std": float(adv[kept].std()) if kept else 0.0}
    return kept, adv, stats


class GRPOTask:
    name = "grpo"

    def __init__(self, cfg: GRPOTrainConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        rows = [r for s, path in enumerate([cfg.data, *cfg.previous_data])
                for r in read_source(path, s, cfg, tokenizer)]
        kept, adv, self.stats = plan_examples(rows, cfg)
        if not kept:
            raise InputError(f"{cfg.data}: no examples to train on: every group has equal rewards "
                             f"or is too long ({self.stats})")
        rows = [rows[i] for i in kept]
        self.advantages = adv[kept]
        self.prompts = [list(r["prompt_token_ids"]) for r in rows]
        self.responses = [list(r["response_token_ids"]) for r in rows]
        self.behaviour = [list(r["behaviour_logps"]) for r in rows]
        self.ref = [list(r["ref_logps"]) if r["ref_logps"] is not None else None for r in rows]
        self.temperatures = np.array([_temperature(r, cfg) for r in rows])
        truncated = sum(1 for r in rows if r["decoding"] and not r["decoding"]["greedy"] and
                        (r["decoding"]["top_p"] < 1 or r["decoding"]["top_k"] > 0))
        self.stats["rows_top_k_or_top_p"] = truncated
        if truncated and cfg.importance != "none":
            warnings.warn(f"{truncated} rows were sampled with top-k/top-p: their behaviour log-probs "
                          "are of the truncated distribution, so their ratio to the untruncated "
                          "policy is below 1 even before training", stacklevel=2)
        self.length = self._constant_length(rows) if cfg.aggregation == "constant" else None
        self._add_replay(len(rows))

    def _add_replay(self, n_policy: int) -> None:
        """Replay rows after the policy-gradient ones (train/replay.py): advantage 0, no
        part in the policy term (mask 0); their own loss mask for the SFT term."""
        cfg, self.replay_masks = self.cfg, [None] * len(self.prompts)
        if not cfg.replay:
            self.stats["replay_examples"] = 0
            return
        from .replay import replay_tokens
        prompts, responses, masks = replay_tokens(cfg.replay, self.tokenizer, n_policy,
                                                  cfg.replay_fraction, cfg.seed, cfg.max_tokens)
        self.prompts += prompts
        self.responses += responses
        self.replay_masks += masks
        self.behaviour += [[0.0] * len(r) for r in responses]
        self.ref += [[0.0] * len(r) for r in responses]
        self.advantages = np.concatenate([self.advantages, np.zeros(len(responses))])
        self.temperatures = np.concatenate([self.temperatures, np.ones(len(responses))])
        self.stats["replay_examples"] = len(responses)

    def _constant_length(self, rows: list[dict]) -> float:
        if self.cfg.normalizer_tokens:
            return float(self.cfg.normalizer_tokens)
        budgets = [r["decoding"]["max_new_tokens"] for r in rows if r["decoding"]]
        return float(max(budgets) if budgets else max(len(x) for x in self.responses))

    def lengths(self) -> np.ndarray:
        return np.array([len(p) + len(r) for p, r in zip(self.prompts, self.responses)])

    def begin_step(self, examples: list[int]) -> None:
        """token_mean: the step's mean response length (the same on every process)."""
        if self.cfg.aggregation == "token_mean":
            self.length = float(np.mean([len(self.responses[i]) for i in examples
                                         if self.replay_masks[i] is None] or [1]))

    def collate(self, indices: list[int], device) -> dict:
        ids, attn = pad([self.prompts[i] + self.responses[i] for i in indices],
                        self.tokenizer.pad_token_id, "right", device)
        width = max(len(self.responses[i]) for i in indices)
        shape = (len(indices), width)
        pred, target = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
        mask, beh, ref = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        replay = torch.zeros(shape)
        for b, i in enumerate(indices):
            n_p, n_r = len(self.prompts[i]), len(self.responses[i])
            pred[b, :n_r] = torch.arange(n_p - 1, n_p - 1 + n_r)
            target[b, :n_r] = torch.tensor(self.responses[i])
            if self.replay_masks[i] is None:
                mask[b, :n_r] = 1.0
            else:
                replay[b, :n_r] = torch.tensor(self.replay_masks[i], dtype=torch.float32)
            beh[b, :n_r] = torch.tensor(self.behaviour[i])
            if self.ref[i] is not None:
                ref[b, :n_r] = torch.tensor(self.ref[i])
        has_ref = all(self.ref[i] is not None for i in indices)
        return {"input_ids": ids, "attention_mask": attn, "pred": pred.to(device),
                "target": target.to(device), "mask": mask.to(device), "behaviour": beh.to(device),
                "ref": ref.to(device) if has_ref else None, "replay_mask": replay.to(device),
                "advantages": torch.tensor(self.advantages[indices], dtype=torch.float32, device=device),
                "temperature": torch.tensor(self.temperatures[indices], dtype=torch.float32, device=device)}

    def policy_logps(self, model, batch: dict) -> torch.Tensor:
        """Per response token: log-prob under the policy at the row's temperature ``[B, T]``."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(len(batch["pred"]), device=batch["pred"].device)[:, None]
        picked = logits[rows, batch["pred"]].float() / batch["temperature"][:, None, None]
        return picked.gather(-1, batch["target"][..., None])[..., 0] - torch.logsumexp(picked, -1)

    def loss(self, model, batch: dict):
        cfg = self.cfg
        logps = self.policy_logps(model, batch)
        losses, metrics = grpo_loss(
            logps, batch["behaviour"], batch["advantages"], batch["mask"], ref_logps=batch["ref"],
            kl_coef=cfg.kl_coef, objective=cfg.objective, importance=cfg.importance,
            eps_low=cfg.clip_low, eps_high=cfg.clip_high, ratio_cap=cfg.cap, band_low=cfg.band_low,
            band_high=math.inf if cfg.band_high is None else cfg.band_high,
            aggregation=cfg.aggregation, length=self.length)
        metrics["advantage/max"] = metrics["advantage/min"] = metrics["advantage"]
        if cfg.replay:   # the SFT term of replay rows: mean token NLL of the completion
            rm = batch["replay_mask"]
            is_replay = (rm.sum(-1) > 0).float()
            nll = -(logps * rm).sum(-1) / rm.sum(-1).clamp(min=1)
            losses = losses + nll
            metrics["replay_rows"], metrics["replay_nll"] = is_replay, nll.detach()
        return losses, metrics

    def finish_record(self, record: dict) -> None:
        """Turn the step's per-sequence sums into token means, fractions and the ESS."""
        tokens = max(record["tokens"], 1e-12)
        for total, name in (("clipped", "clip_fraction"), ("masked", "masked_fraction"),
                            ("staleness_kl", "staleness_kl"), ("kl_ref", "kl_ref"),
                            ("ratio", "is_weight/mean")):
            if total in record:
                record[name] = record.pop(total) / tokens
        ratio_sq = record.pop("ratio_sq") / tokens
        record["is_weight/ess"] = record["is_weight/mean"] ** 2 / max(ratio_sq, 1e-12)
        record["is_weight/max"] = record.pop("ratio/max")
        record["advantage/mean"] = record.pop("advantage")
        record["groups_dropped"] = self.stats["groups_dropped"]
        if "replay_rows" in record:   # the step's share of replay rows, and their mean NLL
            record["replay_fraction"] = record.pop("replay_rows")
            record["replay_nll"] = record.pop("replay_nll") / max(record["replay_fraction"], 1e-12)


def train_grpo(cfg: GRPOTrainConfig) -> dict:
    """Train; the summary's ``data`` holds the task's counts (groups dropped, examples...).
    Rewards and log-probs are checked finite first: one NaN reward would drop its group."""
    columns = ["reward", "behaviour_logps"] + (["ref_logps"] if cfg.kl_coef > 0 else [])
    for path in [cfg.data, *cfg.previous_data]:
        check_finite(path, "generations", columns, "train grpo")
    return fit(cfg, lambda model, tokenizer, acc: GRPOTask(cfg, tokenizer))
