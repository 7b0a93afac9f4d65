"""Reference log-probs that the pairs lack, computed once per job and stored with the output.

``train dpo --reference MODEL`` fills the reference sums of pairs imported without them
(or whose stored sums describe sequences that truncation changed). The reference is, by
what it is:

- **the policy itself** (same content fingerprint, same ``--bits``): no second model.
  A LoRA / QLoRA policy runs with its adapter switched off, i.e. its (quantized) base,
  as TRL does; a fully fine-tuned policy runs before its first step (checkpoints are
  loaded after this pass, so a resumed run sees the starting weights too);
- **another model**, or the policy at other ``--reference-bits``: loaded (quantized
  when asked), used, deleted and its memory handed back before training starts.

Every process computes its share of the pairs (``i % world == rank``); the shares are
gathered and the main process writes ``OUTPUT/reference_logps.safetensors``, keyed by
content: the reference's fingerprint and bits, the data's fingerprint, the truncation
settings and the numerics (dtype, mixed precision). A resumed run, or a rerun with the
same key, reads the file instead of running the reference again; a changed key (a new
reference, other data or truncation) recomputes and says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..console import progress, status
from ..lineage import config_hash, utc_now
from ..models import (
    adapter_disabled,
    fingerprint,
    free_memory,
    frozen_forward,
    is_adapter_model,
    load_reference,
)

CACHE_NAME = "reference_logps.safetensors"


@dataclass
class ReferenceSource:
    shared: bool          # the policy's own (starting or base) weights: no second model
    fingerprint: str
    bits: int | None
    describe: str


def resolve_source(cfg, model) -> ReferenceSource:
    """Whether ``cfg.reference`` is the policy itself (by content, not path) at the
    policy's bits, and how it will be run."""
    ref_fp = fingerprint(cfg.reference)
    bits = cfg.bits if cfg.reference_bits is None else (cfg.reference_bits or None)
    if bits == cfg.bits and ref_fp == fingerprint(cfg.policy):
        how = ("the policy's base, adapter off" + (f", {bits}-bit" if bits else "")
               if is_adapter_model(model) else "the policy before its first step")
        return ReferenceSource(True, ref_fp, bits, how)
    return ReferenceSource(False, ref_fp, bits, f"{cfg.reference}" + (f" in {bits} bits" if bits else ""))


def cache_key(cfg, source: ReferenceSource, data_fingerprint: str, mixed_precision: str) -> dict:
    """What the stored values depend on; its hash is the cache key."""
    key = {"reference_fingerprint": source.fingerprint, "reference_bits": source.bits,
            "data_fingerprint": data_fingerprint, "max_prompt_tokens": cfg.max_prompt_tokens,
            "max_completion_tokens": cfg.max_completion_tokens, "dtype": cfg.dtype,
            "mixed_precision": str(mixed_precision)}
    if getattr(cfg, "ld_alpha", None) is not None:    # LD-DPO sums weigh the tokens
        key["ld_alpha"] = cfg.ld_alpha
    return key


def read_cache(path: Path, key: str, need: list[int]) -> np.ndarray | None:
    """The stored ``[len(need), 2]`` sums if ``path`` holds them for ``key``, else None."""
    from safetensors import safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            index, values = f.get_tensor("index"), f.get_tensor("values")
    except (OSError, ValueError, KeyError):
        return None      # unreadable: recompute (and rewrite) rather than trust it
    if index.tolist() != list(need):
        return None
    return values.numpy()


def write_cache(path: Path, key: str, meta: dict, need: list[int], values: np.ndarray) -> None:
    """Write atomically (temporary name, then rename): a kill leaves the old file or none."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"index": torch.tensor(need, dtype=torch.int64), "values": torch.from_numpy(values)},
              str(tmp), metadata={"key": key, "meta": json.dumps(meta), "pairs": str(len(need)),
                                  "created_at": utc_now().isoformat()})
    os.replace(tmp, path)


def fill_reference(task, model, acc) -> tuple[np.ndarray, dict]:
    """Reference sums ``[len(task.need), 2]`` of the pairs ``task.need``: read from the
    output's cache when it matches, else computed (shared over the processes) and stored."""
    cfg, need = task.cfg, task.need
    source = resolve_source(cfg, model)
    from ..pairs import pairs_fingerprint  # the data's content, hashed only when a pass is due
    meta = cache_key(cfg, source, pairs_fingerprint(cfg.data, fingerprint(cfg.policy)),
                     acc.mixed_precision)
    meta.update(getattr(task, "reference_key", {}))   # what else the task's sums depend on
    key = config_hash(meta)
    path = Path(cfg.output) / CACHE_NAME
    cached = read_cache(path, key, need)
    if cached is not None:
        if acc.is_main_process:
            status(f"reference log-probs: {len(need)} pairs reused from {path}")
        return cached, {"ref_logps_reused": len(need), "reference": source.describe}
    if path.exists() and acc.is_main_process:
        status(f"reference log-probs: {path} was computed for another reference, data or "
               "truncation; recomputing")
    mine = need[acc.process_index::acc.num_processes]
    status(f"reference log-probs: computing {len(mine)} of {len(need)} pairs on process "
           f"{acc.process_index + 1}/{acc.num_processes} with {source.describe}")
    values = _compute(task, model, acc, source, mine)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object
        parts = gather_object([(mine, values)])
        found = {i: v for idx, vals in parts for i, v in zip(idx, vals)}
        values = np.array([found[i] for i in need], dtype=np.float64).reshape(-1, 2)
    if acc.is_main_process:
        truncated = task.stats["prompts_truncated"] + task.stats["completions_truncated"]
        write_cache(path, key, {**meta, "reference": cfg.reference, "how": source.describe,
                                "truncated": truncated}, need, values)
    return values, {"ref_logps_computed": len(need), "reference": source.describe}


def _compute(task, model, acc, source: ReferenceSource, indices: list[int]) -> np.ndarray:
    bar = progress(len(indices), "reference log-probs", "pair", enabled=acc.is_main_process)
    try:
        if source.shared:
            with frozen_forward(model), adapter_disabled(model):
                return task.reference_sums(model, indices, acc, bar)
        cfg = task.cfg
        ref = load_reference(cfg.reference, dtype=cfg.dtype, bits=source.bits, device=str(acc.device),
                             trust_remote_code=cfg.trust_remote_code)
        try:
            with frozen_forward(ref):   # computed as the training forward computes
                return task.reference_sums(ref, indices, acc, bar)
        finally:
            del ref
            free_memory()
    finally:
        bar.close()


def pairs_with_reference(data: str, output: str, dest: str) -> str:
    """Write the pairs ``data`` with the reference sums that a ``train dpo`` run stored in
    ``output`` as a new pairs dataset ``dest``, for other runs to read without a reference.
    Refused where truncation cut pairs (their computed sums are not the stored kind, which
    describes whole sequences) or where the sums were computed for other data."""
    from safetensors import safe_open

    from ..errors import InputError
    from ..schemas import replace_column
    from ..shards import ShardWriter, open_dataset
    src = open_dataset(data, require_complete=True)
    cache = Path(output) / CACHE_NAME
    if not cache.is_file():
        raise InputError(f"{cache}: no stored reference log-probs")
    with safe_open(str(cache), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        index, values = f.get_tensor("index").tolist(), f.get_tensor("values").tolist()
    if meta["data_fingerprint"] != src.fingerprint:
        raise InputError(f"{cache}: computed for other data than {data}")
    if meta.get("truncated"):
        raise InputError(f"{cache}: {meta['truncated']} pairs were truncated in training; their "
                         "sums describe the cut sequences and are not stored as pair columns")
    table = src.read()
    sums = {side: table.column(f"{side}_ref_logps_sum").to_pylist() for side in ("chosen", "rejected")}
    for i, (c, r) in zip(index, values):
        sums["chosen"][i], sums["rejected"][i] = c, r
    for side, col in sums.items():
        table = replace_column(table, f"{side}_ref_logps_sum", col)
    lineage = {**src.lineage, "reference_fingerprint": meta["reference_fingerprint"]}
    with ShardWriter(dest, "pairs", lineage=lineage) as w:
        w.write(0, table)
        w.finish(total_chunks=1)
    return dest
