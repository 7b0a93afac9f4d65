"""``offline-rlhf eval``: held-out prompts -> generate -> score, against a baseline.

Reports, for the policy and the baseline (same prompts, same scorer): mean reward (with
its standard error) and each component, win rate of the policy over the baseline (ties
count half), response length, and the KL to the reference.

The KL is estimated on responses *sampled from the evaluated model* at temperature 1
(the evaluation's own samples when it samples that way, else ``kl_samples`` extra
samples per prompt, 2 by default), with the k3 estimator summed over response tokens: per token,
with r = ref(y_t) / pi(y_t), k3 = (r - 1) - log r, which is never negative and whose
expectation under pi is KL(pi || ref) at that state (J. Schulman, "Approximating KL
divergence", 2020). Each sequence's sum estimates the sequence-level KL; the report
gives the mean and its standard error. Greedy decoding samples nothing from the
policy, so with ``kl_samples = 0`` a greedy evaluation reports no KL (null, with the
reason) rather than a biased number.

``ilql_heads`` evaluates the policy with ILQL value-guided decoding (its heads, with
``ilql_beta``): its responses and its KL samples are drawn from the guided distribution
(the baseline and checkpoints decode plainly).

Every option is checked before any generation: the generate and score options are built
(and so checked) for every model, and the prompts read, before the first model loads.

Besides the policy and the baseline, ``checkpoints`` adds models: model directories, or
training checkpoints (exported first with :mod:`offline_rlhf.export`). Every model is
labelled (``policy``, ``baseline``, a checkpoint's directory name such as
``step-0000005``, made distinct) in results.json, in report.md's table (one column per
model) and in the plots.

Writes ``results.json`` and ``report.md`` with PNG plots: reward histograms of every
model, reward vs KL per model (labelled points with error bars), training curves.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from .backends import BackendOptions, backend_options
from .config import opt, to_dict
from .errors import InputError
from .eval_report import pick_samples, write_report
from .generation import GenerateConfig, generate
from .logprobs import LogprobsConfig, compute_logprobs
from .rewards.judge import JUDGE_OPTIONS, JudgeOptions
from .rewards.judge_stats import pointwise_diagnostics
from .rewards.score import ScoreConfig, score
from .shards import is_complete, open_dataset
from .storage import read_json_file, refuse_link, remove_run_output, write_json_atomic


@dataclasses.dataclass
class EvalConfig(BackendOptions, JudgeOptions):
    """Options of ``eval``; ``backend`` is the engine that generates the evaluated responses
    (scoring and reference log-probs run on the built-in one)."""

    policy: str = opt(help="model to evaluate")
    prompts: str = opt(help="held-out prompts (dataset or file)")
    output: str = opt(help="output directory (results.json, report.md, plots, datasets)")
    baseline: str | None = opt(None, "baseline policy for the win rate (e.g. the starting model)")
    reference: str | None = opt(None, "reference model for the KL estimate (default: baseline)")
    baseline_from: str | None = opt(None, "an earlier eval OUTPUT whose policy was this baseline: its "
                                    "scored responses are reused when the model's content and every "
                                    "decoding and scoring option match (the nights driver sets it)")
    checkpoints: list[str] = opt([], "more models to evaluate beside the policy: model directories "
                                 "or training checkpoints (OUTPUT/checkpoints/step-0000005, "
                                 "exported to OUTPUT/checkpoint-I/model first); each is labelled "
                                 "by its directory name in the report and the plots")
    metrics: list[str] = opt([], "training metrics to plot: metrics.jsonl files or training "
                             "output directories")
    reward_model: str | None = opt(None, "reward model directory")
    weights: dict[str, float] = opt({}, "reward components and weights (see `score`)")
    format_pattern: str | None = opt(None, "regex for the 'format' component")
    greedy: bool = opt(True, "greedy decoding (else sampled with temperature)")
    num_samples: int = opt(1, "samples per prompt")
    temperature: float = opt(1.0, "sampling temperature when not greedy")
    max_new_tokens: int = opt(128, "longest response")
    stop: list[str] = opt([], "stop strings")
    seed: int = opt(0, "sampling seed")
    kl_samples: int = opt(2, "responses per prompt sampled at temperature 1 from each evaluated "
                          "model for the KL estimate (0: estimate it only when the evaluation "
                          "itself samples at temperature 1)")
    ilql_heads: str | None = opt(None, "evaluate the policy with ILQL value-guided decoding: "
                                 "its heads directory (heads.safetensors)")
    ilql_beta: float = opt(1.0, "ILQL value-guidance strength for --ilql-heads")
    overwrite: bool = opt(False, "start afresh: remove an earlier eval's OUTPUT (a directory "
                          "holding eval_key.json) once the inputs are checked; without it, an "
                          "OUTPUT made with other options or model weights is refused")

    def __post_init__(self):
        super().__post_init__()
        if self.kl_samples < 0 or self.num_samples < 1:
            raise InputError("kl_samples must be >= 0 and num_samples >= 1")


def _generate_config(cfg: EvalConfig, model: str, output: Path, heads: str | None,
                     kl: bool = False) -> GenerateConfig:
    """The generate options of one model's evaluated responses (``kl``: its KL samples)."""
    guided = {"ilql_heads": heads, "ilql_beta": cfg.ilql_beta} if heads else {}
    if kl:
        return GenerateConfig(prompts=cfg.prompts, output=str(output), policy=model,
                              num_samples=cfg.kl_samples, temperature=1.0,
                              max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop),
                              seed=cfg.seed + 1, overlong="truncate", **guided)
    return GenerateConfig(prompts=cfg.prompts, output=str(output), policy=model,
                          num_samples=cfg.num_samples, greedy=cfg.greedy,
                          temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                          stop=list(cfg.stop), seed=cfg.seed, overlong="truncate",
                          **guided, **backend_options(cfg))


def _score_config(cfg: EvalConfig, out: Path) -> ScoreConfig:
    kw = {"format_pattern": cfg.format_pattern} if cfg.format_pattern else {}
    return ScoreConfig(generations=str(out / "generations"), output=str(out / "scored"),
                       reward_model=cfg.reward_model, weights=dict(cfg.weights), **kw,
                       vllm_kv_cache_gb=cfg.vllm_kv_cache_gb,   # the judge's, on vllm
                       **{k: getattr(cfg, k) for k in JUDGE_OPTIONS})


def check_eval_inputs(cfg: EvalConfig) -> list[Path]:
    """Before any work: every model directory, the prompts, the generate and score
    options, the ILQL heads and the metrics files; the metrics files to plot (a training
    output directory stands for its metrics.jsonl)."""
    from .export import is_checkpoint, read_checkpoint
    from .generation import load_prompt_table
    from .models import check_model_dir, check_reward_model
    for name in ("policy", "baseline", "reference", "judge"):
        if getattr(cfg, name):
            check_model_dir(getattr(cfg, name), name)
    for c in cfg.checkpoints:
        if is_checkpoint(c):
            read_checkpoint(c)   # a training checkpoint: exported before it is evaluated
        else:
            check_model_dir(c, "checkpoint")
    if cfg.reward_model:
        check_reward_model(cfg.reward_model)
    if not Path(cfg.prompts).exists() and "://" not in cfg.prompts:
        raise InputError(f"prompts: {cfg.prompts}: no such dataset or file")
    load_prompt_table(cfg.prompts)
    _score_config(cfg, Path(cfg.output))   # weights, reward model, format pattern
    _generate_config(cfg, cfg.policy, Path(cfg.output), cfg.ilql_heads)
    if cfg.ilql_heads:
        from .ilql import load_heads
        load_heads(cfg.ilql_heads)
    files = []
    for m in cfg.metrics:
        p = Path(m) / "metrics.jsonl" if Path(m).is_dir() else Path(m)
        if not p.is_file():
            raise InputError(f"metrics: {m}: neither a metrics.jsonl file nor a training output "
                             "directory holding one")
        files.append(p)
    return files


def kl_k3(policy_logps: list[list[float]], ref_logps: list[list[float]]) -> np.ndarray:
    """Per-sequence KL(pi || ref) estimates from samples of pi: the k3 estimator
    (r - 1) - log r, r = ref / pi per token, summed over each response's tokens.
    Every term is >= 0, so no estimate is negative."""
    out = []
    for lp, lr in zip(policy_logps, ref_logps):
        log_r = np.asarray(lr, dtype=np.float64) - np.asarray(lp, dtype=np.float64)
        out.append(float(np.sum(np.expm1(log_r) - log_r)))
    return np.array(out)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def _kl(cfg: EvalConfig, model: str, out: Path, reference: str | None, heads: str | None) -> dict:
    """The KL estimate of one model (or why there is none)."""
    if not reference:
        return {"kl_to_reference": None, "kl_note": "no reference (or baseline) model given"}
    sampled_at_1 = not cfg.greedy and cfg.temperature == 1.0
    if not sampled_at_1 and not cfg.kl_samples:
        why = "greedy decoding" if cfg.greedy else f"sampling at temperature {cfg.temperature:g}"
        return {"kl_to_reference": None,
                "kl_note": f"not estimated: {why} does not sample from the model itself; set "
                           "kl_samples to draw samples at temperature 1 for it"}
    src = out / "scored"
    if not sampled_at_1:
        src = out / "kl-generations"
        if not is_complete(str(src)):
            generate(_generate_config(cfg, model, src, heads, kl=True))
    if not is_complete(str(out / "kl-ref")):
        compute_logprobs(LogprobsConfig(generations=str(src), output=str(out / "kl-ref"),
                                        reference=reference))
    t = open_dataset(str(out / "kl-ref")).read(columns=["behaviour_logps", "ref_logps"])
    per_seq = kl_k3(t.column("behaviour_logps").to_pylist(), t.column("ref_logps").to_pylist())
    mean, se = _mean_se(per_seq)
    return {"kl_to_reference": mean, "kl_stderr": se, "kl_samples": len(per_seq),
            "kl_note": f"k3 estimator summed over response tokens, {len(per_seq)} responses "
                       "sampled at temperature 1"}


def _scored(cfg: EvalConfig, model: str, out: Path, reference: str | None,
            heads: str | None = None) -> dict:
    """Generate and score for one model; summary figures (and its KL estimate)."""
    if not is_complete(str(out / "scored")):
        generate(_generate_config(cfg, model, out / "generations", heads))
        score(_score_config(cfg, out))
    t = open_dataset(str(out / "scored")).read(
        columns=["prompt_id", "sample_index", "reward", "reward_components", "response_token_ids",
                 "prompt", "response"]).to_pylist()
    rewards = np.array([r["reward"] for r in t])
    comps: dict[str, list[float]] = {}
    for r in t:
        for c in r["reward_components"] or []:
            comps.setdefault(c["name"], []).append(c["value"])
    mean, se = _mean_se(rewards)
    return {"model": model, "samples": len(t), "reward_mean": mean, "reward_stderr": se,
            "reward_std": float(rewards.std()),
            "components": {k: float(np.mean(v)) for k, v in comps.items()},
            "response_tokens_mean": float(np.mean([len(r["response_token_ids"]) for r in t])),
            **_kl(cfg, model, out, reference, heads), "rewards": rewards.tolist(), **_judged(t, comps),
            "by_prompt": {(r["prompt_id"], r["sample_index"]): r["reward"] for r in t},
            "texts": {(r["prompt_id"], r["sample_index"]): (r["prompt"], r["response"]) for r in t}}


def _judged(t: list[dict], comps: dict) -> dict:
    """Judge diagnostics (docs/rlaif.md) when a judge scored the responses."""
    if "judge" not in comps:
        return {}
    others = {k: np.array(v) for k, v in comps.items() if k != "judge" and len(v) == len(t)}
    lengths = np.array([len(r["response_token_ids"]) for r in t])
    return {"judge": pointwise_diagnostics(np.array(comps["judge"]), others, lengths)}


def win_rate(policy: dict, baseline: dict) -> float:
    wins = []
    for key, r in policy.items():
        if key in baseline:
            b = baseline[key]
            wins.append(1.0 if r > b else 0.5 if r == b else 0.0)
    if not wins:
        raise InputError("policy and baseline share no evaluated prompt")
    return float(np.mean(wins))


EVAL_KEY = "eval_key.json"   # what an OUTPUT's responses were made by: options and model content


def _eval_key(cfg: EvalConfig) -> dict:
    from .models import fingerprint
    key = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "overwrite", "baseline_from")
           and (cfg.judge or k not in JUDGE_OPTIONS) and k != "judge_cache"}
    for name in ("policy", "baseline", "reference", "ilql_heads"):
        if getattr(cfg, name, None) and Path(getattr(cfg, name)).is_dir():
            key[f"{name}_content"] = fingerprint(getattr(cfg, name))
    return key


def _claim_output(cfg: EvalConfig, out: Path) -> None:
    """Reuse what an identical eval left in ``out`` (a killed one resumes), never what
    another made: a rerun with other options or other model weights is refused in one
    line naming what differs (``--overwrite`` starts afresh)."""
    from .manifest import config_diff
    key = _eval_key(cfg)
    refuse_link(out)
    if out.is_dir() and any(out.iterdir()):
        before = read_json_file(out / EVAL_KEY)
        if before is None:
            raise InputError(f"{out}: exists and holds no eval output ({EVAL_KEY}); write "
                             "elsewhere, or pass --overwrite to replace an eval output")
        if before != key:
            raise InputError(f"{out}: holds an eval made with other settings "
                             f"({config_diff(before, key)}); pass --overwrite to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / EVAL_KEY, key)


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.policy`` (and the baseline); write results.json and report.md."""
    metrics = check_eval_inputs(cfg)
    out = Path(cfg.output)
    if cfg.overwrite:
        remove_run_output(out, EVAL_KEY, "eval")
    _claim_output(cfg, out)
    reference = cfg.reference or cfg.baseline
    policy = {"label": "policy", **_scored(cfg, cfg.policy, out / "policy", reference,
                                           cfg.ilql_heads)}
    results, base = {"config": to_dict(cfg), "policy": policy}, None
    if cfg.baseline:
        if _reuse_baseline(cfg, out / "baseline"):
            results["baseline_reused"] = {"from": cfg.baseline_from}
        base = {"label": "baseline", **_scored(cfg, cfg.baseline, out / "baseline", reference)}
        results["baseline"] = base
        results["win_rate"] = win_rate(policy["by_prompt"], base["by_prompt"])
    results["checkpoints"] = [_checkpoint(cfg, c, label, out / f"checkpoint-{i}", reference)
                              for i, (c, label) in enumerate(zip(cfg.checkpoints,
                                                                 model_labels(cfg.checkpoints)))]
    results["samples"] = pick_samples(policy, base, cfg.seed)
    write_report(results, out, metrics)
    bulky = ("rewards", "by_prompt", "texts")
    slim = {k: ({kk: vv for kk, vv in v.items() if kk not in bulky}
                if k in ("policy", "baseline") else
                [{kk: vv for kk, vv in c.items() if kk not in bulky} for c in v]
                if k == "checkpoints" else v) for k, v in results.items()}
    write_json_atomic(out / "results.json", slim)  # its presence means done: atomic
    return slim


# options that do not change a model's scored rows (baseline_from, itself left out of the key,
# reuses rows across evals that agree on every other option)
NOT_ROWS = ("policy", "baseline", "reference", "checkpoints", "metrics")


def _reuse_baseline(cfg: EvalConfig, out: Path) -> bool:
    """Copy the scored responses of ``cfg.baseline_from``'s policy to ``out`` when that
    eval made them from the same model content with the same options (so the same rows:
    per-sample seeds depend on the seed, prompt and sample index only)."""
    if not cfg.baseline_from or is_complete(str(out / "scored")):
        return False
    before, key = read_json_file(Path(cfg.baseline_from) / EVAL_KEY) or {}, _eval_key(cfg)
    same = {k for k in key if k.partition("_content")[0] not in NOT_ROWS}
    src = Path(cfg.baseline_from) / "policy" / "scored"
    if before.get("policy_content") != key.get("baseline_content") or not is_complete(str(src)) \
            or any(before.get(k) != key[k] for k in same):
        return False
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out / "scored")
    return True


def _checkpoint(cfg: EvalConfig, path: str, label: str, out: Path, reference: str | None) -> dict:
    """One ``--checkpoints`` model scored; a training checkpoint is exported first, to
    OUT/checkpoint-I/model (reused while the checkpoint is unchanged; what was generated
    from an earlier export is dropped)."""
    from .export import exported, is_checkpoint
    model = path
    if is_checkpoint(path):
        target, fresh = exported(path, out / "model")
        model = str(target)
        for stale in ("generations", "scored", "kl-generations", "kl-ref") if fresh else ():
            shutil.rmtree(out / stale, ignore_errors=True)
    return {"label": label, **({"checkpoint": path} if model != path else {}),
            **_scored(cfg, model, out, reference)}


def model_labels(paths: list[str]) -> list[str]:
    """A short, distinct label per model path: its directory name (``step-0000005``),
    with as many parent directories as it takes to tell it from the others (and from
    ``policy`` and ``baseline``); a path given twice gets ``#2``."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i and p != mine]
        depth = 1
        while depth < len(mine) and (
                any(p[-depth:] == mine[-depth:] for p in others) or
                "/".join(mine[-depth:]) in ("policy", "baseline")):
            depth += 1
        labels.append("/".join(mine[-depth:]))
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        labels[i] = f"{label} #{seen[label]}" if seen[label] > 1 else label
    return labels
