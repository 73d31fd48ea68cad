"""End-to-end runs through ``fscl run``: records, determinism, skipping, failures, bad input."""
import json

import pytest
import torch
import yaml

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.grid import run_grid
from benchmark.plugins import StrategyPlugin
from benchmark.registry import STRATEGIES, STREAMS
from benchmark.runs import run_dir
from streams.base import Stream, StreamDataError, StreamSpec, open_image
from streams.digits import Digits

RUN_FILES = {"config.yaml", "manifest.json", "samples.json", "metrics.jsonl", "matrix.csv", "summary.json"}


@STRATEGIES.register("test-nan-after-1")
class PoisonAfterFirstSession(StrategyPlugin):
    """Test strategy: trains like full-ft, but breaks the weights in session 2 (non-finite loss)."""

    def setup(self, session):
        self.backbone.visual.requires_grad_(True)
        if session.session_index == 2:
            with torch.no_grad():
                self.backbone.visual.proj.fill_(float("nan"))


def _run(tmp_path, *overrides) -> int:
    return main(["run", "quick", f"out={tmp_path}", "--no-progress", "seed=0", "train.epochs=1", *overrides])


def test_run_writes_complete_records_and_rerun_skips(tmp_path, capsys):
    assert _run(tmp_path, "strategy=[zeroshot,full-ft]") == 0
    cfg = load_config("quick", [f"out={tmp_path}", "seed=0", "train.epochs=1"])
    path = run_dir(cfg.expand()[1])
    assert path.parts[-5:] == ("quick", "digits", "openclip-fscl-tiny", "full-ft", "5-s0")
    assert RUN_FILES <= {p.name for p in path.iterdir()}

    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["strategy"] == "full-ft" and config["seed"] == 0 and config["train"]["epochs"] == 1
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert {"torch", "open_clip_torch", "avalanche-lib", "fscl-bench", "python"} <= set(manifest["versions"])
    assert manifest["seeds"] == {"seed": 0, "shot_seed": 0} and manifest["samples"]["count"] == 50
    assert manifest["device"] == "cpu"  # the device as resolved (device: auto)
    samples = json.loads((path / "samples.json").read_text())
    assert [len(v) for v in samples.values()] == [25, 25]

    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    # per session: top1 + one per class group, + top1_seen after session 0
    assert len(rows) == 3 * 3 + 2
    assert {r["metric"] for r in rows} == {"top1", "top1_seen", "top1_s1", "top1_s2"}
    final = [r for r in rows if r["session"] == 2]
    top1 = next(r for r in final if r["metric"] == "top1")
    groups = [r for r in final if r["metric"].startswith("top1_s") and r["metric"] != "top1_seen"]
    assert top1["correct"] == sum(r["correct"] for r in groups) and top1["total"] == 540

    summary = json.loads((path / "summary.json").read_text())
    assert summary["target_improvement"] == pytest.approx(summary["target_final"] - summary["target_initial"])
    assert [s["session"] for s in summary["costs"]["sessions"]] == [1, 2]
    assert summary["costs"]["sessions"][0]["trainable"] == summary["costs"]["visual_parameters"]

    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    capsys.readouterr()
    assert _run(tmp_path, "strategy=[zeroshot,full-ft]") == 0
    assert "0 finished, 2 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_same_seeds_give_identical_matrix(tmp_path):
    for sub in ("a", "b"):  # 2 epochs: a session is one batch and the first step runs at min_lr
        assert _run(tmp_path / sub, "strategy=full-ft", "train.epochs=2") == 0
    rel = "quick/digits/openclip-fscl-tiny/full-ft/5-s0/matrix.csv"
    first, second = (tmp_path / "a" / rel).read_text(), (tmp_path / "b" / rel).read_text()
    assert first == second
    assert _run(tmp_path / "c", "strategy=full-ft", "train.epochs=2", "seed=1") == 0
    assert (tmp_path / "c" / rel.replace("5-s0", "5-s1")).read_text() != first


def test_row_zero_is_the_standalone_zero_shot_accuracy(tmp_path, tiny_backbone):
    assert _run(tmp_path, "strategy=zeroshot") == 0
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    stream = Digits("unused")
    data = stream.dataset("test").with_transform(tiny_backbone.preprocess(False))
    expected = ZeroShotEvaluator(tiny_backbone).accuracy(data, "digits", stream.spec.class_names,
                                                        stream.spec.templates)
    assert summary["target_initial"] == pytest.approx(expected, abs=1e-12)
    assert summary["target_improvement"] == 0.0  # zero-shot never changes the model


def test_non_finite_loss_fails_that_run_keeps_evaluated_sessions_and_grid_goes_on(tmp_path, capsys):
    assert _run(tmp_path, "strategy=[test-nan-after-1,zeroshot]") == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "non-finite loss" in err
    failed = tmp_path / "quick/digits/openclip-fscl-tiny/test-nan-after-1/5-s0"
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "session 2" in manifest["reason"]
    summary = json.loads((failed / "summary.json").read_text())
    assert summary["sessions"] == 1
    matrix = (failed / "matrix.csv").read_text().splitlines()
    assert matrix[2].split(",")[1] != "" and matrix[3].split(",")[1] == ""  # session 1 kept, 2 empty
    other = json.loads((tmp_path / "quick/digits/openclip-fscl-tiny/zeroshot/5-s0/manifest.json").read_text())
    assert other["status"] == "finished"


def test_dry_run_lists_the_grid(tmp_path, capsys):
    assert main(["run", "quick", f"out={tmp_path}", "seed=0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 run(s)" in out and not tmp_path.joinpath("quick").exists()


def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path, capsys):
    assert main(["run", "quick", "strategy=lorsuu", f"out={tmp_path}"]) == 2
    assert "unknown strategy 'lorsuu'" in capsys.readouterr().err


@STREAMS.register("test-folder-stream")
class FolderStream(Stream):
    """Test stream with an on-disk folder."""

    spec = StreamSpec("test-folder-stream", 1, ("a", "b"), ("{}",), (0, 1))
    folder = "my-folder"
    layout = "my-folder/<class>/*.png"

    def dataset(self, split):  # pragma: no cover - never reached: the root is missing
        raise AssertionError


def test_missing_dataset_root_names_the_path_and_layout(tmp_path, capsys):
    with pytest.raises(StreamDataError) as err:
        FolderStream(tmp_path)
    assert str(tmp_path / "my-folder") in str(err.value) and "my-folder/<class>/*.png" in str(err.value)
    assert main(["run", "quick", "stream=test-folder-stream", f"data_root={tmp_path}", f"out={tmp_path}"]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(StreamDataError, match="broken.jpg"):
        open_image(bad)


def test_grid_api_returns_outcomes(tmp_path):
    cfg = load_config("quick", [f"out={tmp_path}", "seed=0", "strategy=zeroshot", "sessions=1"])
    (outcome,) = run_grid(cfg, progress=False)
    assert outcome.status == "finished"
    summary = json.loads((outcome.path / "summary.json").read_text())
    assert summary["sessions"] == 1 and summary["costs"]["sessions"][0]["trainable"] == 0
