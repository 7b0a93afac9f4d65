"""The score stage: reward components, their weighted total and the group-normalised
reward, written as a new dataset. Only the reward columns change: every generation
column is copied through untouched, so rescoring never regenerates."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa

from ..backends import BackendOptions, backend_module, check_backend
from ..config import opt, to_dict
from ..errors import InputError, located
from ..executors import ExecutorOptions, run_stage
from ..lineage import canonical_json, config_hash
from ..models import check_reward_model, fingerprint
from ..schemas import replace_column
from ..shards import open_dataset
from ..stage import LazyWorker, StagePlan
from . import rules
from .judge import Judge, JudgeOptions, check_judge

COMPONENTS = ("reward_model", "judge", "exact_match", "numeric_match", "format", "length_penalty",
              "kimi_length")
NEEDS_REFERENCE = ("exact_match", "numeric_match", "kimi_length")
CORRECTNESS = ("exact_match", "numeric_match")


@dataclasses.dataclass
class ScoreConfig(BackendOptions, ExecutorOptions, JudgeOptions):
    generations: str = opt(help="input generations dataset (never modified)")
    output: str = opt(help="output dataset: the same rows with reward columns filled")
    reward_model: str | None = opt(None, "reward model directory (sequence classification, one label)")
    overwrite: bool = opt(False, "replace an existing output dataset: it is removed (datasets only) once every input is checked, and the stage starts afresh")
    weights: dict[str, float] = opt({}, "component weights, e.g. reward_model=1 exact_match=0.5; "
                                    f"components: {', '.join(COMPONENTS)} (default: reward_model=1, "
                                    "or judge=1 with --judge alone)")
    format_pattern: str = opt(rules.DEFAULT_FORMAT, "regex the whole response must match for 'format'")
    length_target: int = opt(0, "'length_penalty' is -(response tokens beyond this)")
    numeric_tolerance: float = opt(1e-6, "relative tolerance of 'numeric_match'")
    length_correct: str = opt("exact_match", "'kimi_length' (group-relative length reward of Kimi "
                              "k1.5): the rule that decides which answers are correct: "
                              "exact_match | numeric_match")
    max_length: int = opt(2048, "reward-model input tokens kept (the last ones)")
    token_budget: int = opt(16384, "hf backend: reward-model tokens per batch")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    bits: int | None = opt(None, "load the reward model in 4 or 8 bits (bitsandbytes)")
    device: str | None = opt(None, "cuda | cpu (default: cuda when available)")
    trust_remote_code: bool = opt(False, "allow custom model code from the model directory")

    def __post_init__(self):
        super().__post_init__()
        if not self.weights:
            if not self.reward_model and not self.judge:
                raise InputError("weights: nothing to score: give a reward_model, a judge or rule weights")
            self.weights = {"reward_model": 1.0} if self.reward_model else {"judge": 1.0}
        for name in self.weights:
            if name not in COMPONENTS:
                raise InputError(f"weights.{name}: unknown component (known: {', '.join(COMPONENTS)})")
        if "reward_model" in self.weights and not self.reward_model:
            raise InputError("weights.reward_model: set, but no reward_model path was given")
        if self.reward_model and "reward_model" not in self.weights:
            raise InputError("reward_model: given, but weights has no reward_model entry")
        if ("judge" in self.weights) != bool(self.judge):
            raise InputError("weights.judge: set, but no judge model was given" if self.judge is None
                             else "judge: given, but weights has no judge entry")
        if self.judge and self.judge_backend == "vllm" and self.reward_model and \
                self.backend == "vllm":
            raise InputError("judge_backend: vllm, and the reward model is on vllm too: one vLLM "
                             "engine per process, and the judge's (generate) is not the reward "
                             "model's (pooling); put one of them on hf (--judge-backend hf or "
                             "--backend hf)")
        if self.length_correct not in CORRECTNESS:
            raise InputError(f"length_correct: must be one of {', '.join(CORRECTNESS)}, "
                             f"got {self.length_correct!r}")


def group_normalize(prompt_ids: list[str], rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / std over the samples of each prompt (population std; 0 when it is 0)."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for idx in _groups(prompt_ids).values():
        r = rewards[idx]
        std = r.std()
        out[idx] = (r - r.mean()) / std if std > 1e-8 else 0.0
    return out


def rule_components(cfg: ScoreConfig, table: pa.Table, source: str) -> dict[str, np.ndarray]:
    responses = table.column("response").to_pylist()
    refs = table.column("reference_answer").to_pylist()
    out = {}
    for name in cfg.weights:
        if name in NEEDS_REFERENCE:
            missing = [i for i, r in enumerate(refs) if r is None]
            if missing:
                raise InputError(located(f"{name} needs a reference answer", source, missing[0],
                                         "reference_answer"))
        if name == "exact_match":
            out[name] = np.array([rules.exact_match(r, a) for r, a in zip(responses, refs)])
        elif name == "numeric_match":
            out[name] = np.array([rules.numeric_match(r, a, cfg.numeric_tolerance)
                                  for r, a in zip(responses, refs)])
        elif name == "format":
            out[name] = np.array([rules.format_match(r, cfg.format_pattern) for r in responses])
        elif name == "length_penalty":
            lengths = table.column("response_token_ids").to_pylist()
            out[name] = np.array([rules.length_penalty(len(x), cfg.length_target) for x in lengths])
        elif name == "kimi_length":
            out[name] = kimi_length_component(cfg, table)
    return out


def _correct(cfg: ScoreConfig, responses: list[str], refs: list[str]) -> list[bool]:
    if cfg.length_correct == "numeric_match":
        return [rules.numeric_match(r, a, cfg.numeric_tolerance) == 1.0 for r, a in zip(responses, refs)]
    return [rules.exact_match(r, a) == 1.0 for r, a in zip(responses, refs)]


def kimi_length_component(cfg: ScoreConfig, table: pa.Table) -> np.ndarray:
    """Kimi k1.5's length reward, relative to each prompt's group of samples (the K
    samples of a prompt share a shard: generate writes them together)."""
    lengths = [len(x) for x in table.column("response_token_ids").to_pylist()]
    correct = _correct(cfg, table.column("response").to_pylist(), table.column("reference_answer").to_pylist())
    out = np.zeros(table.num_rows)
    for idx in _groups(table.column("prompt_id").to_pylist()).values():
        out[idx] = rules.kimi_length([lengths[i] for i in idx], [correct[i] for i in idx])
    return out


def _groups(prompt_ids: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    return groups


def check_inputs(cfg: ScoreConfig, src) -> None:
    """Before the first output: every shard's size and sha256, and the values the rules
    need (a reference answer on every row), so nothing is committed before a refusal."""
    src.verify()
    needs = [n for n in cfg.weights if n in NEEDS_REFERENCE]
    if not needs:
        return
    for e in src.shards:
        refs = src.read_shard(e["chunk"], columns=["reference_answer"], verify=False)
        missing = refs.column("reference_answer").is_null().to_pylist()
        if any(missing):
            raise InputError(located(f"{needs[0]} needs a reference answer",
                                     src.store.display(e["name"]), missing.index(True),
                                     "reference_answer"))


def score(cfg: ScoreConfig) -> dict:
    """Run the score stage; return the output manifest."""
    return run_stage(plan_score(cfg), cfg)


def plan_score(cfg: ScoreConfig) -> StagePlan:
    src = open_dataset(cfg.generations, require_complete=True)
    if src.schema_name != "generations":
        raise InputError(f"{cfg.generations}: is a {src.schema_name} dataset, not generations")
    if cfg.reward_model:
        check_reward_model(cfg.reward_model, cfg.trust_remote_code)
        check_backend(cfg, "score")
    check_inputs(cfg, src)
    rm_fp = fingerprint(cfg.reward_model) if cfg.reward_model else None
    judge_fp = check_judge(cfg, "pointwise") if cfg.judge else None
    scorer_spec = {"reward_model": rm_fp, "weights": cfg.weights,
                   **({"judge": judge_fp} if judge_fp else {}),
                   "format_pattern": cfg.format_pattern if "format" in cfg.weights else None,
                   "length_target": cfg.length_target if "length_penalty" in cfg.weights else None,
                   "numeric_tolerance": cfg.numeric_tolerance, "max_length": cfg.max_length,
                   "length_correct": cfg.length_correct if "kimi_length" in cfg.weights else None}
    reward_fp = hashlib.sha256(canonical_json(scorer_spec).encode()).hexdigest()
    hashed = {"generations": src.fingerprint, "scorer": reward_fp, "dtype": cfg.dtype,
              "bits": cfg.bits, **({"backend": cfg.backend} if cfg.reward_model else {}),
              **({"judge_dtype": cfg.judge_dtype, "judge_bits": cfg.judge_bits} if judge_fp else {}),
              # the judge fingerprint (and verdict cache) leave the backend out: its verdicts
              # are the same numbers; a run is not resumed on the other one (as for --backend)
              **({"judge_backend": "vllm"} if judge_fp and cfg.judge_backend == "vllm" else {})}
    chash = config_hash(hashed)
    return StagePlan(name="score", unit="rows", units=[e["rows"] for e in src.shards],
                     writer={"url": cfg.output, "schema": "generations", "config_hash": chash,
                             "config": {**hashed, **scorer_spec}, "lineage": {**src.lineage, "reward_fingerprint": reward_fp,
                                         "reward_model_fingerprint": rm_fp, "scorer": scorer_spec,
                                         "generations": src.fingerprint}},
                     worker=ScoreWorker(cfg, reward_fp), info={"config": to_dict(cfg)},
                     overwrite=cfg.overwrite)


class ScoreWorker(LazyWorker):
    """Scores chunks of generations; the reward model (if any) loads on first use."""

    def __init__(self, cfg: ScoreConfig, reward_fp: str):
        self.cfg, self.reward_fp = cfg, reward_fp

    def load(self):
        cfg, rm, judge = self.cfg, None, None
        if cfg.reward_model:
            rm = backend_module(cfg.backend).RewardModel(cfg)
        if cfg.judge:
            judge = Judge(cfg, "pointwise", cfg.device)
        return open_dataset(cfg.generations, require_complete=True), rm, judge

    def compute(self, chunk: int, progress) -> tuple[pa.Table, dict]:
        cfg, (src, rm, judge) = self.cfg, self.loaded
        table = src.read_shard(chunk)
        where = f"{src.url}/{src.entry(chunk)['name']}"
        comps = rule_components(cfg, table, where)
        stats = {}
        if rm is not None:
            seqs, cut = rm.encode(table.column("prompt").to_pylist(),
                                  table.column("response").to_pylist())
            comps["reward_model"] = rm.score_ids(seqs)
            stats["reward_model_inputs_truncated"] = cut
        probs = None
        if judge is not None:
            comps["judge"], probs, stats = judge_rows(judge, table, stats)
        names = [n for n in COMPONENTS if n in cfg.weights]
        total = sum(cfg.weights[n] * comps[n] for n in names) if names else np.zeros(table.num_rows)
        total = np.asarray(total, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(total))
        if len(bad):
            raise InputError(located("reward is not finite (reward model produced NaN/inf?)",
                                     where, int(bad[0]), "reward"))
        table = replace_column(table, "reward", total)
        table = replace_column(table, "reward_components", [
            [{"name": n, "value": float(comps[n][i])} for n in names] for i in range(table.num_rows)])
        table = replace_column(table, "reward_normalized",
                               group_normalize(table.column("prompt_id").to_pylist(), total))
        table = replace_column(table, "reward_fingerprint", [self.reward_fp] * table.num_rows)
        table = replace_column(table, "judge_probs", [None] * table.num_rows if probs is None
                               else probs.tolist())
        progress.update(units=table.num_rows, samples=table.num_rows,
                        tokens=sum(len(x) for x in table.column("response_token_ids").to_pylist()))
        return table, stats


def judge_rows(judge, table: pa.Table, stats: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ``judge`` component, its label probabilities, and the judge's counters."""
    before = dict(judge.stats)
    values, probs = judge.pointwise(table.column("prompt").to_pylist(),
                                    table.column("response").to_pylist(),
                                    table.column("reference_answer").to_pylist())
    return values, probs, {**stats, **{k: v - before[k] for k, v in judge.stats.items()}}
