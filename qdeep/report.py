"""Human-facing output: summary tables for the terminal, plots for MLflow and OUT/."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qdeep import io


def summary_table(f2: float, per_label: dict[str, float], thresholds: dict[str, float], counts: dict[str, int]) -> str:
    """A fixed-width table: overall F2, then one line per label."""
    width = max(len("label"), *(len(t) for t in per_label))
    lines = [f"F2 (out-of-fold): {f2:.4f}", "", f"{'label':<{width}}  {'images':>6}  {'F2':>6}  {'threshold':>9}"]
    for tag in sorted(per_label, key=lambda t: -counts.get(t, 0)):
        lines.append(f"{tag:<{width}}  {counts.get(tag, 0):>6}  {per_label[tag]:>6.3f}  {thresholds[tag]:>9.2f}")
    return "\n".join(lines)


def headline_f2(metrics: dict) -> float:
    """The one F2 a run is judged by: out-of-fold for the baseline, validation for a CNN."""
    return metrics["f2_oof"] if "f2_oof" in metrics else metrics["val_f2"]


def comparison_table(runs: dict[str, dict]) -> str:
    """Labels down, runs across: F2 overall and per label, the best run per label marked with *."""
    names = list(runs)
    labels = sorted({t for m in runs.values() for t in m["per_label_f2"]})
    width = max(len("label"), *(len(t) for t in labels))
    cols = [max(len(n), 7) for n in names]
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols))]
    lines.append(f"{'F2':<{width}}  " + "  ".join(f"{headline_f2(runs[n]):>{c}.4f}" for n, c in zip(names, cols)))
    lines.append("")
    for tag in labels:
        values = [runs[n]["per_label_f2"].get(tag, float("nan")) for n in names]
        best = max(values)
        cells = [f"{v:.3f}{'*' if v == best else ' '}" for v in values]
        lines.append(f"{tag:<{width}}  " + "  ".join(f"{cell:>{c}}" for cell, c in zip(cells, cols)))
    return "\n".join(lines)


@contextmanager
def _figure(path: str | Path, figsize: tuple[float, float], ncols: int = 1) -> Iterator:
    """A new figure's axes (`ncols` of them); the figure is written to `path` atomically as PNG when
    the block succeeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        fig.tight_layout()
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def per_label_bar_chart(per_label: dict[str, float], path: str | Path, title: str, xlabel: str = "F2") -> None:
    """Horizontal bars of a per-label score (F2, or per-class F1)."""
    tags = sorted(per_label, key=per_label.get)
    with _figure(path, (6, 0.3 * len(tags) + 1.2)) as ax:
        ax.barh(tags, [per_label[t] for t in tags], color="#3a7d44")
        ax.set_xlim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_title(title)


def ladder_plot(rows: list[dict], path: str | Path, metric: str) -> None:
    """Best score per architecture (groups) and freeze depth (bars): does unfreezing pay?"""
    archs = sorted({r["arch"] for r in rows})
    freezes = sorted({r["freeze"] for r in rows})
    best = {}
    for r in rows:
        key = (r["arch"], r["freeze"])
        best[key] = max(best.get(key, 0.0), r[metric])
    width = 0.8 / max(len(freezes), 1)
    with _figure(path, (max(4, 1.6 * len(archs) * max(len(freezes), 1) / 2), 3.5)) as ax:
        for i, freeze in enumerate(freezes):
            xs = [a + i * width for a in range(len(archs))]
            ax.bar(xs, [best.get((arch, freeze), 0.0) for arch in archs], width, label=f"freeze {freeze}")
        ax.set_xticks([a + width * (len(freezes) - 1) / 2 for a in range(len(archs))], archs)
        ax.set_ylim(0, 1)
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)


def per_label_heatmap(names: list[str], grid: list[list[float]], vocab: list[str], path: str | Path,
                      label: str) -> None:
    """Per-label score (F2, or per-class F1) of every configuration (a row each, `names` down the
    side): which one wins which label."""
    import numpy as np

    grid = np.array(grid, dtype=float).reshape(len(names), len(vocab))
    with _figure(path, (0.45 * len(vocab) + 3, 0.35 * len(names) + 2)) as ax:
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(vocab)), vocab, rotation=70, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.figure.colorbar(im, ax=ax, label=label)


def rung_chart(f2: dict[str, float], path: str | Path, ylabel: str) -> None:
    """One bar per rung of the ladder."""
    with _figure(path, (5, 3.2)) as ax:
        ax.bar(list(f2), list(f2.values()), color=["#8c8c8c", "#c47f2c", "#3a7d44", "#2c5fc4"][: len(f2)])
        for i, v in enumerate(f2.values()):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)


def cluster_grid(paths: list, path: str | Path, title: str, cols: int = 4, thumb: int = 96, load=None) -> None:
    """Up to cols x cols member images (nearest to the centre first) on one PNG; `load`: a path or
    bytes -> RGB PIL image (default `load_rgb`; multiband images: `InputBands.preview`)."""
    from PIL import Image, ImageDraw

    from qdeep.data.images import load_rgb

    load = load or load_rgb
    rows = max(1, -(-len(paths) // cols))
    sheet = Image.new("RGB", (cols * thumb, rows * thumb + 18), "white")
    ImageDraw.Draw(sheet).text((4, 3), title, fill="black")
    for i, p in enumerate(paths):
        image = load(p).resize((thumb, thumb))
        sheet.paste(image, ((i % cols) * thumb, 18 + (i // cols) * thumb))
    with io.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def deepcluster_curves(history: list[dict], path: str | Path) -> None:
    """Per iteration: clustering score, train/ctrl accuracy on the pseudo-labels, NMI(t-1, t) and
    NMI against the ground truth when known."""
    from matplotlib.ticker import MaxNLocator

    its = [h["iteration"] for h in history]
    with _figure(path, (9, 3.4), ncols=2) as (left, right):
        left.plot(its, [h["score"] for h in history], marker="o")
        left.set_ylabel("clustering score")
        for key in ("train_acc", "ctrl_acc", "nmi_prev", "nmi_true"):
            points = [(h["iteration"], h[key]) for h in history if h.get(key) is not None]
            if points:
                right.plot(*zip(*points), marker="o", label=key)
        right.set_ylim(0, 1.05)
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def deepcluster_sizes(history: list[dict], final_sizes: list[int], path: str | Path) -> None:
    """Cluster sizes, largest first: every iteration (lines) and the final over-clustering (bars)."""
    with _figure(path, (9, 3.4), ncols=2) as (left, right):
        for h in history:
            left.plot(sorted(h["sizes"], reverse=True), marker=".", label=f"iter {h['iteration']}")
        left.set_xlabel("cluster (by size)")
        left.set_ylabel("train images")
        if history:
            left.legend(fontsize=7)
        right.bar(range(len(final_sizes)), sorted(final_sizes, reverse=True), color="#3a7d44")
        right.set_xlabel("final cluster (by size)")
