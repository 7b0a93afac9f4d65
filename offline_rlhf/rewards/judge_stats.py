"""The judge judged: diagnostics of an LLM judge from what the stages stored (no model).

Pairwise (from a pairs dataset's manifest counters, which cover every pair asked,
dropped ones included): position consistency (both orders agree), first-position
preference (mean P(first is better) over every input; 0.5 is unbiased), agreement with
the generations' reward where it separates the two responses, and the share of pairs
where the judge chose the longer response. Pointwise (from scored rows): correlation of
the judge component with every other component and with response length.
"""

from __future__ import annotations

import numpy as np


def _ratio(a, b):
    return float(a) / b if b else None


def pairwise_diagnostics(stats: dict) -> dict:
    """Judge diagnostics from the summed counters of ``pairs --strategy judge``."""
    asked = stats.get("judge_pairs_asked", 0)
    if not asked:
        return {}
    decided = asked - stats.get("judge_ties_dropped", 0)
    return {
        "judge_pairs_asked": asked,
        "position_consistency": _ratio(decided - stats.get("judge_inconsistent", 0), decided),
        "first_position_preference": _ratio(stats.get("judge_first_better_sum", 0.0), 2 * asked),
        "agreement_with_reward": _ratio(stats.get("judge_agrees_with_reward", 0),
                                        stats.get("judge_reward_decided", 0)),
        "chose_longer": _ratio(stats.get("judge_chose_longer", 0), stats.get("judge_length_decided", 0)),
    }


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def pointwise_diagnostics(judge: np.ndarray, others: dict[str, np.ndarray],
                          lengths: np.ndarray) -> dict:
    """Pearson correlation of the judge score with each other component and with the
    response length in tokens (None where either side is constant)."""
    out = {f"corr_with_{name}": _corr(judge, v) for name, v in sorted(others.items())}
    out["length_bias"] = _corr(judge, lengths.astype(np.float64))
    return out
