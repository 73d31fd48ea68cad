"""Reports from run records written here in the real schema with hand-chosen numbers.

Setting A (mini world, 2 sessions, controls clean_a and clean_b): lorsu, lora and ln over seeds
0-2, zeroshot over seeds 0 and 7, plus a failed, a still-running and an incomplete run.
Setting B (digits, no controls): one full-ft run. Every expected number is worked out by hand.
"""
from __future__ import annotations

import ast
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.container import ErrorbarContainer
from scipy import stats

from benchmark.cli import main
from benchmark.config import Config
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.records import STATUS_FAILED, STATUS_FINISHED, RunRecord, atomic_write, slug, write_json
from benchmark.vqa.session import VQA_SUMMARY, vqa_summary
from reports import ReportError, filter_runs, load_runs, paired_test, results_table, scan_runs, write_report
from reports.figures import (
    REFERENCE_STYLE,
    ZEROSHOT_STYLE,
    cost_figure,
    curves_figure,
    matrix_figure,
    strategy_styles,
    tradeoff_figure,
)
from reports.frame import VQA, ZEROSHOT, cost_scalars, strategy_order
from reports.tables import COST_COLUMNS, TEST_NAME, curve_table, result_columns, results_text_table

MINI, DIGITS = "mini-shapes", "digits"
CONTROLS = ["clean_a", "clean_b"]
START = [0.20, 0.60, 0.50]  # target, clean_a, clean_b before training (every run)
# (strategy, seed) -> rows after sessions 1 and 2: TI, CC and target forgetting in the comments.
MATRICES = {
    ("lorsu", 0): [[0.30, 0.60, 0.50], [0.40, 0.58, 0.50]],  # TI .20, CC -.01, F -.10
    ("lorsu", 1): [[0.32, 0.60, 0.49], [0.44, 0.60, 0.48]],  # TI .24, CC -.01, F -.12
    ("lorsu", 2): [[0.28, 0.59, 0.50], [0.42, 0.59, 0.49]],  # TI .22, CC -.01, F -.14
    ("lora", 0): [[0.35, 0.50, 0.45], [0.38, 0.45, 0.40]],  # TI .18, CC -.125, F -.03
    ("lora", 1): [[0.36, 0.52, 0.44], [0.45, 0.48, 0.40]],  # TI .25, CC -.11, F -.09
    ("lora", 2): [[0.30, 0.50, 0.46], [0.40, 0.46, 0.42]],  # TI .20, CC -.11, F -.10
    ("ln", 0): [[0.30, 0.60, 0.50], [0.45, 0.60, 0.50]],  # TI .25 = lorsu + .05 on every seed
    ("ln", 1): [[0.32, 0.60, 0.50], [0.49, 0.60, 0.50]],  # TI .29, CC 0 = lorsu + .01, F -.17
    ("ln", 2): [[0.28, 0.60, 0.50], [0.47, 0.60, 0.50]],  # TI .27
    ("zeroshot", 0): [START, START],
    ("zeroshot", 7): [START, START],  # only seed 0 is shared with lorsu
}
TRAINABLE = {"lorsu": 1000, "lora": 2000, "ln": 500, "zeroshot": 0}
SECONDS = {"lorsu": (1.0, 2.0), "lora": (2.0, 2.0), "ln": (0.5, 0.5), "zeroshot": (0.0, 0.0)}
TI = {"lorsu": [0.20, 0.24, 0.22], "lora": [0.18, 0.25, 0.20], "ln": [0.25, 0.29, 0.27]}
CC = {"lorsu": [-0.01, -0.01, -0.01], "lora": [-0.125, -0.11, -0.11], "ln": [0.0, 0.0, 0.0]}
FORGET = {"lorsu": [-0.10, -0.12, -0.14], "lora": [-0.03, -0.09, -0.10], "ln": [-0.15, -0.17, -0.19]}


def write_run(root: Path, strategy: str, seed: int, rows: list[list[float]], *, stream: str = MINI,
              backbone: str = "mini", controls: list[str] = CONTROLS, sessions: int = 2,
              status: str = STATUS_FINISHED, reason: str = "", vqa: dict[int, list[float]] | None = None,
              costs: dict[str, float] | None = None) -> Path:
    """A run record as the runner writes it; ``rows`` are the evaluated sessions (0, 1, ...); ``vqa``: the
    VQA accuracies (target, controls) of the sessions VQA scored; ``costs``: more costs of every session."""
    cfg = Config(name="exp", stream=stream, strategy=strategy, backbone=backbone, shots=5, seed=seed,
                 sessions=sessions, controls=list(controls), out=str(root))
    path = root / cfg.name / stream / slug(backbone) / strategy / f"5-s{seed}"
    record = RunRecord(path)
    record.start(cfg.to_dict(), {"seed": seed, "shot_seed": 0}, {f"session_{i}": ["x"] for i in range(1, 3)})
    matrix = AccuracyMatrix.empty(stream, list(controls), sessions)
    for t, row in enumerate(rows):
        matrix.values[t] = row
        matrix.groups[t] = row[0]
        entries = [(stream, "top1", row[0])] + [(stream, f"top1_s{i + 1}", row[0]) for i in range(sessions)]
        if t:
            matrix.seen[t] = row[0]
            entries.append((stream, "top1_seen", row[0]))
        entries += list(zip(controls, ["top1"] * len(controls), row[1:]))
        record.append_metrics([{"session": t, "dataset": d, "metric": m, "value": v, "correct": round(100 * v),
                                "total": 100} for d, m, v in entries])
    vqa_matrix = AccuracyMatrix.empty(stream, list(controls), sessions)
    for t, row in (vqa or {}).items():
        vqa_matrix.values[t] = row
        record.append_metrics([{"session": t, "dataset": d, "metric": m, "value": v, "correct": round(100 * v),
                                "total": 100, "scoring": "letter"} for d, v in zip([stream, *controls], row)
                               for m in ("vqa_acc", "vqa_acc_strict")])
    if status == "running":
        return path
    atomic_write(path / "matrix.csv", matrix.to_csv())
    summary = summarize(matrix)
    if vqa:
        atomic_write(path / "vqa_matrix.csv", vqa_matrix.to_csv(per_group=False))
        summary["vqa"] = vqa_summary(vqa_matrix, VQA_SUMMARY)
    summary["costs"] = {"visual_parameters": 10_000, "sessions": [
        {"session": s + 1, "train_seconds": SECONDS.get(strategy, (1.0, 1.0))[s], "train_samples": 25,
         "peak_memory_mb": 100.0 + 20 * s, "trainable": TRAINABLE.get(strategy, 1),
         "trainable_with_biases": TRAINABLE.get(strategy, 1) + 10, **(costs or {})} for s in range(len(rows) - 1)]}
    write_json(path / "summary.json", summary)
    record.update_manifest(status=status, **({"reason": reason} if reason else {}))
    return path


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for (strategy, seed), rows in MATRICES.items():
        write_run(root, strategy, seed, [START, *rows])
    write_run(root, "lora", 3, [START, [0.99, 0.1, 0.1]], status=STATUS_FAILED,
              reason="session 2: non-finite loss (nan)")
    write_run(root, "lorsu", 3, [START, [0.99, 0.1, 0.1]], status="running")
    incomplete = write_run(root, "ln", 3, [START, [0.99, 0.1, 0.1], [0.99, 0.1, 0.1]])
    (incomplete / "summary.json").unlink()
    write_run(root, "full-ft", 0, [[0.10], [0.30], [0.50]], stream=DIGITS, backbone="openclip:fscl-tiny", controls=[])
    return root


@pytest.fixture(scope="module")
def runset(runs_dir):
    return scan_runs(runs_dir)


@pytest.fixture(scope="module")
def table(runset):
    return results_table(runset.finished, "lorsu")


def row_of(table: pd.DataFrame, strategy: str, stream: str = MINI) -> pd.Series:
    rows = table[(table["strategy"] == strategy) & (table["stream"] == stream)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_failed_and_partial_runs_are_listed_with_reasons_and_excluded(runset):
    excluded = runset.excluded.set_index("run")
    assert len(runset.finished) == 12 and len(excluded) == 3
    failed, running, incomplete = (f"exp/{MINI}/mini/{s}/5-s3" for s in ("lora", "lorsu", "ln"))
    assert excluded.loc[failed, "status"] == "failed" and "non-finite" in excluded.loc[failed, "reason"]
    assert excluded.loc[running, "status"] == "running"
    assert excluded.loc[incomplete, "status"] == "incomplete" and "summary.json" in excluded.loc[incomplete, "reason"]
    assert set(runset.scores["run"]) == set(runset.finished["run"])


def test_tidy_scores_frame_and_filter(runs_dir, runset):
    scores = load_runs(runs_dir)
    # per mini run: 3 sessions × (top1 + 2 groups + 2 controls) + 2 seen; the digits run: 3 × 3 + 2
    assert len(scores) == 11 * 17 + 11
    value = filter_runs(scores, strategy="lora", seed=1, session=2, dataset="clean_a", metric="top1")["value"]
    assert value.tolist() == pytest.approx([0.48])
    target = filter_runs(scores, stream=MINI, metric="top1", role="target")
    assert set(target["dataset"]) == {MINI}
    assert set(filter_runs(scores, strategy=["ln", "lora"])["strategy"]) == {"ln", "lora"}
    with_unfinished = load_runs(runs_dir, include_unfinished=True)
    assert {"failed", "running", "incomplete"} <= set(with_unfinished["status"])
    with pytest.raises(KeyError, match="no column"):
        filter_runs(scores, colour="red")


def test_cost_scalars_sum_durations_max_peaks_mean_counts():
    costs = {"visual_parameters": 10, "mask_build_seconds": 4.0, "sessions": [
        {"session": 1, "train_seconds": 1.5, "peak_memory_mb": 100.0, "trainable": 10, "flops_per_sample": 2e9},
        {"session": 2, "train_seconds": 2.5, "peak_memory_mb": 300.0, "trainable": 30, "flops_per_sample": 4e9}]}
    assert cost_scalars(costs) == {"visual_parameters": 10.0, "mask_build_seconds": 4.0, "train_seconds": 4.0,
                                   "peak_memory_mb": 300.0, "trainable": 20.0, "flops_per_sample": 3e9}


def test_means_stds_and_best_per_column(table):
    assert list(table[table["stream"] == MINI]["strategy"]) == ["lorsu", "ln", "lora", "zeroshot"]
    for strategy in ("lorsu", "lora", "ln"):
        row = row_of(table, strategy)
        assert row["n"] == 3  # the failed / running / incomplete seed 3 is not averaged in
        for key, values in (("target_improvement", TI), ("control_change", CC), ("target_forgetting", FORGET)):
            assert row[f"{key}_mean"] == pytest.approx(np.mean(values[strategy]))
            assert row[f"{key}_std"] == pytest.approx(np.std(values[strategy], ddof=1), abs=1e-12)
    lorsu = row_of(table, "lorsu")
    assert lorsu["target_improvement_std"] == pytest.approx(0.02)
    assert lorsu["train_seconds_mean"] == pytest.approx(3.0) and lorsu["trainable_mean"] == 1000
    assert row_of(table, "zeroshot")["n"] == 2
    best = {c: set(table[(table["stream"] == MINI) & table[f"{c}_best"]]["strategy"])
            for c in ("target_improvement", "control_change", "target_forgetting", "trainable", "train_seconds")}
    # ln's TI 27 ± 2 against lorsu's 22 ± 2: a gap of 5 beyond the stds' sum of 4; CC: ln's 0 ± 0 against lorsu's
    # -1 ± 0 (zeroshot, which trains nothing, is never the best: its CC is 0 by construction, its cost zero);
    # ln's 500 parameters and 1 s are the best, clear of lorsu's (std 0)
    assert best == {"target_improvement": {"ln"}, "control_change": {"ln"},
                    "target_forgetting": {"ln"}, "trainable": {"ln"}, "train_seconds": {"ln"}}
    assert not row_of(table, "full-ft", DIGITS)["target_improvement_best"]  # alone in its setting: nothing to beat


def test_paired_t_test_matches_scipy_and_hand_computation(table):
    lora = row_of(table, "lora")
    for key, values in (("target_improvement", TI), ("control_change", CC), ("target_forgetting", FORGET)):
        assert lora[f"{key}_p"] == pytest.approx(stats.ttest_rel(values["lora"], values["lorsu"]).pvalue)
    d = np.subtract(TI["lora"], TI["lorsu"])  # -.02, .01, -.02
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert lora["target_improvement_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert lora["target_improvement_pairs"] == 3 and lora["target_improvement_note"] == ""
    assert row_of(table, "ln")["target_improvement_note"] == "zero variance"  # ln = lorsu + .05 on every seed
    assert math.isnan(row_of(table, "ln")["target_improvement_p"])
    zeroshot = row_of(table, "zeroshot")
    assert zeroshot["target_improvement_note"] == "n<3" and zeroshot["target_improvement_pairs"] == 1
    assert row_of(table, "lorsu")["control_change_note"] == "reference"
    assert row_of(table, "full-ft", DIGITS)["target_improvement_note"] == "no reference"


def test_paired_test_pairs_by_seed_not_by_order():
    values = pd.Series([0.30, 0.10, 0.21], index=[2, 0, 1])
    reference = pd.Series([0.0, 0.1, 0.2, 0.9], index=[0, 1, 2, 5])
    test = paired_test(values, reference)
    assert test.pairs == 3
    assert test.p == pytest.approx(stats.ttest_rel([0.10, 0.21, 0.30], [0.0, 0.1, 0.2]).pvalue)
    assert paired_test(pd.Series([0.5], index=[0]), reference).note == "n<3"
    two = paired_test(pd.Series([0.5, 0.7], index=[0, 1]), reference)  # a test on two seeds says nothing
    assert (two.note, two.pairs) == ("n<3", 2) and math.isnan(two.p)


def test_text_tables_mark_best_and_name_the_test(table):
    mini = table[table["stream"] == MINI]
    markdown = results_text_table(mini).markdown()
    assert "| ln | 3 | **27.0 ± 2.0** | n/a (zero variance) |" in markdown
    assert "| lorsu | 3 | 22.0 ± 2.0 | ref. |" in markdown
    assert "n/a (n<3)" in markdown and "| zeroshot | 2 |" in markdown
    costs = results_text_table(mini, COST_COLUMNS)  # columns nobody recorded (FLOPs here) are left out
    assert costs.header == ["Strategy", "n", "Trainable incl. biases", "Peak memory (MiB)"]
    assert [c.text for c in costs.rows[1]] == ["ln", "3", "510 ± 0", "120 ± 0"]
    assert "CC (pp)" not in results_text_table(table[table["stream"] == DIGITS]).header  # no controls there
    latex = results_text_table(mini).latex("caption")
    assert r"\textbf{27.0 $\pm$ 2.0}" in latex and r"\toprule" in latex
    assert "ttest_rel" in TEST_NAME and "paired" in TEST_NAME


def test_figures_hold_one_artist_per_strategy_in_consistent_styles(runset, table):
    mini_runs = runset.finished[runset.finished["stream"] == MINI]
    scores = runset.scores[runset.scores["run"].isin(mini_runs["run"])]
    rows = table[table["stream"] == MINI]
    styles = strategy_styles(strategy_order(rows["strategy"], "lorsu"), "lorsu")
    assert styles["lorsu"] == REFERENCE_STYLE and styles["zeroshot"] == ZEROSHOT_STYLE
    assert len({(s.color, s.marker) for s in styles.values()}) == 4

    curves = curves_figure(curve_table(scores), styles, "A")
    assert len(curves.axes) == 2  # target and mean control accuracy
    for ax in curves.axes:
        assert [line.get_label() for line in ax.get_lines()] == list(styles)
        assert all(len(line.get_xdata()) == 3 for line in ax.get_lines())
        assert len(ax.collections) == 4  # the ± std bands
    lora_line = curves.axes[1].get_lines()[2]
    assert lora_line.get_ydata()[2] == pytest.approx(100 * np.mean([(0.45 + 0.40) / 2, (0.48 + 0.40) / 2,
                                                                     (0.46 + 0.42) / 2]))

    tradeoff = tradeoff_figure(rows, styles, "A")
    bars = [c for c in tradeoff.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == list(styles)
    ln_point = bars[1].lines[0]
    assert (ln_point.get_xdata()[0], ln_point.get_ydata()[0]) == pytest.approx((27.0, 0.0))
    for bar, line in zip(bars, curves.axes[0].get_lines()):  # same colour and marker in both figures
        assert (bar.lines[0].get_color(), bar.lines[0].get_marker()) == (line.get_color(), line.get_marker())

    cost = cost_figure(rows, styles, "A")
    for ax in cost.axes[:2]:
        assert [c.get_label() for c in ax.containers] == ["lorsu", "ln", "lora"]  # zero-cost zeroshot left out
        assert ax.get_xscale() == "log"

    panels = {r: r for r in mini_runs[mini_runs["seed"] == 0]["run"]}
    heatmap = matrix_figure(scores, panels, "A")
    images = [ax.images[0] for ax in heatmap.axes if ax.images]
    assert len(images) == 4 and all(im.get_array().shape == (3, 3) for im in images)
    assert [t.get_text() for t in images[0].axes.get_xticklabels()] == [MINI, *CONTROLS]
    wrapped = matrix_figure(scores, {r: r for r in mini_runs["run"][:5]}, "A")  # 4 per row, spare axes removed
    assert len(wrapped.axes) == 5 + 1  # + the colour bar
    with pytest.raises(ReportError, match="no finished runs"):
        results_table(runset.finished.iloc[:0], "lorsu")


@pytest.fixture(scope="module")
def report(runs_dir, tmp_path_factory):
    return write_report(runs_dir, tmp_path_factory.mktemp("report"), reference="lorsu")


def test_write_report_files_and_contents(report):
    # setting A: curves, trade-off, cost, matrix; setting B (no controls): no trade-off
    # + a table across settings' figure per family (mini, and openclip:fscl-tiny)
    assert len(report.figures) == 2 * (7 + 2) and all(p.stat().st_size > 0 for p in report.figures)
    assert {p.suffix for p in report.figures} == {".png", ".svg"}
    assert len(report.excluded) == 3
    markdown = report.markdown.read_text()
    sections = {s.split("\n", 1)[0]: s for s in markdown.split("\n## ")}
    mini = next(s for h, s in sections.items() if h.startswith(MINI))
    digits = next(s for h, s in sections.items() if h.startswith(DIGITS))
    assert "mini world, not CLIP" in mini and "Mini-world results, not CLIP" in mini
    assert "not CLIP" not in digits and "no paired tests" in digits
    assert TEST_NAME in markdown
    assert "| Strategy | n | Trainable incl. biases | Peak memory (MiB) |" in mini
    excluded = sections["Excluded runs"]
    assert all(f"{s}/5-s3" in excluded for s in ("lora", "lorsu", "ln")) and "non-finite loss" in excluded
    assert "| train.lr |" in sections["Configuration"] and "| seed | 0, 1, 2, 7 |" in sections["Configuration"]
    assert "| python |" in sections["Software versions"]
    for png in (p for p in report.figures if p.suffix == ".png"):
        assert f"]({png.relative_to(report.markdown.parent).as_posix()})" in markdown

    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == 9 and 'src="figures' not in page
    assert "<strong>27.0 ± 2.0</strong>" in page

    csv = pd.read_csv(report.results_csv)
    assert len(csv) == 5 and csv.loc[csv["strategy"] == "lora", "target_improvement_p"].notna().all()
    assert r"\textbf" in report.results_latex.read_text()
    assert len(pd.read_csv(report.runs_csv)) == 15


def test_missing_empty_or_unfinished_folders_give_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        scan_runs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run records"):
        write_report(tmp_path / "empty", tmp_path / "out")
    write_run(tmp_path / "failed", "lora", 0, [START, START], status=STATUS_FAILED, reason="boom")
    with pytest.raises(ReportError, match="none of the 1 run.*boom"):
        write_report(tmp_path / "failed", tmp_path / "out")


def test_duplicate_runs_cannot_be_paired(tmp_path):
    one = write_run(tmp_path / "a", "lora", 0, [START, START, START])
    shutil.copytree(tmp_path / "a", tmp_path / "b" / "copy")
    assert one.is_dir()
    with pytest.raises(ReportError, match="cannot be paired"):
        scan_runs(tmp_path)


@pytest.mark.parametrize("with_reference", [True, False])
def test_training_tflops_its_ratio_to_lora_vlm_and_the_compute_figure(tmp_path, with_reference):
    compute = {"lorsu": (1e12, 1.2e12), "lora-vlm": (2e13, 3e13), "zeroshot": None}  # paper_train_flops by seed
    for strategy, flops in compute.items():
        if strategy == "lora-vlm" and not with_reference:
            continue
        for seed in (0, 1):
            write_run(tmp_path / "runs", strategy, seed, [[0.1], [0.2], [0.3 + 0.1 * seed]], stream=DIGITS,
                      backbone="openclip:fscl-tiny", controls=[],
                      costs={"train_flops": flops[seed] / 2, "paper_train_flops": flops[seed]} if flops else {})
    report = write_report(tmp_path / "runs", tmp_path / "out", reference="lorsu")
    table = pd.read_csv(report.results_csv).set_index("strategy")
    assert table.loc["lorsu", "paper_train_flops_mean"] == pytest.approx(1.1e12)
    assert table.loc["lorsu", "train_flops_mean"] == pytest.approx(0.55e12)
    markdown = report.markdown.read_text()
    costs = next(line for line in markdown.splitlines() if line.startswith("| Strategy | n | Trainable incl."))
    assert "Train TFLOPs / session |" in costs and "Train TFLOPs / session (paper's count) |" in costs
    assert ("× lora-vlm (paper's count)" in costs) == with_reference
    lorsu = next(line for line in markdown.splitlines() if line.startswith("| lorsu | 2 |") and "0.55 ±" in line)
    assert "| 1.1 ± 0.141 |" in lorsu and (("| 0.044× |" in lorsu) == with_reference)  # 1.1 / 25 TFLOPs
    assert "| zeroshot | 2 |" in markdown
    if with_reference:
        assert table.loc["lora-vlm", "compute_ratio_mean"] == 1 and np.isnan(table.loc["zeroshot", "compute_ratio_mean"])
    compute_png = [p for p in report.figures if p.name.endswith("-compute.png")]
    assert len(compute_png) == 1 and f"]({compute_png[0].relative_to(report.markdown.parent).as_posix()})" in markdown


def test_cli_report_verb(tmp_path, capsys):
    write_run(tmp_path / "runs", "full-ft", 0, [[0.1], [0.2], [0.3]], stream=DIGITS, backbone="openclip:fscl-tiny",
              controls=[])
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--reference", "full-ft"]) == 0
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.html").is_file()
    printed = capsys.readouterr().out  # the headline table on the terminal, then where the report is
    assert printed.startswith("openclip:fscl-tiny · 5-shot · exp [random weights]\n| Strategy | n | digits TI (pp) |")
    assert "| full-ft | 1 | 20.0 |" in printed and "report: " in printed
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reports_import_only_benchmark():
    """The import direction of the house: reports -> benchmark, never strategies or streams."""
    for path in (Path(__file__).parents[1] / "reports").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"strategies", "streams"}, path


# Setting C (mini world, 2 sessions, control clean_a) with VQA at the ends: lorsu and lora over seeds 0-2.
VQA_START = [0.40, 0.70]  # VQA accuracy of target and clean_a before training
VQA_END = {  # after session 2: VQA TI and CC in the comments
    ("lorsu", 0): [0.50, 0.70], ("lorsu", 1): [0.56, 0.69], ("lorsu", 2): [0.52, 0.68],  # TI .10 .16 .12, CC 0 -.01 -.02
    ("lora", 0): [0.45, 0.60], ("lora", 1): [0.50, 0.62], ("lora", 2): [0.49, 0.58],  # TI .05 .10 .09, CC -.1 -.08 -.12
}


@pytest.fixture(scope="module")
def vqa_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa-runs")
    for (strategy, seed), end in VQA_END.items():
        write_run(root, strategy, seed, [[0.2, 0.6], [0.3, 0.6], [0.4, 0.5 + seed / 100]], controls=["clean_a"],
                  vqa={0: VQA_START, 2: end})
    write_run(root, "lorsu", 0, [[0.10], [0.30], [0.50]], stream=DIGITS, backbone="openclip:fscl-tiny", controls=[])
    return root


def test_vqa_numbers_are_aggregated_beside_zero_shot_with_paired_tests(vqa_runs):
    runset = scan_runs(vqa_runs)
    table = results_table(runset.finished, "lorsu")
    lorsu, lora = row_of(table, "lorsu"), row_of(table, "lora")
    assert lorsu["vqa_target_improvement_mean"] == pytest.approx(np.mean([0.10, 0.16, 0.12]))
    assert lorsu["vqa_target_improvement_std"] == pytest.approx(np.std([0.10, 0.16, 0.12], ddof=1))
    assert lora["vqa_control_change_mean"] == pytest.approx(-0.10)
    assert lora["vqa_target_forgetting_mean"] == pytest.approx(-np.mean([0.05, 0.10, 0.09]))  # A[0] - A[T]
    assert lora["vqa_target_final_mean"] == pytest.approx(np.mean([0.45, 0.50, 0.49]))
    assert lora["vqa_target_improvement_p"] == pytest.approx(
        stats.ttest_rel([0.05, 0.10, 0.09], [0.10, 0.16, 0.12]).pvalue)
    # TI 12.7 ± 3.1 against 8.0 ± 2.6: within the seeds' spread, no bold; CC -1.0 ± 1.0 against -10.0 ± 2.0: clear
    assert not lorsu["vqa_target_improvement_best"] and not lora["vqa_target_improvement_best"]
    assert lorsu["vqa_control_change_best"] and not lora["vqa_control_change_best"]
    assert lorsu["target_improvement_mean"] == pytest.approx(0.2)  # zero-shot, from the top-1 rows as before
    assert math.isnan(row_of(table, "lorsu", DIGITS)["vqa_target_improvement_mean"])  # that run had no VQA
    curves = curve_table(runset.scores, VQA)
    assert sorted(set(curves["session"])) == [0, 2] and set(curves["curve"]) == {"target", "control"}
    target = curves[(curves["strategy"] == "lora") & (curves["curve"] == "target") & (curves["session"] == 2)]
    assert target["mean"].item() == pytest.approx(np.mean([0.45, 0.50, 0.49]))
    markdown = results_text_table(table[table["stream"] == MINI], result_columns(VQA)).markdown()
    assert "| lorsu | 3 | 12.7 ± 3.1 | ref. | **-1.0 ± 1.0** | ref. |" in markdown


def test_a_report_with_vqa_puts_it_first_and_keeps_zero_shot(vqa_runs, tmp_path):
    report = write_report(vqa_runs, tmp_path, reference="lorsu")
    markdown = report.markdown.read_text()
    sections = {s.split("\n", 1)[0]: s for s in markdown.split("\n## ")}
    mini = next(s for h, s in sections.items() if h.startswith(MINI))
    vqa_at, zeroshot_at, costs_at = (mini.index(f"**{t}**") for t in (VQA.title, ZEROSHOT.title, "Costs"))
    assert vqa_at < zeroshot_at < costs_at
    assert mini.count("| Strategy | n | LR | TI (pp) | p (TI) | CC (pp) |") == 2
    vqa_part, zeroshot_part = mini[vqa_at:zeroshot_at], mini[zeroshot_at:costs_at]
    assert "Forgetting" not in vqa_part and "Forgetting (pp)" in zeroshot_part  # VQA scored 0 and T: it is -TI
    assert "| Final target acc. (%) |" in vqa_part
    names = {p.name for p in report.figures if p.suffix == ".png"}
    stem = slug(f"exp-{MINI}-mini-5shot")
    assert {f"{stem}-vqa-{kind}.png" for kind in ("curves", "tradeoff", "cost", "matrix")} <= names
    assert {f"{stem}-{kind}.png" for kind in ("curves", "tradeoff", "cost", "matrix")} <= names
    digits = next(s for h, s in sections.items() if h.startswith(DIGITS))
    assert VQA.title not in digits and not any(n.startswith(slug(f"exp-{DIGITS}")) and "-vqa-" in n for n in names)
    assert mini.index(f"{VQA.title}. Target accuracy") < mini.index("](figures/" + f"{stem}-curves.png")
    assert "VQA scored" in sections["How to read the tables"]
    csv = pd.read_csv(report.results_csv)
    assert csv.loc[csv["strategy"] == "lora", "vqa_control_change_mean"].dropna().tolist() == pytest.approx([-0.10])
    latex = report.results_latex.read_text()
    assert latex.index(VQA.title) < latex.index(ZEROSHOT.title)
    figure = matrix_figure(scan_runs(vqa_runs).scores, {f"exp/{MINI}/mini/lora/5-s0": "lora"}, "C", VQA)
    image = next(ax for ax in figure.axes if ax.images).images[0]
    assert image.get_array().shape == (2, 2) and figure.axes[-1].get_ylabel() == "VQA accuracy (%)"


def test_a_report_without_vqa_has_no_vqa_part(report):
    markdown = report.markdown.read_text()
    assert "VQA" not in markdown and "Zero-shot classification" not in markdown
    assert not any("-vqa-" in p.name for p in report.figures)
    assert not any(c.startswith("vqa_") for c in pd.read_csv(report.results_csv).columns)


# The table across settings: one family (exp, mini, 5-shot) with two targets, mini-shapes (the MATRICES above)
# and mini-signs (below, controls clean_a and clean_b); TI and CC in the comments.
SIGNS = "mini-signs"
SIGNS_END = {  # after session 2, from START
    ("lorsu", 0): [0.30, 0.60, 0.50], ("lorsu", 1): [0.32, 0.58, 0.50], ("lorsu", 2): [0.34, 0.60, 0.48],
    # TI .10 .12 .14, CC 0 -.01 -.01
    ("lora", 0): [0.60, 0.40, 0.30], ("lora", 1): [0.62, 0.40, 0.30], ("lora", 2): [0.58, 0.40, 0.30],
    # TI .40 .42 .38, CC -.20
}


@pytest.fixture(scope="module")
def across_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("across")
    for (strategy, seed), rows in MATRICES.items():
        if strategy in ("lorsu", "lora"):
            write_run(root, strategy, seed, [START, *rows])
    for (strategy, seed), end in SIGNS_END.items():
        write_run(root, strategy, seed, [START, START, end], stream=SIGNS)
    write_run(root, "lora", 3, [START, START, START], stream=SIGNS)  # a seed only one target has
    return root


def test_table_across_settings_means_and_the_bold_rule(across_runs):
    from reports.overview import MEAN, main_table, main_text_table

    table = main_table(scan_runs(across_runs).finished, ZEROSHOT, "lorsu")
    cell = table.set_index(["strategy", "target", "metric"])
    assert cell.loc[("lorsu", SIGNS, "target_improvement"), "mean"] == pytest.approx(0.12)
    assert cell.loc[("lora", SIGNS, "target_improvement"), "n"] == 4  # its seed 3 counts for mini-signs alone
    assert cell.loc[("lora", SIGNS, "target_improvement"), "mean"] == pytest.approx(np.mean([0.40, 0.42, 0.38, -0.0]))
    # Mean: per seed the mean over both targets, for the seeds finished on both (0-2)
    lorsu_mean = np.mean([TI["lorsu"], [0.10, 0.12, 0.14]], axis=0)
    assert cell.loc[("lorsu", MEAN, "target_improvement"), "mean"] == pytest.approx(lorsu_mean.mean())
    assert cell.loc[("lorsu", MEAN, "target_improvement"), "std"] == pytest.approx(np.std(lorsu_mean, ddof=1))
    assert cell.loc[("lora", MEAN, "target_improvement"), "n"] == 3
    lora_cc = np.mean([CC["lora"], [-0.20] * 3], axis=0)
    assert cell.loc[("lora", MEAN, "control_change"), "mean"] == pytest.approx(lora_cc.mean())
    # bold only where clear: mini-shapes TI 22 ± 2 against lora's 21 ± 3.6 is not, lorsu's CC -1 ± 0 against
    # -11.5 ± 0.9 is; mini-signs TI: lora's 30.0 ± 20.1 (its seed 3 at 0) is not clear of lorsu's 12 ± 2, lorsu's
    # CC -0.7 ± 0.6 against -15 ± 10 is; Mean TI: lora's 30.5 ± 2.6 against lorsu's 17.0 ± 1.7 is
    best = set(table.loc[table["best"], ["strategy", "target", "metric"]].itertuples(index=False, name=None))
    assert best == {("lorsu", MINI, "control_change"), ("lorsu", SIGNS, "control_change"),
                    ("lorsu", MEAN, "control_change"), ("lora", MEAN, "target_improvement")}

    text = main_text_table(table)
    assert text.groups == [("", 2), (MINI, 2), (SIGNS, 2), (MEAN, 2)]
    assert text.header == ["Strategy", "n", *["TI (pp)", "CC (pp)"] * 3]
    markdown = text.markdown()
    assert f"| Strategy | n | {MINI} TI (pp) | {MINI} CC (pp) | {SIGNS} TI (pp) |" in markdown
    assert "| lorsu | 3 | 22.0 ± 2.0 | **-1.0 ± 0.0** | 12.0 ± 2.0 |" in markdown
    assert "| lora | 3–4 |" in markdown
    latex = text.latex("Main table")
    assert r"\multicolumn{2}{c}{mini-shapes} & \multicolumn{2}{c}{mini-signs} & \multicolumn{2}{c}{Mean}" in latex
    assert r"\cmidrule(lr){3-4} \cmidrule(lr){5-6} \cmidrule(lr){7-8}" in latex
    assert r"\textbf{-1.0 $\pm$ 0.0}" in latex and latex.count(r"\toprule") == 1
    if shutil.which("pdflatex"):  # compile it with booktabs where a TeX is installed
        import subprocess

        doc = Path(across_runs) / "main.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + latex
                       + "\n\\end{document}\n")
        subprocess.run(["pdflatex", "-interaction=nonstopmode", doc.name], cwd=doc.parent, check=True,
                       capture_output=True)


def test_the_zero_shot_reference_is_never_the_best_of_the_table_across_settings(tmp_path):
    # zeroshot's CC is 0 ± 0 by construction, clear of lorsu's -1 ± 0: it trains nothing, so it is no "best"
    for seed in range(3):
        write_run(tmp_path, "lorsu", seed, [START, *MATRICES[("lorsu", seed)]])
        write_run(tmp_path, "ln", seed, [START, *MATRICES[("ln", seed)]])
        write_run(tmp_path, "zeroshot", seed, [START, START, START])
    from reports.overview import main_table

    table = main_table(scan_runs(tmp_path).finished, ZEROSHOT, "lorsu")
    best = set(table.loc[table["best"], ["strategy", "metric"]].itertuples(index=False, name=None))
    # ln's CC 0 ± 0 against lorsu's -1 ± 0, its TI 27 ± 2 against 22 ± 2 (a gap of 5 beyond the stds' 4)
    assert best == {("ln", "control_change"), ("ln", "target_improvement")}


def test_a_report_opens_with_the_table_across_settings(across_runs, tmp_path):
    report = write_report(across_runs, tmp_path)
    markdown = report.markdown.read_text()
    assert markdown.index("## Main results across settings") < markdown.index(f"## {MINI}")
    assert "mean ± std intervals do not overlap" in markdown
    csv = pd.read_csv(report.main_csv)
    assert set(csv["target"]) == {MINI, SIGNS, "Mean"} and set(csv["evaluation"]) == {"zeroshot"}
    assert report.main_latex.read_text().count(r"\begin{table}") == 1
    assert (tmp_path / "figures" / "main-exp-mini-5shot.png").is_file()
    assert report.headline.startswith("mini · 5-shot · exp") and "| lorsu | 3 |" in report.headline


def test_clear_best_needs_three_seeds_and_a_gap_beyond_the_spread():
    from reports.tables import clear_best

    mean, std = pd.Series([0.30, 0.20, 0.10]), pd.Series([0.02, 0.02, 0.01])
    assert clear_best(mean, std, pd.Series([3, 3, 3]), "higher").tolist() == [True, False, False]
    assert not clear_best(mean, std, pd.Series([3, 2, 3]), "higher").any()  # the runner-up has n < 3
    assert not clear_best(mean, pd.Series([0.06, 0.05, 0.0]), pd.Series([3, 3, 3]), "higher").any()  # 10 < 11
    assert clear_best(mean, std, pd.Series([3, 3, 3]), "lower").tolist() == [False, False, True]
    # a strategy that trains nothing is never the best of a cost column
    eligible = pd.Series([True, True, False])
    assert clear_best(mean, std, pd.Series([3, 3, 3]), "lower", eligible).tolist() == [False, True, False]


def test_twelve_strategies_get_twelve_styles_fixed_per_strategy():
    builtins = ["zeroshot", "full-ft", "ewc", "layernorm", "lora", "spu", "lorsu", "lora-ppl", "lorsu-ppl"]
    outside = ["l2sp", "mine", "zz-new"]
    styles = strategy_styles(strategy_order([*builtins, *outside], "lorsu"), "lorsu")
    assert len(styles) == 12 and len(set(styles.values())) == 12
    assert len({s.color for s in styles.values()}) == 12 and len({(s.color, s.marker) for s in styles.values()}) == 12
    assert styles["lorsu"] == REFERENCE_STYLE and styles["zeroshot"] == ZEROSHOT_STYLE
    assert styles["zeroshot"].linestyle == "--"
    builtin_looks = {(s.color, s.marker) for name, s in styles.items() if name in builtins}
    assert all(styles[o].color not in {c for c, _ in builtin_looks} for o in outside)
    assert all(styles[o].marker not in {m for _, m in builtin_looks} for o in outside)
    # the same strategy keeps its style whatever else a report holds; another reference takes the reference style
    assert strategy_styles(["lora", "zeroshot"], "lorsu")["lora"] == styles["lora"]
    other = strategy_styles(["lorsu", "full-ft"], "full-ft")
    assert other["full-ft"] == REFERENCE_STYLE and other["lorsu"] != REFERENCE_STYLE


def test_a_random_weights_backbone_gets_the_banner(runs_dir, report):
    from reports.frame import has_random_weights

    assert has_random_weights("openclip:fscl-tiny") and not has_random_weights("openclip:ViT-B-16@openai")
    assert not has_random_weights("openclip:local-dir:/models/mini") and not has_random_weights("mini")
    markdown = report.markdown.read_text()
    assert "**This report contains runs on backbones with random weights**" in markdown
    assert f"## {DIGITS} · openclip:fscl-tiny · 5-shot · exp [random weights]" in markdown
    assert "random weights" not in markdown.split(f"## {MINI}")[1].split("\n", 1)[0]


def test_honest_figures_chance_lines_minimum_spans_and_no_log_point_for_zero_training(tmp_path):
    root = tmp_path / "runs"
    for seed, ti in enumerate([0.004, 0.006, 0.005]):  # TI of half a point: no trend to blow up
        write_run(root, "lorsu", seed, [START, START, [0.20 + ti, 0.60, 0.50]])
        zeroshot = write_run(root, "zeroshot", seed, [START, START, START])
        write_json(zeroshot / "manifest.json", {**RunRecord(zeroshot).manifest(), "classes": {
            MINI: 10, "clean_a": 4, "clean_b": 2}})
    runset = scan_runs(root)
    zeroshot_runs = runset.finished[runset.finished["strategy"] == "zeroshot"]
    assert zeroshot_runs["chance_target"].tolist() == pytest.approx([0.1] * 3)
    assert zeroshot_runs["chance_control"].tolist() == pytest.approx([(1 / 4 + 1 / 2) / 2] * 3)
    assert zeroshot_runs["vqa_chance_target"].tolist() == pytest.approx([1 / 5] * 3)  # min(5, 10) options
    table = results_table(runset.finished, "lorsu")
    styles = strategy_styles(strategy_order(table["strategy"], "lorsu"), "lorsu")
    curves = curves_figure(curve_table(runset.scores), styles, "A", chance={"target": 0.1})
    target, control = curves.axes
    low, high = target.get_ylim()
    assert low <= 10.0 and high - low >= 10.0  # covers chance
    assert any(line.get_ydata()[0] == pytest.approx(10.0) for line in target.get_lines()[2:])  # the chance line
    low, high = control.get_ylim()
    assert high - low >= 10.0  # flat at 55 %: at least 10 pp shown
    # a chance level far below the curves (the controls at 55 %, chance 20 %) is named in the legend, not drawn into
    # the range, which would flatten every change into the line
    far = curves_figure(curve_table(runset.scores), styles, "A", chance={"target": 0.1, "control": 0.2}).axes[1]
    assert far.get_ylim()[0] > 20.0 + 10.0 and far.get_ylim()[1] - far.get_ylim()[0] >= 10.0
    assert [t.get_text() for t in far.get_legend().get_texts()] == ["chance (20 %, below the axis)"]
    tradeoff = tradeoff_figure(table, styles, "A")
    assert np.ptp(tradeoff.axes[0].get_xlim()) >= 4.0 and np.ptp(tradeoff.axes[0].get_ylim()) >= 4.0
    # zeroshot takes a little time per session, but trains nothing: no point on the log axes
    rows = table.assign(train_seconds_mean=table["train_seconds_mean"].where(table["strategy"] != "zeroshot", 0.5))
    cost = cost_figure(rows, styles, "A")
    assert all([c.get_label() for c in ax.containers] == ["lorsu"] for ax in cost.axes)
    cost.canvas.draw()  # the time axis spans under a decade: plain numbers, not 2 × 10^0
    labels = [t.get_text() for t in [*cost.axes[1].xaxis.get_majorticklabels(), *cost.axes[1].xaxis.get_minorticklabels()]]
    assert not any("times" in label or "^" in label for label in labels) and any(label for label in labels)
    assert not row_of(table, "zeroshot")["train_seconds_best"] and not row_of(table, "zeroshot")["trainable_best"]


def test_jobs_note_and_learning_rates_in_the_report(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        path = write_run(root, "lorsu", seed, [START, *MATRICES[("lorsu", seed)]])
        RunRecord(path).update_manifest(jobs=2, threads=1)
        write_run(root, "zeroshot", seed, [START, START, START])
    report = write_report(root, tmp_path / "out")
    markdown = report.markdown.read_text()
    assert "**Timings from processes sharing cores:** 3 of the 6 run(s)" in markdown and "--jobs 2" in markdown
    assert "| lorsu | 3 | 1e-05 | 22.0 ± 2.0 | ref. |" in markdown  # the run's train.lr (Config's default); alone
    # among the strategies that train: no best
    assert "| zeroshot | 3 | – | 0.0 ± 0.0 |" in markdown  # trains nothing: no rate


def test_the_configuration_section_reads_old_and_new_records_alike(tmp_path):
    # An old record holds no default options (lorsu.rank left at 64) and another strategy's section; a new
    # one holds its strategy's options resolved. Read as before, the report said "lorsu.rank 8, shared by all".
    root = tmp_path / "runs"
    old = write_run(root, "lorsu", 0, [START, *MATRICES[("lorsu", 0)]])
    new = write_run(root, "lorsu", 1, [START, *MATRICES[("lorsu", 1)]])
    other = write_run(root, "lora", 0, [START, *MATRICES[("lora", 0)]])
    for path, sections in ((old, {"lora": {"rank": 8}}), (new, {"lorsu": {"rank": 8}}), (other, {"lora": {"rank": 8}})):
        config = yaml.safe_load((path / "config.yaml").read_text())
        config.pop("lorsu", None)
        config.update(sections)
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    sections = {s.split("\n", 1)[0]: s for s in write_report(root, tmp_path / "out").markdown.read_text().split("\n## ")}
    assert "| lorsu.rank | 8, 64 |" in sections["Configuration"]
    assert "| lora.rank | 8 |" in sections["Configuration"]  # the lora run's only: the lorsu run's old section is not read


def test_the_table_across_settings_keeps_a_target_without_vqa_beside_one_with_it(across_runs, tmp_path):
    """One family, two targets: VQA on mini-shapes only. The VQA table has mini-shapes' cells and no mini-signs
    column to read (the runs there have no VQA), instead of failing on it."""
    from reports.overview import main_table

    shutil.copytree(across_runs, tmp_path / "runs")
    for seed in range(3):  # the mini-shapes runs again, now with VQA at the ends
        write_run(tmp_path / "runs", "lorsu", seed, [START, *MATRICES[("lorsu", seed)]],
                  vqa={0: [0.40, 0.70, 0.50], 2: [0.50 + 0.01 * seed, 0.70, 0.50]})
    table = main_table(scan_runs(tmp_path / "runs").finished, VQA, "lorsu")
    cell = table.set_index(["strategy", "target", "metric"])
    assert cell.loc[("lorsu", MINI, "target_improvement"), "mean"] == pytest.approx(0.11)
    assert cell.loc[("lorsu", SIGNS, "target_improvement"), "n"] == 0
    assert "## Main results across settings" in write_report(tmp_path / "runs", tmp_path / "out").markdown.read_text()
