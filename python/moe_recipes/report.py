"""Report pieces shared by the recipes: markdown tables, claim verdicts, and plots (matplotlib, PNG).

A directional claim (RECIPES.md 6.4) is judged from a margin and the noise of the metrics it compares:
``yes`` when the margin has the claimed sign and exceeds the noise, ``no`` when it has the opposite
sign beyond the noise, ``inconclusive`` otherwise. The noise of an accuracy over n held-out images is
the standard error of a difference of two such accuracies, 100 * sqrt(2 p (1 - p) / n); for AP, IoU
and depth errors (no closed form) a fixed 1 point. The report states the rule next to the verdicts.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

DENSE_NOISE = 1.0  # points, for metrics without a closed-form standard error


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int,)) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence], digits: int = 1) -> str:
    """A GitHub markdown table; floats with ``digits`` decimals, None as an en dash."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(v, digits) for v in r) + " |")
    return "\n".join(out)


def accuracy_noise(p_percent: float, n: int) -> float:
    p = min(max(p_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(max(2 * p * (1 - p), 1e-4) / max(n, 1))


def verdict(margin: Optional[float], noise: float, claimed_positive: bool = True) -> str:
    """``yes`` / ``no`` / ``inconclusive`` for a claim that ``margin`` is > 0 (or < 0)."""
    if margin is None or (isinstance(margin, float) and math.isnan(margin)):
        return "not run"
    m = margin if claimed_positive else -margin
    if m > noise:
        return "yes"
    if m < -noise:
        return "no"
    return "inconclusive"


def within(diff: Optional[float], tolerance: float, noise: float) -> str:
    """Verdict for a claim ``|diff| <= tolerance`` judged with ``noise``: *yes* only when the noise is
    no larger than the tolerance (else a small difference proves nothing)."""
    if diff is None:
        return "not run"
    if abs(diff) <= tolerance and noise <= tolerance:
        return "yes"
    if abs(diff) > tolerance + noise:
        return "no"
    return "inconclusive"


def read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: Mapping[str, str], path: str, title: str = "training loss") -> Optional[str]:
    """Per-source training loss (logged steps) of each run ``{label: metrics.jsonl path}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for label, p in runs.items():
        recs = [r for r in read_jsonl(p) if r.get("kind") == "train"]
        per: Dict[str, list] = {}
        for r in recs:
            for s, v in r["losses"].items():
                per.setdefault(s, []).append((r["step"], v))
        for s, pts in per.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=f"{label}: {s}", lw=1)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (logged steps)")
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmaps(maps: Mapping[str, Sequence[Sequence[float]]], path: str, xlabel: str, ylabel: str,
                  title: str, vmax: Optional[float] = None) -> str:
    """One heatmap panel per key (rows = ``ylabel``, columns = ``xlabel``), one colour scale."""
    plt = _plt()
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), squeeze=False)
    top = vmax if vmax is not None else max(max(max(r) for r in m) for m in maps.values())
    im = None
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(series: Mapping[str, Sequence[tuple]], path: str, xlabel: str, ylabel: str, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["table", "fmt", "verdict", "within", "accuracy_noise", "DENSE_NOISE", "read_jsonl", "plot_losses",
           "plot_heatmaps", "plot_lines"]
