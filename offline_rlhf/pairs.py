"""Preference pairs: built from scored generations, or imported from prompt/chosen/rejected data.

Strategies (per prompt, after identical responses are de-duplicated):

- ``best_worst``: the highest- against the lowest-reward response;
- ``margin``: every pair whose reward margin is at least ``min_margin``;
- ``top_bottom``: each of the top ``k`` against each of the bottom ``k``.

Ties are never paired (chosen always has the strictly higher reward, so chosen never
equals rejected), prompts with one distinct response are dropped, and both are
counted in the manifest. Reference log-probs (from the logprobs stage) are carried on
both sides when the generations have them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math

import pyarrow as pa

from .config import opt, to_dict
from .errors import InputError, located
from .lineage import code_version, config_hash, utc_now
from .models import apply_chat_template
from .prompts import prompt_id_for
from .schemas import load_schema
from .shards import ShardWriter, open_dataset, read_rows
from .stage import run_chunks

STRATEGIES = ("best_worst", "margin", "top_bottom")
GEN_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "sample_index", "response",
               "response_token_ids", "reward", "reward_normalized", "ref_logps_sum",
               "policy_fingerprint", "reward_fingerprint", "reference_fingerprint"]


@dataclasses.dataclass
class PairsConfig:
    generations: str = opt(help="scored generations dataset")
    output: str = opt(help="output pairs dataset")
    strategy: str = opt("best_worst", f"pairing strategy: {' | '.join(STRATEGIES)}")
    min_margin: float = opt(0.0, "smallest reward margin kept (ties are always dropped)")
    top_k: int = opt(2, "k of top_bottom")
    reward_column: str = opt("reward", "reward | reward_normalized")
    max_pairs_per_prompt: int = opt(0, "cap on pairs per prompt, largest margins first (0: none)")

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.reward_column not in ("reward", "reward_normalized"):
            raise InputError(f"reward_column: must be reward or reward_normalized, got {self.reward_column!r}")
        if self.min_margin < 0 or self.top_k < 1 or self.max_pairs_per_prompt < 0:
            raise InputError("min_margin must be >= 0, top_k >= 1, max_pairs_per_prompt >= 0")


def pair_id(prompt_id: str, chosen: str, rejected: str) -> str:
    return hashlib.sha256(f"{prompt_id}\0{chosen}\0{rejected}".encode()).hexdigest()[:16]


def select_pairs(rewards: list[float], cfg: PairsConfig) -> list[tuple[int, int]]:
    """(chosen, rejected) positions among one prompt's distinct responses."""
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    if cfg.strategy == "best_worst":
        cands = [(order[0], order[-1])]
    elif cfg.strategy == "margin":
        cands = list(itertools.combinations(order, 2))
    else:
        k = min(cfg.top_k, len(order) // 2)
        cands = [(a, b) for a in order[:k] for b in order[-k:]]
    out = [(a, b) for a, b in cands
           if rewards[a] > rewards[b] and rewards[a] - rewards[b] >= cfg.min_margin]
    out.sort(key=lambda ab: (-(rewards[ab[0]] - rewards[ab[1]]), ab))
    return out[:cfg.max_pairs_per_prompt] if cfg.max_pairs_per_prompt else out


def pairs_from_rows(rows: list[dict], cfg: PairsConfig, source: str, where: str) -> tuple[list[dict], dict]:
    stats = {"prompts": 0, "prompts_single_response": 0, "prompts_all_tied": 0,
             "duplicate_responses_dropped": 0}
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        if r[cfg.reward_column] is None:
            raise InputError(located("row has no reward: run `offline-rlhf score` first",
                                     where, i, cfg.reward_column))
        if not math.isfinite(r[cfg.reward_column]):   # a dataset written by another tool
            raise InputError(located(f"reward is {r[cfg.reward_column]} (not finite)",
                                     where, i, cfg.reward_column))
        groups.setdefault(r["prompt_id"], []).append(r)
    out = []
    for pid, group in groups.items():
        stats["prompts"] += 1
        group.sort(key=lambda r: (-r[cfg.reward_column], r["sample_index"]))
        distinct, seen = [], set()
        for r in group:
            if r["response"] in seen:
                stats["duplicate_responses_dropped"] += 1
                continue
            seen.add(r["response"])
            distinct.append(r)
        if len(distinct) < 2:
            stats["prompts_single_response"] += 1
            continue
        chosen_pairs = select_pairs([r[cfg.reward_column] for r in distinct], cfg)
        if not chosen_pairs:
            stats["prompts_all_tied"] += 1
            continue
        for a, b in chosen_pairs:
            c, r = distinct[a], distinct[b]
            out.append({
                "pair_id": pair_id(pid, c["response"], r["response"]), "prompt_id": pid,
                "prompt": c["prompt"], "prompt_token_ids": c["prompt_token_ids"],
                "chosen": c["response"], "rejected": r["response"],
                "chosen_reward": c[cfg.reward_column], "rejected_reward": r[cfg.reward_column],
                "margin": c[cfg.reward_column] - r[cfg.reward_column],
                "chosen_token_ids": c["response_token_ids"], "rejected_token_ids": r["response_token_ids"],
                "chosen_ref_logps_sum": c["ref_logps_sum"], "rejected_ref_logps_sum": r["ref_logps_sum"],
                "source": source, "policy_fingerprint": c["policy_fingerprint"],
                "reward_fingerprint": c["reward_fingerprint"],
                "reference_fingerprint": c["reference_fingerprint"]})
    return out, stats


def build_pairs(cfg: PairsConfig) -> dict:
    """Run the pairs stage over a scored generations dataset; return the manifest."""
    src = open_dataset(cfg.generations, require_complete=True)
    if src.schema_name != "generations":
        raise InputError(f"{cfg.generations}: is a {src.schema_name} dataset, not generations")
    _check_prompts_within_shards(src)
    chash = config_hash({**to_dict(cfg), "generations": src.fingerprint, "output": None})
    writer = ShardWriter(cfg.output, "pairs", config_hash=chash,
                         lineage={**src.lineage, "generations": src.fingerprint,
                                  "strategy": cfg.strategy})
    source = f"{cfg.generations}#{cfg.strategy}"
    meta = {"config_hash": chash, "code_version": code_version()}

    def compute(chunk: int, progress):
        rows = src.read_shard(chunk, columns=GEN_COLUMNS).to_pylist()
        where = f"{src.url}/{src.entry(chunk)['name']}"
        pairs, stats = pairs_from_rows(rows, cfg, source, where)
        now = utc_now()
        for p in pairs:
            p.update(meta, created_at=now)
        progress.update(units=len(rows), samples=len(pairs))
        stats["pairs"] = len(pairs)
        return pa.Table.from_pylist(pairs, schema=load_schema("pairs").arrow), stats

    return run_chunks(writer, len(src.shards), 0, 1, compute,
                      units_per_chunk=lambda c: src.entry(c)["rows"], desc="pairs", unit="rows",
                      info={"config": to_dict(cfg)})


def _check_prompts_within_shards(src) -> None:
    """Pairs are built shard by shard: a prompt's samples must not span shards."""
    owner: dict[str, int] = {}
    for e in src.shards:
        for pid in set(src.read_shard(e["chunk"], columns=["prompt_id"], verify=False)
                       .column("prompt_id").to_pylist()):
            if owner.setdefault(pid, e["chunk"]) != e["chunk"]:
                raise InputError(f"{src.url}: prompt {pid} has samples in chunks {owner[pid]} and "
                                 f"{e['chunk']}; pairs need each prompt's samples in one shard")


# --------------------------------------------------------------------------- import

def _render(value, tokenizer, where, column, prompt_messages=None):
    """Text of a prompt or completion given as a string or a list of chat messages."""
    if value is None:
        raise InputError(located("missing value", *where, column))
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise InputError(located("expected text or a list of {role, content} messages", *where, column))
    if tokenizer is None:
        raise InputError(located("chat messages need a tokenizer with a chat template "
                                 "(--tokenizer MODEL_DIR)", *where, column))
    msgs = [{"role": m["role"], "content": m["content"]} for m in value]
    at = (*where, column)
    if prompt_messages is None:  # a prompt: render up to the assistant's turn
        return apply_chat_template(tokenizer, msgs, at, add_generation_prompt=True), msgs
    head = apply_chat_template(tokenizer, prompt_messages, at, add_generation_prompt=True)
    full = apply_chat_template(tokenizer, prompt_messages + msgs, at)
    if full.startswith(head):
        return full[len(head):], msgs
    return "".join(m["content"] for m in msgs), msgs


# Numeric columns an imported pair may carry (the ref log-probs are checked <= 0 on write).
NUMBER_COLUMNS = ("score_chosen", "score_rejected", "chosen_reward", "rejected_reward", "margin",
                  "chosen_ref_logps_sum", "rejected_ref_logps_sum")


def _number(row: dict, column: str, src: str, i: int) -> float | None:
    """A numeric cell as a float; text (even "5"), booleans and the like are refused."""
    v = row.get(column)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(located(f"expected a number, got {type(v).__name__} {v!r}", src, i, column))
    return float(v)


def _split_implicit(chosen, rejected):
    """Conversations sharing a prefix (no prompt column): prompt = the shared turns."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def import_pairs(src: str, out: str, tokenizer_path: str | None = None, chunk_rows: int = 10_000) -> dict:
    """Import prompt/chosen/rejected data (text or chat messages; JSONL, JSON or Parquet)."""
    data, columns = read_rows(src)
    for col in ("chosen", "rejected"):
        if col not in columns:
            raise InputError(located("missing column (expected prompt, chosen, rejected)", src, None, col))
    tokenizer = None
    if tokenizer_path:
        from .models import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
    rows, dropped = [], 0
    has_prompt = "prompt" in columns
    for i, r in enumerate(data):
        where = (src, i)
        chosen, rejected, prompt = r["chosen"], r["rejected"], r.get("prompt")
        if not has_prompt:
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                raise InputError(located("no prompt column: chosen and rejected must be "
                                         "conversations that share their first turns", src, i, "prompt"))
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
        prompt_text, prompt_msgs = _render(prompt, tokenizer, where, "prompt")
        chosen_text, _ = _render(chosen, tokenizer, where, "chosen", prompt_msgs or [])
        rejected_text, _ = _render(rejected, tokenizer, where, "rejected", prompt_msgs or [])
        if not prompt_text.strip():
            raise InputError(located("empty prompt", src, i, "prompt"))
        if chosen_text == rejected_text:
            dropped += 1
            continue
        pid = str(r["prompt_id"]) if r.get("prompt_id") is not None else prompt_id_for(prompt_text)
        num = {col: _number(r, col, src, i) for col in NUMBER_COLUMNS}
        cr = num["score_chosen"] if "score_chosen" in r else num["chosen_reward"]
        rr = num["score_rejected"] if "score_rejected" in r else num["rejected_reward"]
        margin = num["margin"] if "margin" in r else None if cr is None or rr is None else cr - rr
        rows.append({"pair_id": pair_id(pid, chosen_text, rejected_text), "prompt_id": pid,
                     "prompt": prompt_text, "chosen": chosen_text, "rejected": rejected_text,
                     "chosen_reward": cr, "rejected_reward": rr, "margin": margin, "source": src,
                     "chosen_ref_logps_sum": num["chosen_ref_logps_sum"],
                     "rejected_ref_logps_sum": num["rejected_ref_logps_sum"],
                     "code_version": code_version(), "created_at": utc_now()})
    pairs = pa.Table.from_pylist(rows, schema=load_schema("pairs").arrow)
    writer = ShardWriter(out, "pairs", lineage={"source": src})
    chunks = max(1, -(-pairs.num_rows // chunk_rows))
    with writer:
        for c in range(chunks):
            if not writer.committed(c):
                writer.write(c, pairs.slice(c * chunk_rows, chunk_rows), source=src,
                             row_offset=c * chunk_rows,
                             stats={"pairs_dropped_identical": dropped} if c == 0 else {})
        return writer.finish(total_chunks=chunks)
