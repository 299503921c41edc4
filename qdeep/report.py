"""Human-facing output: summary tables for the terminal, plots for MLflow and OUT/."""

from __future__ import annotations

from pathlib import Path

from qdeep import io


def summary_table(f2: float, per_label: dict[str, float], thresholds: dict[str, float], counts: dict[str, int]) -> str:
    """A fixed-width table: overall F2, then one line per label."""
    width = max(len("label"), *(len(t) for t in per_label))
    lines = [f"F2 (out-of-fold): {f2:.4f}", "", f"{'label':<{width}}  {'images':>6}  {'F2':>6}  {'threshold':>9}"]
    for tag in sorted(per_label, key=lambda t: -counts.get(t, 0)):
        lines.append(f"{tag:<{width}}  {counts.get(tag, 0):>6}  {per_label[tag]:>6.3f}  {thresholds[tag]:>9.2f}")
    return "\n".join(lines)


def per_label_bar_chart(per_label: dict[str, float], path: str | Path, title: str) -> None:
    """Horizontal bars of per-label F2, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted(per_label, key=per_label.get)
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(tags) + 1.2))
    ax.barh(tags, [per_label[t] for t in tags], color="#3a7d44")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F2")
    ax.set_title(title)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
