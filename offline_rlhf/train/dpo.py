"""``train dpo``: the DPO family on stored pairs, reference log-probs read from the shard.

The reference model is never loaded during training. Pairs without reference
log-probs are refused with the stage to run, unless ``--reference`` is given, in which
case they are computed once before training (and the reference freed).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ..batching import pad
from ..config import opt
from ..errors import InputError
from ..losses.common import masked_sums, token_logps
from ..losses.dpo import LOSS_TYPES, dpo_loss, nll_term
from ..models import check_model_dir
from ..pairs import check_pairs_source, read_pairs
from ..shards import is_dataset, open_dataset_of
from .loop import TrainConfig, fit

PAIR_COLUMNS = ["prompt", "prompt_token_ids", "chosen", "rejected", "chosen_token_ids",
                "rejected_token_ids", "chosen_ref_logps_sum", "rejected_ref_logps_sum"]


@dataclasses.dataclass
class DPOTrainConfig(TrainConfig):
    data: str = opt(help="pairs dataset, or a preference file (JSONL/JSON/Parquet in any layout "
                    "`import-pairs` reads) imported on the fly; pairs need reference log-probs "
                    "or --reference")
    loss: str = opt("sigmoid", f"loss: {' | '.join(LOSS_TYPES)}")
    beta: float = opt(0.1, "strength of the KL regularisation (IPO: tau)")
    label_smoothing: float = opt(0.0, "assumed label-flip rate for cdpo and robust")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin")
    nll_alpha: float = opt(1.0, "weight of the NLL of the chosen response (RPO); 0 is plain DPO, "
                           "which can push chosen log-probs down with the rejected ones")
    reference: str | None = opt(None, "reference model, used only to fill missing reference "
                                "log-probs before training")
    max_prompt_tokens: int = opt(1024, "prompts longer than this keep their last tokens")
    max_completion_tokens: int = opt(1024, "completions longer than this keep their first tokens")
    share_prompt: bool = opt(True, "run each prompt once: pack prompt + chosen + rejected in one "
                             "row with an attention mask that hides chosen from rejected (needs an "
                             "attention implementation that takes 4D masks: eager or sdpa)")

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSS_TYPES:
            raise InputError(f"loss: must be one of {', '.join(LOSS_TYPES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise InputError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise InputError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("cdpo", "robust"):
            raise InputError("label_smoothing: only used by the cdpo and robust losses")


class DPOTask:
    name = "dpo"

    def __init__(self, cfg: DPOTrainConfig, tokenizer, device):
        self.cfg, self.tokenizer = cfg, tokenizer
        rows = read_pairs(cfg.data, tokenizer, PAIR_COLUMNS, "train dpo")
        if not rows:
            raise InputError(f"{cfg.data}: has no pairs")
        self.stats = {"pairs": len(rows), "prompts_truncated": 0, "completions_truncated": 0,
                      "pairs_dropped_truncated": 0, "ref_logps_computed": 0}
        self.prompts, self.chosen, self.rejected, ref_c, ref_r, exact = [], [], [], [], [], []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for r in rows:
            p = r["prompt_token_ids"] or tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            c = r["chosen_token_ids"] or tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] + eos
            j = r["rejected_token_ids"] or tokenizer(r["rejected"], add_special_tokens=False)["input_ids"] + eos
            cut = len(p) > cfg.max_prompt_tokens
            self.stats["prompts_truncated"] += cut
            cut_c = len(c) > cfg.max_completion_tokens or len(j) > cfg.max_completion_tokens
            self.stats["completions_truncated"] += cut_c
            self.prompts.append(p[-cfg.max_prompt_tokens:])
            self.chosen.append(c[:cfg.max_completion_tokens])
            self.rejected.append(j[:cfg.max_completion_tokens])
            ref_c.append(r["chosen_ref_logps_sum"])
            ref_r.append(r["rejected_ref_logps_sum"])
            exact.append(not (cut or cut_c))  # stored sums describe the untruncated sequences
        self.ref_chosen, self.ref_rejected = self._reference(ref_c, ref_r, exact, device)

    def _reference(self, ref_c, ref_r, exact, device):
        if self.cfg.loss == "simpo":
            return np.zeros(len(ref_c)), np.zeros(len(ref_r))
        need = [i for i in range(len(ref_c)) if ref_c[i] is None or ref_r[i] is None or not exact[i]]
        if need and not self.cfg.reference:
            truncated = sum(not e for e in exact)
            if truncated and len(need) == truncated:  # only truncation is the problem: drop them
                self._drop(need)
                self.stats["pairs_dropped_truncated"] = len(need)
                warnings.warn(f"dropped {len(need)} truncated pairs whose stored reference log-probs "
                              "no longer match; pass --reference to recompute them instead", stacklevel=2)
                keep = [i for i in range(len(exact)) if exact[i]]
                return np.array([ref_c[i] for i in keep]), np.array([ref_r[i] for i in keep])
            raise InputError(f"{self.cfg.data}: {len(need)} pairs have no reference log-probs: run "
                             "`offline-rlhf logprobs` on the generations and rebuild the pairs, or pass "
                             "--reference MODEL to compute them before training")
        ref_c, ref_r = list(ref_c), list(ref_r)
        if need:
            from ..logprobs import sequence_logps
            from ..models import load_reference
            ref = load_reference(self.cfg.reference, dtype=self.cfg.dtype, device=str(device),
                                 trust_remote_code=self.cfg.trust_remote_code)
            pads = self.tokenizer.pad_token_id
            for side, out in ((self.chosen, ref_c), (self.rejected, ref_r)):
                lps = sequence_logps(ref, [self.prompts[i] for i in need], [side[i] for i in need],
                                     pad_id=pads, token_budget=self.cfg.max_tokens_per_micro_batch)
                for i, lp in zip(need, lps):
                    out[i] = float(lp.astype(np.float64).sum())
            del ref
            self.stats["ref_logps_computed"] = len(need)
        return np.array(ref_c, dtype=np.float64), np.array(ref_r, dtype=np.float64)

    def _drop(self, drop: list[int]) -> None:
        gone = set(drop)
        for name in ("prompts", "chosen", "rejected"):
            setattr(self, name, [x for i, x in enumerate(getattr(self, name)) if i not in gone])

    def lengths(self) -> np.ndarray:
        if self.cfg.share_prompt:
            return np.array([len(p) + len(c) + len(r)
                             for p, c, r in zip(self.prompts, self.chosen, self.rejected)])
        return np.array([2 * (len(p) + max(len(c), len(r)))
                         for p, c, r in zip(self.prompts, self.chosen, self.rejected)])

    def collate(self, indices: list[int], device) -> dict:
        refs = {"ref_chosen": torch.tensor(self.ref_chosen[indices], device=device),
                "ref_rejected": torch.tensor(self.ref_rejected[indices], device=device)}
        if self.cfg.share_prompt:
            return {**self._collate_shared(indices, device), **refs}
        return {**self._collate_pairs(indices, device), **refs}

    def _collate_shared(self, indices: list[int], device) -> dict:
        """One row per pair: prompt + chosen + rejected (prefix sharing; Wang et al. 2024,
        "Accelerating Direct Preference Optimization with Prefix Sharing").

        Rejected tokens attend to the prompt and to themselves, never to the chosen
        tokens, and take the positions that follow the prompt, so every log-prob equals
        the one of a separate prompt + rejected row. The first rejected token is
        predicted from the prompt's last position, like the first chosen token."""
        seqs, pos, where = [], [], {"row": [], "pred": [], "target": [], "pair": [], "side": []}
        for row, i in enumerate(indices):
            p, c, r = self.prompts[i], self.chosen[i], self.rejected[i]
            n_p, n_c = len(p), len(c)
            seqs.append(p + c + r)
            pos.append(list(range(n_p + n_c)) + list(range(n_p, n_p + len(r))))
            preds = [n_p - 1 + j for j in range(n_c)] + \
                [n_p - 1] + [n_p + n_c + j - 1 for j in range(1, len(r))]
            for side, toks in ((0, c), (1, r)):
                where["target"] += toks
                where["side"] += [side] * len(toks)
            where["pred"] += preds
            where["row"] += [row] * (n_c + len(r))
            where["pair"] += [row] * (n_c + len(r))
        ids, attn = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        width = ids.shape[1]
        allow = torch.tril(torch.ones(width, width, dtype=torch.bool, device=device)).repeat(len(seqs), 1, 1)
        for row, i in enumerate(indices):
            n_p, n_c, n_r = len(self.prompts[i]), len(self.chosen[i]), len(self.rejected[i])
            allow[row, n_p + n_c:, n_p:n_p + n_c] = False   # rejected never sees chosen
            end = n_p + n_c + n_r
            allow[row, end:, :] = False                      # padding sees only itself
            allow[row, end:, end:] = torch.eye(width - end, dtype=torch.bool, device=device)
        positions, _ = pad(pos, 0, "right", device)
        index = {k: torch.tensor(v, device=device) for k, v in where.items()}
        return {"input_ids": ids, "attention_mask": allow[:, None], "position_ids": positions,
                "index": index, "n": len(indices)}

    def _collate_pairs(self, indices: list[int], device) -> dict:
        seqs, comp = [], []
        for side in (self.chosen, self.rejected):
            for i in indices:
                seqs.append(self.prompts[i] + side[i])
                comp.append([0] * len(self.prompts[i]) + [1] * len(side[i]))
        ids, mask = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        cmask, _ = pad(comp, 0, "right", device)
        return {"input_ids": ids, "attention_mask": mask, "completion_mask": cmask}

    def completion_logps(self, model, batch: dict):
        """Summed log-probs and token counts of the chosen and rejected completions."""
        if "index" not in batch:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            sums, counts = masked_sums(token_logps(logits, batch["input_ids"]), batch["completion_mask"])
            n = len(sums) // 2
            return sums[:n], sums[n:], counts[:n], counts[n:]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        ix = batch["index"]
        picked = logits[ix["row"], ix["pred"]].float()
        lp = picked.gather(-1, ix["target"][:, None])[:, 0] - torch.logsumexp(picked, -1)
        n = batch["n"]
        slot = ix["pair"] + n * ix["side"]          # chosen sums in [0, n), rejected in [n, 2n)
        sums = torch.zeros(2 * n, dtype=lp.dtype, device=lp.device).index_add(0, slot, lp)
        counts = torch.zeros(2 * n, dtype=lp.dtype, device=lp.device).index_add(0, slot, torch.ones_like(lp))
        return sums[:n], sums[n:], counts[:n], counts[n:]

    def loss(self, model, batch: dict):
        pc, pr, lc, lr = self.completion_logps(model, batch)
        cfg = self.cfg
        losses, metrics = dpo_loss(pc.double(), pr.double(), batch["ref_chosen"], batch["ref_rejected"],
                                   beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
                                   chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=cfg.simpo_gamma)
        if cfg.nll_alpha:
            nll = nll_term(pc.double(), lc)
            metrics["nll"] = nll.detach()
            losses = losses + cfg.nll_alpha * nll
        return losses.float(), metrics


def check_reference(cfg: DPOTrainConfig) -> None:
    """Before any model loads: pairs without reference log-probs need ``--reference``;
    the message says what fits the data (imported pairs have no generations to rerun)."""
    if cfg.reference:
        check_model_dir(cfg.reference, "reference model")
    if cfg.loss == "simpo" or cfg.reference:
        return
    fix = "pass --reference MODEL (usually the starting policy) to compute them once before training"
    if not is_dataset(cfg.data):
        raise InputError(f"{cfg.data}: pairs imported from a file have no reference log-probs: {fix}")
    ds = open_dataset_of(cfg.data, "pairs", "train dpo")
    t = ds.read(columns=["chosen_ref_logps_sum", "rejected_ref_logps_sum"])
    missing = t.num_rows - t.drop_null().num_rows
    if missing:
        how = (f"{fix} (these pairs were imported: there are no generations to run "
               "`offline-rlhf logprobs` on)" if "generations" not in ds.lineage else
               f"run `offline-rlhf logprobs` on the generations and rebuild the pairs, or {fix}")
        raise InputError(f"{cfg.data}: {missing} of {t.num_rows} pairs have no reference "
                         f"log-probs: {how}")


def train_dpo(cfg: DPOTrainConfig) -> dict:
    check_pairs_source(cfg.data, "train dpo")
    check_reference(cfg)
    holder = {}

    def factory(model, tokenizer, acc):
        holder["task"] = DPOTask(cfg, tokenizer, acc.device)
        return holder["task"]

    summary = fit(cfg, factory)
    summary["data"] = holder["task"].stats
    first, last = summary.get("first") or {}, summary.get("last") or {}
    if cfg.loss != "simpo" and cfg.nll_alpha == 0 and first and last and \
            last["logps/chosen"] < first["logps/chosen"] - 1.0:
        msg = (f"chosen log-probs fell from {first['logps/chosen']:.2f} to {last['logps/chosen']:.2f} "
               "during training: DPO is lowering the likelihood of the preferred responses too. "
               "Consider --nll-alpha 1 (RPO), a lower --lr or a higher --beta.")
        warnings.warn(msg, stacklevel=2)
        summary["warning"] = msg
    return summary
