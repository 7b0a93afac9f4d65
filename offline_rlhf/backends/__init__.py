"""Backends: the engines under the forward-only stages.

A generation backend turns prompts (token ids) and per-sample seeds into sampled
tokens, their behaviour log-probs and finish reasons; the generate stage around it
owns everything else (prompts, chunking, seeds, rows, shards, lineage), so every
backend writes the same dataset. An explicit name -> module table; each module has
``Generator(cfg, tokenizer)`` with ``generate(prompt_ids, seeds, sampling, progress)``.
Modules are imported on use, so a backend's own dependencies are needed only when it
is chosen.
"""

from __future__ import annotations

import dataclasses
import importlib

from ..errors import InputError

GENERATORS = {
    "hf": "offline_rlhf.backends.hf",       # the built-in transformers decode loop
}


@dataclasses.dataclass
class Sampling:
    """Decoding settings of one run."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    greedy: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)


def backend_module(name: str):
    if name not in GENERATORS:
        raise InputError(f"backend: must be one of {', '.join(GENERATORS)}, got {name!r}")
    return importlib.import_module(GENERATORS[name])
