"""The pipeline runner: job files that compose stages, fingerprint-keyed and idempotent.

A job file (TOML or YAML) names its external inputs and its stages, in order::

    name = "nightly"
    workdir = "runs/nightly"
    [inputs]
    policy = "models/policy"
    prompts = "data/prompts"
    [stages.generate]
    kind = "generate"
    prompts = "inputs.prompts"        # a reference: an input ...
    policy = "inputs.policy"
    num_samples = 4
    [stages.score]
    kind = "score"
    generations = "stages.generate"   # ... or an earlier stage's output
    weights = { exact_match = 1.0 }

Stage kinds: generate, score, logprobs, pairs, train (with ``algorithm``), rest, eval.
The other keys of a stage are the options of that command (``offline-rlhf KIND
--help``); unknown keys and wrong types are refused with the key's name.

Each stage's output is ``WORKDIR/stages/NAME-KEY`` where KEY hashes the stage's kind,
its options and the keys (stages) or content fingerprints (inputs) of what it reads.
So a rerun with nothing changed does nothing; a new reward model changes the key of
score and of everything after it, never generate's; and a killed pipeline resumes at
the unfinished stage (which itself resumes at its unfinished shard or checkpoint).
Pipelines only compose stages: no tensor math here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from .config import apply_overrides, build, load_file
from .errors import InputError
from .lineage import canonical_json, code_version, utc_now

KINDS = ("generate", "score", "logprobs", "pairs", "train", "rest", "eval")
# Options that name files, datasets or models: given literally, they are fingerprinted too.
PATH_OPTIONS = ("policy", "reward_model", "reference", "prompts", "generations", "data",
                "baseline", "eval_prompts", "ilql_heads")


def _kind_class(kind: str, algorithm: str | None, where: str):
    from .evaluate import EvalConfig
    from .generation import GenerateConfig
    from .logprobs import LogprobsConfig
    from .pairs import PairsConfig
    from .rest import RestConfig
    from .rewards.score import ScoreConfig
    from .train import ALGORITHMS
    if kind == "train":
        if algorithm not in ALGORITHMS:
            raise InputError(f"{where}.algorithm: must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        return ALGORITHMS[algorithm][0]
    table = {"generate": GenerateConfig, "score": ScoreConfig, "logprobs": LogprobsConfig,
             "pairs": PairsConfig, "rest": RestConfig, "eval": EvalConfig}
    if kind not in table:
        raise InputError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    return table[kind]


def _run_kind(kind: str, algorithm: str | None):
    from .evaluate import run_eval
    from .generation import generate
    from .logprobs import compute_logprobs
    from .pairs import build_pairs
    from .rest import run_rest
    from .rewards.score import score
    from .train import ALGORITHMS
    if kind == "train":
        return ALGORITHMS[algorithm][1]
    return {"generate": generate, "score": score, "logprobs": compute_logprobs,
            "pairs": build_pairs, "rest": run_rest, "eval": run_eval}[kind]


@dataclasses.dataclass
class Stage:
    name: str
    kind: str
    algorithm: str | None
    options: dict            # raw options, references unresolved
    refs: dict               # option -> "inputs.X" / "stages.Y"
    key: str = ""
    output: Path | None = None

    @property
    def model_output(self) -> bool:
        return self.kind in ("train", "rest")

    def result(self) -> Path:
        """What later stages read: a dataset directory, or a model directory."""
        assert self.output is not None
        if self.kind == "train":
            return self.output / "final"
        if self.kind == "rest":
            report = self.output / "report.json"
            return Path(json.loads(report.read_text())["final_model"]) if report.exists() \
                else self.output / "final-model-pending"
        return self.output

    def done(self) -> bool:
        from .shards import is_complete
        o = self.output
        if self.kind == "train":
            return (o / "train_summary.json").exists() and (o / "final").is_dir()
        if self.kind in ("rest", "eval"):
            return (o / ("report.json" if self.kind == "rest" else "results.json")).exists()
        return is_complete(str(o))


@dataclasses.dataclass
class Pipeline:
    name: str
    workdir: Path
    inputs: dict
    stages: list[Stage]
    source: str
    resolved: dict


def _fingerprint_input(path: str, where: str) -> str:
    from .models import fingerprint
    from .shards import is_dataset, open_dataset
    p = Path(path)
    if is_dataset(path):
        return open_dataset(path).fingerprint
    if p.is_dir() and ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
        return fingerprint(p)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    raise InputError(f"{where}: path not found: {path}")


def load_pipeline(path: str, overrides: list[str] | None = None) -> Pipeline:
    """Parse, validate and key a job file (nothing runs)."""
    data = apply_overrides(load_file(path), overrides or [])
    known = {"name", "workdir", "inputs", "stages", "description", "nights"}  # nights: nights.py
    for k in data:
        if k not in known:
            raise InputError(f"{path}: {k}: unknown key (known: {', '.join(sorted(known))})")
    for k in ("workdir", "stages"):
        if k not in data:
            raise InputError(f"{path}: {k}: required key is missing")
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
        raise InputError(f"{path}: inputs: must be a table of paths")
    input_fp = {k: _fingerprint_input(v, f"{path}: inputs.{k}") for k, v in inputs.items()}
    stages: list[Stage] = []
    by_name: dict[str, Stage] = {}
    workdir = Path(data["workdir"])
    if not isinstance(data["stages"], dict) or not data["stages"]:
        raise InputError(f"{path}: stages: must be a non-empty table of stages")
    for name, spec in data["stages"].items():
        where = f"{path}: stages.{name}"
        if not isinstance(spec, dict) or "kind" not in spec:
            raise InputError(f"{where}.kind: required key is missing")
        spec = dict(spec)
        kind, algorithm = spec.pop("kind"), spec.pop("algorithm", None)
        cls = _kind_class(kind, algorithm, where)
        fields = {f.name for f in dataclasses.fields(cls)}
        refs, keyed = {}, {}
        for k, v in spec.items():
            if k not in fields or k == "output":
                raise InputError(f"{where}.{k}: unknown key for a {kind} stage "
                                 f"(known: {', '.join(sorted(fields - {'output'}))})")
            if isinstance(v, str) and v.startswith(("inputs.", "stages.")):
                src, _, ref = v.partition(".")
                if src == "inputs" and ref not in inputs:
                    raise InputError(f"{where}.{k}: {v} is not defined in [inputs]")
                if src == "stages" and ref not in by_name:
                    raise InputError(f"{where}.{k}: {v} is not an earlier stage")
                refs[k] = v
                keyed[k] = input_fp[ref] if src == "inputs" else by_name[ref].key
            elif isinstance(v, list) and v and all(isinstance(x, str) and x.startswith("stages.") for x in v):
                for x in v:
                    if x.partition(".")[2] not in by_name:
                        raise InputError(f"{where}.{k}: {x} is not an earlier stage")
                refs[k] = list(v)
                keyed[k] = [by_name[x.partition(".")[2]].key for x in v]
            elif k in PATH_OPTIONS and isinstance(v, str):
                keyed[k] = _fingerprint_input(v, f"{where}.{k}")
            else:
                keyed[k] = v
        # check the options' types now, with placeholders where references will go
        trial = {k: ("/placeholder" if not isinstance(v, list) else ["/placeholder"]) if k in refs else v
                 for k, v in spec.items()}
        trial["output"] = "/placeholder"
        build(cls, trial, where)
        key = hashlib.sha256(canonical_json({"kind": kind, "algorithm": algorithm, **keyed})
                             .encode()).hexdigest()[:12]
        stage = Stage(name, kind, algorithm, spec, refs, key, workdir / "stages" / f"{name}-{key}")
        stages.append(stage)
        by_name[name] = stage
    resolved = {"name": data.get("name", Path(path).stem), "workdir": str(workdir), "inputs": inputs,
                "stages": {s.name: {"kind": s.kind, **({"algorithm": s.algorithm} if s.algorithm else {}),
                                    **s.options, "key": s.key, "output": str(s.output)} for s in stages}}
    return Pipeline(resolved["name"], workdir, inputs, stages, path, resolved)


def _resolve(p: Pipeline, stage: Stage) -> dict:
    by_name = {s.name: s for s in p.stages}
    opts = dict(stage.options)
    for k, ref in stage.refs.items():
        if isinstance(ref, list):
            opts[k] = [str(_ref_path(p, by_name, r, k)) for r in ref]
        else:
            opts[k] = str(_ref_path(p, by_name, ref, k))
    opts["output"] = str(stage.output)
    return opts


def _ref_path(p: Pipeline, by_name: dict, ref: str, option: str) -> Path:
    src, _, name = ref.partition(".")
    if src == "inputs":
        return Path(p.inputs[name])
    target = by_name[name]
    if option == "metrics" and target.kind == "train":
        return target.output / "metrics.jsonl"
    return target.result()


def plan(p: Pipeline) -> list[dict]:
    """What a run would do: for each stage, reuse (finished output) or run."""
    return [{"stage": s.name, "kind": s.kind + (f" {s.algorithm}" if s.algorithm else ""),
             "key": s.key, "action": "reuse" if s.done() else "run", "output": str(s.output)}
            for s in p.stages]


def render_plan(rows: list[dict]) -> str:
    w = max(len(r["stage"]) for r in rows)
    k = max(len(r["kind"]) for r in rows)
    lines = [f"{'stage':<{w}}  {'kind':<{k}}  {'action':<6}  output"]
    lines += [f"{r['stage']:<{w}}  {r['kind']:<{k}}  {r['action']:<6}  {r['output']}" for r in rows]
    return "\n".join(lines)


def run_pipeline(p: Pipeline, dry_run: bool = False) -> list[dict]:
    """Run every unfinished stage in order; return the plan with timings."""
    rows = plan(p)
    if dry_run:
        return rows
    p.workdir.mkdir(parents=True, exist_ok=True)
    (p.workdir / "pipeline.resolved.json").write_text(json.dumps(
        {**p.resolved, "source": p.source, "code_version": code_version()}, indent=1, default=str))
    log = p.workdir / "run.log"
    with open(log, "a") as f:
        f.write(f"{utc_now().isoformat()} start {p.name} ({p.source})\n")
    for stage, row in zip(p.stages, rows):
        if stage.done():
            row["seconds"] = 0.0
            _log(log, f"reuse {stage.name} {stage.output}")
            continue
        cls = _kind_class(stage.kind, stage.algorithm, stage.name)
        cfg = build(cls, _resolve(p, stage), f"stages.{stage.name}")
        _log(log, f"run {stage.name} ({row['kind']})")
        t0 = time.perf_counter()
        _run_kind(stage.kind, stage.algorithm)(cfg)
        row["seconds"] = time.perf_counter() - t0
        _log(log, f"done {stage.name} in {row['seconds']:.1f} s -> {stage.output}")
    with open(log, "a") as f:
        f.write(f"{utc_now().isoformat()} finished {p.name}\n")
    return rows


def _log(path: Path, msg: str) -> None:
    with open(path, "a") as f:
        f.write(f"{utc_now().isoformat()} {msg}\n")


def stage_output(p: Pipeline, name: str) -> Path:
    for s in p.stages:
        if s.name == name:
            return s.result()
    raise InputError(f"no stage named {name}")
