"""The generate stage: K sampled responses per prompt, with behaviour log-probs, into shards.

The stage owns prompts (rendering, tokenizing, over-long handling), per-sample seeds
(sample ``k`` of prompt ``p`` is seeded by ``(run seed, p, k)``), rows, lineage and
shards; a *backend* (``offline_rlhf/backends/``: ``--backend hf``, the built-in decode
loop, ...) turns token ids and seeds into tokens and log-probs, and an *executor*
(``offline_rlhf/executors/``) decides where chunks run. Whichever runs, the dataset is
the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import pyarrow as pa

from .backends import SPEED_OPTIONS, BackendOptions, Sampling, backend_module, check_backend
from .config import opt, to_dict
from .errors import InputError, located
from .executors import EXECUTOR_OPTIONS, ExecutorOptions, run_stage
from .layouts import prompt_ids
from .lineage import canonical_json, code_version, config_hash, utc_now
from .models import apply_chat_template, check_model_dir, fingerprint, load_tokenizer
from .prompts import normalize_prompts
from .schemas import load_schema
from .shards import is_dataset, open_dataset, read_rows
from .stage import LazyWorker, StagePlan

OVERLONG = ("error", "truncate", "skip")
# Settings that change how fast rows are made, not which rows: left out of the config hash.
# (the backend is hashed: engines may differ in the last bits of their arithmetic)
NOT_HASHED = ("output", "overwrite", "token_budget", "device", *EXECUTOR_OPTIONS, *SPEED_OPTIONS)


@dataclasses.dataclass
class GenerateConfig(BackendOptions, ExecutorOptions):
    prompts: str = opt(help="prompts dataset (directory/URL), or a JSONL/JSON/Parquet prompt file")
    output: str = opt(help="output generations dataset (directory or URL)")
    policy: str = opt(help="policy model directory (transformers, safetensors)")
    overwrite: bool = opt(False, "replace an existing output dataset: it is removed (datasets only) once every input is checked, and the stage starts afresh")
    num_samples: int = opt(4, "K: responses sampled per prompt")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this mass")
    top_k: int = opt(0, "keep the k most likely tokens (0: off)")
    max_new_tokens: int = opt(128, "most tokens generated per response")
    stop: list[str] = opt([], "stop strings: a response ends where its text first contains one "
                          "(the text is cut before it)")
    greedy: bool = opt(False, "argmax decoding, for evaluation (behaviour log-probs are then "
                       "those of the unmodified distribution)")
    seed: int = opt(0, "run seed; each sample's randomness derives from (seed, prompt id, index)")
    max_prompt_tokens: int = opt(1024, "longest prompt accepted, in policy tokens")
    overlong: str = opt("error", "prompts over max_prompt_tokens: error | truncate (keep the "
                        "last tokens) | skip; truncated and skipped prompts are counted in the manifest")
    token_budget: int | None = opt(None, "hf backend: tokens per batch, prompts x K x (longest "
                                   "prompt + max_new_tokens) (default: 16384 on CPU; on CUDA "
                                   "sized from free memory and printed)")
    chunk_prompts: int = opt(256, "prompts per output shard: the unit of resume and of work sharing")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    bits: int | None = opt(None, "load the policy in 4 (NF4) or 8 bits with bitsandbytes")
    device: str | None = opt(None, "cuda | cpu (default: cuda when available)")
    trust_remote_code: bool = opt(False, "allow custom model code from the model directory")
    ilql_heads: str | None = opt(None, "directory with ILQL heads (heads.safetensors): sample "
                                 "from logits + ilql_beta * (min target Q - V)")
    ilql_beta: float = opt(1.0, "ILQL value-guidance strength (0: the policy alone)")
    ilql_top_k: int = opt(0, "ILQL: perturb only the policy's top-k tokens (0: all)")

    def __post_init__(self):
        super().__post_init__()
        checks = [("num_samples", self.num_samples >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "must be >= 0"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("max_prompt_tokens", self.max_prompt_tokens >= 1, "must be >= 1"),
                  ("overlong", self.overlong in OVERLONG, f"must be one of {', '.join(OVERLONG)}"),
                  ("token_budget", self.token_budget is None or self.token_budget >= 1,
                   "must be >= 1"),
                  ("chunk_prompts", self.chunk_prompts >= 1, "must be >= 1")]
        for name, ok, why in checks:
            if not ok:
                raise InputError(f"{name}: {why}, got {getattr(self, name)!r}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens,
                        self.greedy, list(self.stop))


def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"{run_seed}\0{prompt_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def response_text(tokenizer, tokens: list[int], finish_reason: str, stop: list[str]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if finish_reason == "stop":
        cut = min((text.find(x) for x in stop if x in text), default=-1)
        if cut >= 0:
            text = text[:cut]
    return text


# --------------------------------------------------------------------------- prompts

def load_prompt_table(path: str) -> tuple[pa.Table, str]:
    """A prompts table and its fingerprint, from a prompts dataset or a prompt file."""
    if is_dataset(path):
        ds = open_dataset(path, require_complete=True)
        if ds.schema_name != "prompts":
            raise InputError(f"{path}: is a {ds.schema_name} dataset, not prompts")
        return ds.read(), ds.fingerprint
    table = normalize_prompts(read_rows(path)[0], path)
    digest = hashlib.sha256()
    for row in table.to_pylist():   # the content, not only the ids
        digest.update(canonical_json(row).encode() + b"\n")
    return table, digest.hexdigest()


def render_prompts(tokenizer, table: pa.Table, source: str | None = None) -> list[str]:
    """Prompt text as fed to the policy: chat messages go through its chat template."""
    out = []
    for i, (text, messages) in enumerate(zip(table.column("prompt").to_pylist(),
                                             table.column("messages").to_pylist())):
        if messages is not None:
            if not tokenizer.chat_template:
                raise InputError("the policy's tokenizer has no chat template, but some prompts "
                                 "are chat messages")
            text = apply_chat_template(tokenizer, messages, (source, i, "messages"),
                                       add_generation_prompt=True)
        out.append(text)
    return out


def encode_prompts(tokenizer, texts: list[str], cfg: GenerateConfig, source: str,
                   first_row: int = 0) -> tuple[list[list[int] | None], dict]:
    """Token ids per prompt (None when skipped) and counters for the manifest."""
    ids = prompt_ids(tokenizer, texts)
    counts = {"prompts_truncated": 0, "prompts_skipped": 0}
    out: list[list[int] | None] = []
    for i, x in enumerate(ids):
        if not x:
            raise InputError(located("prompt encodes to no tokens", source, first_row + i, "prompt"))
        if len(x) > cfg.max_prompt_tokens:
            if cfg.overlong == "error":
                raise InputError(located(
                    f"prompt has {len(x)} tokens, more than max_prompt_tokens={cfg.max_prompt_tokens} "
                    "(set overlong to truncate or skip)", source, first_row + i, "prompt"))
            if cfg.overlong == "skip":
                counts["prompts_skipped"] += 1
                out.append(None)
                continue
            counts["prompts_truncated"] += 1
            x = x[-cfg.max_prompt_tokens:]
        out.append(x)
    return out, counts


# --------------------------------------------------------------------------- the stage

def generate(cfg: GenerateConfig) -> dict:
    """Run the generate stage; return the output manifest (plus this process's timings)."""
    return run_stage(plan_generate(cfg), cfg)


def plan_generate(cfg: GenerateConfig) -> StagePlan:
    """Check everything that can be checked before a model loads; describe the stage."""
    check_backend(cfg, "generate")
    check_model_dir(cfg.policy, "policy")
    tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code)
    prompts, prompts_fp = load_prompt_table(cfg.prompts)
    texts = render_prompts(tokenizer, prompts, cfg.prompts)
    if cfg.overlong == "error":  # refuse before any work, not hours in
        encode_prompts(tokenizer, texts, cfg, cfg.prompts)
    policy_fp = fingerprint(cfg.policy)
    hashed = {k: v for k, v in to_dict(cfg).items() if k not in NOT_HASHED}
    hashed.update(prompts=prompts_fp, policy=policy_fp)
    if cfg.ilql_heads:
        from .ilql import load_heads
        load_heads(cfg.ilql_heads)  # refuse a bad directory before any work
        hashed["ilql_heads"] = _heads_fingerprint(cfg.ilql_heads)
    chash = config_hash(hashed)
    decoding = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.max_new_tokens, "greedy": cfg.greedy, "seed": cfg.seed,
                "stop": list(cfg.stop)}
    meta = {"decoding": decoding, "policy_fingerprint": policy_fp, "config_hash": chash,
            "code_version": code_version()}
    total = max(1, math.ceil(prompts.num_rows / cfg.chunk_prompts))
    units = [prompts.slice(c * cfg.chunk_prompts, cfg.chunk_prompts).num_rows for c in range(total)]
    return StagePlan(
        name="generate", unit="prompts", units=units,
        writer={"url": cfg.output, "schema": "generations", "config_hash": chash,
                "config": hashed, "lineage": {
            "policy_fingerprint": policy_fp, "prompts": prompts_fp, "decoding": decoding,
            "stop": cfg.stop, "code_version": code_version()}},
        worker=GenerateWorker(cfg, prompts, texts, meta),
        info={"config": to_dict(cfg), "prompts_source": str(Path(cfg.prompts))},
        overwrite=cfg.overwrite)


def _heads_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    for name in ("heads.json", "heads.safetensors"):
        h.update((Path(path) / name).read_bytes())
    return h.hexdigest()


class GenerateWorker(LazyWorker):
    """Generates chunks of prompts: the tokenizer and the backend load on first use."""

    def __init__(self, cfg: GenerateConfig, prompts: pa.Table, texts: list[str], meta: dict):
        self.cfg, self.prompts, self.texts, self.meta = cfg, prompts, texts, meta

    def load(self):
        tokenizer = load_tokenizer(self.cfg.policy, self.cfg.trust_remote_code)
        return tokenizer, backend_module(self.cfg.backend).Generator(self.cfg, tokenizer)

    def compute(self, chunk: int, progress) -> tuple[pa.Table, dict]:
        cfg = self.cfg
        tokenizer, backend = self.loaded
        lo = chunk * cfg.chunk_prompts
        part = self.prompts.slice(lo, cfg.chunk_prompts)
        texts = self.texts[lo:lo + part.num_rows]
        ids, counts = encode_prompts(tokenizer, texts, cfg, cfg.prompts, lo)
        pids = part.column("prompt_id").to_pylist()
        live = [i for i, x in enumerate(ids) if x is not None]
        seeds = [[sample_seed(cfg.seed, pids[i], k) for k in range(cfg.num_samples)] for i in live]
        samples = backend.generate([ids[i] for i in live], seeds, cfg.sampling, progress) \
            if live else []
        rows = _rows(tokenizer, part, texts, ids, dict(zip(live, samples)), cfg)
        meta = {**self.meta, "created_at": utc_now()}
        for r in rows:
            r.update(meta)
        return pa.Table.from_pylist(rows, schema=load_schema("generations").arrow), counts


def _rows(tokenizer, part: pa.Table, texts, ids, by_prompt: dict[int, list[dict]],
          cfg: GenerateConfig) -> list[dict]:
    """Output rows in prompt order, then sample index."""
    pids = part.column("prompt_id").to_pylist()
    messages = part.column("messages").to_pylist()
    answers = part.column("reference_answer").to_pylist()
    rows = []
    for i in sorted(by_prompt):
        for k, smp in enumerate(by_prompt[i]):
            rows.append({"prompt_id": pids[i], "prompt": texts[i], "messages": messages[i],
                         "reference_answer": answers[i], "sample_index": k,
                         "response": response_text(tokenizer, smp["tokens"], smp["finish_reason"],
                                                   cfg.stop),
                         "prompt_token_ids": ids[i], "response_token_ids": smp["tokens"],
                         "behaviour_logps": smp["logps"], "finish_reason": smp["finish_reason"]})
    return rows
