"""``train dpo``: the DPO family on stored pairs, reference log-probs read from the shard.

The reference model is never loaded during training. Pairs without reference
log-probs are refused with the stage to run, unless ``--reference`` is given: then they
are computed once, before the first step, and stored in the output directory
(``reference.py``); when the reference is the policy itself no second model is loaded.

Each pair is, by default, one row: prompt + chosen + rejected with the rejected tokens
hidden from the chosen ones (prefix sharing). How that is hidden is the layout: a dense
4D mask (fastest on CPU), or FlexAttention over the micro-batch's pairs packed into one
row (on GPUs, where the dense mask takes SDPA off its fused kernels); else two rows.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ..batching import pad
from ..config import opt
from ..errors import InputError, located
from ..losses.common import masked_sums, token_logps
from ..losses.dpo import (
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSS_TYPES,
    REFERENCE_FREE,
    SMOOTHED,
    dpo_loss,
    ld_token_weights,
    nll_term,
    parse_losses,
)
from ..models import check_model_dir
from ..pairs import check_pairs_source, read_pairs
from ..shards import is_dataset, open_dataset_of
from .defaults import beta_of, beta_text
from .loop import TrainConfig, fit, micro_batches
from .values import check_finite

PAIR_COLUMNS = ["prompt", "prompt_token_ids", "chosen", "rejected", "chosen_token_ids",
                "rejected_token_ids", "chosen_ref_logps_sum", "rejected_ref_logps_sum"]
PREFIX_ATTENTION = ("auto", "mask", "flex")
PAIR_WEIGHTS = ("none", "judge")
JUDGE_COLUMNS = ["judge_p_ab", "judge_p_ba", "judge_consistent"]


@dataclasses.dataclass
class DPOTrainConfig(TrainConfig):
    data: str = opt(help="pairs dataset, or a preference file (JSONL/JSON/Parquet in any layout "
                    "`import-pairs` reads) imported on the fly; pairs need reference log-probs "
                    "or --reference")
    loss: str = opt("sigmoid", f"loss, or several separated by commas, summed with --loss-weights "
                    f"(MPO: sigmoid,bco_pair,sft): {' | '.join(LOSS_TYPES)} (docs/dpo.md)")
    loss_weights: str = opt("", "weights of the --loss terms, comma-separated (default: 1 each)")
    beta: float | None = opt(None, "strength of the KL regularisation (IPO, sppo_hard: tau); "
                             + beta_text("dpo"))
    label_smoothing: float = opt(0.0, "assumed label-flip rate for cdpo, robust, aot, aot_unpaired; "
                                 "the label smoothing eps of exo_pair (which needs it > 0; paper: 1e-3)")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature of the log-ratio modulation")
    f_divergence: str = opt("reverse_kl", f"f-DPO regulariser: {' | '.join(F_DIVERGENCES)}; other "
                            f"than reverse_kl only with {', '.join(F_DIVERGENCE_LOSSES)}")
    f_alpha: float = opt(0.5, "alpha of --f-divergence alpha_divergence")
    ld_alpha: float | None = opt(None, "LD-DPO: weight in [0, 1] of completion tokens past the shorter "
                                 "completion's length (1: plain DPO); needs --reference (the stored "
                                 "reference sums are unweighted)")
    nll_alpha: float = opt(1.0, "weight of the NLL of the chosen response (RPO); 0 is plain DPO, "
                           "which can push chosen log-probs down with the rejected ones")
    reference: str | None = opt(None, "reference model, used only to fill the reference log-probs "
                                "the pairs lack: computed once before training and stored in "
                                "OUTPUT/reference_logps.safetensors. When it is the policy (same "
                                "content) no second model is loaded: the policy's base with its "
                                "LoRA adapter off (with --bits, the quantized base), or in full "
                                "fine-tuning the policy before its first step")
    reference_bits: int | None = opt(None, "4 | 8 | 0 (unquantized): how a reference is loaded; "
                                     "default: as --bits. A value other than --bits loads the "
                                     "reference as a second model even when it is the policy")
    max_prompt_tokens: int = opt(1024, "prompts longer than this keep their last tokens")
    max_completion_tokens: int = opt(1024, "completions longer than this keep their first tokens")
    share_prompt: bool = opt(True, "run each prompt once: prompt + chosen + rejected in one row, "
                             "the chosen tokens hidden from the rejected ones (prefix sharing)")
    prefix_attention: str = opt("auto", "how a shared row hides chosen from rejected: mask (a "
                                "dense 4D mask, eager/sdpa attention), flex (FlexAttention, the "
                                "micro-batch's pairs packed into one row; trains on GPUs only) or "
                                "auto: mask on CPU; on a GPU flex where torch, the model and the "
                                "GPU support it, else two rows per pair (the dense mask is slower there)")

    pair_weight: str = opt("none", "per-pair loss weight: none | judge (the judge's confidence "
                           "judge_p_ab + judge_p_ba - 1 of pairs --strategy judge; 0 for pairs "
                           "kept inconsistent)")

    def __post_init__(self):
        super().__post_init__()
        self.terms = check_losses(self)
        if self.pair_weight not in PAIR_WEIGHTS:
            raise InputError(f"pair_weight: must be one of {', '.join(PAIR_WEIGHTS)}, got {self.pair_weight!r}")
        if self.beta is not None and self.beta <= 0:
            raise InputError(f"beta: must be > 0, got {self.beta}")
        names = [n for n, _ in self.terms]
        if not 0 <= self.label_smoothing < 0.5:
            raise InputError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not set(names) & set(SMOOTHED):
            raise InputError(f"label_smoothing: only used by the {', '.join(SMOOTHED)} losses")
        if "exo_pair" in names and self.label_smoothing == 0:
            raise InputError("label_smoothing: exo_pair needs it > 0 (the EXO paper uses 1e-3)")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise InputError(f"ld_alpha: must be in [0, 1], got {self.ld_alpha}")
        if self.discopop_tau <= 0:
            raise InputError(f"discopop_tau: must be > 0, got {self.discopop_tau}")
        if self.reference_bits not in (None, 0, 4, 8):
            raise InputError(f"reference_bits: must be 0, 4 or 8, got {self.reference_bits}")
        if self.prefix_attention not in PREFIX_ATTENTION:
            raise InputError(f"prefix_attention: must be one of {', '.join(PREFIX_ATTENTION)}, "
                             f"got {self.prefix_attention!r}")


def check_losses(cfg: DPOTrainConfig) -> list[tuple[str, float]]:
    """The (name, weight) terms of ``--loss`` / ``--loss-weights``, and the f-divergence
    they allow; refused in one line naming the option."""
    try:
        weights = [float(w) for w in cfg.loss_weights.split(",")] if cfg.loss_weights.strip() else None
    except ValueError:
        raise InputError(f"loss_weights: must be numbers separated by commas, got {cfg.loss_weights!r}") \
            from None
    try:
        terms = parse_losses(cfg.loss, weights)
    except ValueError as e:
        field = "loss_weights" if "loss_weights" in str(e) else "loss"
        raise InputError(f"{field}: {e}") from None
    if cfg.f_divergence not in F_DIVERGENCES:
        raise InputError(f"f_divergence: must be one of {', '.join(F_DIVERGENCES)}, got {cfg.f_divergence!r}")
    other = [n for n, _ in terms if n not in F_DIVERGENCE_LOSSES]
    if cfg.f_divergence != "reverse_kl" and other:
        raise InputError(f"f_divergence: {cfg.f_divergence} is defined only for the losses "
                         f"{', '.join(F_DIVERGENCE_LOSSES)} (the f-DPO reparameterisation cancels "
                         f"only in a chosen-minus-rejected difference), not {', '.join(other)}")
    return terms


def reference_free(cfg: DPOTrainConfig) -> bool:
    """Whether every loss term does without reference log-probs (simpo, sft)."""
    return all(n in REFERENCE_FREE for n, _ in cfg.terms)


class DPOTask:
    name = "dpo"

    def __init__(self, cfg: DPOTrainConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.layout = "mask" if cfg.share_prompt else "rows"   # settled by prepare()
        rows = read_pairs(cfg.data, tokenizer, PAIR_COLUMNS + (
            JUDGE_COLUMNS if cfg.pair_weight == "judge" else []), "train dpo")
        if not rows:
            raise InputError(f"{cfg.data}: has no pairs")
        self.weights = pair_weights(rows, cfg)
        self.stats = {"pairs": len(rows), "prompts_truncated": 0, "completions_truncated": 0,
                      "pairs_dropped_truncated": 0, "ref_logps_computed": 0, "ref_logps_reused": 0}
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
        self.ref_chosen, self.ref_rejected, self.need = self._reference(ref_c, ref_r, exact)

    def _reference(self, ref_c, ref_r, exact):
        """Stored reference sums (NaN where missing) and the pairs whose sums must be
        computed with ``--reference`` (missing, or describing an untruncated pair)."""
        if reference_free(self.cfg):
            return np.zeros(len(ref_c)), np.zeros(len(ref_r)), []
        if self.cfg.ld_alpha is not None:   # stored sums are unweighted: all recomputed
            return _floats(ref_c), _floats(ref_r), list(range(len(ref_c)))
        need = [i for i in range(len(ref_c)) if ref_c[i] is None or ref_r[i] is None or not exact[i]]
        if need and not self.cfg.reference:
            truncated = sum(not e for e in exact)
            if truncated and len(need) == truncated:  # only truncation is the problem: drop them
                self._drop(need)
                self.stats["pairs_dropped_truncated"] = len(need)
                warnings.warn(f"dropped {len(need)} truncated pairs whose stored reference log-probs "
                              "no longer match; pass --reference to recompute them instead", stacklevel=2)
                keep = [i for i in range(len(exact)) if exact[i]]
                return np.array([ref_c[i] for i in keep]), np.array([ref_r[i] for i in keep]), []
            raise InputError(f"{self.cfg.data}: {len(need)} pairs have no reference log-probs: run "
                             "`offline-rlhf logprobs` on the generations and rebuild the pairs, or pass "
                             "--reference MODEL to compute them before training")
        return _floats(ref_c), _floats(ref_r), need

    def _drop(self, drop: list[int]) -> None:
        gone = set(drop)
        for name in ("prompts", "chosen", "rejected"):
            setattr(self, name, [x for i, x in enumerate(getattr(self, name)) if i not in gone])
        self.weights = np.array([w for i, w in enumerate(self.weights) if i not in gone])

    def prepare(self, model, acc) -> None:
        """Settle the layout for this device and model, and fill the missing reference
        log-probs (once per job: see ``reference.py``)."""
        self.layout = resolve_layout(self.cfg, acc.device, model)
        self.stats["layout"] = self.layout
        if self.need:
            from .reference import fill_reference
            values, counts = fill_reference(self, model, acc)
            self.ref_chosen[self.need], self.ref_rejected[self.need] = values[:, 0], values[:, 1]
            self.stats.update(counts)

    @torch.no_grad()
    def reference_sums(self, model, indices: list[int], acc, bar=None) -> np.ndarray:
        """Summed completion log-probs ``[len(indices), 2]`` (chosen, rejected) under
        ``model`` in this task's layout and the loop's autocast, micro-batched like training:
        at the first step, policy and reference log-probs then agree to rounding."""
        use_layout(model, self.layout)
        out = {}
        for mb in micro_batches(indices, self.lengths(), self.cfg.micro_batch_size,
                                self.cfg.max_tokens_per_micro_batch, 1):
            with acc.autocast():
                c, r = self.completion_logps(model, self.collate(mb, acc.device))[:2]
            out.update(zip(mb, zip(c.double().tolist(), r.double().tolist())))
            if bar is not None:
                bar.update(len(mb))
        return np.array([out[i] for i in indices], dtype=np.float64).reshape(-1, 2)

    def lengths(self) -> np.ndarray:
        if self.layout != "rows":
            return np.array([len(p) + len(c) + len(r)
                             for p, c, r in zip(self.prompts, self.chosen, self.rejected)])
        return np.array([2 * (len(p) + max(len(c), len(r)))
                         for p, c, r in zip(self.prompts, self.chosen, self.rejected)])

    def collate(self, indices: list[int], device) -> dict:
        refs = {"ref_chosen": torch.tensor(self.ref_chosen[indices], device=device),
                "ref_rejected": torch.tensor(self.ref_rejected[indices], device=device),
                "pair_weight": torch.tensor(self.weights[indices], device=device)}
        collate = {"rows": self._collate_pairs, "mask": self._collate_masked,
                   "flex": self._collate_packed}[self.layout]
        return {**collate(indices, device), **refs}

    def _shared_rows(self, indices: list[int], packed: bool):
        """Prompt + chosen + rejected of each pair (prefix sharing; Wang et al. 2024,
        "Accelerating Direct Preference Optimization with Prefix Sharing"), and where each
        completion token is predicted.

        Rejected tokens take the positions that follow the prompt, so (with attention that
        hides the chosen tokens from them) every log-prob equals the one of a separate
        prompt + rejected row; the first rejected token is predicted from the prompt's last
        position, like the first chosen token. ``packed``: all pairs in one row, one after
        another (their token offsets accumulate); else one row per pair."""
        seqs, pos, where = [], [], {"row": [], "pred": [], "target": [], "pair": [], "side": [], "pos": []}
        start = 0
        for k, i in enumerate(indices):
            p, c, r = self.prompts[i], self.chosen[i], self.rejected[i]
            n_p, n_c, n_r = len(p), len(c), len(r)
            seqs.append(p + c + r)
            pos.append(list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)))
            where["pred"] += [start + n_p - 1 + j for j in range(n_c)] + [start + n_p - 1] + \
                [start + n_p + n_c + j - 1 for j in range(1, n_r)]
            where["target"] += c + r
            where["side"] += [0] * n_c + [1] * n_r
            where["pos"] += list(range(n_c)) + list(range(n_r))
            where["row"] += [0 if packed else k] * (n_c + n_r)
            where["pair"] += [k] * (n_c + n_r)
            start += (n_p + n_c + n_r) if packed else 0
        return seqs, pos, where

    def _collate_masked(self, indices: list[int], device) -> dict:
        """One padded row per pair under a dense 4D mask (eager / sdpa attention)."""
        seqs, pos, where = self._shared_rows(indices, packed=False)
        ids, _ = pad(seqs, self.tokenizer.pad_token_id, "right", device)
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

    def _collate_packed(self, indices: list[int], device) -> dict:
        """All pairs of the micro-batch in one row, no padding, under a FlexAttention block
        mask: a token sees earlier tokens of its own pair, except that rejected tokens
        never see chosen ones. Fully masked blocks (other pairs) are skipped."""
        from torch.nn.attention.flex_attention import create_block_mask
        seqs, pos, where = self._shared_rows(indices, packed=True)
        pair = torch.tensor([k for k, s in enumerate(seqs) for _ in s], device=device)
        part = torch.tensor([x for i in indices for x in [0] * len(self.prompts[i]) +
                             [1] * len(self.chosen[i]) + [2] * len(self.rejected[i])], device=device)

        def visible(b, h, q, kv):
            return (pair[q] == pair[kv]) & (q >= kv) & ~((part[q] == 2) & (part[kv] == 1))
        n = len(pair)
        block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
        index = {k: torch.tensor(v, device=device) for k, v in where.items()}
        return {"input_ids": torch.tensor([[t for s in seqs for t in s]], device=device),
                "attention_mask": block_mask,
                "position_ids": torch.tensor([[x for ps in pos for x in ps]], device=device),
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
        """Summed log-probs and token counts of the chosen and rejected completions, and
        the chosen sums unweighted: with ``--ld-alpha`` the first two are LD-DPO sums."""
        if "index" not in batch:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_token = token_logps(logits, batch["input_ids"])
            mask = batch["completion_mask"][:, 1:].to(per_token.dtype)
            sums, counts = masked_sums(per_token, batch["completion_mask"])
            n = len(sums) // 2
            full = sums
            if self.cfg.ld_alpha is not None:
                pair_len = [torch.cat([counts[:n], counts[:n]])[:, None], torch.cat([counts[n:], counts[n:]])[:, None]]
                w = ld_token_weights(mask.cumsum(1) - 1, *pair_len, self.cfg.ld_alpha).to(per_token.dtype)
                sums = (per_token * mask * w).sum(-1)
            return sums[:n], sums[n:], counts[:n], counts[n:], full[:n]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        ix = batch["index"]
        picked = logits[ix["row"], ix["pred"]].float()
        lp = picked.gather(-1, ix["target"][:, None])[:, 0] - torch.logsumexp(picked, -1)
        n = batch["n"]
        slot = ix["pair"] + n * ix["side"]          # chosen sums in [0, n), rejected in [n, 2n)
        zeros = torch.zeros(2 * n, dtype=lp.dtype, device=lp.device)
        sums = zeros.index_add(0, slot, lp)
        counts = zeros.index_add(0, slot, torch.ones_like(lp))
        full = sums
        if self.cfg.ld_alpha is not None:
            w = ld_token_weights(ix["pos"], counts[ix["pair"]], counts[n + ix["pair"]], self.cfg.ld_alpha)
            sums = zeros.index_add(0, slot, lp * w.to(lp.dtype))
        return sums[:n], sums[n:], counts[:n], counts[n:], full[:n]

    def begin_step(self, examples: list[int]) -> None:
        """The step's mean chosen length: ``sft`` is per token over the whole step."""
        self.step_chosen_tokens = float(np.mean([len(self.chosen[i]) for i in examples]))

    def loss(self, model, batch: dict):
        pc, pr, lc, lr, pc_full = self.completion_logps(model, batch)
        cfg = self.cfg
        beta = beta_of(cfg)
        sft_mean = getattr(self, "step_chosen_tokens", None)
        losses, metrics = dpo_loss(
            pc.double(), pr.double(), batch["ref_chosen"], batch["ref_rejected"], beta=beta,
            loss_type=[n for n, _ in cfg.terms], loss_weights=[w for _, w in cfg.terms],
            label_smoothing=cfg.label_smoothing, chosen_lengths=lc, rejected_lengths=lr,
            simpo_gamma=cfg.simpo_gamma, discopop_tau=cfg.discopop_tau, f_divergence=cfg.f_divergence,
            f_alpha=cfg.f_alpha, policy_chosen_full_logps=pc_full.double(), sft_mean_tokens=sft_mean)
        nll = nll_term(pc_full.double(), lc)
        metrics["loss/dpo"] = losses.detach()       # what TRL logs as its loss
        metrics["loss/nll"] = nll.detach()
        if cfg.nll_alpha:
            losses = losses + cfg.nll_alpha * nll
        if cfg.pair_weight != "none":
            losses = losses * batch["pair_weight"].to(losses.dtype)
        return losses.float(), metrics


def check_reference(cfg: DPOTrainConfig) -> None:
    """Before any model loads: pairs without reference log-probs need ``--reference``;
    the message says what fits the data (imported pairs have no generations to rerun)."""
    if cfg.reference:
        check_model_dir(cfg.reference, "reference model")
    if cfg.ld_alpha is not None and not cfg.reference:
        raise InputError("ld_alpha: LD-DPO weighs reference tokens too, and the stored reference "
                         "sums are unweighted: pass --reference MODEL (usually the starting policy)")
    if reference_free(cfg) or cfg.reference:
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
    check_finite(cfg.data, "pairs", [] if cfg.loss == "simpo" else PAIR_COLUMNS[-2:], "train dpo")
    holder = {}

    def factory(model, tokenizer, acc):
        holder["task"] = DPOTask(cfg, tokenizer)
        holder["task"].prepare(model, acc)
        return holder["task"]

    summary = fit(cfg, factory)    # its "data": the task's stats (also when a finished run is reused)
    first, last = summary.get("first") or {}, summary.get("last") or {}
    if not reference_free(cfg) and cfg.nll_alpha == 0 and first and last and \
            last["logps/chosen"] < first["logps/chosen"] - 1.0:
        msg = (f"chosen log-probs fell from {first['logps/chosen']:.2f} to {last['logps/chosen']:.2f} "
               "during training: DPO is lowering the likelihood of the preferred responses too. "
               "Consider --nll-alpha 1 (RPO), a lower --lr or a higher --beta.")
        warnings.warn(msg, stacklevel=2)
        summary["warning"] = msg
    return summary


def pair_weights(rows: list[dict], cfg: DPOTrainConfig) -> np.ndarray:
    """Per-pair loss weights: 1, or with ``--pair-weight judge`` the judge's confidence
    ``judge_p_ab + judge_p_ba - 1`` (2 P(chosen better) - 1, in [0, 1]; 0 for a pair
    kept although its two orders disagree). Pairs no judge labelled are refused."""
    if cfg.pair_weight == "none":
        return np.ones(len(rows))
    for i, r in enumerate(rows):
        if r["judge_p_ab"] is None or r["judge_p_ba"] is None:
            raise InputError(located("no judge verdict (--pair-weight judge needs pairs from "
                                     "`offline-rlhf pairs --strategy judge`)", cfg.data, i, "judge_p_ab"))
    return np.array([max(0.0, r["judge_p_ab"] + r["judge_p_ba"] - 1.0) if r["judge_consistent"]
                     else 0.0 for r in rows])


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# --------------------------------------------------------------------------- layouts

def flex_supported(model, device) -> bool:
    """Whether torch and the model's attention code take FlexAttention block masks, and,
    on CUDA, whether its compiled kernels can run: Triton present, compute capability 8.0+."""
    import importlib.util

    from transformers.utils import is_torch_flex_attn_available

    from ..models import base_model
    if not (is_torch_flex_attn_available() and getattr(base_model(model), "_supports_flex_attn", False)):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None and \
            torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def resolve_layout(cfg: DPOTrainConfig, device, model) -> str:
    """``rows`` (two rows per pair), ``mask`` (a shared row under a dense mask) or ``flex``
    (pairs packed under a FlexAttention block mask) for this device and model."""
    from ..models import base_model
    if not cfg.share_prompt:
        return "rows"
    gpu = torch.device(device).type != "cpu"
    if cfg.prefix_attention == "auto":
        if not gpu:
            return "mask"      # measured: bench/dpo.py
        return "flex" if flex_supported(model, device) else "rows"
    if cfg.prefix_attention == "flex":
        if not gpu:
            raise InputError("prefix_attention: flex trains only on a GPU (FlexAttention has no "
                             "backward pass on CPU); use auto or mask")
        if not flex_supported(model, device):
            raise InputError(f"prefix_attention: flex needs FlexAttention in torch and in the model "
                             f"({type(base_model(model)).__name__}) and, on CUDA, Triton and a GPU "
                             "of compute capability 8.0+; use auto or mask")
    return cfg.prefix_attention


def use_layout(model, layout: str) -> None:
    """Switch ``model``'s attention to what ``layout`` needs (FlexAttention for ``flex``;
    a 4D-mask-taking implementation for ``mask``)."""
    from ..models import base_model
    base = base_model(model)
    current = base.config._attn_implementation
    want = {"flex": "flex_attention", "mask": current if current in ("eager", "sdpa") else "sdpa"}.get(
        layout, current)
    if want != current:
        base.set_attn_implementation(want)
