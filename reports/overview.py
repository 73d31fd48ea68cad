"""The table across settings, the paper's main table: strategies as rows, per target TI and CC as columns.

Runs are grouped into *families* (:data:`FAMILY_KEYS`: a grid's name, backbone and shots); the targets of a
family (its streams) are the table's column groups, each with TI and CC (mean ± std over seeds), and a
last group ``Mean`` averages over the targets: per seed the mean of its runs on every target (only seeds
finished on all targets enter), then mean ± std over those seeds. One table (and one figure) per family and
evaluation (VQA, zero-shot). Bold follows :data:`reports.tables.BEST_RULE`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from reports.figures import MIN_CHANGE_SPAN, Style, floor_span, suptitle
from reports.frame import Evaluation, has_random_weights, is_mini_world, strategy_order
from reports.tables import Cell, TextTable, _missing, clear_best, mean_std, trains

FAMILY_KEYS = ("name", "backbone", "shots")  # one table across settings per family: its streams are the targets
MEAN = "Mean"  # the target column group averaging over the targets
METRICS = (("target_improvement", "TI"), ("control_change", "CC"))
HATCHES = ("//", "..", "xx", "\\\\", "++", "oo", "--", "||")  # one per target in the figure; the mean is solid


def family_label(name: str, backbone: str, shots: int, targets: list[str]) -> str:
    """A family's name in headings and captions, flagged as :func:`reports.frame.group_label` flags settings
    (mini world when any of its ``targets`` is)."""
    label = f"{backbone} · {shots}-shot · {name}"
    if has_random_weights(backbone):
        label += " [random weights]"
    return f"{label} [mini world, not CLIP]" if any(is_mini_world(t, backbone) for t in targets) else label


def main_table(finished: pd.DataFrame, evaluation: Evaluation, reference: str) -> pd.DataFrame:
    """The table across settings of ``finished`` runs (one row per run, ``RunSet.finished``) under ``evaluation``.

    Returns:
        Tidy, one row per (family, strategy, target, metric): the :data:`FAMILY_KEYS`, ``strategy`` (the
        reference first, then alphabetical), ``target`` (a stream, or :data:`MEAN` when the family has several),
        ``metric`` (``target_improvement``, ``control_change``; CC only with controls), ``mean``, ``std``
        (ddof 1), ``n`` (seeds) and ``best`` (:func:`reports.tables.clear_best` within the family, target and
        metric). Fractions, as in the run records. A strategy none of whose runs in a family has results of
        ``evaluation`` (its ``evaluate`` left it out) has no rows there.
    """
    rows = []
    for family, runs in finished.groupby(list(FAMILY_KEYS), sort=True):
        targets = sorted(set(runs["stream"]))
        strategies = strategy_order(runs["strategy"], reference)
        for metric, _ in METRICS:
            key = evaluation.key(metric)
            if key not in runs or runs[key].isna().all():
                continue
            values = runs.pivot_table(index=["strategy", "seed"], columns="stream", values=key,
                                      aggfunc="first").reindex(columns=targets)  # a target none of whose runs has it
            columns = {t: values[t] for t in targets}
            if len(targets) > 1:
                columns[MEAN] = values.reindex(columns=targets).dropna().mean(axis=1)
            for target, per_seed in columns.items():
                for strategy in strategies:
                    seeds = per_seed[per_seed.index.get_level_values("strategy") == strategy].dropna()
                    rows.append({**dict(zip(FAMILY_KEYS, family)), "strategy": strategy, "target": target,
                                 "metric": metric, "mean": seeds.mean(), "std": seeds.std(ddof=1), "n": len(seeds)})
    table = pd.DataFrame(rows, columns=[*FAMILY_KEYS, "strategy", "target", "metric", "mean", "std", "n"])
    scored = table.groupby([*FAMILY_KEYS, "strategy"])["n"].transform("max") > 0  # no run evaluated it: left out
    table = table[scored].reset_index(drop=True)
    table["best"] = False
    eligible = table["strategy"].map(trains(finished))
    for _, cell in table.groupby([*FAMILY_KEYS, "target", "metric"], sort=False):
        table.loc[cell.index, "best"] = clear_best(cell["mean"], cell["std"], cell["n"], "higher", eligible[cell.index])
    return table


def main_text_table(rows: pd.DataFrame) -> TextTable:
    """One family of :func:`main_table` for print: a column group per target (then Mean), TI and CC in pp as
    ``mean ± std``, ``n`` the seeds per strategy (a range where targets differ)."""
    targets = list(dict.fromkeys(rows["target"]))
    metrics = [(m, short) for m, short in METRICS if (rows["metric"] == m).any()]
    header, groups = ["Strategy", "n"], [("", 2)]
    for target in targets:
        header += [f"{short} (pp)" for _, short in metrics]
        groups.append((target, len(metrics)))
    cells = rows.set_index(["strategy", "target", "metric"])
    table = []
    for strategy in dict.fromkeys(rows["strategy"]):
        seeds = rows.loc[(rows["strategy"] == strategy) & (rows["target"] != MEAN), "n"]
        line = [Cell(strategy), Cell(str(seeds.min()) if seeds.min() == seeds.max() else f"{seeds.min()}–{seeds.max()}")]
        for target in targets:
            for metric, _ in metrics:
                cell = cells.loc[(strategy, target, metric)]
                line.append(Cell(mean_std(cell["mean"], cell["std"]), bool(cell["best"])))
        table.append(line)
    return TextTable(header, table, groups)


def main_figure(rows: pd.DataFrame, styles: dict[str, Style], title: str, evaluation: Evaluation) -> Figure:
    """TI and CC per target (one panel each), one group of bars per strategy: a hatched bar per target and a
    solid one for the mean over targets, in the strategy's colour, with ± std error bars; 0 is drawn, and each
    y-range spans at least :data:`reports.figures.MIN_CHANGE_SPAN` pp.

    Args:
        rows: one family of :func:`main_table`.
    """
    targets = list(dict.fromkeys(rows["target"]))
    strategies = [s for s in styles if (rows["strategy"] == s).any()]
    metrics = [(m, short) for m, short in METRICS if (rows["metric"] == m).any()]
    width = 0.8 / len(targets)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(strategies) * len(metrics)), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    cells = rows.set_index(["strategy", "target", "metric"])
    for ax, (metric, short) in zip(axes, metrics):
        for i, strategy in enumerate(strategies):
            style = styles[strategy]
            for j, target in enumerate(targets):
                cell = cells.loc[(strategy, target, metric)]
                if _missing(cell["mean"]):
                    continue
                std = 100 * cell["std"] if np.isfinite(cell["std"]) else None
                ax.bar(i - 0.4 + width * (j + 0.5), 100 * cell["mean"], width, yerr=std, capsize=2,
                       color=style.color, alpha=1.0 if target == MEAN else 0.55, edgecolor="black", linewidth=0.5,
                       hatch=HATCHES[j % len(HATCHES)] if target != MEAN else "")
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
        ax.set_ylabel(f"{short} (pp), {evaluation.accuracy}")
        floor_span(ax, MIN_CHANGE_SPAN, [0.0])
        ax.grid(alpha=0.3, axis="y")
    fig.legend(handles=[Patch(facecolor="white" if t != MEAN else "0.5", edgecolor="black",
                              hatch=HATCHES[j % len(HATCHES)] if t != MEAN else "", label=t)
                        for j, t in enumerate(targets)], loc="outside lower center", ncols=len(targets),
               fontsize="small", title="target", title_fontsize="small")
    suptitle(fig, title)
    return fig
