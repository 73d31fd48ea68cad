"""The MTIL tables of sequence settings, from run records written here in the real schema with hand-chosen
matrices (as the runner writes a sequence run: its session groups are whole datasets, ``summary.json`` holds
``sequence``).

One setting, three datasets: lorsu (the reference) over seeds 0-2 in the released order, full-ft over seeds 0-2
with seed 1 trained in another order (``session_order: seed``). Every per-run Transfer, Avg and Last below is
worked out by hand from its matrix.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmark.config import Config
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.records import STATUS_FINISHED, RunRecord, atomic_write, write_json
from reports import scan_runs, write_report
from reports.figures import matrix_figure
from reports.sequence import MEAN, dataset_order, sequence_table

STREAM = "mini-mtil"
A, B, C = "mini-shapes", "mini-colours", "mini-digits"  # the released order (not alphabetical)
RELEASED = [A, B, C]
PRETRAINED = {A: 0.50, B: 0.40, C: 0.10}
# (strategy, seed) -> (its datasets in session order, its rows after sessions 1..3 over those datasets).
RUNS = {
    ("lorsu", 0): (RELEASED, [[0.80, 0.50, 0.30], [0.70, 0.90, 0.40], [0.60, 0.80, 0.90]]),
    ("lorsu", 1): (RELEASED, [[0.90, 0.60, 0.20], [0.80, 1.00, 0.40], [0.70, 0.90, 0.80]]),
    ("lorsu", 2): (RELEASED, [[0.85, 0.55, 0.25], [0.75, 0.95, 0.35], [0.65, 0.85, 0.85]]),
    ("full-ft", 0): (RELEASED, [[0.60, 0.30, 0.20], [0.50, 0.70, 0.30], [0.40, 0.60, 0.80]]),
    ("full-ft", 1): ([C, A, B], [[0.90, 0.50, 0.40], [0.70, 0.90, 0.50], [0.60, 0.80, 0.90]]),
    ("full-ft", 2): (RELEASED, [[0.70, 0.40, 0.30], [0.60, 0.80, 0.20], [0.50, 0.70, 0.90]]),
}
# By hand: Transfer_i = mean of dataset i's column above its session's row, Avg_i = its column's mean, Last_i =
# the last row; each run's Mean over its datasets (Transfer's over the two it has).
HAND = {
    ("lorsu", 0): {"transfer": {B: .50, C: .35}, "avg": {A: .70, B: 2.2 / 3, C: 1.6 / 3}, "last": {A: .6, B: .8, C: .9}},
    ("lorsu", 1): {"transfer": {B: .60, C: .30}, "avg": {A: .80, B: 2.5 / 3, C: 1.4 / 3}, "last": {A: .7, B: .9, C: .8}},
    ("lorsu", 2): {"transfer": {B: .55, C: .30}, "avg": {A: .75, B: 2.35 / 3, C: 1.45 / 3},
                   "last": {A: .65, B: .85, C: .85}},
    ("full-ft", 0): {"transfer": {B: .30, C: .25}, "avg": {A: .50, B: 1.6 / 3, C: 1.3 / 3},
                     "last": {A: .4, B: .6, C: .8}},
    # order C, A, B: C trained first has no Transfer; A's is the first row's, B's the mean of the first two rows
    ("full-ft", 1): {"transfer": {A: .50, B: .45}, "avg": {C: 2.2 / 3, A: 2.2 / 3, B: 1.8 / 3},
                     "last": {C: .6, A: .8, B: .9}},
    ("full-ft", 2): {"transfer": {B: .40, C: .25}, "avg": {A: .60, B: 1.9 / 3, C: 1.4 / 3},
                     "last": {A: .5, B: .7, C: .9}},
}


def write_sequence_run(root: Path, strategy: str, seed: int, datasets: list[str], rows: list[list[float]]) -> Path:
    """A finished sequence run's record as the runner writes it: session ``i`` trains ``datasets[i-1]``, its
    target's group ``top1_s<i>`` is that dataset (each among its own classes), ``top1`` the pooled accuracy."""
    order = "released" if datasets == RELEASED else "seed"
    cfg = Config(name="exp", stream=STREAM, strategy=strategy, backbone="mini", shots=5, seed=seed,
                 sessions=len(datasets), controls=[], session_order=order, out=str(root))
    path = root / cfg.name / STREAM / "mini" / strategy / f"5-s{seed}"
    record = RunRecord(path)
    record.start(cfg.to_dict(), {"seed": seed, "shot_seed": seed},
                 {f"session_{i}": [f"{d}/0"] for i, d in enumerate(datasets, start=1)})
    matrix = AccuracyMatrix.empty(STREAM, [], len(datasets))
    for t, row in enumerate([[PRETRAINED[d] for d in datasets], *rows]):
        matrix.groups[t] = row
        matrix.values[t, 0] = float(np.mean(row))  # the pooled accuracy (equal test sets)
        entries = [("top1", matrix.values[t, 0])] + [(f"top1_s{i}", v) for i, v in enumerate(row, start=1)]
        if t:
            matrix.seen[t] = float(np.mean(row[:t]))
            entries.append(("top1_seen", matrix.seen[t]))
        record.append_metrics([{"session": t, "dataset": STREAM, "metric": m, "value": v, "correct": round(100 * v),
                                "total": 100} for m, v in entries])
    atomic_write(path / "matrix.csv", matrix.to_csv())
    summary = summarize(matrix, datasets)
    trainable = 0 if strategy == "zeroshot" else 1000
    summary["costs"] = {"sessions": [{"session": s, "train_seconds": 1.0, "trainable": trainable}
                                     for s in range(1, len(datasets) + 1)]}
    write_json(path / "summary.json", summary)
    record.update_manifest(status=STATUS_FINISHED)
    return path


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sequence-runs")
    for (strategy, seed), (datasets, rows) in RUNS.items():
        write_sequence_run(root, strategy, seed, datasets, rows)
    return root


@pytest.fixture(scope="module")
def report(runs_dir, tmp_path_factory):
    return write_report(runs_dir, tmp_path_factory.mktemp("sequence-report"))


def hand(strategy: str, metric: str, dataset: str) -> list[float]:
    """The hand-computed values of one cell over the strategy's seeds (a run's Mean over its datasets)."""
    runs = [values[metric] for (s, _), values in HAND.items() if s == strategy]
    return [float(np.mean(list(v.values()))) if dataset == MEAN else v[dataset] for v in runs if dataset in v
            or dataset == MEAN]


def test_transfer_avg_last_cells_equal_the_hand_computation(runs_dir):
    table = sequence_table(scan_runs(runs_dir).finished, "lorsu")
    assert list(dict.fromkeys(table["dataset"])) == [*RELEASED, MEAN]  # the released order, by name
    assert list(dict.fromkeys(table["strategy"])) == ["lorsu", "full-ft"]
    for row in table.itertuples():
        values = hand(row.strategy, row.metric, row.dataset)
        assert row.n == len(values), (row.strategy, row.metric, row.dataset)
        if not values:  # the released first dataset: never untrained before a session of it in those runs
            assert row.metric == "transfer" and (row.strategy, row.dataset) == ("lorsu", A) and math.isnan(row.mean)
            continue
        assert row.mean == pytest.approx(np.mean(values), abs=1e-12)
        assert row.std == pytest.approx(np.std(values, ddof=1), abs=1e-12) if len(values) > 1 else math.isnan(row.std)
    cell = table.set_index(["strategy", "metric", "dataset"])
    assert cell.loc[("full-ft", "transfer", A), "mean"] == pytest.approx(0.50)  # only the run that trained C first
    assert cell.loc[("full-ft", "transfer", C), "n"] == 2
    assert cell.loc[("lorsu", "avg", MEAN), "mean"] == pytest.approx((0.65556 + 0.7 + 0.67222) / 3, abs=1e-5)
    # the paired test of the reference's Mean against the others': scipy on the hand-computed per-seed means
    for metric in ("transfer", "avg", "last"):
        p = stats.ttest_rel(hand("full-ft", metric, MEAN), hand("lorsu", metric, MEAN)).pvalue
        assert cell.loc[("full-ft", metric, MEAN), "p"] == pytest.approx(p)
        assert cell.loc[("lorsu", metric, MEAN), "note"] == "reference"


def test_the_report_prints_the_mtil_table_in_percent_with_the_hand_values(report):
    text = report.markdown.read_text()
    header = f"| Metric | Strategy | n | {A} | {B} | {C} | {MEAN} | p ({MEAN}) |"
    assert text.count(header) == 2  # the table across settings and the setting's section
    last, reference = hand("full-ft", "last", MEAN), hand("lorsu", "last", MEAN)  # .6, .7667, .7; .7667, .8, .7833
    assert (f"| Last | lorsu | 3 | 65.0 ± 5.0 | 85.0 ± 5.0 | 85.0 ± 5.0 | {100 * np.mean(reference):.1f} ± "
            f"{100 * np.std(reference, ddof=1):.1f} | ref. |") in text
    p = stats.ttest_rel(last, reference).pvalue
    assert (f"|  | full-ft | 3 | 56.7 ± 20.8 | 73.3 ± 15.3 | 76.7 ± 15.3 | {100 * np.mean(last):.1f} ± "
            f"{100 * np.std(last, ddof=1):.1f} | {p:.3f} |") in text
    assert "| Transfer | lorsu | 3 | – | **55.0 ± 5.0** | 31.7 ± 2.9 |" in text  # clearly above full-ft's 38.3 ± 7.6
    # the class-group numbers of a pooled target are not shown; the costs are
    assert "| TI (pp) | p (TI) |" not in text and "Final target acc. (%)" not in text and "| Trainable params |" in text
    assert "Session orders differ between runs** (2 orders among 6 runs" in text
    assert "**Transfer, Avg, Last**" in text  # defined under How to read the tables
    assert report.headline.startswith(f"MTIL · {STREAM} · mini") and header in report.headline
    assert report.main_csv.read_text().count("\n") == 1  # no table across settings of a pooled target


def test_csv_and_latex_exports_hold_the_table(report):
    assert report.sequence_csv is not None
    csv = report.sequence_csv.read_text().splitlines()
    assert csv[0] == "name,stream,backbone,shots,metric,strategy,dataset,mean,std,n,p,pairs,note,best"
    assert len(csv) == 1 + 3 * 2 * 4  # metrics × strategies × (datasets + Mean)
    for tex in (report.results_latex.read_text(), report.main_latex.read_text()):
        assert f"Metric & Strategy & n & {A} & {B} & {C} & Mean & p (Mean) \\\\" in tex.replace("\\_", "_")
        assert "Last & lorsu & 3 & 65.0 $\\pm$ 5.0 & 85.0 $\\pm$ 5.0 & 85.0 $\\pm$ 5.0" in tex
        assert "MTIL metrics (\\%): Transfer, Avg and Last" in tex


def test_mixed_orders_line_up_by_name_and_fall_back_to_alphabetical(runs_dir):
    finished = scan_runs(runs_dir).finished
    assert dataset_order(finished) == (RELEASED, True)
    shuffled = finished[finished["session_order"] == "seed"]  # no released run: alphabetical
    assert dataset_order(shuffled) == (sorted(RELEASED), False)
    table = sequence_table(shuffled, "lorsu").set_index(["metric", "dataset"])
    assert list(dict.fromkeys(table.index.get_level_values("dataset"))) == [B, C, A, MEAN]
    assert table.loc[("last", C), "mean"] == pytest.approx(0.6) and table.loc[("transfer", C), "n"] == 0
    assert table.loc[("transfer", B), "mean"] == pytest.approx(0.45)


def test_matrix_heatmap_has_a_column_per_dataset_in_the_table_order(runs_dir):
    runset = scan_runs(runs_dir)
    run = "exp/mini-mtil/mini/full-ft/5-s1"  # trained C, A, B
    fig = matrix_figure(runset.scores, {run: "full-ft (seed 1)"}, "t", sequences={run: [C, A, B]}, columns=RELEASED)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == RELEASED
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", f"1 {C}", f"2 {A}", f"3 {B}"]
    grid = ax.images[0].get_array()
    np.testing.assert_allclose(grid[1], [50, 40, 90])  # session 1's row [C .9, A .5, B .4] by name
    np.testing.assert_allclose(grid[0], [100 * PRETRAINED[d] for d in RELEASED])
