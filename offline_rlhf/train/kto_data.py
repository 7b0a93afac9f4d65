"""Examples for ``train kto``: single completions with a desirable / undesirable label.

Three sources, told apart by what ``data`` is:

- a **generations** dataset (scored): labels from the reward, by ``--desirable-threshold``
  or, per prompt group, the top / bottom ``--group-fraction``; reference sums from
  ``ref_logps_sum``;
- **pairs** (a pairs dataset, or any preference file ``import-pairs`` reads): the chosen
  completion desirable, the rejected one undesirable; reference sums from the pair columns;
- a **TRL unpaired file** (JSONL / JSON / Parquet with ``prompt``, ``completion`` and a
  boolean ``label``), as TRL's KTO datasets are; no reference sums.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from ..datafiles import read_rows
from ..errors import InputError
from ..layouts import encode_prompt
from ..pairs import check_pairs_source, read_pairs
from ..shards import Dataset, is_dataset, open_dataset_of
from .dpo import PAIR_COLUMNS

GEN_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "sample_index", "response",
               "response_token_ids", "reward", "reward_normalized", "ref_logps_sum"]
UNPAIRED = ("prompt", "completion", "label")


def source_kind(data: str) -> str:
    """``generations``, ``pairs`` or ``unpaired`` (a file with prompt/completion/label)."""
    if is_dataset(data):
        kind = Dataset(data, require_complete=True).schema_name
        if kind not in ("generations", "pairs"):
            raise InputError(f"{data}: is a {kind} dataset; train kto reads generations or pairs")
        return kind
    rows, columns = read_rows(data)
    return "unpaired" if "label" in columns and "completion" in columns else "pairs"


def check_kto_source(cfg) -> str:
    """Before any model loads: the source is readable and its labels can be made."""
    kind = source_kind(cfg.data)
    if kind == "generations":
        open_dataset_of(cfg.data, "generations", "train kto")
    elif kind == "pairs":
        check_pairs_source(cfg.data, "train kto")
    else:
        unpaired_rows(cfg.data)
    if kind != "generations" and cfg.desirable_threshold is not None:
        raise InputError(f"desirable_threshold: {cfg.data} has labels, not rewards (a generations "
                         "dataset has rewards)")
    return kind


def unpaired_rows(path: str) -> list[dict]:
    """TRL's unpaired rows, each checked: text prompt and completion, boolean label."""
    rows, columns = read_rows(path)
    for c in UNPAIRED:
        if c not in columns:
            raise InputError(f"{path}: no column {c!r} (an unpaired file has prompt, completion, label)")
    for i, r in enumerate(rows):
        for c in ("prompt", "completion"):
            v = r.get(c)
            if not isinstance(v, str) or (c == "prompt" and not v):
                what = "non-empty text" if c == "prompt" else "text"
                raise InputError(f"{path}: row {i}, column {c}: expected {what}, got {v!r}")
        if not isinstance(r.get("label"), bool):
            raise InputError(f"{path}: row {i}, column label: expected true or false, got {r.get('label')!r}")
    return rows


def label_generations(rows: list[dict], column: str, threshold: float | None, fraction: float,
                      data: str) -> list[tuple[int, bool]]:
    """(row, desirable) of the rows that get a label. With a threshold: every row, reward
    >= threshold desirable. Else per prompt: the top ``floor(K * fraction)`` by reward
    (ties by sample index) desirable unless they equal the group's lowest reward, the
    bottom as many undesirable unless they equal its highest."""
    for i, r in enumerate(rows):
        v = r[column]
        if v is None or not math.isfinite(v):
            raise InputError(f"{data}: row {i}, column {column}: {v} (train kto needs a finite reward "
                             "on every row: run `offline-rlhf score` first)")
    if threshold is not None:
        return [(i, r[column] >= threshold) for i, r in enumerate(rows)]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["prompt_id"], []).append(i)
    out = []
    for members in groups.values():
        order = sorted(members, key=lambda i: (-rows[i][column], rows[i]["sample_index"]))
        k = math.floor(len(order) * fraction)
        if k == 0:
            continue
        hi, lo = rows[order[0]][column], rows[order[-1]][column]
        out += [(i, True) for i in order[:k] if rows[i][column] > lo]
        out += [(i, False) for i in order[-k:] if rows[i][column] < hi]
    return sorted(out)


def _from_generations(cfg, tokenizer):
    rows = open_dataset_of(cfg.data, "generations", "train kto").read(columns=GEN_COLUMNS).to_pylist()
    labelled = label_generations(rows, cfg.reward_column, cfg.desirable_threshold, cfg.group_fraction, cfg.data)
    out = []
    for i, good in labelled:
        r = rows[i]
        p = r["prompt_token_ids"] or encode_prompt(tokenizer, r["prompt"])
        out.append((p, r["response_token_ids"], good, r["ref_logps_sum"], r["prompt_id"], i))
    return out, {"rows": len(rows), "labelled": len(labelled)}


def _from_pairs(cfg, tokenizer):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, r in enumerate(read_pairs(cfg.data, tokenizer, PAIR_COLUMNS, "train kto")):
        p = r["prompt_token_ids"] or tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
        for side, good in (("chosen", True), ("rejected", False)):
            c = r[f"{side}_token_ids"] or tokenizer(r[side], add_special_tokens=False)["input_ids"] + eos
            out.append((p, c, good, r[f"{side}_ref_logps_sum"], r["prompt"], f"{i}:{side}"))
    return out, {"pairs": len(out) // 2}


def _from_unpaired(cfg, tokenizer):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, r in enumerate(unpaired_rows(cfg.data)):
        p = encode_prompt(tokenizer, r["prompt"])
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + eos
        out.append((p, c, r["label"], None, r["prompt"], i))
    return out, {"rows": len(out)}


def read_examples(cfg, tokenizer) -> dict:
    """Token ids, labels, stored reference sums (None: not stored or cut by truncation),
    prompt keys (for the mismatched pairs) and a content key of the selection."""
    kind = source_kind(cfg.data)
    read = {"generations": _from_generations, "pairs": _from_pairs, "unpaired": _from_unpaired}[kind]
    items, stats = read(cfg, tokenizer)
    if not items:
        raise InputError(f"{cfg.data}: no labelled examples ({stats})")
    if all(good for _, _, good, *_ in items) or not any(good for _, _, good, *_ in items):
        which = "desirable" if items[0][2] else "undesirable"
        raise InputError(f"{cfg.data}: every labelled example is {which}; KTO needs both classes")
    stats.update(source=kind, prompts_truncated=0, completions_truncated=0)
    ex = {"prompts": [], "completions": [], "desirable": [], "ref": [], "prompt_keys": []}
    for p, c, good, ref, key, _ in items:
        cut_p, cut_c = len(p) > cfg.max_prompt_tokens, len(c) > cfg.max_completion_tokens
        stats["prompts_truncated"] += cut_p
        stats["completions_truncated"] += cut_c
        ex["prompts"].append(p[-cfg.max_prompt_tokens:])
        ex["completions"].append(c[:cfg.max_completion_tokens])
        ex["desirable"].append(bool(good))
        ex["ref"].append(None if cut_p or cut_c else ref)
        ex["prompt_keys"].append(str(key))
    ids = json.dumps([[str(x[5]), bool(x[2])] for x in items]).encode()
    return {**ex, "stats": stats, "key": hashlib.sha256(ids).hexdigest()[:16]}


def kl_partners(prompt_keys: list[str]) -> np.ndarray:
    """For each example, the example whose completion forms its mismatched pair: the
    previous one in a fixed shuffled order (TRL rotates by one within a batch) with
    another prompt. Fixed by the data alone, so its reference sums are computed once."""
    n = len(prompt_keys)
    order = np.random.default_rng(0).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    for j, i in enumerate(order):
        for s in range(1, n):
            k = order[(j - s) % n]
            if prompt_keys[k] != prompt_keys[i]:
                partner[i] = k
                break
        else:
            raise InputError("KTO's reference point needs completions of at least two different "
                             "prompts (or use --loss apo_zero_unpaired)")
    return partner
