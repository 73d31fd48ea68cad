"""Figures of one setting, drawn headless (matplotlib's object API, never pyplot).

Every figure takes a ``styles`` mapping from :func:`strategy_styles`, so a strategy keeps
its colour, marker and line style across all figures of a report; markers and line styles
keep the strategies apart in grayscale print. Accuracies are drawn in percent. The figures of
accuracies take the :class:`~reports.frame.Evaluation` they show (zero-shot top-1 or VQA).
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from reports.frame import ROLE_TARGET, TOP1, ZEROSHOT, Evaluation

HEATMAP_CMAP = "cividis"  # lightness rises monotonically, so it survives grayscale
HEATMAPS_PER_ROW = 4
MIN_ACCURACY_SPAN = 10.0  # pp: the least y-range of an accuracy axis, so ±1 pp never looks like a trend
MIN_CHANGE_SPAN = 4.0  # pp: the least range of a TI or CC axis
CHANCE_REACH = 15.0  # pp: an accuracy axis covers chance when it lies this close to the curves, else the legend says
# where it is (a control at 70 % over a chance of 20 % would otherwise flatten every change into the line)


@dataclass(frozen=True)
class Style:
    """How one strategy is drawn (matplotlib colour, marker and line style; line width in points)."""

    color: str
    marker: str
    linestyle: str
    linewidth: float = 1.5
    markersize: float = 8.0  # of a point (mean ± std); curves draw three quarters of it


# Fixed styles: the reference strategy black with stars and a thick line, zeroshot grey and dashed, each built-in
# strategy its own colour, marker and line style (Okabe & Ito's colour-blind-safe palette and Tol's; markers and
# line styles tell them apart in grayscale). Strategies from outside packages draw from colours and markers no
# built-in uses, in the order given.
REFERENCE_STYLE = Style("#000000", "*", "-", 2.4, 12.0)
ZEROSHOT_STYLE = Style("#7F7F7F", "x", "--")
BUILTIN_STYLES = {
    "zeroshot": ZEROSHOT_STYLE,
    "lorsu": Style("#0072B2", "o", "-"),
    "lorsu-ppl": Style("#56B4E9", "D", "-."),
    "lora": Style("#D55E00", "s", "-"),
    "lora-ppl": Style("#E69F00", "v", "-."),
    "full-ft": Style("#009E73", "^", ":"),
    "ewc": Style("#332288", "P", ":"),
    "layernorm": Style("#CC79A7", "h", "-"),
    "spu": Style("#882255", "X", "-."),
}
OUTSIDE_COLORS = ("#44AA99", "#999933", "#AA4499", "#117733", "#661100", "#6699CC", "#DDCC77", "#EE3377")
OUTSIDE_MARKERS = ("<", ">", "p", "d", "8", "H", "1")  # 7 and 8 coprime: 56 distinct (colour, marker) pairs
OUTSIDE_LINESTYLES = ("-", ":", "-.")


def strategy_styles(strategies: Sequence[str], reference: str | None = None) -> dict[str, Style]:
    """A fixed style per strategy, in the given order (build it once per report and pass it to every figure).

    ``reference`` gets :data:`REFERENCE_STYLE`, a built-in strategy its :data:`BUILTIN_STYLES` entry, every other
    strategy the next of the outside styles (colours and markers no built-in uses; they repeat only after 56).
    """
    styles, outside = {}, 0
    for name in strategies:
        if name == reference:
            styles[name] = REFERENCE_STYLE
        elif name in BUILTIN_STYLES:
            styles[name] = BUILTIN_STYLES[name]
        else:
            styles[name] = Style(OUTSIDE_COLORS[outside % len(OUTSIDE_COLORS)],
                                 OUTSIDE_MARKERS[outside % len(OUTSIDE_MARKERS)],
                                 OUTSIDE_LINESTYLES[outside % len(OUTSIDE_LINESTYLES)])
            outside += 1
    return styles


def suptitle(fig: Figure, title: str) -> None:
    """The figure's title, wrapped to its width (a setting's label is long; a narrow figure would clip it)."""
    fig.suptitle(textwrap.fill(title, width=int(11 * fig.get_figwidth())), fontsize="medium")


def floor_span(ax: Axes, span: float, include: Sequence[float] = (), axis: str = "y") -> None:
    """Widen the ``axis`` range of ``ax`` (``x`` or ``y``) to at least ``span`` (data units) around its centre, and
    to cover ``include`` (a chance level, 0): a difference of a point or two then looks as small as it is."""
    get, put = (ax.get_ylim, ax.set_ylim) if axis == "y" else (ax.get_xlim, ax.set_xlim)
    low, high = get()
    low, high = min([low, *include]), max([high, *include])
    if high - low < span:
        middle = (low + high) / 2
        low, high = middle - span / 2, middle + span / 2
    put(low, high)


def curves_figure(curves: pd.DataFrame, styles: dict[str, Style], title: str,
                  evaluation: Evaluation = ZEROSHOT, chance: dict[str, float] | None = None) -> Figure:
    """Accuracy vs session: mean line and ± std band over seeds, one line per strategy.

    Args:
        curves: :func:`reports.tables.curve_table` of one setting under ``evaluation``.
        styles: from :func:`strategy_styles`; also fixes the legend order.
        title: the setting's label.
        evaluation: whose accuracy the curves are (the axis labels).
        chance: the chance accuracy (a fraction) per curve (``target``, ``control``), drawn as a grey line;
            a curve without one has none.

    Returns:
        One panel for the target accuracy, and a second for the mean control accuracy when
        the runs have controls; each y-range spans at least :data:`MIN_ACCURACY_SPAN` and covers chance when it
        lies within :data:`CHANCE_REACH` of the curves (else its legend entry says it is off the axis).
    """
    kinds = [k for k in ("target", "control") if (curves["curve"] == k).any()]
    fig = Figure(figsize=(5.2 * len(kinds), 3.8), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        for strategy, style in styles.items():
            rows = curves[(curves["curve"] == kind) & (curves["strategy"] == strategy)].sort_values("session")
            if rows.empty:
                continue
            x, mean, std = rows["session"].to_numpy(), 100 * rows["mean"].to_numpy(), 100 * rows["std"].to_numpy()
            ax.plot(x, mean, color=style.color, marker=style.marker, linestyle=style.linestyle,
                    linewidth=style.linewidth, markersize=0.75 * style.markersize, label=strategy)
            if np.isfinite(std).any():
                ax.fill_between(x, mean - std, mean + std, color=style.color, alpha=0.15, linewidth=0)
        low, high = ax.get_ylim()  # the curves' own range
        level = (chance or {}).get(kind)
        near = level is not None and low - CHANCE_REACH <= 100 * level <= high + CHANCE_REACH
        if level is not None:
            where = "" if near else (", below the axis" if 100 * level < low else ", above the axis")
            ax.axhline(100 * level, color="0.5", linewidth=1.0, linestyle=(0, (1, 2)), zorder=0,
                       label=f"chance ({100 * level:.0f} %{where})")
        ax.set_ylim(low, high)
        floor_span(ax, MIN_ACCURACY_SPAN, [100 * level] if near else [])
        ax.set_xlabel("session (0 = before training)")
        ax.set_ylabel(f"target {evaluation.accuracy} (%)" if kind == "target"
                      else f"mean control {evaluation.accuracy} (%)")
        ax.set_xticks(sorted(curves["session"].unique()))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    for ax in axes[1:]:  # the strategies once; a panel's own chance line in its own
        chance_lines = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
        if chance_lines:
            ax.legend(handles=chance_lines, fontsize="small")
    suptitle(fig, title)
    return fig


def tradeoff_figure(table: pd.DataFrame, styles: dict[str, Style], title: str,
                    evaluation: Evaluation = ZEROSHOT) -> Figure:
    """TI (x) vs CC (y) of ``evaluation``, one point per strategy with ± std error bars; upper right = gain
    without forgetting.

    Args:
        table: :func:`reports.tables.results_table` rows of one setting.
    """
    ti, cc = evaluation.key("target_improvement"), evaluation.key("control_change")
    fig = Figure(figsize=(5.2, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.axhline(0, color="0.5", linewidth=0.8, linestyle=":")
    ax.axvline(0, color="0.5", linewidth=0.8, linestyle=":")
    for _, row in table.iterrows():
        draw_point(ax, styles[row["strategy"]], row["strategy"], 100 * row[f"{ti}_mean"], 100 * row[f"{cc}_mean"],
               100 * row[f"{ti}_std"], 100 * row[f"{cc}_std"])
    ax.set_xlabel("target improvement TI (pp)")
    ax.set_ylabel("control change CC (pp)")
    floor_change_axes(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    suptitle(fig, title)
    return fig


def floor_change_axes(ax: Axes) -> None:
    """A TI (x) against CC (y) plot: both axes cover 0 and span at least :data:`MIN_CHANGE_SPAN`."""
    for axis in ("x", "y"):
        floor_span(ax, MIN_CHANGE_SPAN, [0.0], axis)


@dataclass(frozen=True)
class CostAxis:
    """One log x axis of :func:`cost_figure`: a cost column of :func:`reports.tables.results_table`, its label,
    and the factor from the record's unit to the drawn one."""

    key: str
    label: str
    scale: float = 1.0


COST_AXES = (CostAxis("trainable", "trainable parameters"), CostAxis("train_seconds", "training time, all sessions (s)"))
COMPUTE_AXES = (CostAxis("paper_train_flops", "training TFLOPs per session (paper's count)", 1e-12),)


def cost_figure(table: pd.DataFrame, styles: dict[str, Style], title: str,
                evaluation: Evaluation = ZEROSHOT, axes: Sequence[CostAxis] = COST_AXES) -> Figure:
    """TI of ``evaluation`` (y) vs cost (log x), one panel per axis of ``axes``: by default trainable parameters and
    training time; :data:`COMPUTE_AXES`: training TFLOPs per session.

    A strategy that trains nothing (no trainable parameter, e.g. zero-shot) has no cost to place on a log
    axis, whatever time its sessions took; nor has a cost of zero or unknown. Each panel names the ones it
    leaves out.
    """
    ti = evaluation.key("target_improvement")
    fig = Figure(figsize=(5.2 * len(axes), 4.0), layout="constrained")
    trains = table["trainable_mean"] > 0
    for ax, axis in zip(fig.subplots(1, len(axes), squeeze=False)[0], axes):
        shown = table[trains & (table[f"{axis.key}_mean"] > 0)]
        for _, row in shown.iterrows():
            draw_point(ax, styles[row["strategy"]], row["strategy"], axis.scale * row[f"{axis.key}_mean"],
                       100 * row[f"{ti}_mean"], axis.scale * row[f"{axis.key}_std"], 100 * row[f"{ti}_std"])
        left_out = sorted(set(table["strategy"]) - set(shown["strategy"]))
        if left_out:
            ax.text(0.01, 0.01, f"not shown (trains nothing, or cost 0 or unknown): {', '.join(left_out)}",
                    transform=ax.transAxes, fontsize="x-small", color="0.3")
        if len(shown):
            ax.set_xscale("log")
            ax.margins(x=0.15)
            plain_log_labels(ax)
            ax.legend(fontsize="small")
        floor_span(ax, MIN_CHANGE_SPAN, [0.0])
        ax.set_xlabel(axis.label)
        ax.set_ylabel("target improvement TI (pp)")
        ax.grid(alpha=0.3, which="both")
    suptitle(fig, title)
    return fig


def plain_log_labels(ax: Axes) -> None:
    """Plain numbers (0.8, 2, 30000) on a log x axis, its minor ticks labelled too when it spans under a decade
    (matplotlib's default there reads 2 × 10^0)."""
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    low, high = ax.get_xlim()
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())


def draw_point(ax: Axes, style: Style, label: str, x: float, y: float, xerr: float, yerr: float) -> None:
    """One strategy's mean as a marker with ± std bars (none where the std is undefined), in display units."""
    if not (np.isfinite(x) and np.isfinite(y)):
        return
    ax.errorbar(x, y, xerr=xerr if np.isfinite(xerr) else None, yerr=yerr if np.isfinite(yerr) else None,
                color=style.color, marker=style.marker,
                markersize=style.markersize, linestyle="none", capsize=3, label=label)


def matrix_figure(scores: pd.DataFrame, panels: dict[str, str], title: str,
                  evaluation: Evaluation = ZEROSHOT, sequences: dict[str, list[str]] | None = None,
                  columns: list[str] | None = None) -> Figure:
    """Accuracy-matrix heatmaps (sessions × datasets, accuracy of ``evaluation`` in %), one panel per run.

    Args:
        scores: tidy scores (:func:`reports.frame.load_runs`).
        panels: run (its ``run`` column value) → panel title, in drawing order.
        title: the setting's label.
        evaluation: whose accuracy; only the sessions it scored are rows.
        sequences: the sequence runs among ``panels`` (MTIL's protocol) → their datasets in session order: their
            columns are those datasets (session ``i``'s group ``top1_s<i>`` is the ``i``-th), in ``columns``' order
            (the same in every panel, whatever order a run trained them in), and each session's row names the
            dataset it trained.

    Datasets are ordered target first, then controls in logged order; cells carry their value.
    Panels wrap after :data:`HEATMAPS_PER_ROW`.
    """
    ncols = min(HEATMAPS_PER_ROW, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(0.6 + 3.6 * ncols, 0.4 + 3.2 * nrows), layout="constrained")
    grid_axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for spare in grid_axes[len(panels):]:
        spare.remove()
    axes = grid_axes[: len(panels)]
    image = None
    for ax, (run, panel_title) in zip(axes, panels.items()):
        if run in (sequences or {}):
            grid = _sequence_grid(scores[scores["run"] == run], sequences[run], columns or sequences[run])
        else:
            rows = scores[(scores["run"] == run) & (scores["metric"] == evaluation.metric)]
            order = list(pd.unique(rows.sort_values("role", key=lambda r: r != ROLE_TARGET, kind="stable")["dataset"]))
            grid = rows.pivot(index="session", columns="dataset", values="value")[order] * 100
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=100, cmap=HEATMAP_CMAP, aspect="auto")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize="x-small",
                        color="white" if value < 50 else "black")
        ax.set_xticks(range(grid.shape[1]), grid.columns.tolist(), rotation=30, ha="right", fontsize="small")
        ax.set_yticks(range(len(grid)), grid.index.tolist())
        ax.set_ylabel("session")
        ax.set_title(panel_title, fontsize="small")
    fig.colorbar(image, ax=list(axes), label=f"{evaluation.accuracy} (%)", shrink=0.9)
    suptitle(fig, title)
    return fig


def _sequence_grid(scores: pd.DataFrame, datasets: list[str], columns: list[str]) -> pd.DataFrame:
    """One sequence run's zero-shot matrix in % (``scores``: its tidy scores): a row per session, labelled
    ``<t> <dataset it trained>`` (``0``: the pretrained model), a column per dataset of ``columns``."""
    groups = {f"{TOP1}_s{i}": d for i, d in enumerate(datasets, start=1)}
    rows = scores[scores["metric"].isin(groups)]
    grid = rows.assign(dataset=rows["metric"].map(groups)).pivot(index="session", columns="dataset", values="value")
    grid.index = [f"{t} {datasets[t - 1]}" if t else "0" for t in grid.index]
    return grid.reindex(columns=columns) * 100


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg``; returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths
