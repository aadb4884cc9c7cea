"""Charts as data, then pictures: callers describe what to draw (`Chart`), this
module only draws it (matplotlib, Agg backend, imported on first use), so what
a picture shows can be checked without looking at pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Line:
    label: str
    x: np.ndarray  # for "stairs": the len(y) + 1 bin edges; for "bars": category positions
    y: np.ndarray


@dataclass(frozen=True)
class Panel:
    ylabel: str
    lines: tuple[Line, ...]
    style: str = "line"  # line, stack (stacked areas), stairs (histogram), bars (grouped, by category), image
    xlabel: str = "seconds since the first point"
    percent: bool = False  # y values are ratios, shown as %
    log_x: bool = False
    log_y: bool = False  # counts on a log scale: a few next to many stay visible
    x_range: tuple[float, float] | None = None  # the x axis's limits (default: matplotlib's, from the lines)
    fit_y: bool = False  # the y axis spans the data's range, not from 0: small differences between bars stay visible
    categories: tuple[str, ...] = ()  # bar labels, for "bars"
    # for "bars": (category index, what it is), e.g. the baseline of a comparison: drawn hatched, named in the legend
    marked: tuple[int, str] | None = None
    # for "image": (rows, columns, 3) RGB in 0-1, or (rows, columns) values drawn with a colour scale;
    # row 0 at the bottom; column i spans x_edges[i]..x_edges[i + 1] (uneven columns where the
    # times are uneven), row j y_edges[j]..y_edges[j + 1], in data coordinates
    image: np.ndarray | None = None
    x_edges: np.ndarray | None = None
    y_edges: np.ndarray | None = None
    swatches: tuple[tuple[str, tuple[float, float, float]], ...] = ()  # legend: label, RGB colour
    colorbar: str = ""  # label of the colour scale of a (rows, columns) image


@dataclass(frozen=True)
class Chart:
    name: str  # file stem
    title: str
    panels: tuple[Panel, ...]
    columns: int = 1
    row_height: float = 2.3  # inches per row of panels
    caption: str = ""  # what the chart shows, in a sentence or two (the HTML report's caption)


def render(chart: Chart, directory: Path, prefix: str = "") -> Path:
    """Draw `chart` to `directory/<prefix><name>.png`."""
    path = directory / f"{prefix}{chart.name}.png"
    figure(chart).savefig(path, dpi=100)
    return path


def figure(chart: Chart):
    """`chart` as a matplotlib Figure (one Axes per panel, hidden ones beyond)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import PercentFormatter

    rows = -(-len(chart.panels) // chart.columns)
    drawing = Figure(figsize=(4.5 + 4.5 * chart.columns, 2.2 + chart.row_height * rows), layout="constrained")
    FigureCanvasAgg(drawing)
    axes = drawing.subplots(rows, chart.columns, squeeze=False).ravel()
    for unused in axes[len(chart.panels):]:
        unused.set_visible(False)
    drawing.suptitle(chart.title)
    for ax, panel in zip(axes, chart.panels):
        _draw(ax, panel)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if panel.log_x:
            ax.set_xscale("log")
        if panel.log_y:
            ax.set_yscale("log")
        if panel.x_range is not None:
            ax.set_xlim(*panel.x_range)
        if panel.fit_y and (limits := _data_range([line.y for line in panel.lines])):
            ax.set_ylim(*limits)
        if panel.style == "image":
            continue  # no grid over a picture; its legend is drawn with it
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] if len(panel.lines) > 1 or panel.style == "stack" else []
        if panel.marked is not None:
            handles.append(Patch(facecolor="none", edgecolor="black", hatch="//", label=panel.marked[1]))
        if handles:
            # above the axes, not in them: a legend inside covers lines, areas or bars
            ax.legend(handles=handles, fontsize="small", loc="lower left", bbox_to_anchor=(0.0, 1.01),
                      ncols=min(len(handles), 4), frameon=False, borderaxespad=0.0)
    return drawing


def _data_range(values: list[np.ndarray]) -> tuple[float, float] | None:
    """From a little below the lowest finite value to a little above the highest (None: no finite value)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if not finite.size:
        return None
    low, high = float(finite.min()), float(finite.max())
    margin = 0.1 * (high - low) or 0.05 * abs(high) or 1.0
    return low - margin, high + margin


def _draw(ax, panel: Panel) -> None:
    if panel.style == "image":
        _draw_image(ax, panel)
    elif panel.style == "stack":
        ax.stackplot(panel.lines[0].x, *[line.y for line in panel.lines], labels=[line.label for line in panel.lines],
                     alpha=0.8)
    elif panel.style == "stairs":
        for line in panel.lines:
            ax.stairs(line.y, line.x, label=line.label, linewidth=1.5)
    elif panel.style == "bars":
        width = 0.8 / len(panel.lines)
        for i, line in enumerate(panel.lines):
            bars = ax.bar(line.x + (i - (len(panel.lines) - 1) / 2) * width, line.y, width, label=line.label)
            if panel.marked is not None:
                bars[panel.marked[0]].set(hatch="//", edgecolor="black")
        ax.set_xticks(np.arange(len(panel.categories)), panel.categories, rotation=20, ha="right", fontsize="small")
        if panel.marked is not None:
            ax.get_xticklabels()[panel.marked[0]].set_fontweight("bold")
    else:
        for line in panel.lines:
            ax.plot(line.x, line.y, label=line.label, linewidth=1.2)


def _draw_image(ax, panel: Panel) -> None:
    from matplotlib.patches import Patch

    picture = ax.pcolormesh(panel.x_edges, panel.y_edges, panel.image, shading="flat",
                            cmap="magma_r" if panel.image.ndim == 2 else None)
    if panel.image.ndim == 2:
        ax.figure.colorbar(picture, ax=ax, label=panel.colorbar)
    if panel.swatches:
        ax.legend(handles=[Patch(facecolor=colour, edgecolor="0.5", label=label) for label, colour in panel.swatches],
                  fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
