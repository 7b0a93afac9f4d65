"""Nights: a job file run night after night, each night's policy trained from the last.

``offline-rlhf pipeline run FILE --nights N`` (or a ``[nights]`` table in the job file)
runs the job once per night n = 0..N-1, each in ``WORKDIR/night-NNN`` with:

- ``inputs.<policy_input>`` = the previous night's trained policy (night 0: the job's);
- every generate stage's ``seed`` advanced by ``n * seed_stride`` (fresh samples);
- the train stage's ``previous_data`` = the previous M nights' training data (``previous``;
  ``train grpo`` corrects their staleness with their stored behaviour log-probs);
- every logprobs stage's ``reference`` fixed to night 0's (``reference_refresh = 0``), or,
  every ``reference_refresh`` nights, refreshed to the policy that starts the night.

Each night is an ordinary pipeline run: its stages are keyed by content and reused when
done, so a killed nights run rerun with the same command continues at the unfinished
night, at its unfinished stage (which resumes at its unfinished shard or checkpoint).
Every night keeps its data, policy, eval report and run log; ``WORKDIR/nights.json``
records the lineage (policy in and out, reference, data, previous data, fingerprints)
and each night's training and held-out figures, ``WORKDIR/nights.md`` tabulates them.
Only composition here: every stage is the pipeline's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .config import apply_overrides, build, load_file, opt
from .errors import InputError
from .pipeline import Pipeline, load_pipeline, run_pipeline, stage_output


@dataclasses.dataclass
class NightsConfig:
    """The ``[nights]`` table of a job file."""
    count: int = opt(1, "nights to run (`--nights N` overrides)")
    policy_input: str = opt("policy", "the input each night replaces by the previous night's policy")
    policy_stage: str | None = opt(None, "the stage whose model is the next night's policy "
                                   "(default: the last train or rest stage)")
    train_stage: str | None = opt(None, "the train stage that also reads earlier nights' data "
                                  "(default: the last train stage)")
    data_stage: str | None = opt(None, "the stage whose dataset is a night's training data "
                                 "(default: the stage the train stage's `data` names)")
    previous: int = opt(0, "M: the train stage also reads the previous M nights' data "
                        "(train grpo only: importance-corrected with their behaviour log-probs)")
    reference_refresh: int = opt(0, "0: logprobs stages keep night 0's reference; n: every n "
                                 "nights the reference becomes the policy that starts the night")
    seed_stride: int = opt(1, "each generate stage's seed grows by this every night (0: same seeds)")

    def __post_init__(self):
        for name in ("count", "previous", "reference_refresh", "seed_stride"):
            if getattr(self, name) < 0:
                raise InputError(f"nights.{name}: must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass
class NightsPlan:
    """What each night changes in the job: stage names found in the job file."""
    cfg: NightsConfig
    workdir: Path
    policy_stage: str
    train_stage: str | None
    data_stage: str | None
    logprobs_stages: list[str]
    seeds: dict[str, int]


def has_nights(path: str, overrides: list[str] | None = None) -> bool:
    return "nights" in apply_overrides(load_file(path), overrides or [])


def _last(stages: dict, kinds: tuple[str, ...]) -> str | None:
    names = [n for n, s in stages.items() if s.get("kind") in kinds]
    return names[-1] if names else None


def load_plan(path: str, overrides: list[str] | None = None, count: int | None = None) -> NightsPlan:
    """Read and check the ``[nights]`` table against the job's stages."""
    data = apply_overrides(load_file(path), overrides or [])
    cfg = build(NightsConfig, data.get("nights") or {}, f"{path}: nights")
    if count is not None:
        cfg = dataclasses.replace(cfg, count=count)
    stages, inputs = data.get("stages"), data.get("inputs") or {}
    if "workdir" not in data or not isinstance(stages, dict):
        raise InputError(f"{path}: workdir and stages are required")
    stages = {n: s for n, s in stages.items() if isinstance(s, dict)}
    if cfg.policy_input not in inputs:
        raise InputError(f"{path}: nights.policy_input: '{cfg.policy_input}' is not defined in [inputs]")
    policy_stage = cfg.policy_stage or _last(stages, ("train", "rest"))
    train_stage = cfg.train_stage or _last(stages, ("train",))
    for key, name in (("policy_stage", policy_stage), ("train_stage", train_stage)):
        if name is None or name not in stages:
            raise InputError(f"{path}: nights.{key}: no such stage ({name}); nights need a train stage")
    data_stage = cfg.data_stage
    ref = stages[train_stage].get("data")
    if data_stage is None and isinstance(ref, str) and ref.startswith("stages."):
        data_stage = ref.partition(".")[2]
    if cfg.previous:
        if stages[train_stage].get("algorithm") != "grpo":
            raise InputError(f"{path}: nights.previous: only `train grpo` reads earlier nights' data "
                             f"(stages.{train_stage} is {stages[train_stage].get('algorithm')})")
        if data_stage not in stages:
            raise InputError(f"{path}: nights.data_stage: the train stage's data is not a stage's "
                             "output; name the stage whose dataset is each night's data")
    seeds = {n: int(s.get("seed", 0)) for n, s in stages.items() if s.get("kind") == "generate"}
    logprobs = [n for n, s in stages.items() if s.get("kind") == "logprobs"]
    return NightsPlan(cfg, Path(data["workdir"]), policy_stage, train_stage, data_stage, logprobs, seeds)


def _resolved(p: Pipeline, stage_name: str, option: str) -> str | None:
    """A stage option's value, with a reference turned into the path it names."""
    stage = next(s for s in p.stages if s.name == stage_name)
    ref = stage.refs.get(option)
    if not isinstance(ref, str):
        return stage.options.get(option)
    src, _, name = ref.partition(".")
    return p.inputs[name] if src == "inputs" else str(stage_output(p, name))


def night_overrides(pl: NightsPlan, n: int, policies: list[str], data: list[str],
                    references: dict[str, str]) -> list[str]:
    """The overrides that make the job night ``n`` (given nights 0..n-1's outputs)."""
    out = [f"workdir={pl.workdir / f'night-{n:03d}'}"]
    if n == 0:
        return out
    out.append(f"inputs.{pl.cfg.policy_input}={policies[n]}")
    out += [f"stages.{g}.seed={s + n * pl.cfg.seed_stride}" for g, s in pl.seeds.items()]
    k = pl.cfg.reference_refresh
    for stage in pl.logprobs_stages:
        ref = policies[k * (n // k)] if k and n >= k else references[stage]
        out.append(f"stages.{stage}.reference={ref}")
    if pl.cfg.previous:
        out.append(f"stages.{pl.train_stage}.previous_data={json.dumps(data[max(0, n - pl.cfg.previous):n])}")
    return out


def run_nights(path: str, overrides: list[str] | None = None, count: int | None = None,
               dry_run: bool = False) -> list[dict]:
    """Run (or plan) the nights; return one record per night."""
    overrides = list(overrides or [])
    pl = load_plan(path, overrides, count)
    policies: list[str] = []    # policies[n]: the policy that starts night n
    data: list[str] = []        # data[n]: night n's training data
    references: dict[str, str] = {}
    records: list[dict] = []
    for n in range(pl.cfg.count):
        if n and not Path(policies[n]).exists():
            records.append({"night": n, "pending": f"needs night-{n - 1:03d}'s policy"})
            break
        p = load_pipeline(path, overrides + night_overrides(pl, n, policies, data, references))
        if n == 0:
            policies.append(p.inputs[pl.cfg.policy_input])
            references = {s: _resolved(p, s, "reference") for s in pl.logprobs_stages}
        rows = run_pipeline(p, dry_run=dry_run)
        policies.append(str(stage_output(p, pl.policy_stage)))
        data.append(str(stage_output(p, pl.data_stage)) if pl.data_stage else "")
        records.append(_record(pl, p, n, rows, policies, data, dry_run))
        if not dry_run:
            _write_report(pl.workdir, records)
    return records


def _record(pl: NightsPlan, p: Pipeline, n: int, rows: list[dict], policies: list[str], data: list[str],
            dry_run: bool) -> dict:
    rec = {"night": n, "workdir": str(p.workdir), "policy_in": policies[n], "policy_out": policies[n + 1],
           "data": data[n] or None, "reference": {s: _resolved(p, s, "reference") for s in pl.logprobs_stages},
           "previous_data": data[max(0, n - pl.cfg.previous):n] if pl.cfg.previous else [],
           "stages": rows}
    if dry_run:
        return rec
    from .models import fingerprint
    rec["policy_in_fingerprint"] = fingerprint(policies[n])
    rec["policy_out_fingerprint"] = fingerprint(policies[n + 1])
    stages = {s.name: s for s in p.stages}
    summary = _read_json(stages[pl.train_stage].output / "train_summary.json")
    if summary:
        first, last = summary.get("first") or {}, summary.get("last") or {}
        rec["train"] = {"data": summary.get("data"), "steps": summary.get("steps"),
                        "first": first, "last": last}
    for s in p.stages:
        if s.kind == "eval":
            results = _read_json(s.output / "results.json") or {}
            rec["eval"] = {"policy_reward": (results.get("policy") or {}).get("reward_mean"),
                           "baseline_reward": (results.get("baseline") or {}).get("reward_mean"),
                           "win_rate": results.get("win_rate"), "report": str(s.output / "report.md")}
    return rec


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_report(workdir: Path, records: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name, text in (("nights.json", json.dumps(records, indent=1, default=str)),
                       ("nights.md", "# Nights\n\n" + render_nights(records) + "\n")):
        tmp = workdir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, workdir / name)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_nights(records: list[dict]) -> str:
    """One line per night: training data, staleness and held-out figures."""
    lines = ["| night | examples | groups dropped | staleness KL (first / last step) | held-out reward "
             "(before -> after) | win rate |", "|---|---|---|---|---|---|"]
    for r in records:
        if "pending" in r:
            lines.append(f"| {r['night']} | {r['pending']} | | | | |")
            continue
        tr, ev = r.get("train") or {}, r.get("eval") or {}
        d, first, last = tr.get("data") or {}, tr.get("first") or {}, tr.get("last") or {}
        lines.append(f"| {r['night']} | {d.get('examples', '-')} | {d.get('groups_dropped', '-')} | "
                     f"{_fmt(first.get('staleness_kl'), '.4f')} / {_fmt(last.get('staleness_kl'), '.4f')} | "
                     f"{_fmt(ev.get('baseline_reward'), '.3f')} -> {_fmt(ev.get('policy_reward'), '.3f')} | "
                     f"{_fmt(ev.get('win_rate'), '.1%')} |")
    return "\n".join(lines)
