"""Sequence settings (MTIL's protocol, :mod:`streams.sequence`): the table the MTIL papers print.

A setting whose runs are sequence runs (their ``summary.json`` has a ``sequence`` block,
:func:`benchmark.metrics.sequence_metrics`) gets, for each of Transfer, Avg and Last, one row per strategy and one
column per dataset plus their mean: mean ± std over seeds in percent, the clear best per column in bold
(:data:`reports.tables.BEST_RULE`) and the paired test against the reference strategy on the mean column.

Runs of one setting may train the datasets in different orders (``session_order: seed``): cells line up by
dataset name, the columns in the *released* order (that of the lowest-seed run with ``session_order: released``)
or, when no run has it, alphabetically (:func:`dataset_order`); the report then says the orders differ.
"""
from __future__ import annotations

import pandas as pd

from reports.frame import GROUP_KEYS, SEQUENCE, SESSION_ORDER, sequence_key, strategy_order
from reports.tables import TEST_NAME, Cell, TextTable, _p_text, clear_best, mean_std, reference_test, trains

METRICS = (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last"))  # (summary key, printed name), paper order
MEAN = "Mean"  # the column of each metric's mean over the datasets (per run, then over seeds)
SEQUENCE_INTRO = ("Transfer, Avg and Last (MTIL's metrics, as ZSCL computes them: *How to read the tables*) in %, "
                  "mean ± std over seeds: a block of rows per metric, a row per strategy, a column per dataset and "
                  f"their **{MEAN}** (per run, then over seeds); p: the paired test of the {MEAN} against the reference.")
POOLED_NOTE = ("The target's TI, forgetting and final accuracy of the other settings are left out here: they pool the "
               "sequence's datasets (each evaluated among its own classes), and BWT (`runs.csv`) compares session "
               "groups that are whole datasets; Transfer, Avg and Last are this protocol's numbers.")
SEQUENCE_DEFINITIONS = (
    "**Transfer, Avg, Last** (sequence settings, MTIL's protocol: session i trains the i-th dataset of the sequence, "
    "and after every session each dataset is evaluated among its own classes), as ZSCL's `results.ipynb` computes "
    "them (`benchmark.metrics.sequence_metrics`) from X[j, i] = A[j+1, i], the matrix without the pretrained row: "
    "**Avg** of dataset i = mean over the T sessions of X[j, i]; **Last** = X[T−1, i] = A[T, i]; **Transfer** = mean "
    "over j < i of X[j, i], dataset i's accuracy while it was not trained yet (none for the first dataset: –). "
    f"**{MEAN}**: per run the mean over its datasets (Transfer's over the T−1 that have one), then mean ± std over "
    "seeds. Cells line up by dataset name, whatever order a run trained the datasets in (`session_order: seed`).")
COLUMNS = [*GROUP_KEYS, "metric", "strategy", "dataset", "mean", "std", "n", "p", "pairs", "note", "best"]


def is_sequence(runs: pd.DataFrame) -> pd.Series:
    """Per row of ``runs`` (the ``runs`` frame) whether it is a finished sequence run."""
    return runs[SEQUENCE].notna() if SEQUENCE in runs else pd.Series(False, index=runs.index)


def datasets_of(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Each sequence run of ``runs`` (by its ``run``) → its datasets in session order (session ``i`` trains the
    ``i``-th)."""
    sequences = runs[is_sequence(runs)]
    return {run: names.split(", ") for run, names in zip(sequences["run"], sequences.get(SEQUENCE, []))}


def dataset_order(runs: pd.DataFrame) -> tuple[list[str], bool]:
    """The columns of one sequence setting's table (``runs``: its finished sequence runs) and whether that is the
    released order: the datasets of the lowest-seed run with ``session_order: released``, else every dataset
    alphabetically (datasets no released run trains follow, alphabetically)."""
    released = runs[runs[SESSION_ORDER] == "released"].sort_values(["seed", "strategy"])
    first = released[SEQUENCE].iloc[0].split(", ") if len(released) else []
    every = {d for names in runs[SEQUENCE] for d in names.split(", ")}
    return first + sorted(every - set(first)), bool(first)


def order_note(runs: pd.DataFrame) -> str:
    """A sentence on the session orders of one sequence setting's runs: the order when they share one, else that
    they differ and how the columns line up."""
    orders = sorted(set(runs[SEQUENCE]))
    if len(orders) == 1:
        return f"Every run trains the datasets in one order: {orders[0].replace(', ', ' → ')}."
    columns, released = dataset_order(runs)
    where = "the released order (that of the lowest-seed run with `session_order: released`)" if released else \
        "alphabetical order (no run has `session_order: released`)"
    return (f"**Session orders differ between runs** ({len(orders)} orders among {len(runs)} runs, "
            f"`session_order: seed`): cells line up by dataset name, the columns in {where}; a dataset's Transfer is "
            "over the runs in which it was not trained first, so its n can be smaller than the strategy's.")


def sequence_table(finished: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Transfer, Avg and Last of the sequence runs among ``finished`` (one row per run), aggregated over seeds.

    Returns:
        Tidy, one row per (setting, metric, strategy, dataset): the :data:`GROUP_KEYS`, ``metric`` (``transfer``,
        ``avg``, ``last``), ``strategy`` (the reference first), ``dataset`` (in :func:`dataset_order`, then
        :data:`MEAN`), ``mean``, ``std`` (ddof 1), ``n`` (seeds with a value), the paired test against
        ``reference`` (``p``, ``pairs``, ``note``: :func:`reports.tables.reference_test`) and ``best``
        (:func:`reports.tables.clear_best` per setting, metric and dataset; higher is better). Fractions, as in
        the run records. Empty without sequence runs.
    """
    runs = finished[is_sequence(finished)]
    rows = []
    for key, group in runs.groupby(list(GROUP_KEYS), sort=True):
        datasets = dataset_order(group)[0]
        keys = [sequence_key(m, d if d != MEAN else None) for m, _ in METRICS for d in [*datasets, MEAN]]
        group = group.reindex(columns=list(dict.fromkeys([*group.columns, *keys])))  # a missing one: NaN
        ref = group[group["strategy"] == reference].set_index("seed")
        for metric, _ in METRICS:
            for strategy in strategy_order(group["strategy"], reference):
                by_seed = group[group["strategy"] == strategy].set_index("seed")
                for dataset in [*datasets, MEAN]:
                    column = sequence_key(metric, dataset if dataset != MEAN else None)
                    values = by_seed[column]
                    test = reference_test(strategy, reference, values, ref[column] if len(ref) else None)
                    rows.append({**dict(zip(GROUP_KEYS, key)), "metric": metric, "strategy": strategy,
                                 "dataset": dataset, "mean": values.mean(), "std": values.std(ddof=1),
                                 "n": int(values.notna().sum()), "p": test.p, "pairs": test.pairs, "note": test.note})
    table = pd.DataFrame(rows, columns=COLUMNS[:-1])
    eligible = table["strategy"].map(trains(runs))
    table["best"] = False
    for _, cell in table.groupby([*GROUP_KEYS, "metric", "dataset"], sort=False):
        table.loc[cell.index, "best"] = clear_best(cell["mean"], cell["std"], cell["n"], "higher", eligible[cell.index])
    return table


def sequence_text_table(rows: pd.DataFrame) -> TextTable:
    """One setting of :func:`sequence_table` for print, the MTIL papers' layout: a block of rows per metric
    (Transfer, Avg, Last; its name on the block's first row), one row per strategy, a column per dataset and
    :data:`MEAN` (percent, ``mean ± std``), ``n`` the strategy's seeds and the p-value of its mean against the
    reference."""
    datasets = [d for d in dict.fromkeys(rows["dataset"]) if d != MEAN]
    header = ["Metric", "Strategy", "n", *datasets, MEAN, f"p ({MEAN})"]
    table = []
    for metric, title in METRICS:
        block = rows[rows["metric"] == metric]
        for i, strategy in enumerate(dict.fromkeys(block["strategy"])):
            cells = block[block["strategy"] == strategy].set_index("dataset")
            mean = cells.loc[MEAN]
            line = [Cell(title if i == 0 else ""), Cell(strategy), Cell(str(cells.loc[[*datasets, MEAN], "n"].max()))]
            line += [Cell(mean_std(cells.loc[d, "mean"], cells.loc[d, "std"]), bool(cells.loc[d, "best"]))
                     for d in [*datasets, MEAN]]
            line.append(Cell("–" if pd.isna(mean["mean"]) else _p_text(mean["p"], mean["note"])))
            table.append(line)
    return TextTable(header, table)


def sequence_caption(label: str, reference: str) -> str:
    """The caption of one setting's :func:`sequence_text_table`."""
    return (f"{label}. MTIL metrics (%): Transfer, Avg and Last per dataset and their mean; mean ± std over seeds; "
            f"p: {TEST_NAME}, against {reference}, on the mean.")
