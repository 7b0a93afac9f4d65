"""The nights' report: WORKDIR/nights.json, nights.md and nights.png, from the records.

nights.md has one row per night (prompts drawn, informative groups, training data,
staleness, every eval stage's held-out reward before -> after, drift, promoted), a
table of the eval stages (greedy or sampled, samples per prompt), each night's drift
metrics, and the guard's decisions. nights.png plots, across nights: held-out reward
per eval stage, KL to the starting policy, token entropy, informative fraction.
"""

from __future__ import annotations

import json
from pathlib import Path

from .storage import read_json_file, write_file_atomic


def eval_figures(output: Path) -> dict:
    """An eval stage's figures, with how it decoded (greedy or sampled, samples per prompt)."""
    res = read_json_file(output / "results.json") or {}
    cfg, pol, base = res.get("config") or {}, res.get("policy") or {}, res.get("baseline") or {}
    greedy = bool(cfg.get("greedy", True))
    return {"decoding": "greedy" if greedy else "sampled",
            "temperature": None if greedy else cfg.get("temperature"),
            "samples_per_prompt": cfg.get("num_samples"), "responses": pol.get("samples"),
            "policy_reward": pol.get("reward_mean"), "policy_stderr": pol.get("reward_stderr"),
            "baseline_reward": base.get("reward_mean"), "baseline_stderr": base.get("reward_stderr"),
            "baseline_reused_from": (res.get("baseline_reused") or {}).get("from"),
            "win_rate": res.get("win_rate"), "report": str(output / "report.md")}


def write_report(workdir: Path, records: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(workdir / "nights.json", json.dumps(records, indent=1, default=str) + "\n")
    png = plot_nights(records, workdir / "nights.png")
    md = "# Nights\n\n" + render_nights(records) + "\n"
    if png:
        md += f"\n![nights]({png.name})\n"
    write_file_atomic(workdir / "nights.md", md)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _stage_names(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(s for r in records for s in r.get("evals") or {}))


def render_nights(records: list[dict]) -> str:
    """The per-night table, then eval stages, drift and guard sections."""
    names = _stage_names(records)
    head = ["night", "prompts (replayed / skipped)", "informative groups", "examples",
            "staleness KL (first / last)", *[f"{s}: before -> after" for s in names],
            "KL to start", "promoted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "pending" in r:
            lines.append(f"| {r['night']} | {r['pending']} |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join(_row(r, names)) + " |")
    out = "\n".join(lines)
    for section in (_evals_section(records, names), _drift_section(records), _guard_section(records)):
        if section:
            out += "\n\n" + section
    return out


def _row(r: dict, names: list[str]) -> list[str]:
    tr, dr, h, d = r.get("train") or {}, r.get("draw") or {}, r.get("history") or {}, r.get("drift") or {}
    data, first, last = tr.get("data") or {}, tr.get("first") or {}, tr.get("last") or {}
    g = r.get("guard")
    cells = [str(r["night"]),
             f"{dr['count']} ({dr['replayed']} / {dr['skipped']})" if dr else "all",
             f"{h['informative']} / {h['groups']} ({h['informative_fraction']:.0%})" if h.get("groups") else "-",
             str(data.get("examples", "-")) + (f" (+{data['replay_examples']} replay)"
                                               if data.get("replay_examples") else ""),
             f"{_fmt(first.get('staleness_kl'), '.4f')} / {_fmt(last.get('staleness_kl'), '.4f')}"]
    for s in names:
        e = (r.get("evals") or {}).get(s) or {}
        cells.append(f"{_fmt(e.get('baseline_reward'), '.3f')} -> {_fmt(e.get('policy_reward'), '.3f')}")
    cells.append(f"{d['kl']:.4f} ± {d['kl_stderr']:.4f}" if d.get("kl") is not None else "-")
    cells.append("-" if g is None else "yes" if g["promoted"] else "**no**")
    return cells


def _evals_section(records: list[dict], names: list[str]) -> str:
    if not names:
        return ""
    lines = ["## Eval stages", "", "| stage | decoding | samples per prompt | responses |", "|---|---|---|---|"]
    for s in names:
        e = next(r["evals"][s] for r in records if s in (r.get("evals") or {}))
        dec = e["decoding"] + (f" (temperature {e['temperature']:g})" if e.get("temperature") else "")
        lines.append(f"| {s} | {dec} | {e['samples_per_prompt']} | {e['responses']} |")
    return "\n".join(lines)


def _drift_section(records: list[dict]) -> str:
    rows = [("start", r["drift_start"]) for r in records if r.get("drift_start")]
    rows += [(str(r["night"]), r["drift"]) for r in records if r.get("drift")]
    if not rows:
        return ""
    lines = ["## Drift (sampled held-out responses)", "",
             "| night | token entropy | distinct-1 | distinct-2 | length mean / p95 | reward p5 / p50 / p95 "
             "| KL to start (± se) |", "|---|---|---|---|---|---|---|"]
    for name, d in rows:
        q = d.get("reward_q") or {}
        kl = f"{d['kl']:.4f} ± {d['kl_stderr']:.4f}" if d.get("kl") is not None else "-"
        lines.append(f"| {name} | {_fmt(d.get('entropy'), '.4f')} | {_fmt(d.get('distinct_1'), '.3f')} | "
                     f"{_fmt(d.get('distinct_2'), '.3f')} | {_fmt(d.get('length_mean'), '.1f')} / "
                     f"{_fmt(d.get('length_p95'), '.0f')} | {_fmt(q.get('p5'), '.3f')} / "
                     f"{_fmt(q.get('p50'), '.3f')} / {_fmt(q.get('p95'), '.3f')} | {kl} |")
    return "\n".join(lines)


def _guard_section(records: list[dict]) -> str:
    notes = [r["guard"]["message"] for r in records if (r.get("guard") or {}).get("message")]
    notes += [r["stopped"] for r in records if r.get("stopped")]
    best = next((r["guard"]["best_night"] for r in reversed(records) if r.get("guard")), None)
    if not notes and best is None:
        return ""
    lines = ["## Guard", ""] + [f"- {x}" for x in notes]
    lines.append(f"- best night so far: {best} (its policy is in WORKDIR/best/)" if best is not None
                 else "- no night promoted yet")
    return "\n".join(lines)


def plot_nights(records: list[dict], path: Path) -> Path | None:
    """Held-out reward per eval stage, KL to start, token entropy and informative fraction,
    one panel each, across nights (points with standard errors where there are some)."""
    done = [r for r in records if r.get("evals") or r.get("drift") or r.get("history")]
    if not done:
        return None
    from .plots import panels
    xs = [r["night"] for r in done]
    reward = {s: [((r.get("evals") or {}).get(s) or {}).get("policy_reward") for r in done]
              for s in _stage_names(done)}
    reward_se = {s: [((r.get("evals") or {}).get(s) or {}).get("policy_stderr") for r in done] for s in reward}
    d = [r.get("drift") or {} for r in done]
    h = [r.get("history") or {} for r in done]
    spec = {"held-out reward": {s: (ys, reward_se[s]) for s, ys in reward.items()},
            "KL to start": {"k3": ([x.get("kl") for x in d], [x.get("kl_stderr") for x in d])},
            "token entropy": {"sampled": ([x.get("entropy") for x in d], None)},
            "informative fraction": {"groups": ([x.get("informative_fraction") for x in h], None)}}
    spec = {k: v for k, v in spec.items() if any(y is not None for ys, _ in v.values() for y in ys)}
    return panels(xs, spec, path, "nights", "night") if spec else None
