"""Replay of human data in ``train grpo``: an SFT term beside the policy-gradient term.

Training night after night on its own samples, a model loses the tails of its
distribution first (model collapse: Shumailov et al., 2024, "AI models collapse when
trained on recursively generated data", Nature 631); there, keeping 10% of the original
human data in every generation's training mix slowed the degradation markedly.
``replay = FILE`` (an SFT file: prompt/completion, messages or text, as ``train sft``
reads) adds ``r = round(f * n / (1 - f))`` replay examples to the ``n`` policy-gradient
examples, so a share ``f = replay_fraction`` of the examples (and, in expectation, of
every step's) are replay rows. A replay row's loss is its completion's mean token
negative log-likelihood; it takes no part in the policy-gradient term, its ratios or
its KL. Rows are drawn without replacement in a seeded order (cycled when r exceeds
the file).
"""

from __future__ import annotations

import numpy as np

from ..datafiles import read_rows
from ..layouts import sft_examples, sft_tokens


def replay_tokens(path: str, tokenizer, n_policy: int, fraction: float, seed: int,
                  max_tokens: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt ids, response ids, loss masks) of the replay examples for ``n_policy``
    policy-gradient examples; rows longer than ``max_tokens`` are left out."""
    rows, columns = read_rows(path)
    examples = sft_examples(rows, columns, path)
    encoded = [sft_tokens(tokenizer, ex, path, i) for i, ex in enumerate(examples)]
    encoded = [e for e in encoded if len(e[0]) + len(e[1]) <= max_tokens and any(e[2])]
    want = round(fraction * n_policy / (1 - fraction))
    if not encoded or not want:
        return [], [], []
    order = np.random.default_rng(seed).permutation(len(encoded))
    picks = [encoded[order[i % len(order)]] for i in range(want)]
    return [p for p, _, _ in picks], [r for _, r, _ in picks], [m for _, _, m in picks]
