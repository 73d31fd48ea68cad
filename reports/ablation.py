"""Sweeps and ablations: the runs of grids with swept keys (``train.lr=[...]``, ``lorsu.top_k_heads=[...]``).

Per setting (:data:`~reports.frame.GROUP_KEYS`) and strategy, :func:`ablation_table` gives one row per
combination of the strategy's swept values: the swept keys as columns, mean ± std over seeds of TI,
CC, target forgetting and final accuracy, and a paired t-test by seed against the reference
combination (each key at its documented default when that value was swept, else at its smallest
value). :func:`sweep_figure` draws TI against CC with each strategy's sweep as a line through its
values, the points on the strategy's Pareto front filled. The numbers are of one evaluation,
:func:`reports.frame.basis`: zero-shot classification, or VQA for sweeps of runs that evaluated VQA only.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchmark.config import declared_default, declared_type
from benchmark.records import slug
from reports.blocks import Heading, Image, Table, Text
from reports.figures import Style, draw_point, floor_change_axes, save_figure, suptitle
from reports.frame import GROUP_KEYS, SWEEP, SWEPT_PREFIX, ZEROSHOT, Evaluation, ReportError, basis, group_label, named
from reports.tables import (
    TEST_NAME,
    Cell,
    Column,
    PairedTest,
    TextTable,
    _missing,
    _p_text,
    clear_best,
    paired_test,
    result_columns,
)


def ablation_columns(evaluation: Evaluation = ZEROSHOT) -> tuple[Column, ...]:
    """The columns of a sweep's table under ``evaluation``: TI, CC, target forgetting, final target accuracy."""
    return result_columns(evaluation)[:4]


def swept_keys(runs: pd.DataFrame) -> list[str]:
    """The swept keys (``train.lr``) with a value in any of ``runs`` (a ``runs`` frame of reports.frame)."""
    return [c.removeprefix(SWEPT_PREFIX) for c in runs.columns if c.startswith(SWEPT_PREFIX) and runs[c].notna().any()]


def natural(value: Any) -> tuple[int, float, str]:
    """Sort key of swept values: numbers by value, then the rest as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, float(value), ""
    return 1, 0.0, str(value)


def reference_values(runs: pd.DataFrame, keys: list[str]) -> dict[str, Any]:
    """Per swept key its reference value: the documented default when it was swept, else the smallest value."""
    ref = {}
    for key in keys:
        values = sorted(set(runs[f"{SWEPT_PREFIX}{key}"].dropna()), key=natural)
        default = declared_default(key)
        ref[key] = default if default is not dataclasses.MISSING and default in values else values[0]
    return ref


def main_runs(finished: pd.DataFrame) -> tuple[pd.DataFrame, dict[tuple, dict[str, Any]]]:
    """The runs of the main comparison: every run outside a sweep, and each swept strategy's runs at its reference
    values (:func:`reference_values`, per setting and strategy; unless the strategy has runs outside the sweep in
    that setting), so a sweep never drops a strategy from it.

    Returns:
        Those rows of ``finished``, and per (setting keys..., strategy) of a swept strategy its reference values.
    """
    swept = finished[SWEEP].fillna("") != ""
    keep, references = ~swept, {}
    plain = set(finished.loc[~swept, [*GROUP_KEYS, "strategy"]].itertuples(index=False, name=None))
    for key, runs in finished[swept].groupby([*GROUP_KEYS, "strategy"], sort=True):
        if key in plain:  # the same strategy ran outside the sweep too: those runs stand for it
            continue
        keys = swept_keys(runs)
        references[key] = reference_values(runs, keys)
        at = np.logical_and.reduce([runs[f"{SWEPT_PREFIX}{k}"] == v for k, v in references[key].items()])
        keep[runs.index[at]] = True
    return finished[keep], references


def ablation_table(finished: pd.DataFrame, evaluation: Evaluation | None = None) -> pd.DataFrame:
    """Per setting, strategy and combination of swept values of the finished swept runs: mean, std (ddof 1)
    and paired tests against the reference combination, under ``evaluation`` (None: :func:`reports.frame.basis`
    of the swept runs).

    Returns:
        One row per combination, in order of the values: the group keys, ``strategy``, ``keys`` (the
        strategy's swept keys, comma-joined), one column per swept key (its value), ``reference`` (bool),
        ``n``, ``seeds``, and per :func:`ablation_columns` column ``<key>_mean``, ``_std``, ``_p``, ``_pairs``,
        ``_note`` (as :func:`reports.tables.results_table`). Accuracies as fractions.

    Raises:
        ReportError: no finished run of a sweep.
    """
    swept = finished[finished[SWEEP].fillna("") != ""]
    if swept.empty:
        raise ReportError("no finished run of a sweep (a grid with list values of option keys)")
    columns = ablation_columns(evaluation or basis(swept))
    rows = []
    for key, runs in swept.groupby([*GROUP_KEYS, "strategy"], sort=True):
        keys = swept_keys(runs)
        ref_values = reference_values(runs, keys)
        swept_columns = [f"{SWEPT_PREFIX}{k}" for k in keys]
        combos = sorted({tuple(r) for r in runs[swept_columns].itertuples(index=False)},
                        key=lambda c: [natural(v) for v in c])
        is_ref = np.logical_and.reduce([runs[c] == ref_values[k] for c, k in zip(swept_columns, keys)])
        ref = runs[is_ref].set_index("seed")
        for combo in combos:
            these = runs[np.logical_and.reduce([runs[c] == v for c, v in zip(swept_columns, combo)])]
            reference = dict(zip(keys, combo)) == ref_values
            row = {**dict(zip([*GROUP_KEYS, "strategy"], key)), "keys": ", ".join(keys), **dict(zip(keys, combo)),
                   "reference": reference, "n": len(these), "seeds": ", ".join(str(s) for s in sorted(these["seed"]))}
            for col in columns:
                row[f"{col.key}_mean"] = these[col.key].mean()
                row[f"{col.key}_std"] = these[col.key].std(ddof=1)
                test = (PairedTest(math.nan, len(these), "reference") if reference else
                        PairedTest(math.nan, 0, "no reference") if ref.empty else
                        paired_test(these.set_index("seed")[col.key], ref[col.key]))
                row.update({f"{col.key}_p": test.p, f"{col.key}_pairs": test.pairs, f"{col.key}_note": test.note})
            rows.append(row)
    return pd.DataFrame(rows)


def _as_declared(key: str, value: Any) -> Any:
    """A swept value as its key's type declares it (a frame's column of ints with gaps holds floats)."""
    return int(value) if declared_type(key) is int and isinstance(value, float) and value.is_integer() else value


def ablation_text_table(rows: pd.DataFrame, evaluation: Evaluation = ZEROSHOT) -> TextTable:
    """One (setting, strategy) of :func:`ablation_table` (made under ``evaluation``) for print: the swept values,
    ``mean ± std`` (accuracies in percent / pp), a p-value column after each tested column, the clear best of each
    column in bold (:data:`reports.tables.BEST_RULE`)."""
    keys = rows["keys"].iloc[0].split(", ")
    columns = [c for c in ablation_columns(evaluation) if rows[f"{c.key}_mean"].notna().any()]
    header = [*keys, "n"]
    for col in columns:
        header += [col.label, f"p ({col.short})"] if col.tested else [col.label]
    best = {c.key: clear_best(rows[f"{c.key}_mean"], rows[f"{c.key}_std"], rows["n"], c.better) for c in columns}
    table = []
    for _, row in rows.iterrows():
        cells = [Cell(f"{_as_declared(k, row[k])}{' (ref.)' if row['reference'] and i == 0 else ''}")
                 for i, k in enumerate(keys)]
        cells.append(Cell(str(row["n"])))
        for col in columns:
            mean, std = row[f"{col.key}_mean"], row[f"{col.key}_std"]
            text = "–" if _missing(mean) else col.fmt(mean) + ("" if _missing(std) else f" ± {col.fmt(std)}")
            cells.append(Cell(text, bool(best[col.key][row.name])))
            if col.tested:
                cells.append(Cell("–" if _missing(mean) else _p_text(row[f"{col.key}_p"], row[f"{col.key}_note"])))
        table.append(cells)
    return TextTable(header, table)


def pareto_front(ti: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """Mask [n] of the points no other point dominates (another with TI and CC both at least as high, one higher)."""
    ti, cc = np.asarray(ti, float), np.asarray(cc, float)
    ge = (ti[None, :] >= ti[:, None]) & (cc[None, :] >= cc[:, None])
    gt = (ti[None, :] > ti[:, None]) | (cc[None, :] > cc[:, None])
    return ~(ge & gt).any(axis=1)


def sweep_figure(rows: pd.DataFrame, styles: dict[str, Style], title: str,
                 baselines: pd.DataFrame | None = None, evaluation: Evaluation = ZEROSHOT) -> Figure:
    """TI (x) against CC (y) of one setting's :func:`ablation_table` rows: each strategy's sweep a line through
    its combinations (in order of the values, each labelled), filled markers on its Pareto front, hollow ones
    dominated, the reference combination labelled ``(ref.)``; upper right is best. ``baselines``:
    :func:`reports.tables.results_table` rows of the setting's strategies that were not swept, drawn as reference
    points (mean ± std). ``evaluation``: the one ``rows`` (and ``baselines``) are read under."""
    ti, cc = evaluation.key("target_improvement"), evaluation.key("control_change")
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.axhline(0, color="0.5", linewidth=0.8, linestyle=":")
    ax.axvline(0, color="0.5", linewidth=0.8, linestyle=":")
    for strategy, points in rows.groupby("strategy", sort=False):
        style = styles[strategy]
        gain, change = 100 * points[f"{ti}_mean"].to_numpy(), 100 * points[f"{cc}_mean"].to_numpy()
        keep = np.isfinite(gain) & np.isfinite(change)
        if not keep.any():
            continue
        keys = points["keys"].iloc[0].split(", ")
        labels = [",".join(str(_as_declared(k, p[k])) for k in keys) + (" (ref.)" if p["reference"] else "")
                  for _, p in points.iterrows()]
        gain, change, labels = gain[keep], change[keep], [lab for lab, k in zip(labels, keep) if k]
        front = pareto_front(gain, change)
        ax.plot(gain, change, color=style.color, linestyle=style.linestyle, linewidth=1.2,
                label=f"{strategy} ({', '.join(k.rsplit('.', 1)[-1] for k in keys)})")
        ax.scatter(gain[front], change[front], color=style.color, marker=style.marker, s=40, zorder=3)
        ax.scatter(gain[~front], change[~front], facecolors="none", edgecolors=style.color, marker=style.marker,
                   s=40, zorder=3)
        for x, y, text in zip(gain, change, labels):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize="x-small", color=style.color)
    for _, row in (baselines if baselines is not None else pd.DataFrame(columns=["strategy"])).iterrows():
        draw_point(ax, styles[row["strategy"]], f"{row['strategy']} (not swept)", 100 * row[f"{ti}_mean"],
                   100 * row[f"{cc}_mean"], 100 * row[f"{ti}_std"], 100 * row[f"{cc}_std"])
    ax.set_xlabel("target improvement TI (pp)")
    ax.set_ylabel("control change CC (pp)")
    floor_change_axes(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    suptitle(fig, title)
    return fig


def ablation_section(finished: pd.DataFrame, styles: dict[str, Style], out: Path,
                     baselines: pd.DataFrame) -> tuple[list, list[Path], pd.DataFrame]:
    """The report's section on the finished swept runs: its blocks (:mod:`reports.blocks`), the figure files
    written into ``out/figures`` and the :func:`ablation_table`; ``baselines``: the main
    :func:`reports.tables.results_table`, whose strategies not swept in a setting its figure draws as points."""
    evaluation = basis(finished)
    table = ablation_table(finished, evaluation)
    blocks: list = [Heading("Sweeps and ablations"), Text(
        "Runs of grids with swept keys; per strategy one row per combination of its swept values: mean ± std over "
        f"seeds; p: {TEST_NAME}, against the reference combination (ref.: each key at its documented default when "
        "swept, else its smallest value). The figure draws each strategy's sweep as a line through TI and CC; "
        "filled markers are its Pareto front (none of its other points is better in both)."
        + (f" Every number is of {evaluation.title}: the swept runs have no zero-shot results." if named([evaluation])
           else ""))]
    figures: list[Path] = []
    for key, setting_rows in table.groupby(list(GROUP_KEYS), sort=True):
        label = group_label(**dict(zip(GROUP_KEYS, key)))
        blocks.append(Heading(label, 3))
        for strategy, rows in setting_rows.groupby("strategy", sort=False):
            blocks += [Text(f"`{strategy}`, swept: {rows['keys'].iloc[0]}."),
                       Table(ablation_text_table(rows, evaluation))]
        if setting_rows[f"{evaluation.key('control_change')}_mean"].notna().any():
            stem = out / "figures" / slug("sweep-{}-{}-{}-{}shot".format(*key))
            others = baselines[(baselines[list(GROUP_KEYS)] == list(key)).all(axis=1)
                               & ~baselines["strategy"].isin(setting_rows["strategy"])]
            png, svg = save_figure(sweep_figure(setting_rows, styles, label, others, evaluation), stem)
            figures += [png, svg]
            blocks.append(Image(png, "Each strategy's sweep: TI against CC (mean over seeds), labelled by its swept "
                                     "values; filled markers on the strategy's Pareto front; the strategies not "
                                     "swept as reference points (mean ± std)."))
    return blocks, figures, table
