"""Rule-based (verifiable) rewards. Each returns one float per response, except the
group-relative :func:`kimi_length`, which scores the K responses of one prompt together.

Answers are read from ``<answer>...</answer>`` when the response has those tags,
else from the whole response.
"""

from __future__ import annotations

import math
import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"


def extract_answer(response: str) -> str:
    """The text inside the last ``<answer>`` tags, else the whole response."""
    found = ANSWER_TAG.findall(response)
    return found[-1] if found else response


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(response: str, reference: str) -> float:
    """1.0 when the answer equals the reference, ignoring surrounding and repeated spaces."""
    return float(_normalize(extract_answer(response)) == _normalize(reference))


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(response: str, reference: str, rel_tol: float = 1e-6) -> float:
    """1.0 when the last number of the answer equals the reference's (relative tolerance)."""
    got, want = parse_number(extract_answer(response)), parse_number(reference)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=rel_tol))


def format_match(response: str, pattern: str) -> float:
    """1.0 when the whole response (stripped) matches ``pattern`` (dot matches newlines)."""
    return float(re.fullmatch(pattern, response.strip(), re.DOTALL) is not None)


def length_penalty(n_tokens: int, target: int) -> float:
    """-(tokens beyond ``target``): weight it to set tokens' price (e.g. 0.01)."""
    return -float(max(0, n_tokens - target))


def kimi_length(lengths: list[int], correct: list[bool]) -> list[float]:
    """Kimi k1.5's length reward within one prompt's group (Kimi Team 2025, "Kimi k1.5",
    sec. 2.3.3, length penalty): ``lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)``;
    a correct response gets ``lambda_i``, an incorrect one ``min(0, lambda_i)``. So the
    shortest correct answers gain up to +0.5, the longest lose up to -0.5, and length never
    rewards a wrong answer. When every response has the same length, all get 0."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [x if ok else min(0.0, x) for x, ok in zip(lam, correct)]
