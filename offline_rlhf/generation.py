"""Batch generation: K sampled responses per prompt, with behaviour log-probs, into shards.

Throughput: prompts are bucketed by length and batched by a token budget, left padded;
each prompt is prefilled once and its KV cache repeated for its K samples; rows that
finish leave the batch.

Determinism: sample ``k`` of prompt ``p`` draws its uniforms from a generator seeded
by ``(run seed, p, k)`` and is sampled by inverse CDF, so its tokens do not depend on
which rows share its batch, on the token budget, on the worker count, or on restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import pyarrow as pa
import torch

from .batching import budget_batches, pad, positions
from .config import opt, to_dict
from .errors import InputError, located
from .lineage import canonical_json, code_version, config_hash, utc_now
from .logprobs import processed_logps
from .models import apply_chat_template, check_model_dir, fingerprint, load_policy, load_tokenizer
from .prompts import normalize_prompts
from .schemas import load_schema
from .shards import is_dataset, open_dataset, read_rows
from .stage import resolve_worker, run_chunks

OVERLONG = ("error", "truncate", "skip")
# Settings that change how fast rows are made, not which rows: left out of the config hash.
NOT_HASHED = ("output", "worker", "num_workers", "token_budget", "device")


@dataclasses.dataclass
class Sampling:
    """Decoding settings of one run."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    greedy: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GenerateConfig:
    prompts: str = opt(help="prompts dataset (directory/URL), or a JSONL/JSON/Parquet prompt file")
    output: str = opt(help="output generations dataset (directory or URL)")
    policy: str = opt(help="policy model directory (transformers, safetensors)")
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
    token_budget: int = opt(32768, "tokens per batch: prompts x K x (longest prompt + max_new_tokens)")
    chunk_prompts: int = opt(256, "prompts per output shard: the unit of resume and of work sharing")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    bits: int | None = opt(None, "load the policy in 4 (NF4) or 8 bits with bitsandbytes")
    device: str | None = opt(None, "cuda | cpu (default: cuda when available)")
    worker: int | None = opt(None, "this worker's index (default: RANK from the launcher, else 0)")
    num_workers: int | None = opt(None, "number of workers (default: WORLD_SIZE, else 1)")
    trust_remote_code: bool = opt(False, "allow custom model code from the model directory")
    ilql_heads: str | None = opt(None, "directory with ILQL heads (heads.safetensors): sample "
                                 "from logits + ilql_beta * (min target Q - V)")
    ilql_beta: float = opt(1.0, "ILQL value-guidance strength (0: the policy alone)")
    ilql_top_k: int = opt(0, "ILQL: perturb only the policy's top-k tokens (0: all)")

    def __post_init__(self):
        checks = [("num_samples", self.num_samples >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "must be >= 0"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("max_prompt_tokens", self.max_prompt_tokens >= 1, "must be >= 1"),
                  ("overlong", self.overlong in OVERLONG, f"must be one of {', '.join(OVERLONG)}"),
                  ("token_budget", self.token_budget >= 1, "must be >= 1"),
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


def _inverse_cdf(logps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    probs = logps.exp()
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    idx = idx.clamp(max=probs.shape[-1] - 1)
    # float round-off at the very top of the CDF can land on a filtered token
    bad = probs.gather(1, idx[:, None])[:, 0] <= 0
    return torch.where(bad, probs.argmax(-1), idx)


@torch.no_grad()
def sample_batch(model, tokenizer, prompt_ids: list[list[int]], seeds: list[list[int]],
                 s: Sampling, logits_hook=None) -> list[list[dict]]:
    """Sample ``len(seeds[p])`` responses for each prompt; return, per prompt and sample,
    ``tokens``, ``logps`` (behaviour log-probs) and ``finish_reason``.

    ``logits_hook(logits, hidden, rows)``, when given, may change the next-token logits
    (value-guided decoding) before the sampling distribution is formed.
    """
    device = next(model.parameters()).device
    k = len(seeds[0])
    n_rows, steps = len(prompt_ids) * k, s.max_new_tokens
    ids, mask = pad(prompt_ids, tokenizer.pad_token_id, "left", device)
    pos = positions(mask)
    want_hidden = logits_hook is not None
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1, output_hidden_states=want_hidden)
    cache = out.past_key_values
    if k > 1:
        cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].float().repeat_interleave(k, 0)
    hidden = out.hidden_states[-1][:, -1].repeat_interleave(k, 0) if want_hidden else None
    mask = mask.repeat_interleave(k, 0)
    next_pos = pos[:, -1].repeat_interleave(k, 0) + 1
    uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seed))
                            for row in seeds for seed in row]).to(device)
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), device=device)
    tokens = torch.full((n_rows, steps), tokenizer.pad_token_id, dtype=torch.long)
    logps = torch.zeros((n_rows, steps), dtype=torch.float32)
    length = torch.zeros(n_rows, dtype=torch.long)
    reason = ["length"] * n_rows
    rows = torch.arange(n_rows, device=device)   # global row of each batch row
    alive = torch.ones(n_rows, dtype=torch.bool, device=device)
    window = max((len(x) for x in s.stop), default=0) + 2
    for t in range(steps):
        if logits_hook is not None:
            logits = logits_hook(logits, hidden, rows)
        lp = processed_logps(logits) if s.greedy else \
            processed_logps(logits, s.temperature, s.top_k, s.top_p)
        tok = lp.argmax(-1) if s.greedy else _inverse_cdf(lp, uniforms[rows, t])
        tok_lp = lp.gather(1, tok[:, None])[:, 0]
        cpu_rows = rows.cpu()
        tokens[cpu_rows, t] = tok.cpu()
        logps[cpu_rows, t] = tok_lp.cpu()
        live = alive.cpu()
        ended = (alive & torch.isin(tok, eos)).cpu()
        length[cpu_rows[live]] = t + 1
        for g in cpu_rows[ended].tolist():
            reason[g] = "eos"
        if s.stop:  # stop strings need the text: per row, only for rows still going
            for b in torch.nonzero(live & ~ended, as_tuple=False)[:, 0].tolist():
                g = int(cpu_rows[b])
                tail = tokenizer.decode(tokens[g, max(0, t + 1 - window):t + 1],
                                        skip_special_tokens=True)
                if any(x in tail for x in s.stop):
                    reason[g], ended[b] = "stop", True
        alive &= ~ended.to(device)
        if not alive.any() or t == steps - 1:
            break
        if alive.sum() <= 0.75 * len(rows):   # drop finished rows from the batch
            keep = torch.nonzero(alive, as_tuple=False)[:, 0]
            cache.batch_select_indices(keep)
            rows, alive, tok, mask, next_pos = rows[keep], alive[keep], tok[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True, output_hidden_states=want_hidden)
        logits = out.logits[:, -1].float()
        hidden = out.hidden_states[-1][:, -1] if want_hidden else None
        next_pos = next_pos + 1
    results = []
    for p in range(len(prompt_ids)):
        results.append([{"tokens": tokens[g, :int(length[g])].tolist(),
                         "logps": logps[g, :int(length[g])].clamp(max=0.0).tolist(),
                         "finish_reason": reason[g]} for g in range(p * k, (p + 1) * k)])
    return results


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([e] if isinstance(e, int) else (e or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


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
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
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
    worker, num_workers = resolve_worker(cfg.worker, cfg.num_workers)
    check_model_dir(cfg.policy, "policy")
    tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code)
    prompts, prompts_fp = load_prompt_table(cfg.prompts)
    texts = render_prompts(tokenizer, prompts, cfg.prompts)
    if cfg.overlong == "error":  # refuse before any work, not hours in
        encode_prompts(tokenizer, texts, cfg, cfg.prompts)
    policy_fp = fingerprint(cfg.policy)
    hashed = {k: v for k, v in to_dict(cfg).items() if k not in NOT_HASHED}
    hashed.update(prompts=prompts_fp, policy=policy_fp)
    logits_hook_factory = None
    if cfg.ilql_heads:
        from .ilql import load_heads, value_guided_hook
        load_heads(cfg.ilql_heads)  # refuse a bad directory before any work
        hashed["ilql_heads"] = _heads_fingerprint(cfg.ilql_heads)

        def logits_hook_factory(model, _path=cfg.ilql_heads):
            heads = load_heads(_path, next(model.parameters()).device)
            return value_guided_hook(heads, cfg.ilql_beta, cfg.ilql_top_k)
    chash = config_hash(hashed)
    decoding = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.max_new_tokens, "greedy": cfg.greedy, "seed": cfg.seed}
    from .shards import ShardWriter
    writer = ShardWriter(cfg.output, "generations", config_hash=chash, lineage={
        "policy_fingerprint": policy_fp, "prompts": prompts_fp, "decoding": decoding,
        "stop": cfg.stop, "code_version": code_version()})
    state: dict = {}
    total = max(1, math.ceil(prompts.num_rows / cfg.chunk_prompts))

    def compute(chunk: int, progress) -> tuple[pa.Table, dict]:
        if "model" not in state:
            state["model"] = load_policy(cfg.policy, dtype=cfg.dtype, bits=cfg.bits,
                                         device=cfg.device, trust_remote_code=cfg.trust_remote_code)
            state["hook"] = logits_hook_factory(state["model"]) if logits_hook_factory else None
        lo = chunk * cfg.chunk_prompts
        part = prompts.slice(lo, cfg.chunk_prompts)
        ids, counts = encode_prompts(tokenizer, texts[lo:lo + part.num_rows], cfg, cfg.prompts, lo)
        rows = _generate_rows(state["model"], tokenizer, part, texts[lo:lo + part.num_rows], ids,
                              cfg, progress, state["hook"])
        meta = {"decoding": decoding, "policy_fingerprint": policy_fp, "config_hash": chash,
                "code_version": code_version(), "created_at": utc_now()}
        for r in rows:
            r.update(meta)
        table = pa.Table.from_pylist(rows, schema=load_schema("generations").arrow)
        return table, counts

    return run_chunks(writer, total, worker, num_workers, compute,
                      units_per_chunk=lambda c: prompts.slice(c * cfg.chunk_prompts,
                                                              cfg.chunk_prompts).num_rows,
                      desc="generate", unit="prompts",
                      info={"config": to_dict(cfg), "prompts_source": str(Path(cfg.prompts))})


def _heads_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    for name in ("heads.json", "heads.safetensors"):
        h.update((Path(path) / name).read_bytes())
    return h.hexdigest()


def _generate_rows(model, tokenizer, part: pa.Table, texts, ids, cfg: GenerateConfig,
                   progress, hook) -> list[dict]:
    pids = part.column("prompt_id").to_pylist()
    messages = part.column("messages").to_pylist()
    answers = part.column("reference_answer").to_pylist()
    live = [i for i, x in enumerate(ids) if x is not None]
    by_prompt: dict[int, list[dict]] = {}
    lengths = [len(ids[i]) for i in live]
    for batch in budget_batches(lengths, cfg.token_budget, extra=cfg.max_new_tokens,
                                row_multiplier=cfg.num_samples):
        members = [live[b] for b in batch]
        seeds = [[sample_seed(cfg.seed, pids[i], k) for k in range(cfg.num_samples)]
                 for i in members]
        results = sample_batch(model, tokenizer, [ids[i] for i in members], seeds,
                               cfg.sampling, hook)
        for i, samples in zip(members, results):
            by_prompt[i] = samples
        progress.update(units=len(members), samples=len(members) * cfg.num_samples,
                        tokens=sum(len(x["tokens"]) for r in results for x in r))
    rows = []
    for i in sorted(by_prompt):   # output order: prompt order, then sample index
        for k, smp in enumerate(by_prompt[i]):
            rows.append({"prompt_id": pids[i], "prompt": texts[i], "messages": messages[i],
                         "reference_answer": answers[i], "sample_index": k,
                         "response": response_text(tokenizer, smp["tokens"], smp["finish_reason"],
                                                   cfg.stop),
                         "prompt_token_ids": ids[i], "response_token_ids": smp["tokens"],
                         "behaviour_logps": smp["logps"], "finish_reason": smp["finish_reason"]})
    return rows
