"""ILQL heads on a policy's hidden states, their files, and value-guided decoding.

``ILQLHeads`` holds a V head (hidden -> 1), two Q heads (hidden -> vocab) and target
copies of the Q heads updated by Polyak averaging. They are saved beside a model as
``heads.safetensors`` + ``heads.json`` and loaded by ``offline-rlhf generate --ilql-heads``,
which samples from ``logits + beta * (min target Q - V)`` restricted to the policy's
top-k tokens, so ILQL policies feed the next night's shards like any other.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .losses.ilql import polyak_update


def _head(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))


class ILQLHeads(nn.Module):
    def __init__(self, hidden: int, vocab: int, two_qs: bool = True):
        super().__init__()
        self.hidden, self.vocab, self.two_qs = hidden, vocab, two_qs
        self.v = _head(hidden, 1)
        self.q1 = _head(hidden, vocab)
        self.q2 = _head(hidden, vocab) if two_qs else None
        self.target_q1 = copy.deepcopy(self.q1).requires_grad_(False)
        self.target_q2 = copy.deepcopy(self.q2).requires_grad_(False) if two_qs else None

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        h = hidden.float()
        out = {"v": self.v(h)[..., 0], "q1": self.q1(h), "target_q1": self.target_q1(h)}
        if self.two_qs:
            out.update(q2=self.q2(h), target_q2=self.target_q2(h))
        return out

    def min_target_q(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        q = self.target_q1(h)
        return torch.minimum(q, self.target_q2(h)) if self.two_qs else q

    def sync_targets(self, alpha: float) -> None:
        polyak_update(self.target_q1, self.q1, alpha)
        if self.two_qs:
            polyak_update(self.target_q2, self.q2, alpha)

    def config(self) -> dict:
        return {"hidden": self.hidden, "vocab": self.vocab, "two_qs": self.two_qs}


def save_heads(heads: ILQLHeads, directory: Path) -> None:
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
              str(directory / "heads.safetensors"))
    (directory / "heads.json").write_text(json.dumps(heads.config()))


def load_heads(directory: str | Path, device="cpu") -> ILQLHeads:
    from safetensors.torch import load_file
    d = Path(directory)
    if not (d / "heads.safetensors").is_file() or not (d / "heads.json").is_file():
        raise InputError(f"{directory}: no ILQL heads (heads.safetensors + heads.json)")
    heads = ILQLHeads(**json.loads((d / "heads.json").read_text()))
    heads.load_state_dict(load_file(str(d / "heads.safetensors")))
    return heads.to(device).eval()


def value_guided_hook(heads: ILQLHeads, beta: float, top_k: int = 0):
    """A ``sample_batch`` logits hook: policy logits (top-k kept) + beta * (min Q' - V)."""
    @torch.no_grad()
    def hook(logits: torch.Tensor, hidden: torch.Tensor, rows) -> torch.Tensor:
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if beta == 0:
            return logits
        advantage = heads.min_target_q(hidden) - heads.v(hidden.float())
        return logits + beta * advantage
    return hook
