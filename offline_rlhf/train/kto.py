"""``train kto``: KTO on unpaired feedback, single completions labelled desirable or not.

Examples come from (see :mod:`.kto_data`) scored generations (labels from the reward: a
threshold, or the top / bottom fraction of each prompt's group), pairs (chosen desirable,
rejected undesirable) or a TRL unpaired file (``prompt``, ``completion``, ``label``).

Reference log-probs come from the stored column (``ref_logps_sum``, or the pairs'
``*_ref_logps_sum``). KTO's reference point z0 also needs the reference on *mismatched*
(prompt, completion) pairs, which nothing stores: each example gets a fixed partner
completion from another prompt, and their reference sums are computed once before the
first step (``reference.py``: cached in the output, keyed by content) with ``--reference``,
by default the policy itself (no second model). Each step, z0 is the mean over the step's
examples of ``log pi - log pi_ref`` on their mismatched pairs (a no-grad forward), clamped at 0.

``--loss bco`` needs no mismatched pairs: its reward shift delta is the running mean of the
rewards ``beta r`` of every example trained on before the step (``losses.kto.bco_delta``,
updated from each step's reduced metrics, so every process holds the same value). At
``--save-steps`` it is written to ``OUTPUT/bco_delta.json`` by step, and a resumed run
starts from its checkpoint's value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..batching import pad
from ..config import opt
from ..errors import InputError
from ..losses.common import masked_sums, token_logps
from ..losses.kto import KTO_LOSS_TYPES, balanced_weights, bco_delta, kto_kl, kto_loss
from ..models import check_model_dir, frozen_forward
from ..storage import read_json_file, write_json_atomic
from .checkpoint import find_resume
from .defaults import beta_of, beta_text
from .kto_data import check_kto_source, kl_partners, read_examples
from .loop import TrainConfig, fit, micro_batches

DELTA_FILE = "bco_delta.json"


@dataclasses.dataclass
class KTOTrainConfig(TrainConfig):
    data: str = opt(help="scored generations dataset, pairs (dataset or preference file: chosen "
                    "desirable, rejected undesirable), or a TRL unpaired file (JSONL/JSON/Parquet "
                    "with prompt, completion, label)")
    loss: str = opt("kto", f"loss: {' | '.join(KTO_LOSS_TYPES)} (bco: Binary Classifier "
                    "Optimization, its reward shift the running mean reward)")
    beta: float | None = opt(None, "strength of the KL regularisation; " + beta_text("kto"))
    desirable_weight: float | None = opt(None, "lambda_D; default: the classes balance "
                                         "(lambda_D n_D = lambda_U n_U, the minority weighted up)")
    undesirable_weight: float | None = opt(None, "lambda_U; default: the classes balance, as for "
                                           "--desirable-weight (one given: the other balances it)")
    desirable_threshold: float | None = opt(None, "generations: reward >= this is desirable, below "
                                            "it undesirable (default: --group-fraction)")
    group_fraction: float = opt(0.5, "generations without a threshold: in each prompt's group the top "
                                "fraction is desirable and the bottom fraction undesirable (ties "
                                "with the other end dropped; groups of one reward dropped)")
    reward_column: str = opt("reward", "generations: reward | reward_normalized")
    reference: str | None = opt(None, "reference model for what is not stored: the mismatched "
                                "pairs of KTO's reference point, and rows without reference "
                                "log-probs (default: the policy, run before its first step or "
                                "with its LoRA adapter off: no second model)")
    reference_bits: int | None = opt(None, "4 | 8 | 0 (unquantized): how a reference is loaded; "
                                     "default: as --bits")
    max_prompt_tokens: int = opt(1024, "prompts longer than this keep their last tokens")
    max_completion_tokens: int = opt(1024, "completions longer than this keep their first tokens")

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in KTO_LOSS_TYPES:
            raise InputError(f"loss: must be one of {', '.join(KTO_LOSS_TYPES)}, got {self.loss!r}")
        if self.beta is not None and self.beta <= 0:
            raise InputError(f"beta: must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise InputError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 < self.group_fraction <= 0.5:
            raise InputError(f"group_fraction: must be in (0, 0.5], got {self.group_fraction}")
        if self.reward_column not in ("reward", "reward_normalized"):
            raise InputError(f"reward_column: must be reward or reward_normalized, got {self.reward_column!r}")
        if self.reference_bits not in (None, 0, 4, 8):
            raise InputError(f"reference_bits: must be 0, 4 or 8, got {self.reference_bits}")


class KTOTask:
    name = "kto"
    layout = "rows"

    def __init__(self, cfg: KTOTrainConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        ex = read_examples(cfg, tokenizer)
        self.prompts, self.completions = ex["prompts"], ex["completions"]
        self.desirable = np.array(ex["desirable"], dtype=bool)
        self.stats = ex["stats"]
        n_d = int(self.desirable.sum())
        self.weights = balanced_weights(n_d, len(self.desirable) - n_d, cfg.desirable_weight,
                                        cfg.undesirable_weight)
        self.stats.update(examples=len(self.desirable), desirable=n_d,
                          undesirable=len(self.desirable) - n_d, desirable_weight=self.weights[0],
                          undesirable_weight=self.weights[1])
        self.ref = np.array([np.nan if r is None else r for r in ex["ref"]], dtype=np.float64)
        self.partner = kl_partners(ex["prompt_keys"]) if cfg.loss == "kto" else None
        self.ref_kl = np.full(len(self.ref), np.nan)
        missing = np.isnan(self.ref)
        self.need = list(range(len(self.ref))) if cfg.loss == "kto" else np.flatnonzero(missing).tolist()
        self.stats.update(ref_logps_stored=int((~missing).sum()))
        self.reference_key = {"kto_examples": ex["key"], "kto_loss": cfg.loss}
        self.kl = torch.zeros(())
        self.delta, self.delta_history = (0.0, 0), {}     # BCO: (running mean reward, count)

    def prepare(self, model, acc) -> None:
        """Reference sums of the mismatched pairs (and of rows without stored ones), once."""
        self.model, self.acc = model, acc
        if not self.need:
            return
        from .reference import fill_reference
        values, counts = fill_reference(self, model, acc)
        missing = np.isnan(self.ref[self.need])
        self.ref[np.array(self.need)[missing]] = values[missing, 0]
        self.ref_kl[self.need] = values[:, 1]
        counts["ref_logps_computed"] = int(missing.sum())
        counts["kl_pairs_computed"] = len(self.need) if self.partner is not None else 0
        self.stats.update(counts)

    def _kl_completion(self, i: int) -> list[int]:
        return self.completions[self.partner[i]] if self.partner is not None else self.completions[i]

    def _sums(self, model, rows: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
        seqs = [p + c for p, c in rows]
        comp = [[0] * len(p) + [1] * len(c) for p, c in rows]
        ids, attn = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        cmask, _ = pad(comp, 0, "right", device)
        logits = model(input_ids=ids, attention_mask=attn).logits
        return masked_sums(token_logps(logits, ids), cmask)[0]

    @torch.no_grad()
    def reference_sums(self, model, indices: list[int], acc, bar=None) -> np.ndarray:
        """``[len(indices), 2]``: the reference sums of each example and of its mismatched pair."""
        out = {}
        for mb in self._passes(indices, acc):
            with acc.autocast():
                own = self._sums(model, [(self.prompts[i], self.completions[i]) for i in mb], acc.device)
                kl = self._sums(model, [(self.prompts[i], self._kl_completion(i)) for i in mb], acc.device)
            out.update(zip(mb, zip(own.double().tolist(), kl.double().tolist())))
            if bar is not None:
                bar.update(len(mb))
        return np.array([out[i] for i in indices], dtype=np.float64).reshape(-1, 2)

    def _passes(self, indices: list[int], acc) -> list[list[int]]:
        return micro_batches(indices, self.lengths(), self.cfg.micro_batch_size,
                             self.cfg.max_tokens_per_micro_batch, 1)

    def lengths(self) -> np.ndarray:
        return np.array([len(p) + len(c) for p, c in zip(self.prompts, self.completions)])

    def begin_step(self, examples: list[int]) -> None:
        """z0 for this step: the policy on the step's mismatched pairs, no gradient (every
        process computes it over the whole step, so all agree without communicating)."""
        if self.partner is None:
            return
        sums = []
        with torch.no_grad(), frozen_forward(self.model):
            for mb in self._passes(examples, self.acc):
                with self.acc.autocast():
                    rows = [(self.prompts[i], self._kl_completion(i)) for i in mb]
                    sums.append((self._sums(self.model, rows, self.acc.device).double(),
                                 torch.tensor(self.ref_kl[mb], device=self.acc.device)))
        self.kl = kto_kl(torch.cat([s for s, _ in sums]), torch.cat([r for _, r in sums]))

    def collate(self, indices: list[int], device) -> dict:
        rows = [(self.prompts[i], self.completions[i]) for i in indices]
        seqs = [p + c for p, c in rows]
        ids, attn = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        cmask, _ = pad([[0] * len(p) + [1] * len(c) for p, c in rows], 0, "right", device)
        return {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask,
                "ref": torch.tensor(self.ref[indices], device=device),
                "desirable": torch.tensor(self.desirable[indices], device=device)}

    def loss(self, model, batch: dict):
        beta = beta_of(self.cfg)                  # before the forward: an unset beta costs none
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums, _ = masked_sums(token_logps(logits, batch["input_ids"]), batch["completion_mask"])
        return kto_loss(sums.double(), batch["ref"], batch["desirable"], self.kl, beta=beta,
                        desirable_weight=self.weights[0], undesirable_weight=self.weights[1],
                        loss_type=self.cfg.loss, delta=self.delta[0])

    def finish_record(self, record: dict) -> None:
        """Class means from the per-example sums: ``rewards/chosen`` (desirable) and
        ``rewards/rejected`` (undesirable), as TRL names them, and their margin."""
        d = record.get("desirable", 0.0)
        for side, frac, key in (("chosen", d, "rewards/desirable_sum"),
                                ("rejected", 1 - d, "rewards/undesirable_sum")):
            total = record.pop(key, None)
            if total is not None and frac > 0:
                record[f"rewards/{side}"] = total / frac
        if "rewards/chosen" in record and "rewards/rejected" in record:
            record["rewards/margins"] = record["rewards/chosen"] - record["rewards/rejected"]
        if self.cfg.loss == "bco":
            self._update_delta(record)

    def _update_delta(self, record: dict) -> None:
        """BCO: the step's mean reward joins the running mean (kept by step at checkpoints)."""
        self.delta = bco_delta(*self.delta, record["rewards"], record["examples"])
        step, every = record["step"], self.cfg.save_steps
        if every and step % every == 0 and self.acc.is_main_process:
            self.delta_history[str(step)] = list(self.delta)
            write_json_atomic(Path(self.cfg.output) / DELTA_FILE, self.delta_history)

    def resume_delta(self) -> None:
        """BCO: the running mean at the checkpoint this run resumes from, if any."""
        ck = find_resume(Path(self.cfg.output), self.cfg.resume)
        if ck is None:
            return
        step = str(json.loads((ck / "state.json").read_text())["step"])
        path = ck.parent.parent / DELTA_FILE
        history = read_json_file(path) or {}
        if step not in history:
            raise InputError(f"{path}: no BCO reward shift recorded for step {step}, the step of "
                             f"{ck}: cannot resume exactly (--overwrite starts afresh)")
        self.delta_history = {k: v for k, v in history.items() if int(k) <= int(step)}
        self.delta = (float(history[step][0]), int(history[step][1]))


def train_kto(cfg: KTOTrainConfig) -> dict:
    check_kto_source(cfg)
    if cfg.reference:
        check_model_dir(cfg.reference, "reference model")
    else:
        cfg.reference = cfg.policy
    holder = {}

    def factory(model, tokenizer, acc):
        holder["task"] = KTOTask(cfg, tokenizer)
        holder["task"].prepare(model, acc)
        if cfg.loss == "bco":
            holder["task"].resume_delta()
        return holder["task"]

    summary = fit(cfg, factory)
    summary["data"] = holder["task"].stats
    return summary
