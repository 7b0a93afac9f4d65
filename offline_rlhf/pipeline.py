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
its options and the keys (stages) or content keys (inputs: a dataset's
:attr:`~offline_rlhf.shards.Dataset.fingerprint`, a model's or file's content hash) of
what it reads: a pure function of the job and of content, never of paths, times or
the workdir. So a rerun with nothing changed does nothing; a new reward model changes
the key of score and of everything after it, never generate's; and a killed pipeline
resumes at the unfinished stage (which itself resumes at its unfinished shard or
checkpoint). Stage names are plain names (letters, digits, ``-``, ``_``).

``run`` holds ``WORKDIR/pipeline.lock`` (see ``locks.py``): a second run on the same
workdir is refused with the holder's host, pid and start time (or waits, with
``wait``); a lock left by a killed run is taken over. Before anything runs, and on
``--dry-run``, :func:`preflight` makes every check that needs no model output.
Every error names the job file and the stage key (``job.toml: stages.score: ...``).
Literal paths are checked for their kind at ``--dry-run`` (data options take a dataset
or a data file, ``metrics`` a metrics.jsonl, ...). The lock, ``run.log`` and each stage's
directory are never opened through a symbolic link.
Pipelines only compose stages: no tensor math here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import sys
import time
from pathlib import Path

from .config import PATH_OPTIONS, apply_overrides, build, load_file
from .errors import InputError
from .executors import EXECUTOR_OPTIONS
from .lineage import canonical_json, code_version, utc_now
from .storage import append_line, read_json_file, refuse_link, write_json_atomic

KINDS = ("generate", "score", "logprobs", "pairs", "train", "rest", "eval")
# Options naming models: preflight checks them (safetensors, loadable config).
MODEL_OPTIONS = {"policy": "policy", "reference": "reference model", "baseline": "baseline policy",
                 "checkpoints": "checkpoint model", "judge": "judge model"}
# Options that name data: a dataset, or a data file of one of these kinds.
DATA_OPTIONS = ("prompts", "generations", "data", "eval_prompts", "previous_data")
DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")
# Options kept out of a stage's key: where rows are made, and whether an old output goes.
# baseline_from (eval): where identical rows may be copied from, set by the nights driver;
# judge_cache: how fast verdicts come, not which.
UNKEYED = (*EXECUTOR_OPTIONS, "overwrite", "baseline_from", "judge_cache")
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
LOCK = "pipeline.lock"


@contextlib.contextmanager
def naming(where: str):
    """An error inside names ``where`` (the job file and the stage key) unless it does."""
    try:
        yield
    except InputError as e:
        if str(e).startswith(where.partition(": ")[0]):
            raise
        raise InputError(f"{where}: {e}") from None


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
            report = read_json_file(self.output / "report.json") or {}
            return Path(report["final_model"]) if "final_model" in report \
                else self.output / "final-model-pending"
        return self.output

    def done(self) -> bool:
        """Whether the output is finished: a complete dataset, or a done file that
        parses (written atomically; an empty or cut file from older versions is not done)."""
        from .shards import is_complete
        o = self.output
        refuse_link(o.parent)   # WORKDIR/stages, and the stage's own directory: never
        refuse_link(o)          # written or read through a planted link
        if self.kind == "train":
            return read_json_file(o / "train_summary.json") is not None and (o / "final").is_dir()
        if self.kind == "rest":
            return "final_model" in (read_json_file(o / "report.json") or {})
        if self.kind == "eval":
            return "policy" in (read_json_file(o / "results.json") or {})
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
    if p.is_dir() and any((p / n).exists() for n in ("config.json", "adapter_config.json",
                                                       "state.json", "heads.json")):
        # state: a checkpoint; heads: ILQL heads (eval and generate --ilql-heads)
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
    for k in ("workdir", "name"):
        if k in data and (not isinstance(data[k], str) or not data[k].strip()):
            raise InputError(f"{path}: {k}: expected a non-empty string, got "
                             f"{type(data[k]).__name__} {data[k]!r}")
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
        raise InputError(f"{path}: inputs: must be a table of paths")
    input_fp = {k: _fingerprint_input(v, f"{path}: inputs.{k}") for k, v in inputs.items()}
    workdir = Path(data["workdir"])
    if not isinstance(data["stages"], dict) or not data["stages"]:
        raise InputError(f"{path}: stages: must be a non-empty table of stages")
    by_name: dict[str, Stage] = {}
    for name, spec in data["stages"].items():
        if not STAGE_NAME.fullmatch(name):
            raise InputError(f"{path}: stages.{name}: a stage name is letters, digits, '-' and '_' "
                             "only (it names a directory under WORKDIR/stages)")
        stage = _stage(f"{path}: stages.{name}", name, spec, inputs, input_fp, by_name)
        stage.output = workdir / "stages" / f"{name}-{stage.key}"
        by_name[name] = stage
    stages = list(by_name.values())
    resolved = {"name": data.get("name", Path(path).stem), "workdir": str(workdir), "inputs": inputs,
                "stages": {s.name: {"kind": s.kind, **({"algorithm": s.algorithm} if s.algorithm else {}),
                                    **s.options, "key": s.key, "output": str(s.output)} for s in stages}}
    return Pipeline(resolved["name"], workdir, inputs, stages, path, resolved)


def _is_ref(v) -> bool:
    return isinstance(v, str) and v.startswith(("inputs.", "stages."))


def _ref_key(where: str, k: str, v: str, inputs: dict, input_fp: dict, by_name: dict) -> str:
    """The key a reference contributes: an input's content key or a stage's key."""
    src, _, ref = v.partition(".")
    if src == "inputs" and ref not in inputs:
        raise InputError(f"{where}.{k}: {v} is not defined in [inputs]")
    if src == "stages" and ref not in by_name:
        raise InputError(f"{where}.{k}: {v} is not an earlier stage")
    return input_fp[ref] if src == "inputs" else by_name[ref].key


def _stage(where: str, name: str, spec, inputs: dict, input_fp: dict, by_name: dict) -> Stage:
    """One stage: options checked against its command's config, references resolved to
    keys, path options fingerprinted, and its key."""
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
        if k in UNKEYED:
            continue  # where rows are made, not which: kept out of the key
        if _is_ref(v):
            refs[k] = v
            keyed[k] = _ref_key(where, k, v, inputs, input_fp, by_name)
        elif k in PATH_OPTIONS and isinstance(v, list) and all(isinstance(x, str) for x in v):
            if any(_is_ref(x) for x in v):
                refs[k] = list(v)
            keyed[k] = [_ref_key(where, k, x, inputs, input_fp, by_name) if _is_ref(x)
                        else _fingerprint_input(x, f"{where}.{k}") for x in v]
        elif k in PATH_OPTIONS and isinstance(v, str):
            keyed[k] = _fingerprint_input(v, f"{where}.{k}")
        else:
            keyed[k] = v
    # check the options' types now, with placeholders where references will go
    trial = {k: ("/placeholder" if not isinstance(v, list) else ["/placeholder"]) if k in refs else v
             for k, v in spec.items()}
    trial["output"] = "/placeholder"
    with naming(where):
        build(cls, trial, where)
    key = hashlib.sha256(canonical_json({"kind": kind, "algorithm": algorithm, **keyed})
                         .encode()).hexdigest()[:12]
    return Stage(name, kind, algorithm, spec, refs, key)


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
    if not _is_ref(ref):  # a literal path in a list that also holds references
        return Path(ref)
    src, _, name = ref.partition(".")
    if src == "inputs":
        return Path(p.inputs[name])
    target = by_name[name]
    if option == "metrics" and target.kind == "train":
        return target.output / "metrics.jsonl"
    return target.result()


def plan(p: Pipeline) -> list[dict]:
    """What a run would do: for each stage, reuse (finished output) or run."""
    rows = []
    for s in p.stages:
        with naming(f"{p.source}: stages.{s.name}"):
            done = s.done()
        rows.append({"stage": s.name, "kind": s.kind + (f" {s.algorithm}" if s.algorithm else ""),
                     "key": s.key, "action": "reuse" if done else "run", "output": str(s.output)})
    return rows


def render_plan(rows: list[dict]) -> str:
    w = max(len(r["stage"]) for r in rows)
    k = max(len(r["kind"]) for r in rows)
    lines = [f"{'stage':<{w}}  {'kind':<{k}}  {'action':<6}  output"]
    lines += [f"{r['stage']:<{w}}  {r['kind']:<{k}}  {r['action']:<6}  {r['output']}" for r in rows]
    return "\n".join(lines)


def preflight(p: Pipeline) -> None:
    """Every check that needs no model output, before anything runs (and on --dry-run):
    model directories given as inputs or paths (local, safetensors, a config that
    loads without running custom code), a reward model's single label, and input
    datasets complete with unique keys. Stage outputs are checked when they exist."""
    from .export import is_checkpoint, read_checkpoint
    from .models import check_model_dir, check_reward_model, load_config
    from .shards import is_dataset, open_dataset
    for stage in p.stages:
        trust = bool(stage.options.get("trust_remote_code", False))
        for k, value in stage.options.items():
            values = value if isinstance(value, list) else [value]
            refs = stage.refs.get(k)
            refs = refs if isinstance(refs, list) else [refs] * len(values)
            for v, ref in zip(values, refs):
                if not isinstance(v, str) or (ref and ref.startswith("stages.")):
                    continue
                path = p.inputs[ref.partition(".")[2]] if ref else v
                try:
                    if k == "reward_model":
                        check_reward_model(path, trust)
                    elif k == "checkpoints" and is_checkpoint(path):
                        read_checkpoint(path)   # eval exports it
                    elif k in MODEL_OPTIONS:
                        if (check_model_dir(path, MODEL_OPTIONS[k]) / "config.json").exists():
                            load_config(path, trust)   # (an adapter directory has none)
                    elif k in PATH_OPTIONS and is_dataset(path):
                        open_dataset(path, require_complete=True)
                    elif k in PATH_OPTIONS:
                        _check_path_kind(k, path)
                except InputError as e:
                    raise InputError(f"{p.source}: stages.{stage.name}.{k}: {e}") from None


def _check_path_kind(option: str, path: str) -> None:
    """A literal path that is not a dataset is the kind of file its option reads: a data
    file (``.jsonl``, ``.json``, ``.parquet``) for data, a metrics.jsonl of JSON objects
    (or a training directory holding one) for ``metrics``, heads for ``ilql_heads``."""
    p = Path(path)
    if "://" in path or not p.exists():
        return   # fingerprinting has refused a missing local path
    if option in DATA_OPTIONS and not (p.is_file() and p.suffix.lower() in DATA_SUFFIXES):
        raise InputError(f"{path}: neither a dataset nor a data file "
                         f"({', '.join(DATA_SUFFIXES)})")
    if option == "metrics":
        f = p / "metrics.jsonl" if p.is_dir() else p
        if not (f.is_file() and f.suffix == ".jsonl"):
            raise InputError(f"{path}: neither a metrics.jsonl file nor a training output "
                             "directory holding one")
        with open(f, "rb") as fh:
            first = fh.readline(1 << 16).strip()
        if first and not first.startswith(b"{"):
            raise InputError(f"{f}: line 1 is not a JSON object (not a metrics file)")
    if option == "ilql_heads" and not (p / "heads.safetensors").is_file():
        raise InputError(f"{path}: not an ILQL heads directory (no heads.safetensors)")


def run_pipeline(p: Pipeline, dry_run: bool = False, wait: bool = False) -> list[dict]:
    """Run every unfinished stage in order; return the plan with timings.

    Holds the workdir lock while it runs: another run of this workdir is refused
    (or, with ``wait``, waited for, and its finished stages are then reused)."""
    preflight(p)
    if dry_run:
        return plan(p)
    from .locks import FileLock, describe, holder_record
    lock = FileLock(p.workdir / LOCK, holder_record(pipeline=p.name))
    previous = lock.acquire(wait=wait, message=f"{p.workdir}: workdir is in use by another "
                            "pipeline run", hint="; let it finish, or pass --wait to queue behind it")
    try:
        log = p.workdir / "run.log"
        if previous:
            note = f"took over {p.workdir / LOCK} from {describe(previous)}, which died holding it"
            print(f"note: {note}", file=sys.stderr)
            _log(log, note)
        rows = plan(p)   # after the lock: a run waited for may have finished stages
        write_json_atomic(p.workdir / "pipeline.resolved.json",
                          {**p.resolved, "source": p.source, "code_version": code_version()})
        _log(log, f"start {p.name} ({p.source})")
        for stage, row in zip(p.stages, rows):
            row["seconds"] = _run_stage(p, stage, row, log)
        _log(log, f"finished {p.name}")
        return rows
    finally:
        lock.release()


def _run_stage(p: Pipeline, stage: Stage, row: dict, log: Path) -> float:
    if stage.done():
        _log(log, f"reuse {stage.name} {stage.output}")
        return 0.0
    where = f"{p.source}: stages.{stage.name}"
    with naming(where):
        cfg = build(_kind_class(stage.kind, stage.algorithm, where), _resolve(p, stage), where)
    _log(log, f"run {stage.name} ({row['kind']})")
    t0 = time.perf_counter()
    with naming(where):
        _run_kind(stage.kind, stage.algorithm)(cfg)
    seconds = time.perf_counter() - t0
    _log(log, f"done {stage.name} in {seconds:.1f} s -> {stage.output}")
    return seconds


def _log(path: Path, msg: str) -> None:
    append_line(path, f"{utc_now().isoformat()} {msg}\n")   # never through a planted link


def stage_output(p: Pipeline, name: str) -> Path:
    for s in p.stages:
        if s.name == name:
            return s.result()
    raise InputError(f"no stage named {name}")
