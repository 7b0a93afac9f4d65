"""Drift metrics of a policy from its sampled held-out responses (the nights' collapse watch).

From a scored generations dataset (an eval stage's sampled ``policy/scored``):

- ``entropy``: mean over response tokens of -log pi(y_t), the behaviour log-probs stored
  with each sampled token: a Monte Carlo estimate of the per-token entropy of the
  distribution that was sampled (at the eval's temperature);
- ``distinct_1`` / ``distinct_2``: distinct token ids (bigrams) over all tokens (bigrams)
  of the responses (Li et al., 2016);
- ``length_mean`` / ``length_p95``: response tokens;
- ``reward_q``: reward quantiles 5, 25, 50, 75, 95%;
- ``kl``: KL(pi || night 0's policy), the k3 estimator summed over each response's
  tokens (see :func:`offline_rlhf.evaluate.kl_k3`), with its standard error; unbiased
  only when the responses were sampled at temperature 1 (``kl_note`` says otherwise).

Only the stored columns are read; the KL needs one forward pass of night 0's policy over
the responses (``logprobs`` stage, kept beside the night and reused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluate import kl_k3
from .logprobs import LogprobsConfig, compute_logprobs
from .shards import is_complete, open_dataset

QUANTILES = (5, 25, 50, 75, 95)


def text_metrics(token_ids: list[list[int]], logps: list[list[float]], rewards: list[float]) -> dict:
    """Entropy estimate, distinct-1/-2, lengths and reward quantiles of sampled responses."""
    tokens = [t for ids in token_ids for t in ids]
    bigrams = [(a, b) for ids in token_ids for a, b in zip(ids, ids[1:])]
    flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in logps if len(x)] or [np.zeros(0)])
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.float64)
    return {"responses": len(token_ids),
            "entropy": float(-flat.mean()) if flat.size else None,
            "distinct_1": len(set(tokens)) / len(tokens) if tokens else None,
            "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else None,
            "length_mean": float(lengths.mean()) if lengths.size else None,
            "length_p95": float(np.percentile(lengths, 95)) if lengths.size else None,
            "reward_q": {f"p{q}": float(np.percentile(rewards, q)) for q in QUANTILES} if rewards else {}}


def drift_metrics(scored: str, anchor: str | None, out: Path, temperature: float) -> dict:
    """:func:`text_metrics` of ``scored`` and its KL to ``anchor`` (a model directory;
    reference log-probs written to ``out`` and reused)."""
    t = open_dataset(scored).read(columns=["response_token_ids", "behaviour_logps", "reward"])
    logps = t.column("behaviour_logps").to_pylist()
    m = text_metrics(t.column("response_token_ids").to_pylist(), logps,
                     [r for r in t.column("reward").to_pylist() if r is not None])
    m["temperature"] = temperature
    if anchor is None:
        return {**m, "kl": None}
    if not is_complete(str(out)):
        compute_logprobs(LogprobsConfig(generations=scored, output=str(out), reference=anchor))
    ref = open_dataset(str(out)).read(columns=["behaviour_logps", "ref_logps"])
    per_seq = kl_k3(ref.column("behaviour_logps").to_pylist(), ref.column("ref_logps").to_pylist())
    se = float(per_seq.std(ddof=1) / np.sqrt(len(per_seq))) if len(per_seq) > 1 else 0.0
    m.update(kl=float(per_seq.mean()), kl_stderr=se, kl_anchor=anchor)
    if temperature != 1.0:
        m["kl_note"] = f"sampled at temperature {temperature:g}, not 1: the k3 estimate is biased"
    return m
