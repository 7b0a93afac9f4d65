"""PNG plots for reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def histograms(series: dict[str, list[float]], path: Path, title: str, xlabel: str = "reward") -> Path:
    """Overlaid histograms of several reward samples."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values = [v for vs in series.values() for v in vs]
    bins = 30 if len(set(values)) > 30 else max(2, len(set(values)) * 2)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    for name, vs in series.items():
        ax.hist(vs, bins=bins, range=(lo, hi), alpha=0.55, label=f"{name} (n={len(vs)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines(xs: list, series: dict[str, list[float]], path: Path, title: str, xlabel: str,
          ylabel: str, markers: bool = True) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, ys in series.items():
        ax.plot(xs[:len(ys)], ys, marker="o" if markers else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter(points: list[tuple[float, float, str]], path: Path, title: str, xlabel: str,
            ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for x, y, label in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(points) > 1:
        ax.plot([p[0] for p in points], [p[1] for p in points], alpha=0.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
