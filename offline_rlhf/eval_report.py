"""The report of ``offline-rlhf eval``: report.md (a table with one column per model,
sample responses, plots) and the short text table that ``eval``, ``pipeline run`` and
``--nights`` print.

Sample responses are shown for the same prompts before (the baseline) and after (the
policy): the prompt where the policy gained most over the baseline, the one where it
lost most, and one drawn at random (seeded) from the rest; without a baseline, the
policy's best-, worst-rewarded and a random response.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHOWN_CHARS = 400   # a sample's prompt or response is cut to this many characters


def _models(results: dict) -> list[dict]:
    """Every evaluated model in report order: baseline, checkpoints, policy."""
    b = results.get("baseline")
    return ([b] if b else []) + list(results.get("checkpoints", [])) + [results["policy"]]


def _kl_points(results: dict) -> list[dict]:
    return [{"x": m["kl_to_reference"], "xerr": m.get("kl_stderr"), "y": m["reward_mean"],
             "yerr": m.get("reward_stderr"), "label": m["label"]}
            for m in _models(results) if m.get("kl_to_reference") is not None]


def write_report(results: dict, out: Path, metrics: list) -> None:
    from .plots import histograms, points
    models = _models(results)
    pngs = [histograms({m["label"]: m["rewards"] for m in models}, out / "rewards.png",
                       "Held-out rewards")]
    kl_points = _kl_points(results)
    if kl_points:
        pngs.append(points(kl_points, out / "reward_vs_kl.png", "Mean reward vs KL to the reference",
                           "KL estimate (nats, k3; bars: ±1 standard error)", "mean reward"))
    pngs += _training_plots(metrics, out)
    p = results["policy"]
    md = ["# Evaluation report", "", *_table(models)]
    if "win_rate" in results:
        md += ["", f"Win rate of the policy over the baseline: **{results['win_rate']:.1%}** (ties count half)."]
    md += ["", f"KL: {p['kl_note']}." + ("" if kl_points else " No reward-vs-KL plot."), ""]
    heads = results.get("config", {}).get("ilql_heads")
    md += [f"- {m['label']}: `{m['model']}`" + (f" (exported from the training checkpoint "
                                                 f"`{m['checkpoint']}`)" if "checkpoint" in m else "")
           + (f" with ILQL heads `{heads}` (beta {results['config']['ilql_beta']:g})"
              if heads and m is p else "")
           for m in models]
    md += [f"- judge diagnostics of {m['label']}: " + ", ".join(
        f"{k} {v:.3g}" if v is not None else f"{k} -" for k, v in m["judge"].items())
        for m in models if m.get("judge")]
    md += ["", *_samples_md(results.get("samples", []))]
    md += [""] + [f"![{png.stem}]({png.name})" for png in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")


def _training_plots(metrics: list, out: Path) -> list[Path]:
    from .plots import curves
    pngs = []
    for i, path in enumerate(metrics):
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "loss" in r]
        if rows:
            keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "loss/nll") if k in rows[0]]
            pngs.append(curves([r["step"] for r in rows], {k: [r[k] for r in rows] for k in keys},
                               out / f"training-{i}.png", f"Training curves ({Path(path).parent.name})"))
    return pngs


def _cell(m: dict, key: str) -> str:
    if m.get(key) is None:
        return "n/a" if key == "kl_to_reference" else "-"
    v = m[key]
    err = m.get({"reward_mean": "reward_stderr", "kl_to_reference": "kl_stderr"}.get(key, ""))
    return f"{v:.4g} ± {err:.2g}" if err is not None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(models: list[dict]) -> list[str]:
    """One column per evaluated model, headed by its label."""
    md = ["| | " + " | ".join(m["label"] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for key, label in (("reward_mean", "mean reward (± s.e.)"), ("reward_std", "reward std"),
                       ("kl_to_reference", "KL to reference (± s.e.)"),
                       ("response_tokens_mean", "response tokens"), ("samples", "samples")):
        md.append(f"| {label} | " + " | ".join(_cell(m, key) for m in models) + " |")
    for name in sorted({c for m in models for c in m["components"]}):
        md.append(f"| {name} | " + " | ".join(
            f"{m['components'][name]:.4g}" if name in m["components"] else "-" for m in models) + " |")
    return md


# --------------------------------------------------------------------------- sample responses

def pick_samples(policy: dict, baseline: dict | None, seed: int) -> list[dict]:
    """Best, worst and a random sample (see the module docstring); each with the prompt,
    and per model its response and reward. ``policy``/``baseline``: ``_scored`` results
    (``texts``: (prompt id, sample index) -> (prompt, response))."""
    keys = sorted(k for k in policy["by_prompt"] if baseline is None or k in baseline["by_prompt"])
    if not keys:
        return []

    def gain(k):
        return policy["by_prompt"][k] - (baseline["by_prompt"][k] if baseline else 0.0)

    best, worst = max(keys, key=gain), min(keys, key=gain)
    rest = [k for k in keys if k not in (best, worst)]
    chosen = [("best", best), ("worst", worst)] if best != worst else [("best", best)]
    if rest:
        chosen.append(("random", random.Random(seed).choice(rest)))
    out = []
    for kind, k in chosen:
        item = {"kind": kind, "prompt_id": k[0], "sample_index": k[1],
                "prompt": policy["texts"][k][0], "models": []}
        for m in ([baseline] if baseline else []) + [policy]:
            item["models"].append({"label": m["label"], "response": m["texts"][k][1],
                                   "reward": m["by_prompt"][k]})
        out.append(item)
    return out


def _quoted(text: str) -> list[str]:
    cut = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " [...]"
    return ["```text", cut.replace("```", "'''"), "```"]


def _samples_md(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    md = ["## Sample responses", "", "The same prompt for every model: where the policy "
          "gained most over the baseline (best), lost most (worst), and one at random." if
          len(samples[0]["models"]) > 1 else "The policy's best- and worst-rewarded response, "
          "and one at random.", ""]
    for s in samples:
        md += [f"### {s['kind']}: prompt `{s['prompt_id']}`", "", *_quoted(s["prompt"]), ""]
        for m in s["models"]:
            md += [f"**{m['label']}** (reward {m['reward']:.4g}):", "", *_quoted(m["response"]), ""]
    return md


# --------------------------------------------------------------------------- printed figures

def figures(results: dict) -> str:
    """The before/after table that commands print: one row per evaluated model."""
    rows = [("model", "mean reward", "KL to ref", "resp. tokens", "samples")]
    for m in _models(results):
        kl = m.get("kl_to_reference")
        rows.append((m["label"], f"{m['reward_mean']:.4g} ± {m.get('reward_stderr') or 0:.2g}",
                     "n/a" if kl is None else f"{kl:.4g} ± {m.get('kl_stderr') or 0:.2g}",
                     f"{m['response_tokens_mean']:.1f}", str(m["samples"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if results.get("win_rate") is not None:
        lines.append(f"win rate of the policy over the baseline: {results['win_rate']:.1%}")
    return "\n".join(lines)


def figures_of(output: Path) -> str | None:
    """:func:`figures` of a finished eval OUTPUT and its report path (None if unfinished)."""
    try:
        results = json.loads((Path(output) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return f"{figures(results)}\nreport: {Path(output) / 'report.md'}"
