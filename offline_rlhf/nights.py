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

Beside that (docs/nights.md): ``prompts_per_night`` draws each night's prompts from the
pool (``nights_draw.py``; ``curate = "informative"`` reads the per-prompt history the
driver stores in ``WORKDIR/history``); the drift metrics (``drift.py``) and the guard
(``nights_guard.py``) decide whether a night's policy is promoted, the next night
starting from the best one otherwise (``WORKDIR/best/``); ``nights_report.py`` writes
nights.json, nights.md and nights.png. A night's eval baseline reuses the previous
night's scored responses of the same policy (eval ``baseline_from``).
Only composition here: every stage is the pipeline's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .config import apply_overrides, build, load_file, opt
from .drift import drift_metrics
from .errors import InputError
from .nights_draw import (
    CURATE,
    curated_draw,
    plain_draws,
    pool_ids,
    read_history,
    write_draw,
    write_history,
)
from .nights_guard import decide
from .nights_report import eval_figures, render_nights, write_report  # noqa: F401 (cli)
from .pipeline import Pipeline, load_pipeline, run_pipeline, stage_output
from .shards import is_complete, open_dataset
from .storage import write_json_atomic


@dataclasses.dataclass
class GuardConfig:
    """The ``[nights.guard]`` table: when a night's policy is not promoted."""
    stage: str | None = opt(None, "the eval stage whose held-out policy reward the guard reads "
                            "(default: the last eval stage)")
    reward_margin: float | None = opt(None, "not promoted when the held-out reward is below the best "
                                      "night's (night 0: the starting policy's) by more than this")
    entropy_fraction: float | None = opt(None, "not promoted when the token entropy of the sampled "
                                         "held-out responses is below this fraction of the "
                                         "starting policy's")
    kl_max: float | None = opt(None, "not promoted when the KL to the starting policy (k3, per "
                               "response) is above this")
    patience: int = opt(0, "stop the run (exit 1) after this many nights in a row not promoted "
                        "(0: never)")

    def __post_init__(self):
        for name in ("reward_margin", "entropy_fraction", "kl_max", "patience"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InputError(f"nights.guard.{name}: must be >= 0, got {v}")


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
    prompts_input: str = opt("prompts", "the input whose prompts the nights draw from")
    prompts_per_night: int = opt(0, "N: each night draws N prompts of the pool (0: all, every night)")
    seed: int = opt(0, "seed of the draw: a night's prompts are a function of (seed, night)")
    curate: str = opt("none", "none | informative: draw unseen or last-informative prompts first, "
                      "skip prompts uninformative on their last `skip_after` nights")
    skip_after: int = opt(2, "curate: a prompt whose last this-many groups were all right or "
                          "all wrong is skipped")
    fill: bool = opt(True, "curate: when fewer than prompts_per_night prompts are not skipped, "
                     "skipped ones fill the night; false: the night draws fewer (fewer samples; "
                     "a night with none left retests the skipped ones)")
    replay_input: str = opt("replay", "the input holding human data (an SFT file) to replay")
    replay_fraction: float = opt(0.0, "share of every night's training examples that are replay "
                                 "rows of inputs.<replay_input> (train grpo: an SFT term); 0: off")
    score_stage: str | None = opt(None, "the stage whose scored groups the history keeps "
                                  "(default: the last score stage)")
    drift_stage: str | None = opt(None, "the eval stage whose sampled held-out responses give "
                                  "the drift metrics (default: the first eval stage that samples)")
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig,
                                           metadata={"help": "[nights.guard]: when a night is not promoted"})

    def __post_init__(self):
        for name in ("count", "previous", "reference_refresh", "seed_stride", "prompts_per_night"):
            if getattr(self, name) < 0:
                raise InputError(f"nights.{name}: must be >= 0, got {getattr(self, name)}")
        if self.skip_after < 1:
            raise InputError(f"nights.skip_after: must be >= 1, got {self.skip_after}")
        if self.curate not in CURATE:
            raise InputError(f"nights.curate: must be one of {', '.join(CURATE)}, got {self.curate!r}")
        if not 0 <= self.replay_fraction < 1:
            raise InputError(f"nights.replay_fraction: must be in [0, 1), got {self.replay_fraction}")
        if self.curate != "none" and not self.prompts_per_night:
            raise InputError("nights.curate: needs nights.prompts_per_night (a draw to curate)")


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
    score_stage: str | None = None
    eval_stages: list[str] = dataclasses.field(default_factory=list)
    guard_stage: str | None = None
    drift_stage: str | None = None
    reuse_baseline: list[str] = dataclasses.field(default_factory=list)


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
    for key in ("policy_input", "prompts_input") if cfg.prompts_per_night else ("policy_input",):
        if getattr(cfg, key) not in inputs:
            raise InputError(f"{path}: nights.{key}: '{getattr(cfg, key)}' is not defined in [inputs]")
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
    evals = [n for n, s in stages.items() if s.get("kind") == "eval"]
    plan = NightsPlan(cfg, Path(data["workdir"]), policy_stage, train_stage, data_stage, logprobs, seeds,
                      cfg.score_stage or _last(stages, ("score",)), evals,
                      cfg.guard.stage or (evals[-1] if evals else None),
                      cfg.drift_stage or next((n for n in evals if stages[n].get("greedy") is False), None),
                      [n for n in evals if stages[n].get("baseline") == f"inputs.{cfg.policy_input}"
                       and stages[n].get("policy") == f"stages.{policy_stage}"])
    _check_observers(path, plan, stages)
    if cfg.replay_fraction:
        if cfg.replay_input not in inputs:
            raise InputError(f"{path}: nights.replay_input: '{cfg.replay_input}' is not defined in [inputs]")
        if stages[train_stage].get("algorithm") != "grpo":
            raise InputError(f"{path}: nights.replay_fraction: only `train grpo` mixes replay rows in "
                             f"(stages.{train_stage} is {stages[train_stage].get('algorithm')})")
    return plan


def _check_observers(path: str, pl: NightsPlan, stages: dict) -> None:
    """The stages curation, drift and the guard read exist and are of the right kind."""
    cfg, g = pl.cfg, pl.cfg.guard
    for key, name, kind in (("guard.stage", g.stage, "eval"), ("drift_stage", cfg.drift_stage, "eval"),
                            ("score_stage", cfg.score_stage, "score")):
        if name is not None and stages.get(name, {}).get("kind") != kind:
            raise InputError(f"{path}: nights.{key}: '{name}' is not {'an' if kind == 'eval' else 'a'} {kind} stage")
    if cfg.drift_stage is not None and stages[cfg.drift_stage].get("greedy", True) is not False:
        raise InputError(f"{path}: nights.drift_stage: '{cfg.drift_stage}' decodes greedily; the drift "
                         "metrics need sampled responses (greedy = false)")
    if cfg.curate != "none" and pl.score_stage is None:
        raise InputError(f"{path}: nights.curate: needs a score stage (its groups are the history)")
    if g.reward_margin is not None and pl.guard_stage is None:
        raise InputError(f"{path}: nights.guard.reward_margin: needs an eval stage")
    for key in ("entropy_fraction", "kl_max"):
        if getattr(g, key) is not None and pl.drift_stage is None:
            raise InputError(f"{path}: nights.guard.{key}: needs an eval stage that samples "
                             "(greedy = false) for the drift metrics")


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
    if pl.cfg.replay_fraction:
        out += [f"stages.{pl.train_stage}.replay=inputs.{pl.cfg.replay_input}",
                f"stages.{pl.train_stage}.replay_fraction={pl.cfg.replay_fraction}"]
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


@dataclasses.dataclass
class _State:
    """What the guard carries from night to night."""
    start_policy: str = ""
    start_reward: float | None = None
    start_entropy: float | None = None
    best_night: int | None = None
    best_policy: str | None = None
    best_reward: float | None = None
    failures: int = 0


def run_nights(path: str, overrides: list[str] | None = None, count: int | None = None,
               dry_run: bool = False) -> list[dict]:
    """Run (or plan) the nights; return one record per night (the last one says
    ``stopped`` when the guard's patience ran out)."""
    overrides = list(overrides or [])
    pl = load_plan(path, overrides, count)
    pool = None
    policies: list[str] = []    # policies[n]: the policy that starts night n
    data: list[str] = []        # data[n]: night n's training data
    references: dict[str, str] = {}
    records: list[dict] = []
    state = _State()
    evaluated: dict[str, dict[str, str]] = {}   # policy -> {eval stage: the eval that scored it}
    for n in range(pl.cfg.count):
        if n and not Path(policies[n]).exists():
            records.append({"night": n, "pending": f"needs night-{n - 1:03d}'s policy"})
            break
        if pl.cfg.prompts_per_night and pool is None:
            base = load_pipeline(path, overrides + night_overrides(pl, 0, policies, data, references))
            pool = pool_ids(base.inputs[pl.cfg.prompts_input])
        draw, extra = _draw(pl, n, pool, write=not dry_run)
        extra += [f"stages.{e}.baseline_from={evaluated[policies[n]][e]}" for e in pl.reuse_baseline
                  if n and e in evaluated.get(policies[n], {})]
        p = load_pipeline(path, overrides + night_overrides(pl, n, policies, data, references) + extra)
        if n == 0:
            policies.append(p.inputs[pl.cfg.policy_input])
            state.start_policy = policies[0]
            references = {s: _resolved(p, s, "reference") for s in pl.logprobs_stages}
        rows = run_pipeline(p, dry_run=dry_run)
        out = str(stage_output(p, pl.policy_stage))
        evaluated[out] = {s.name: str(s.output) for s in p.stages if s.kind == "eval"}
        data.append(str(stage_output(p, pl.data_stage)) if pl.data_stage else "")
        rec = _record(pl, p, n, rows, policies[n], out, data, dry_run)
        if draw:
            rec["draw"] = draw
        if not dry_run or all(r["action"] == "reuse" for r in rows):
            _observe(pl, p, n, rec, state, write=not dry_run)
            decide(pl.cfg.guard, n, rec, state)
            if not dry_run:
                _keep_best(pl.workdir, state)
        policies.append(rec.get("guard", {}).get("next_policy", out))
        records.append(rec)
        if not dry_run:
            write_report(pl.workdir, records)
        if rec.get("stopped"):
            break
    return records


def _draw(pl: NightsPlan, n: int, pool, write: bool) -> tuple[dict | None, list[str]]:
    """Night ``n``'s draw from the pool (a record) and the override that feeds it to the job."""
    if not pl.cfg.prompts_per_night:
        return None, []
    table, ids = pool
    cfg, out = pl.cfg, pl.workdir / "draws" / f"night-{n:03d}"
    if cfg.curate == "informative":
        drawn, counts = curated_draw(ids, cfg.prompts_per_night, cfg.seed, n,
                                     read_history(pl.workdir, n), cfg.skip_after, cfg.fill)
    else:
        draws = plain_draws(ids, cfg.prompts_per_night, cfg.seed, n + 1)
        before = {i for d in draws[:n] for i in d}
        drawn = draws[n]
        counts = {"skipped": 0, "replayed": sum(1 for i in drawn if i in before),
                  "unseen": sum(1 for i in drawn if i not in before)}
    rec = {"prompts": str(out), "pool": len(ids), "count": len(drawn), "curate": cfg.curate,
           "seed": cfg.seed, **counts, "prompt_ids": drawn}
    if is_complete(str(out)):
        stored = open_dataset(str(out)).read(columns=["prompt_id"]).column("prompt_id").to_pylist()
        if stored != drawn:
            raise InputError(f"{out}: holds another draw than this job makes for night {n} (the pool, "
                             "seed or [nights] draw settings changed); move the workdir aside")
    elif not write:
        return {**rec, "prompts": None}, []
    else:
        write_draw(table, drawn, out)
    return rec, [f"inputs.{cfg.prompts_input}={out}"]


def _observe(pl: NightsPlan, p: Pipeline, n: int, rec: dict, state: _State, write: bool) -> None:
    """Read the night's stored outputs: every eval stage, the group history, drift."""
    stages = {s.name: s for s in p.stages}
    rec["evals"] = {name: eval_figures(stages[name].output) for name in pl.eval_stages}
    if pl.score_stage:
        hist = pl.workdir / "history" / f"night-{n:03d}"
        if write or is_complete(str(hist)):
            rec["history"] = write_history(pl.workdir, n, str(stage_output(p, pl.score_stage)))
    if pl.drift_stage:
        s = stages[pl.drift_stage]
        temp = rec["evals"][pl.drift_stage]["temperature"]
        kl_out = p.workdir / "drift" / "kl-start"
        if write or is_complete(str(kl_out)):
            rec["drift"] = drift_metrics(str(s.output / "policy" / "scored"), state.start_policy, kl_out, temp)
        if n == 0 and (s.output / "baseline" / "scored").is_dir():
            rec["drift_start"] = drift_metrics(str(s.output / "baseline" / "scored"), None, kl_out, temp)
            state.start_entropy = rec["drift_start"]["entropy"]
    if n == 0 and pl.guard_stage:
        state.start_reward = rec["evals"][pl.guard_stage].get("baseline_reward")
    rec["guard_stage"] = pl.guard_stage


def _keep_best(workdir: Path, state: _State) -> None:
    """WORKDIR/best/: a copy of the best policy so far (WORKDIR/best.json says which)."""
    if state.best_policy is None:
        return
    from .models import fingerprint
    mark = {"night": state.best_night, "policy": state.best_policy,
            "fingerprint": fingerprint(state.best_policy), "reward": state.best_reward}
    best = workdir / "best"
    if _read_json(workdir / "best.json") == mark and best.is_dir():
        return
    tmp, old = workdir / ".best.tmp", workdir / ".best.old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(state.best_policy, tmp)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    write_json_atomic(workdir / "best.json", mark)


def _record(pl: NightsPlan, p: Pipeline, n: int, rows: list[dict], policy_in: str, policy_out: str,
            data: list[str], dry_run: bool) -> dict:
    rec = {"night": n, "workdir": str(p.workdir), "policy_in": policy_in, "policy_out": policy_out,
           "data": data[n] or None, "reference": {s: _resolved(p, s, "reference") for s in pl.logprobs_stages},
           "previous_data": data[max(0, n - pl.cfg.previous):n] if pl.cfg.previous else [],
           "stages": rows}
    if not Path(policy_out).is_dir():
        return rec
    from .models import fingerprint
    rec["policy_in_fingerprint"] = fingerprint(policy_in)
    rec["policy_out_fingerprint"] = fingerprint(policy_out)
    stages = {s.name: s for s in p.stages}
    summary = _read_json(stages[pl.train_stage].output / "train_summary.json")
    if summary:
        first, last = summary.get("first") or {}, summary.get("last") or {}
        rec["train"] = {"data": summary.get("data"), "steps": summary.get("steps"),
                        "first": first, "last": last}
    return rec


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
