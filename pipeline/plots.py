"""Line charts as PNG files, drawn without a display (matplotlib's Agg backend).

    line_chart({"train": (steps, losses)}, "step", "loss (nats)", "pretrain: loss", Path("loss_curve.png"))

`new_chart` and `mark` are the parts for charts with their own styling (rwkv-pipeline compare).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def new_chart(width: float = 7, height: float = 4) -> tuple[Any, Any]:
    """(figure, axes) of an empty chart, `width` x `height` inches at 100 dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def mark(
    axes: Any, x: float, label: str, color: str = "0.4", fontsize: str = "small", alpha: float = 1.0, row: int = 0
) -> None:
    """A dotted vertical line at `x`, labelled at its top (e.g. where a context extension began); labels of
    successive rows sit one line lower each, so lines close together keep readable labels."""
    axes.axvline(x, color=color, linestyle=":", alpha=alpha)
    axes.annotate(
        label,
        (x, 1),
        xycoords=("data", "axes fraction"),
        xytext=(3, -12 - 11 * row),
        textcoords="offset points",
        fontsize=fontsize,
        color=color,
    )


def chart_formats() -> set[str]:
    """The file suffixes (without the dot) a chart can be saved as."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def save_chart(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    markers: Mapping[str, float] | None = None,
) -> None:
    """One line per series (dots where it has under 20 points); `markers` are labelled vertical lines
    (e.g. the lengths the model was trained at)."""
    figure, axes = new_chart()
    for label, (xs, ys) in series.items():
        axes.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None)
    for row, (label, x) in enumerate((markers or {}).items()):
        mark(axes, x, label, row=row)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    save_chart(figure, path)
