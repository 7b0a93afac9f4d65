"""The built-in backend: our own transformers decode loop.

Throughput: prompts are bucketed by length and batched by a token budget, left padded;
each prompt is prefilled once and its KV cache repeated for its K samples; rows that
finish leave the batch.

Determinism: each sample draws its uniforms from a generator seeded by its own seed
(the stage derives it from (run seed, prompt id, sample index)) and is sampled by
inverse CDF, so its tokens do not depend on which rows share its batch, on the token
budget, on the worker count, or on restarts.

Batch size: ``--token-budget`` bounds prompts x K x (longest prompt + max new tokens).
Left unset, it is 16384 on CPU and, on CUDA, what the free device memory holds
(:func:`cuda_token_budget`: KV cache per token plus activation headroom).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ..batching import budget_batches, pad, positions
from ..console import status
from ..logps import processed_logps, sequence_logps
from ..models import frozen_forward, load_policy, load_reference
from . import Sampling, eos_token_ids

# Measured (bench/generate.py's model, hidden 512 x 8 layers, 2 cores): 8192-16384 tokens a
# batch decoded at 550-770 tokens/s, 32768 at 377-413 (the dynamic cache grows by copying,
# and a larger batch's working set leaves the CPU caches).
CPU_TOKEN_BUDGET = 16384


class Generator:
    """Loads the policy (and ILQL heads, when asked) once; samples batches of prompts."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.model = load_policy(cfg.policy, dtype=cfg.dtype, bits=cfg.bits, device=cfg.device,
                                 trust_remote_code=cfg.trust_remote_code)
        self.token_budget = cfg.token_budget or default_token_budget(self.model, cfg)
        self.hook = None
        if cfg.ilql_heads:
            from ..ilql import load_heads, value_guided_hook
            heads = load_heads(cfg.ilql_heads, next(self.model.parameters()).device)
            self.hook = value_guided_hook(heads, cfg.ilql_beta, cfg.ilql_top_k)

    def generate(self, prompt_ids: list[list[int]], seeds: list[list[int]], sampling: Sampling,
                 progress) -> list[list[dict]]:
        """Per prompt, per seed: ``tokens``, ``logps`` (behaviour) and ``finish_reason``."""
        out: list[list[dict] | None] = [None] * len(prompt_ids)
        k = len(seeds[0]) if seeds else 1
        for batch in budget_batches([len(x) for x in prompt_ids], self.token_budget,
                                    extra=sampling.max_new_tokens, row_multiplier=k):
            results = sample_batch(self.model, self.tokenizer, [prompt_ids[i] for i in batch],
                                   [seeds[i] for i in batch], sampling, self.hook)
            for i, samples in zip(batch, results):
                out[i] = samples
            progress.update(units=len(batch), samples=len(batch) * k,
                            tokens=sum(len(x["tokens"]) for r in results for x in r))
        return out  # type: ignore[return-value]


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
    cache, cache_kw = _new_cache(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1, output_hidden_states=want_hidden, **{cache_kw: cache})
    if k > 1:
        cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].float().repeat_interleave(k, 0)
    hidden = out.hidden_states[-1][:, -1].repeat_interleave(k, 0) if want_hidden else None
    mask = mask.repeat_interleave(k, 0)
    next_pos = pos[:, -1].repeat_interleave(k, 0) + 1
    uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seed))
                            for row in seeds for seed in row]).to(device)
    eos = torch.tensor(eos_token_ids(tokenizer, getattr(model, "generation_config", None),
                                     model.config), device=device)
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
                    use_cache=True, output_hidden_states=want_hidden, **{cache_kw: cache})
        logits = out.logits[:, -1].float()
        hidden = out.hidden_states[-1][:, -1] if want_hidden else None
        next_pos = next_pos + 1
    results = []
    for p in range(len(prompt_ids)):
        results.append([{"tokens": tokens[g, :int(length[g])].tolist(),
                         "logps": logps[g, :int(length[g])].clamp(max=0.0).tolist(),
                         "finish_reason": reason[g]} for g in range(p * k, (p + 1) * k)])
    return results


def _new_cache(model):
    """An empty KV cache and the keyword the model's forward takes it by: ``cache`` from
    transformers 5.2x on, ``past_key_values`` before (passing the old name to a new
    version warns that it is deprecated)."""
    from transformers import DynamicCache
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    return DynamicCache(config=model.config), kw


# --------------------------------------------------------------------------- batch size

def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes: layers x 2 (K and V) x KV heads x head dim x dtype."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return c.num_hidden_layers * 2 * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def cuda_token_budget(config, dtype: torch.dtype, free_bytes: int, k: int, max_new_tokens: int,
                      fraction: float = 0.8) -> int:
    """Tokens per batch that ``fraction`` of ``free_bytes`` holds.

    A budget token costs its KV cache (x1.25: a dynamic cache grows by copying one
    layer at a time, and the prompt cache is repeated K times after prefill), plus its
    share of the prefill activations (at most 1/K of the budget is prefilled at once:
    hidden states, attention projections and the MLP of one layer, ~(6 x hidden + 3 x
    intermediate) values a token), plus its share of the per-step logits (one vocabulary
    row per sequence, in float32, ~6 copies while top-k/top-p are applied; a sequence
    holds at least ``max_new_tokens`` budget tokens).
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    elem = torch.tensor([], dtype=dtype).element_size()
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    act = (6 * c.hidden_size + 3 * inter) * elem / k
    logits = 6 * 4 * c.vocab_size / max(1, max_new_tokens)
    per_token = 1.25 * kv_bytes_per_token(c, dtype) + act + logits
    return max(1, int(fraction * free_bytes / per_token))


def default_token_budget(model, cfg) -> int:
    """The built-in default: 16384 on CPU; on CUDA, from the free device memory (printed)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    budget = cuda_token_budget(model.config, next(model.parameters()).dtype, free,
                               cfg.num_samples, cfg.max_new_tokens)
    status(f"generate: token budget {budget} ({free / 2**30:.1f} GiB free on {device}, "
           f"{kv_bytes_per_token(model.config, next(model.parameters()).dtype)} KV-cache bytes "
           "a token; set --token-budget to override)")
    return budget


# --------------------------------------------------------------------------- other stages

class ReferenceModel:
    """Teacher-forced log-probs with a transformers model (the reference path)."""

    def __init__(self, cfg, tokenizer):
        self.model = load_reference(cfg.reference, dtype=cfg.dtype, bits=cfg.bits,
                                    device=cfg.device, trust_remote_code=cfg.trust_remote_code)
        self.pad_id, self.token_budget = tokenizer.pad_token_id, cfg.token_budget

    def sequence_logps(self, prompts, responses) -> list[np.ndarray]:
        with frozen_forward(self.model):   # 4-bit: computed as a QLoRA policy's base computes
            return sequence_logps(self.model, prompts, responses, pad_id=self.pad_id,
                                  token_budget=self.token_budget)


def RewardModel(cfg):
    """The transformers reward-model scorer of the score stage."""
    from ..rewards.reward_model import RewardModelScorer
    return RewardModelScorer(cfg.reward_model, dtype=cfg.dtype, bits=cfg.bits, device=cfg.device,
                             token_budget=cfg.token_budget, max_length=cfg.max_length,
                             trust_remote_code=cfg.trust_remote_code)
