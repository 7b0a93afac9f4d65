"""PNG plots for reports (matplotlib, headless).

Conventions: legends sit outside the data (right of the axes); quantities of different
scale get their own axes; step axes have integer ticks; a count axis turns logarithmic
when its smallest bar would be too short to see; measured points are drawn as points
with error bars, never joined by a line as if they were a curve.
"""

from __future__ import annotations

from pathlib import Path

# a bar shorter than this share of the tallest one is hard to see on a linear axis
VISIBLE_SHARE = 0.03
# at most this many distinct values: one bar per value instead of bins
DISCRETE_VALUES = 12


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _maybe_log(ax, counts) -> None:
    nonzero = [c for c in counts if c > 0]
    if nonzero and min(nonzero) < VISIBLE_SHARE * max(nonzero):
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)   # a bar of one sample stands clear of the axis
        ax.set_ylabel(ax.get_ylabel() + " (log scale)")


def histograms(series: dict[str, list[float]], path: Path, title: str, xlabel: str = "reward") -> Path:
    """Reward samples side by side: one bar per value when there are few distinct values
    (exact-match style rewards), else shared bins."""
    import numpy as np
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    values = sorted({float(v) for vs in series.values() for v in vs})
    ax.set_ylabel("samples")
    counts = []
    if 0 < len(values) <= DISCRETE_VALUES:
        width = 0.8 / max(1, len(series))
        x = np.arange(len(values))
        for k, (name, vs) in enumerate(series.items()):
            c = [sum(1 for v in vs if float(v) == u) for u in values]
            counts += c
            ax.bar(x + (k - (len(series) - 1) / 2) * width, c, width, label=f"{name} (n={len(vs)})")
        ax.set_xticks(x, [f"{u:g}" for u in values])
    else:
        lo, hi = (values[0], values[-1]) if values else (0.0, 1.0)
        for name, vs in series.items():
            c, _, _ = ax.hist(vs, bins=30, range=(lo, hi), alpha=0.55, label=f"{name} (n={len(vs)})")
            counts += list(c)
    _maybe_log(ax, counts)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.legend(loc="outside right upper")
    return _save(fig, path)


def lines(xs: list, series: dict[str, list[float]], path: Path, title: str, xlabel: str,
          ylabel: str, markers: bool = True) -> Path:
    """Values along a sequence of steps (labels or numbers), all on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    for name, ys in series.items():
        ax.plot(xs[:len(ys)], ys, marker="o" if markers else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        fig.legend(loc="outside right upper")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curves(steps: list[int], series: dict[str, list[float]], path: Path, title: str) -> Path:
    """Training curves: one panel per quantity (their scales differ), a shared integer
    step axis."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    fig, axes = plt.subplots(len(series), 1, figsize=(7.2, 1.9 * len(series) + 0.6),
                             sharex=True, layout="constrained", squeeze=False)
    for ax, (name, ys) in zip(axes[:, 0], series.items()):
        ax.plot(steps[:len(ys)], ys, marker="." if len(ys) <= 50 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, path)


def points(pts: list[dict], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Measured points with error bars (keys x, y, xerr, yerr, label), not joined; each
    labelled in the legend and beside the point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    for p in pts:
        ax.errorbar([p["x"]], [p["y"]], xerr=[p.get("xerr") or 0.0], yerr=[p.get("yerr") or 0.0],
                    fmt="o", capsize=4, label=p["label"])
        # the label beside its point too: colours alone do not tell several models apart
        ax.annotate(p["label"], (p["x"], p["y"]), xytext=(6, 6), textcoords="offset points",
                    fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper")
    return _save(fig, path)


def panels(xs: list[int], spec: dict[str, dict[str, tuple[list, list | None]]], path: Path, title: str,
           xlabel: str) -> Path:
    """One panel per quantity ({panel: {series: (values, standard errors or None)}}) along
    integer steps (nights): measured points with error bars, not joined; a missing value
    (None) is left out. Series of a panel share its axis and its legend."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    fig, axes = plt.subplots(len(spec), 1, figsize=(7.2, 1.9 * len(spec) + 0.6), sharex=True,
                             layout="constrained", squeeze=False)
    for ax, (name, series) in zip(axes[:, 0], spec.items()):
        for label, (ys, errs) in series.items():
            keep = [i for i, y in enumerate(ys) if y is not None]
            err = [(errs[i] or 0.0) for i in keep] if errs else None
            ax.errorbar([xs[i] for i in keep], [ys[i] for i in keep], yerr=err, fmt="o", capsize=3,
                        label=label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, path)
