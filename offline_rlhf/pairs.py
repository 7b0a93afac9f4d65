"""Preference pairs: built from scored generations, or imported from preference files
(every layout of :mod:`offline_rlhf.layouts`).

Strategies (per prompt, after identical responses are de-duplicated):

- ``best_worst``: the highest- against the lowest-reward response;
- ``margin``: every pair whose reward margin is at least ``min_margin``;
- ``top_bottom``: each of the top ``k`` against each of the bottom ``k``;
- ``judge``: an LLM judge labels candidate pairs (every pair of distinct responses, or
  best against worst by reward), asked in both orders (:func:`judge_pairs`).

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

import numpy as np
import pyarrow as pa

from .backends import SPEED_OPTIONS, VllmOptions
from .config import opt, to_dict
from .errors import InputError, located
from .executors import EXECUTOR_OPTIONS, ExecutorOptions, run_stage
from .layouts import column_names, column_opt, number, preference, preference_texts
from .lineage import code_version, config_hash, utc_now
from .prompts import prompt_id_for
from .rewards.judge import JUDGE_OPTIONS, Judge, JudgeOptions, check_judge
from .schemas import load_schema, validate
from .shards import ShardWriter, claim_output, is_dataset, open_dataset, open_dataset_of, read_rows
from .stage import LazyWorker, StagePlan

STRATEGIES = ("best_worst", "margin", "top_bottom", "judge")
REF_SUM_COLUMNS = ("chosen_ref_logps_sum", "rejected_ref_logps_sum")
PAIRS_MADE_BY = "`offline-rlhf pairs` or `offline-rlhf import-pairs`"
GEN_COLUMNS = ["prompt_id", "prompt", "prompt_token_ids", "sample_index", "response",
               "response_token_ids", "reward", "reward_normalized", "ref_logps_sum",
               "policy_fingerprint", "reward_fingerprint", "reference_fingerprint", "reference_answer"]


@dataclasses.dataclass
class PairsConfig(JudgeOptions, VllmOptions, ExecutorOptions):
    generations: str = opt(help="scored generations dataset")
    output: str = opt(help="output pairs dataset")
    overwrite: bool = opt(False, "replace an existing output dataset: it is removed (datasets only) once every input is checked, and the stage starts afresh")
    strategy: str = opt("best_worst", f"pairing strategy: {' | '.join(STRATEGIES)}")
    min_margin: float = opt(0.0, "smallest reward margin kept (ties are always dropped); judge: the "
                            "smallest judge margin 2 P(chosen better) - 1 kept, 0 to 1 (low-confidence "
                            "pairs dropped, not only down-weighted)")
    top_k: int = opt(2, "k of top_bottom")
    reward_column: str = opt("reward", "reward | reward_normalized")
    max_pairs_per_prompt: int = opt(0, "cap on pairs per prompt, largest margins first (0: none; "
                                    "judge: the first candidates in sample order)")
    judge_candidates: str = opt("all", "judge: the pairs asked per prompt: all (every two distinct "
                                "responses, up to max_pairs_per_prompt) | best_worst (by reward: "
                                "needs scored generations)")
    judge_inconsistent: str = opt("drop", "judge: pairs whose two orders disagree: drop | keep "
                                  "(as ties: margin 0, weight 0 under train dpo --pair-weight judge)")

    def __post_init__(self):
        super().__post_init__()
        if (self.strategy == "judge") != bool(self.judge):
            raise InputError("strategy: judge needs --judge MODEL" if self.judge is None else
                             f"judge: given, but the strategy is {self.strategy} (use --strategy judge)")
        if self.judge_candidates not in ("all", "best_worst"):
            raise InputError(f"judge_candidates: must be all or best_worst, got {self.judge_candidates!r}")
        if self.judge_inconsistent not in ("drop", "keep"):
            raise InputError(f"judge_inconsistent: must be drop or keep, got {self.judge_inconsistent!r}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.reward_column not in ("reward", "reward_normalized"):
            raise InputError(f"reward_column: must be reward or reward_normalized, got {self.reward_column!r}")
        if self.min_margin < 0 or self.top_k < 1 or self.max_pairs_per_prompt < 0:
            raise InputError("min_margin must be >= 0, top_k >= 1, max_pairs_per_prompt >= 0")
        if self.strategy == "judge" and self.min_margin > 0 and self.judge_inconsistent == "keep":
            raise InputError("min_margin: kept inconsistent judge pairs are ties (margin 0); "
                             "with min_margin > 0 use --judge-inconsistent drop")
        if self.strategy == "judge" and self.min_margin > 1:
            raise InputError(f"min_margin: judge margins are at most 1, got {self.min_margin}")


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
            out.append(pair_row(pid, c, r, cfg.reward_column, source,
                                c[cfg.reward_column] - r[cfg.reward_column]))
    return out, stats


def pair_row(pid: str, c: dict, r: dict, reward_column: str, source: str, margin) -> dict:
    """A pairs row from the generation rows of its chosen and rejected responses."""
    return {"pair_id": pair_id(pid, c["response"], r["response"]), "prompt_id": pid,
            "prompt": c["prompt"], "prompt_token_ids": c["prompt_token_ids"],
            "chosen": c["response"], "rejected": r["response"],
            "chosen_reward": c[reward_column], "rejected_reward": r[reward_column], "margin": margin,
            "chosen_token_ids": c["response_token_ids"], "rejected_token_ids": r["response_token_ids"],
            "chosen_ref_logps_sum": c["ref_logps_sum"], "rejected_ref_logps_sum": r["ref_logps_sum"],
            "source": source, "policy_fingerprint": c["policy_fingerprint"],
            "reward_fingerprint": c["reward_fingerprint"],
            "reference_fingerprint": c["reference_fingerprint"]}


def _agreement(stats: dict, c: dict, r: dict, reward_column: str) -> None:
    """Count the judge's agreement with the reward (where the two rewards differ) and
    whether it chose the longer response (where the lengths differ)."""
    rc, rr = c[reward_column], r[reward_column]
    if rc is not None and rr is not None and rc != rr:
        stats["judge_reward_decided"] = stats.get("judge_reward_decided", 0) + 1
        stats["judge_agrees_with_reward"] = stats.get("judge_agrees_with_reward", 0) + (rc > rr)
    lc, lr = len(c["response_token_ids"]), len(r["response_token_ids"])
    if lc != lr:
        stats["judge_length_decided"] = stats.get("judge_length_decided", 0) + 1
        stats["judge_chose_longer"] = stats.get("judge_chose_longer", 0) + (lc > lr)


def _distinct(group: list[dict], stats: dict) -> list[dict]:
    """A prompt's rows with repeated responses dropped (first sample kept), counted."""
    distinct, seen = [], set()
    for r in sorted(group, key=lambda r: r["sample_index"]):
        if r["response"] in seen:
            stats["duplicate_responses_dropped"] += 1
            continue
        seen.add(r["response"])
        distinct.append(r)
    return distinct


def judge_candidates(distinct: list[dict], cfg: PairsConfig) -> list[tuple[int, int]]:
    """The (first, second) positions the judge is asked about, for one prompt."""
    if cfg.judge_candidates == "best_worst":
        order = sorted(range(len(distinct)), key=lambda i: (-distinct[i][cfg.reward_column], i))
        return [(order[0], order[-1])]
    cands = list(itertools.combinations(range(len(distinct)), 2))
    return cands[:cfg.max_pairs_per_prompt] if cfg.max_pairs_per_prompt else cands


def judge_pairs(rows: list[dict], cfg: PairsConfig, judge, source: str) -> tuple[list[dict], dict]:
    """Pairs labelled by the judge: each candidate (a, b) is asked as "a then b" and as
    "b then a" (two inputs); P(a better) is the mean of P(first better) in the first
    order and 1 - P(first better) in the second. The better side becomes chosen;
    ``judge_p_ab`` / ``judge_p_ba`` are P(chosen better) with chosen shown first /
    second, ``judge_consistent`` whether both exceed 0.5, and the margin
    ``judge_p_ab + judge_p_ba - 1`` (= 2 P(chosen better) - 1; 0 for kept inconsistent
    pairs). An exact tie (0.5) is dropped, and so is a consistent pair whose margin is
    below ``min_margin``."""
    stats = {"prompts": 0, "prompts_single_response": 0, "duplicate_responses_dropped": 0,
             "judge_pairs_asked": 0, "judge_inconsistent": 0, "judge_inconsistent_dropped": 0,
             "judge_ties_dropped": 0, "judge_below_min_margin_dropped": 0}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    asked = []
    for pid, group in groups.items():
        stats["prompts"] += 1
        distinct = _distinct(group, stats)
        if len(distinct) < 2:
            stats["prompts_single_response"] += 1
            continue
        asked += [(pid, distinct[a], distinct[b]) for a, b in judge_candidates(distinct, cfg)]
    stats["judge_pairs_asked"] = len(asked)
    before = dict(judge.stats)
    both = asked + [(pid, b, a) for pid, a, b in asked]       # the same pairs, order swapped
    p_first = judge.first_better([a["prompt"] for _, a, _ in both], [a["response"] for _, a, _ in both],
                                 [b["response"] for _, _, b in both],
                                 [a["reference_answer"] for _, a, _ in both])
    stats.update({k: v - before[k] for k, v in judge.stats.items()})
    stats["judge_first_better_sum"] = float(np.sum(p_first))
    out, n = [], len(asked)
    for k, (pid, a, b) in enumerate(asked):
        a_first, b_first = float(p_first[k]), float(p_first[n + k])
        pref_a = (a_first + 1.0 - b_first) / 2
        if pref_a == 0.5:
            stats["judge_ties_dropped"] += 1
            continue
        c, r, p_ab, p_ba = (a, b, a_first, 1.0 - b_first) if pref_a > 0.5 else \
            (b, a, b_first, 1.0 - a_first)
        consistent = p_ab > 0.5 and p_ba > 0.5
        stats["judge_inconsistent"] += not consistent
        _agreement(stats, c, r, cfg.reward_column)
        if not consistent and cfg.judge_inconsistent == "drop":
            stats["judge_inconsistent_dropped"] += 1
            continue
        if consistent and p_ab + p_ba - 1.0 < cfg.min_margin:
            stats["judge_below_min_margin_dropped"] += 1
            continue
        row = pair_row(pid, c, r, cfg.reward_column, source, p_ab + p_ba - 1.0 if consistent else 0.0)
        out.append({**row, "judge_p_ab": p_ab, "judge_p_ba": p_ba, "judge_consistent": consistent,
                    "judge_fingerprint": judge.fingerprint})
    return out, stats


def build_pairs(cfg: PairsConfig) -> dict:
    """Run the pairs stage over a scored generations dataset; return the manifest."""
    src = open_dataset(cfg.generations, require_complete=True)
    if src.schema_name != "generations":
        raise InputError(f"{cfg.generations}: is a {src.schema_name} dataset, not generations")
    judged = cfg.strategy == "judge"
    _check_inputs(src, cfg.reward_column, needs_reward=not judged or cfg.judge_candidates == "best_worst")
    judge_fp = check_judge(cfg, "pairwise") if judged else None
    # judge_backend hf keeps the hashes of the runs made before it existed
    skip = {"overwrite", *EXECUTOR_OPTIONS, *SPEED_OPTIONS, *(() if judged else JUDGE_OPTIONS),
            "judge_cache", *(() if judged else ("judge_candidates", "judge_inconsistent")),
            *(("judge_backend",) if cfg.judge_backend == "hf" else ())}
    hashed = {**{k: v for k, v in to_dict(cfg).items() if k not in skip},
              "generations": src.fingerprint, "output": None,
              **({"judge": judge_fp} if judged else {})}
    chash = config_hash(hashed)
    plan = StagePlan(name="pairs", unit="rows", units=[e["rows"] for e in src.shards],
                     writer={"url": cfg.output, "schema": "pairs", "config_hash": chash,
                             "config": hashed,
                             "lineage": {**src.lineage, "generations": src.fingerprint,
                                         "strategy": cfg.strategy,
                                         **({"judge_fingerprint": judge_fp} if judged else {})}},
                     worker=PairsWorker(cfg, {"config_hash": chash, "code_version": code_version()}),
                     info={"config": to_dict(cfg)}, overwrite=cfg.overwrite)
    return run_stage(plan, cfg)


class PairsWorker(LazyWorker):
    def __init__(self, cfg: PairsConfig, meta: dict):
        self.cfg, self.meta = cfg, meta

    def load(self):
        judge = Judge(self.cfg, "pairwise") if self.cfg.strategy == "judge" else None
        return open_dataset(self.cfg.generations, require_complete=True), judge

    def compute(self, chunk: int, progress):
        src, judge = self.loaded
        rows = src.read_shard(chunk, columns=GEN_COLUMNS).to_pylist()
        where = f"{src.url}/{src.entry(chunk)['name']}"
        source = f"{self.cfg.generations}#{self.cfg.strategy}"
        if judge is not None:
            pairs, stats = judge_pairs(rows, self.cfg, judge, source)
        else:
            pairs, stats = pairs_from_rows(rows, self.cfg, source, where)
        now = utc_now()
        for p in pairs:
            p.update(self.meta, created_at=now)
        progress.update(units=len(rows), samples=len(pairs))
        stats["pairs"] = len(pairs)
        return pa.Table.from_pylist(pairs, schema=load_schema("pairs").arrow), stats


def _check_inputs(src, reward_column: str, needs_reward: bool = True) -> None:
    """Before the first output: every shard's size and sha256, a finite reward on every
    row (unless the judge alone pairs them), and each prompt's samples in one shard
    (pairs are built shard by shard)."""
    src.verify()
    owner: dict[str, int] = {}
    for e in src.shards:
        columns = ["prompt_id"] + ([reward_column] if needs_reward else [])
        table = src.read_shard(e["chunk"], columns=columns, verify=False)
        if needs_reward:
            _check_rewards(table.column(reward_column), src.store.display(e["name"]), reward_column)
        for pid in set(table.column("prompt_id").to_pylist()):
            if owner.setdefault(pid, e["chunk"]) != e["chunk"]:
                raise InputError(f"{src.url}: prompt {pid} has samples in chunks {owner[pid]} and "
                                 f"{e['chunk']}; pairs need each prompt's samples in one shard")


def _check_rewards(rewards, where: str, reward_column: str) -> None:
    missing = np.flatnonzero(rewards.is_null().to_numpy(zero_copy_only=False))
    if len(missing):
        raise InputError(located("row has no reward: run `offline-rlhf score` first",
                                 where, int(missing[0]), reward_column))
    values = rewards.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise InputError(located(f"reward is {values[bad[0]]} (not finite)", where,
                                 int(bad[0]), reward_column))


# --------------------------------------------------------------------------- import

@dataclasses.dataclass
class ImportPairsConfig:
    file: str = opt(help="preference file (JSONL, JSON or Parquet) in any layout of "
                    "prompt/chosen/rejected: text, chat messages, whole conversations that repeat "
                    "the prompt, or chosen/rejected only with a shared beginning (implicit prompt)")
    out: str = opt(help="output pairs dataset (directory or URL)")
    tokenizer: str | None = opt(None, "model directory whose chat template renders chat "
                                "messages (needed for chat data)")
    chunk_rows: int = opt(10_000, "pairs per shard")
    overwrite: bool = opt(False, "replace an existing dataset at OUT")
    prompt_column: str = column_opt("prompt")
    chosen_column: str = column_opt("chosen")
    rejected_column: str = column_opt("rejected")


def _scores(r: dict, src: str, i: int) -> tuple:
    """(chosen reward, rejected reward, margin) of a row; the margin defaults to their
    difference."""
    cr, rr = (number(r.get(a, r.get(b)), src, i, a if a in r else b) for a, b in
              (("score_chosen", "chosen_reward"), ("score_rejected", "rejected_reward")))
    margin = number(r.get("margin"), src, i, "margin")
    if margin is None and cr is not None and rr is not None:
        margin = cr - rr
    return cr, rr, margin


def preference_rows(src: str, names: dict | None = None) -> tuple[list[dict], list[tuple]]:
    """A preference file's rows and, per row, its checked (prompt, chosen, rejected) in
    any layout of :mod:`offline_rlhf.layouts` (``names``: the file's column per role, see
    :func:`~offline_rlhf.layouts.column_names`) and (chosen reward, rejected reward,
    margin); no tokenizer needed."""
    n = names or column_names()
    data, columns = read_rows(src)
    for role in ("chosen", "rejected"):
        if n[role] not in columns:
            raise InputError(located(f"missing column (expected {n['prompt']}, {n['chosen']}, "
                                     f"{n['rejected']}; choose with --{role}-column; found "
                                     f"{', '.join(columns) or 'none'})", src, None, n[role]))
    return data, [(preference(r, n["prompt"] in columns, src, i, n), _scores(r, src, i))
                  for i, r in enumerate(data)]


def check_pairs_source(data: str, command: str) -> None:
    """Before any model loads: ``data`` is a pairs dataset or a preference file whose
    every row is in a known layout."""
    if is_dataset(data):
        open_dataset_of(data, "pairs", command, PAIRS_MADE_BY)
    else:
        preference_rows(data)


def pairs_table(src: str, tokenizer=None, names: dict | None = None) -> tuple[pa.Table, dict]:
    """A preference file in any layout of :mod:`offline_rlhf.layouts` as a pairs table
    (chat rendered with ``tokenizer``), and counters (identical pairs dropped)."""
    data, parts = preference_rows(src, names)
    rows, dropped = [], 0
    for i, (r, (part, (cr, rr, margin))) in enumerate(zip(data, parts)):
        prompt, chosen, rejected = preference_texts(tokenizer, *part, src, i)
        if chosen == rejected:
            dropped += 1
            continue
        pid = str(r["prompt_id"]) if r.get("prompt_id") is not None else prompt_id_for(prompt)
        rows.append({"pair_id": pair_id(pid, chosen, rejected), "prompt_id": pid, "prompt": prompt,
                     "chosen": chosen, "rejected": rejected, "chosen_reward": cr,
                     "rejected_reward": rr, "margin": margin, "source": src,
                     # carried when given, so that the schema checks them (<= 0, finite)
                     **{c: number(r.get(c), src, i, c) for c in REF_SUM_COLUMNS},
                     "code_version": code_version(), "created_at": utc_now()})
    table = validate(pa.Table.from_pylist(rows, schema=load_schema("pairs").arrow), "pairs", src)
    return table, {"pairs_dropped_identical": dropped}


def read_pairs(data: str, tokenizer, columns: list[str], command: str) -> list[dict]:
    """Rows of a pairs dataset, or of a preference file imported on the fly (in memory)."""
    if is_dataset(data):
        return open_dataset_of(data, "pairs", command, PAIRS_MADE_BY).read(columns=columns).to_pylist()
    return pairs_table(data, tokenizer)[0].select(columns).to_pylist()


def pairs_fingerprint(data: str, tokenizer_fingerprint: str) -> str:
    """What :func:`read_pairs` rows depend on, by content: a dataset's fingerprint, or for a
    preference file its bytes and the tokenizer that turns them into token ids."""
    if is_dataset(data):
        return open_dataset(data, require_complete=True).fingerprint
    import fsspec
    digest = hashlib.sha256(tokenizer_fingerprint.encode())
    with fsspec.open(str(data), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "file:" + digest.hexdigest()


def import_pairs(src: str, out: str, tokenizer_path: str | None = None, chunk_rows: int = 10_000,
                 overwrite: bool = False, names: dict | None = None) -> dict:
    """Import a preference file (see :func:`pairs_table`; ``names``: its column per role)
    as a pairs dataset at ``out``."""
    tokenizer = None
    if tokenizer_path:
        from .models import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
    pairs, stats = pairs_table(src, tokenizer, names)
    claim_output(out, overwrite)
    writer = ShardWriter(out, "pairs", lineage={"source": src})
    chunks = max(1, -(-pairs.num_rows // chunk_rows))
    with writer:
        for c in range(chunks):
            writer.write(c, pairs.slice(c * chunk_rows, chunk_rows), source=src,
                         row_offset=c * chunk_rows, stats=stats if c == 0 else {})
        return writer.finish(total_chunks=chunks)
