"""``offline-rlhf eval``: held-out prompts -> generate -> score, against a baseline.

Reports, for the policy and the baseline (same prompts, same scorer): mean reward and
each component, win rate of the policy over the baseline (ties count half), response
length, and the KL to the reference estimated from log-probs of the evaluated samples
(mean over samples of the summed ``log pi - log ref`` of the response tokens; with
sampled decoding this is the usual Monte Carlo estimate of KL(pi || ref), with greedy
decoding a proxy). Writes ``results.json`` and ``report.md`` with PNG plots: reward
histograms of baseline vs policy, reward vs KL per checkpoint, training curves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .backends import BackendOptions, backend_options
from .config import opt, to_dict
from .errors import InputError
from .generation import GenerateConfig, generate
from .logprobs import LogprobsConfig, compute_logprobs
from .rewards.score import ScoreConfig, score
from .shards import is_complete, open_dataset


@dataclasses.dataclass
class EvalConfig(BackendOptions):
    """Options of ``eval``; ``backend`` is the engine that generates the evaluated responses
    (scoring and reference log-probs run on the built-in one)."""

    policy: str = opt(help="model to evaluate")
    prompts: str = opt(help="held-out prompts (dataset or file)")
    output: str = opt(help="output directory (results.json, report.md, plots, datasets)")
    baseline: str | None = opt(None, "baseline policy for the win rate (e.g. the starting model)")
    reference: str | None = opt(None, "reference model for the KL estimate (default: baseline)")
    checkpoints: list[str] = opt([], "more models to place on the reward-vs-KL plot")
    metrics: list[str] = opt([], "training metrics.jsonl files to plot")
    reward_model: str | None = opt(None, "reward model directory")
    weights: dict[str, float] = opt({}, "reward components and weights (see `score`)")
    format_pattern: str | None = opt(None, "regex for the 'format' component")
    greedy: bool = opt(True, "greedy decoding (else sampled with temperature)")
    num_samples: int = opt(1, "samples per prompt")
    temperature: float = opt(1.0, "sampling temperature when not greedy")
    max_new_tokens: int = opt(128, "longest response")
    stop: list[str] = opt([], "stop strings")
    seed: int = opt(0, "sampling seed")


def _scored(cfg: EvalConfig, model: str, out: Path, reference: str | None) -> dict:
    """Generate, score (and reference log-probs) for one model; summary figures."""
    if not is_complete(str(out / "scored")):
        generate(GenerateConfig(prompts=cfg.prompts, output=str(out / "generations"), policy=model,
                                num_samples=cfg.num_samples, greedy=cfg.greedy,
                                temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                stop=list(cfg.stop), seed=cfg.seed, overlong="truncate",
                                **backend_options(cfg)))
        kw = {"format_pattern": cfg.format_pattern} if cfg.format_pattern else {}
        score(ScoreConfig(generations=str(out / "generations"), output=str(out / "scored"),
                          reward_model=cfg.reward_model, weights=dict(cfg.weights), **kw))
    final = out / "scored"
    if reference:
        if not is_complete(str(out / "ref")):
            compute_logprobs(LogprobsConfig(generations=str(out / "scored"), output=str(out / "ref"),
                                            reference=reference))
        final = out / "ref"
    t = open_dataset(str(final)).read().to_pylist()
    rewards = np.array([r["reward"] for r in t])
    comps: dict[str, list[float]] = {}
    for r in t:
        for c in r["reward_components"] or []:
            comps.setdefault(c["name"], []).append(c["value"])
    kl = None
    if reference:
        kl = float(np.mean([sum(r["behaviour_logps"]) - r["ref_logps_sum"] for r in t]))
    return {"model": model, "samples": len(t), "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "components": {k: float(np.mean(v)) for k, v in comps.items()},
            "response_tokens_mean": float(np.mean([len(r["response_token_ids"]) for r in t])),
            "kl_to_reference": kl, "rewards": rewards.tolist(),
            "by_prompt": {(r["prompt_id"], r["sample_index"]): r["reward"] for r in t}}


def win_rate(policy: dict, baseline: dict) -> float:
    wins = []
    for key, r in policy.items():
        if key in baseline:
            b = baseline[key]
            wins.append(1.0 if r > b else 0.5 if r == b else 0.0)
    if not wins:
        raise InputError("policy and baseline share no evaluated prompt")
    return float(np.mean(wins))


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.policy`` (and the baseline); write results.json and report.md."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    reference = cfg.reference or cfg.baseline
    policy = _scored(cfg, cfg.policy, out / "policy", reference)
    results = {"config": to_dict(cfg), "policy": policy}
    if cfg.baseline:
        base = _scored(cfg, cfg.baseline, out / "baseline", reference)
        results["baseline"] = base
        results["win_rate"] = win_rate(policy["by_prompt"], base["by_prompt"])
    results["checkpoints"] = [
        {k: v for k, v in _scored(cfg, c, out / f"checkpoint-{i}", reference).items()
         if k not in ("rewards", "by_prompt")} for i, c in enumerate(cfg.checkpoints)]
    write_report(results, out, cfg.metrics)
    slim = {k: ({kk: vv for kk, vv in v.items() if kk not in ("rewards", "by_prompt")}
                if k in ("policy", "baseline") else v) for k, v in results.items()}
    (out / "results.json").write_text(json.dumps(slim, indent=1, default=str))
    return slim


def write_report(results: dict, out: Path, metrics: list[str]) -> None:
    from .plots import histograms, lines, scatter
    p, b = results["policy"], results.get("baseline")
    pngs = [histograms({"baseline": b["rewards"], "policy": p["rewards"]} if b else {"policy": p["rewards"]},
                       out / "rewards.png", "Held-out rewards")]
    points = []
    if b and b["kl_to_reference"] is not None:
        points.append((b["kl_to_reference"], b["reward_mean"], "baseline"))
    for i, c in enumerate(results.get("checkpoints", [])):
        if c["kl_to_reference"] is not None:
            points.append((c["kl_to_reference"], c["reward_mean"], f"checkpoint {i}"))
    if p["kl_to_reference"] is not None:
        points.append((p["kl_to_reference"], p["reward_mean"], "policy"))
    if points:
        pngs.append(scatter(points, out / "reward_vs_kl.png", "Reward vs KL to the reference",
                            "KL estimate (nats)", "mean reward"))
    for i, path in enumerate(metrics):
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "loss" in r]
        if rows:
            keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "nll") if k in rows[0]]
            pngs.append(lines([r["step"] for r in rows], {k: [r[k] for r in rows] for k in keys},
                              out / f"training-{i}.png", f"Training curves ({Path(path).parent.name})",
                              "step", "value", markers=False))
    md = ["# Evaluation report", "", "| | baseline | policy |", "|---|---|---|"]

    def cell(side, key):
        if side is None or side.get(key) is None:
            return "-"
        v = side[key]
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    for key, label in (("reward_mean", "mean reward"), ("reward_std", "reward std"),
                       ("kl_to_reference", "KL to reference"), ("response_tokens_mean", "response tokens"),
                       ("samples", "samples")):
        md.append(f"| {label} | {cell(b, key)} | {cell(p, key)} |")
    for name in sorted(p["components"]):
        bv = f"{b['components'].get(name, float('nan')):.4g}" if b else "-"
        md.append(f"| {name} | {bv} | {p['components'][name]:.4g} |")
    if "win_rate" in results:
        md += ["", f"Win rate of the policy over the baseline: **{results['win_rate']:.1%}** (ties count half)."]
    md += ["", f"Policy: `{p['model']}`" + (f"; baseline: `{b['model']}`" if b else ""), ""]
    md += [f"![{png.stem}]({png.name})" for png in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
