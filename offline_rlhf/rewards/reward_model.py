"""Scalar reward-model scoring: one number per (prompt, response), batched by tokens."""

from __future__ import annotations

import numpy as np
import torch

from ..batching import budget_batches, pad
from ..models import load_reward_model, load_tokenizer


def rm_input_ids(tokenizer, prompts: list[str], responses: list[str],
                 max_length: int) -> tuple[list[list[int]], int]:
    """Token ids a reward model reads for each (prompt, response), and how many were cut.

    Training (``train rm``) and scoring use this one function, so a trained model
    scores exactly the inputs it learnt from. Over-long inputs keep their last
    ``max_length`` tokens: the score is read at the last token.
    """
    texts = [p + r for p, r in zip(prompts, responses)]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    cut = sum(len(x) > max_length for x in ids)
    return [x[-max_length:] if len(x) > max_length else x for x in ids], cut


def _score_head(model):
    """The scalar head under any DDP / peft wrapping (None when there is no ``score``)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return getattr(inner, "score", None)


def last_token_rewards(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward at each row's last real token (right padding).

    Runs the model's own forward (so DDP and peft wrappers work as usual) and applies
    the ``score`` head to the final hidden state at that position, rather than trusting
    a pooling that looks for pad ids (which breaks when the pad token is also the EOS
    token inside the text). Models without a ``score`` head use their pooled logits.
    """
    head = _score_head(model)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=head is not None)
    if head is None:
        return out.logits[:, 0]
    last = mask.sum(-1) - 1
    return head(out.hidden_states[-1][torch.arange(len(ids), device=ids.device), last])[:, 0]


class RewardModelScorer:
    def __init__(self, path: str, *, dtype: str = "auto", bits: int | None = None,
                 device: str | None = None, token_budget: int = 16384, max_length: int = 2048,
                 trust_remote_code: bool = False):
        self.model = load_reward_model(path, dtype=dtype, bits=bits, device=device,
                                       trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path, trust_remote_code, padding_side="right")
        self.token_budget, self.max_length = token_budget, max_length
        self.device = next(self.model.parameters()).device

    def encode(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], int]:
        return rm_input_ids(self.tokenizer, prompts, responses, self.max_length)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> np.ndarray:
        """The scalar reward at each sequence's last token (length-bucketed batches)."""
        out = np.zeros(len(seqs), dtype=np.float64)
        for batch in budget_batches([len(s) for s in seqs], self.token_budget):
            ids, mask = pad([seqs[i] for i in batch], self.tokenizer.pad_token_id, "right",
                            self.device)
            out[batch] = last_token_rewards(self.model, ids, mask).float().cpu().numpy()
        return out
