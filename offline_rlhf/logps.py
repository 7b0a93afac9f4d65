"""Log-probabilities of responses: pure math over a model's logits (no stage, no shards).

:func:`processed_logps` is the sampling distribution (temperature, top-k, top-p) that
the generator samples from and stores as behaviour log-probs; :func:`sequence_logps`
recomputes it teacher-forced. Backends and the ``logprobs`` stage both use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .batching import budget_batches, pad
from .errors import InputError


def processed_logps(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the distribution actually sampled: logits / temperature, then top-k
    and top-p (nucleus) filtering; filtered tokens get -inf. Computed in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
        sorted_logits = sorted_logits.masked_fill(before > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def sequence_logps(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   *, pad_id: int, token_budget: int = 16384, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0) -> list[np.ndarray]:
    """Per-token log-probs of each response given its prompt (teacher forcing).

    Rows are batched by ``token_budget`` with length bucketing and right padding; only
    the response positions go through the (vocabulary-sized) softmax.
    """
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    for batch in budget_batches(lengths, token_budget):
        seqs = [list(prompts[i]) + list(responses[i]) for i in batch]
        ids, mask = pad(seqs, pad_id, "right", device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        rows, cols, targets = [], [], []
        for r, i in enumerate(batch):
            start, n = len(prompts[i]), len(responses[i])
            if start == 0:
                raise InputError("a response needs at least one prompt token before it")
            rows += [r] * n
            cols += range(start - 1, start - 1 + n)
            targets += list(responses[i])
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        lp = processed_logps(picked, temperature, top_k, top_p)
        tok_lp = lp.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].cpu().numpy()
        at = 0
        for i in batch:
            n = len(responses[i])
            out[i] = tok_lp[at:at + n]
            at += n
    return out  # type: ignore[return-value]
