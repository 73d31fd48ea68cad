"""Sweep and ablation reports from run records written here in the real schema with hand-chosen numbers.

One setting (mini-shapes, 1 session, controls clean_a and clean_b, every run starting at START): lorsu over
top_k_heads 1, 2 (the documented default: the reference) and 4, seeds 0-2; lora over train.lr 1e-5 (its
default: the reference) and 1e-4, seeds 0-1; zeroshot, not swept, seeds 0-1. Expected numbers by hand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmark.config import Config
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.records import STATUS_FINISHED, RunRecord, atomic_write, write_json
from benchmark.runs import run_dir
from reports import scan_runs, write_report
from reports.ablation import (
    ablation_table,
    ablation_text_table,
    main_runs,
    pareto_front,
    reference_values,
    sweep_figure,
)
from reports.figures import strategy_styles

START = [0.20, 0.60, 0.50]  # target, clean_a, clean_b before training
FINAL = {  # (strategy, swept values, seed) -> accuracies after the session
    **{("lorsu", 1, s): [t, 0.60, 0.50] for s, t in enumerate([0.30, 0.32, 0.31])},  # TI .10 .12 .11, CC 0
    **{("lorsu", 2, s): [t, 0.58, 0.50] for s, t in enumerate([0.40, 0.44, 0.42])},  # TI .20 .24 .22, CC -.01
    **{("lorsu", 4, s): [t, 0.50, 0.46] for s, t in enumerate([0.45, 0.47, 0.52])},  # TI .25 .27 .32, CC -.07
    **{("lora", 1e-5, s): [t, 0.60, 0.50] for s, t in enumerate([0.25, 0.26])},  # TI .05 .06, CC 0
    **{("lora", 1e-4, s): [t, 0.58, 0.48] for s, t in enumerate([0.35, 0.40])},  # TI .15 .20, CC -.02
    **{("zeroshot", None, s): START for s in range(2)},
}
KEYS = {"lorsu": "lorsu.top_k_heads", "lora": "train.lr"}


def write_run(root: Path, strategy: str, value, seed: int, final: list[float]) -> Path:
    """A finished one-session run record as the runner writes it."""
    swept = {KEYS[strategy]: value} if value is not None else {}
    cfg = Config(name="abl", stream="mini-shapes", strategy=strategy, backbone="mini", shots=5, seed=seed, sessions=1,
                 controls=["clean_a", "clean_b"], out=str(root), swept=swept)
    record = RunRecord(run_dir(cfg))
    record.start(cfg.to_dict(), {"seed": seed, "shot_seed": seed}, {"session_1": ["x"]})
    matrix = AccuracyMatrix.empty(cfg.stream, cfg.controls, 1)
    for t, row in enumerate([START, final]):
        matrix.values[t], matrix.groups[t] = row, row[0]
        if t:
            matrix.seen[t] = row[0]
        record.append_metrics([{"session": t, "dataset": d, "metric": "top1", "value": v, "correct": round(100 * v),
                                "total": 100} for d, v in zip([cfg.stream, *cfg.controls], row)])
    atomic_write(record.path / "matrix.csv", matrix.to_csv())
    write_json(record.path / "summary.json", {**summarize(matrix), "costs": {"visual_parameters": 100, "sessions": [
        {"session": 1, "train_seconds": 1.0, "trainable": 10}]}})
    record.update_manifest(status=STATUS_FINISHED)
    return record.path


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for (strategy, value, seed), final in FINAL.items():
        write_run(root, strategy, value, seed, final)
    return root


@pytest.fixture(scope="module")
def table(runs_dir):
    return ablation_table(scan_runs(runs_dir).finished)


def test_swept_runs_have_their_keys_as_columns_and_folders(runs_dir):
    runs = scan_runs(runs_dir).runs.set_index("run")
    assert runs.loc["abl/mini-shapes/mini/lorsu/top_k_heads=4/5-s2", "swept:lorsu.top_k_heads"] == 4
    assert runs.loc["abl/mini-shapes/mini/lora/lr=0.0001/5-s0", "swept:train.lr"] == 1e-4
    assert runs.loc["abl/mini-shapes/mini/zeroshot/5-s0", "sweep"] == ""


def test_ablation_table_means_stds_and_paired_tests_against_the_reference(table):
    lorsu = table[table["strategy"] == "lorsu"]
    assert list(lorsu["lorsu.top_k_heads"]) == [1, 2, 4] and list(lorsu["reference"]) == [False, True, False]
    assert lorsu["target_improvement_mean"].to_numpy() == pytest.approx([0.11, 0.22, 0.28])
    assert lorsu["target_improvement_std"].iloc[2] == pytest.approx(np.std([0.25, 0.27, 0.32], ddof=1))
    assert lorsu["control_change_mean"].to_numpy() == pytest.approx([0.0, -0.01, -0.07])
    ti = dict(zip(lorsu["lorsu.top_k_heads"], lorsu["target_improvement_p"]))
    assert ti[1] == pytest.approx(stats.ttest_rel([0.10, 0.12, 0.11], [0.20, 0.24, 0.22]).pvalue)
    assert ti[4] == pytest.approx(stats.ttest_rel([0.25, 0.27, 0.32], [0.20, 0.24, 0.22]).pvalue)
    notes = dict(zip(lorsu["lorsu.top_k_heads"], lorsu["control_change_note"]))
    assert notes == {1: "zero variance", 2: "reference", 4: "zero variance"}  # every seed differs alike
    lora = table[table["strategy"] == "lora"]
    assert list(lora["train.lr"]) == [1e-5, 1e-4] and list(lora["reference"]) == [True, False]  # the default lr
    assert lora["target_improvement_mean"].to_numpy() == pytest.approx([0.055, 0.175])
    assert lora["target_improvement_note"].iloc[1] == "n<3"  # two seeds: no p-value
    assert "zeroshot" not in set(table["strategy"])  # not swept: the main results table's


def test_reference_is_the_default_when_swept_else_the_smallest_value(runs_dir):
    runs = scan_runs(runs_dir).finished
    assert reference_values(runs[runs["strategy"] == "lorsu"], ["lorsu.top_k_heads"]) == {"lorsu.top_k_heads": 2}
    no_default = runs[(runs["strategy"] == "lorsu") & (runs["swept:lorsu.top_k_heads"] != 2)]
    assert reference_values(no_default, ["lorsu.top_k_heads"]) == {"lorsu.top_k_heads": 1}


def test_ablation_text_table_in_percent_with_the_best_bold(table):
    text = ablation_text_table(table[table["strategy"] == "lorsu"])
    assert text.header[:4] == ["lorsu.top_k_heads", "n", "TI (pp)", "p (TI)"]
    rows = {r[0].text: r for r in text.rows}
    assert set(rows) == {"1", "2 (ref.)", "4"}
    assert rows["4"][2].text == f"28.0 ± {100 * np.std([0.25, 0.27, 0.32], ddof=1):.1f}" and rows["4"][2].bold
    assert rows["1"][4].text == "0.0 ± 0.0" and rows["1"][4].bold and rows["2 (ref.)"][3].text == "ref."


def test_pareto_front():
    assert pareto_front([1, 2, 3, 2], [0, -1, -2, -3]).tolist() == [True, True, True, False]
    assert pareto_front([1, 1], [0, 0]).tolist() == [True, True]  # equal points dominate neither


def test_sweep_figure_draws_each_strategys_sweep_as_a_line(table):
    fig = sweep_figure(table, strategy_styles(["lorsu", "lora"]), "abl")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"lorsu (top_k_heads)", "lora (lr)"}
    assert lines["lorsu (top_k_heads)"].get_xdata() == pytest.approx([11.0, 22.0, 28.0])
    assert lines["lorsu (top_k_heads)"].get_ydata() == pytest.approx([0.0, -1.0, -7.0])


def test_report_has_the_main_table_and_the_sweeps(runs_dir, tmp_path):
    paths = write_report(runs_dir, tmp_path / "report")
    text = paths.markdown.read_text()
    assert "## Sweeps and ablations" in text and "| lorsu.top_k_heads | n | TI (pp)" in text and "2 (ref.)" in text
    assert "| zeroshot | 2 |" in text  # the runs that were not swept: the main results table
    assert (tmp_path / "report" / "ablation.csv").is_file()
    assert any(p.name.startswith("sweep-") and p.suffix == ".png" for p in paths.figures)


def test_a_swept_strategy_stays_in_the_main_comparison_at_its_reference(runs_dir, tmp_path):
    finished = scan_runs(runs_dir).finished
    main, references = main_runs(finished)
    assert references == {("abl", "mini-shapes", "mini", 5, "lorsu"): {"lorsu.top_k_heads": 2},
                          ("abl", "mini-shapes", "mini", 5, "lora"): {"train.lr": 1e-5}}
    assert sorted(main.groupby("strategy").size().items()) == [("lora", 2), ("lorsu", 3), ("zeroshot", 2)]
    paths = write_report(runs_dir, tmp_path / "report")
    results = pd.read_csv(paths.results_csv).set_index("strategy")
    assert results.loc["lorsu", "target_improvement_mean"] == pytest.approx(0.22)  # top_k_heads=2, the default
    assert results.loc["lora", "target_improvement_mean"] == pytest.approx(0.055)  # lr 1e-5
    assert results.loc["lora", "target_improvement_note"] == "n<3"  # tested against lorsu, no longer "no reference"
    text = paths.markdown.read_text()
    assert "`lora` at train.lr=1e-05; `lorsu` at lorsu.top_k_heads=2" in text
    main_table = pd.read_csv(paths.main_csv)
    assert set(main_table["strategy"]) == {"lorsu", "lora", "zeroshot"}


def test_the_sweep_figure_draws_the_strategies_not_swept_as_reference_points(runs_dir, table):
    from reports.tables import results_table

    baselines = results_table(main_runs(scan_runs(runs_dir).finished)[0], "lorsu")
    zeroshot = baselines[baselines["strategy"] == "zeroshot"]
    fig = sweep_figure(table, strategy_styles(["lorsu", "lora", "zeroshot"], "lorsu"), "abl", zeroshot)
    (ax,) = fig.axes
    points = [c for c in ax.containers if c.get_label() == "zeroshot (not swept)"]
    assert len(points) == 1 and (points[0].lines[0].get_xdata()[0], points[0].lines[0].get_ydata()[0]) == (0, 0)
