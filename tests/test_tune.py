"""``fscl tune``: the validation protocol (no test split is read), the criterion, and the tuned config's runs."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import ClassVar

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.registry import STREAMS
from benchmark.tune import TuneOptions, _table_csv, _table_text, choose, fallbacks, lr_grid, refinements, tune_grid
from streams.digits import Digits
from streams.sampling import held_out


class TrainOnly(Digits):
    """The real handwritten digits, but reading the test split fails (a validation run must never)."""

    opened: ClassVar[list[tuple[str, str]]] = []  # (stream, split) of every split read

    def dataset(self, split):
        TrainOnly.opened.append((self.spec.name, split))
        if split == "test":
            raise AssertionError(f"{self.spec.name}: a validation run read the test split")
        return super().dataset(split)


@STREAMS.register("test-train-only-target")
class TrainOnlyTarget(TrainOnly):
    """The tune test's target: digits whose test split must stay closed."""

    spec = dataclasses.replace(Digits.spec, name="test-train-only-target")


@STREAMS.register("test-train-only-control")
class TrainOnlyControl(TrainOnly):
    """The tune test's control: digits whose test split must stay closed."""

    spec = dataclasses.replace(Digits.spec, name="test-train-only-control")


def test_tune_never_reads_a_test_split_and_its_config_runs(tmp_path):
    tuned = tmp_path / "tuned.yaml"
    TrainOnly.opened.clear()
    assert main(["tune", "quick", f"out={tmp_path}", "stream=test-train-only-target", "seed=0", "train.epochs=1",
                 "controls=[test-train-only-control]", "strategy=[zeroshot,full-ft]", "train.lr=[1e-4,2e-3]",
                 "--validation-per-class", "5", "--no-progress", "--out", str(tuned)]) == 0
    assert {split for _, split in TrainOnly.opened} == {"train"}
    assert {name for name, _ in TrainOnly.opened} == {"test-train-only-target", "test-train-only-control"}

    train_ids = set(Digits("unused").dataset("train").ids)
    runs = sorted((tmp_path / "quick-tune").rglob("validation.json"))
    assert [r.parent.relative_to(tmp_path).as_posix() for r in runs] == [  # zeroshot has nothing to tune
        f"quick-tune/test-train-only-target/openclip-fscl-tiny/full-ft/lr={lr}/5-s0" for lr in ("0.0001", "0.002")]
    for path in runs:
        held = json.loads(path.read_text())
        shots = {i for ids in json.loads((path.parent / "samples.json").read_text()).values() for i in ids}
        target, control = set(held["test-train-only-target"]), set(held["test-train-only-control"])
        assert len(target) == len(control) == 5 * 10 and target | control | shots <= train_ids
        assert not target & shots  # the sessions never draw a validation image
        evaluated = {json.loads(line)["total"] for line in (path.parent / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["metric"] == "top1"}
        assert evaluated == {50}  # target and control: their 50 validation images each

    table = list(csv.DictReader((tmp_path / "quick-tune" / "tune.csv").open()))
    assert [(r["strategy"], float(r["train.lr"])) for r in table] == [("full-ft", 1e-4), ("full-ft", 2e-3)]
    rows = [{"strategy": r["strategy"], "candidate": {"train.lr": float(r["train.lr"])}, "ti": float(r["ti"]),
             "cc": float(r["cc"])} for r in table]
    text = tuned.read_text()
    data = yaml.safe_load(text)
    assert data["full-ft"] == {"train": {"lr": choose(rows, "constrained", 1.0)["full-ft"]["train.lr"]}}
    assert data["name"] == "quick-tuned" and "lr" not in data.get("train", {})  # the swept key: per strategy
    assert "no test split is read" in text and "Criterion constrained" in text and "tolerance 1 pp" in text

    # the tuned config is a preset for fscl run (on the plain digits: test splits are for real runs)
    assert main(["run", str(tuned), "stream=digits", "controls=[]", "--no-progress"]) == 0
    config = yaml.safe_load(next((tmp_path / "quick-tuned").rglob("full-ft/5-s0/config.yaml")).read_text())
    assert config["train"]["lr"] == data["full-ft"]["train"]["lr"] and "full-ft" not in config


ROWS = [  # hand-made validation scores (fractions): full-ft and lorsu over three learning rates
    {"strategy": "full-ft", "candidate": {"train.lr": 1e-5}, "ti": 0.05, "cc": -0.002},
    {"strategy": "full-ft", "candidate": {"train.lr": 1e-4}, "ti": 0.15, "cc": -0.03},
    {"strategy": "full-ft", "candidate": {"train.lr": 1e-3}, "ti": None, "cc": None},  # a failed run
    {"strategy": "lorsu", "candidate": {"train.lr": 1e-5}, "ti": 0.02, "cc": -0.020},
    {"strategy": "lorsu", "candidate": {"train.lr": 1e-4}, "ti": 0.10, "cc": -0.015},
    {"strategy": "lorsu", "candidate": {"train.lr": 1e-3}, "ti": 0.30, "cc": -0.100},
]


@pytest.mark.parametrize("criterion, tolerance, full_ft, lorsu", [
    ("constrained", 1.0, 1e-5, 1e-4),  # full-ft: only 1e-5 within 1 pp; lorsu: none within, the largest CC
    ("constrained", 2.0, 1e-5, 1e-4),  # lorsu: 1e-5 and 1e-4 within 2 pp, 1e-4 gains more
    ("constrained", 3.0, 1e-4, 1e-4),
    ("constrained", 10.0, 1e-4, 1e-3),
    ("target", 0.0, 1e-4, 1e-3),  # a failed candidate is never chosen
    ("sum", 0.0, 1e-4, 1e-3),  # 0.15 - 0.03 > 0.05 - 0.002; 0.30 - 0.10 > 0.10 - 0.015
])
def test_the_criterion_picks_from_hand_made_validation_scores(criterion, tolerance, full_ft, lorsu):
    chosen = choose(ROWS, criterion, tolerance)
    assert chosen == {"full-ft": {"train.lr": full_ft}, "lorsu": {"train.lr": lorsu}}


def test_a_fallback_is_marked_in_the_table_and_its_csv():
    """lorsu has no candidate within 1 pp (CC -2.0, -1.5, -10.0): its chosen 1e-4 is the largest CC, a fallback."""
    assert fallbacks(ROWS, "constrained", 1.0) == ["lorsu"]
    assert fallbacks(ROWS, "constrained", 2.0) == [] and fallbacks(ROWS, "target", 0.0) == []
    chosen, rows = choose(ROWS, "constrained", 1.0), [{**r, "runs": 2, "failed": 0, "basis": "zeroshot"} for r in ROWS]
    text = _table_text(rows, chosen, ["lorsu"])
    assert "| lorsu *! | train.lr=0.0001 |" in text and "| full-ft * | train.lr=1e-05 |" in text
    table = list(csv.DictReader(io.StringIO(_table_csv(rows, chosen, ["lorsu"]))))
    assert [(r["strategy"], r["chosen"], r["fallback"]) for r in table if r["chosen"] == "True"] == [
        ("full-ft", "True", "False"), ("lorsu", "True", "True")]


def test_refinements_name_a_coarse_edge_and_a_grid_end_only():
    """full-ft's 1e-5 keeps CC -0.2 of the 1 pp allowed and 1e-4 gains more at -3.0: the edge lies between;
    lora's best is the grid's largest value with TI rising; lorsu (a fallback) and spu (its choice uses most of
    the tolerance) get no note, nor does any strategy under another criterion."""
    rows = [*ROWS, {"strategy": "lora", "candidate": {"train.lr": 1e-5}, "ti": 0.01, "cc": 0.0},
            {"strategy": "lora", "candidate": {"train.lr": 1e-4}, "ti": 0.03, "cc": -0.001},
            {"strategy": "spu", "candidate": {"train.lr": 1e-5}, "ti": 0.04, "cc": -0.008},
            {"strategy": "spu", "candidate": {"train.lr": 1e-4}, "ti": 0.09, "cc": -0.04}]
    notes = refinements(rows, choose(rows, "constrained", 1.0), "constrained", 1.0)
    assert sorted(notes) == ["full-ft", "lora"]
    assert "between train.lr=1e-05 (CC -0.2 pp) and 0.0001 (TI 15.0, CC -3.0 pp)" in notes["full-ft"]
    assert "train.lr=0.0001 is the grid's largest value" in notes["lora"]
    assert refinements(rows, choose(rows, "target", 0.0), "target", 0.0) == {}


def test_a_vqa_only_tune_chooses_on_the_vqa_numbers_and_says_so(tmp_path, tiny_llava, capsys):
    """Runs with evaluate: [vqa] have no zero-shot TI / CC: the tune reads their summary's vqa block, names that
    basis in the tuned config and tune.csv, and the tune's report scores its sweep on VQA too."""
    from reports import write_report
    from reports.frame import VQA

    tuned = tmp_path / "tuned.yaml"
    assert main(["tune", "quick", f"out={tmp_path}", "seed=0", "train.epochs=1", "strategy=[zeroshot,full-ft]",
                 f"vqa.model=llava:{tiny_llava}", "evaluate=[vqa]", "train.lr=[1e-4,1e-1]", "--validation-per-class", "3",
                 "--no-progress", "--out", str(tuned)]) == 0
    runs = tmp_path / "quick-tune" / "digits" / "openclip-fscl-tiny" / "full-ft"
    ti = {lr: json.loads((runs / f"lr={lr}" / "5-s0" / "summary.json").read_text())["vqa"]["target_improvement"]
          for lr in ("0.0001", "0.1")}
    table = list(csv.DictReader((tmp_path / "quick-tune" / "tune.csv").open()))
    assert [(r["train.lr"], float(r["ti"]), r["basis"]) for r in table] == [
        (lr, pytest.approx(value), "vqa") for lr, value in ti.items()]
    text = tuned.read_text()
    assert "Basis: the validation TI / CC of VQA" in text and "zero-shot classification" not in text
    assert "Basis: the validation TI / CC of VQA" in capsys.readouterr().out  # on the terminal too
    best = max(ti, key=lambda lr: (ti[lr], lr == "0.0001"))  # no controls: the larger TI, ties to the earlier
    assert yaml.safe_load(text)["full-ft"] == {"train": {"lr": float(best)}}
    markdown = write_report(tmp_path / "quick-tune", tmp_path / "report").markdown.read_text()
    sweeps = markdown[markdown.index("## Sweeps and ablations"):]
    assert f"Every number is of {VQA.title}" in sweeps and "| train.lr | n | TI (pp) | p (TI) |" in sweeps


def test_a_strategy_that_trains_only_the_vlm_is_tuned_on_vqa(tmp_path, tiny_llava):
    """lora-llm's zero-shot rows are the pretrained encoder's (TI 0 at every rate): its candidates are scored on VQA,
    beside full-ft's zero-shot scores in the same tune."""
    assert main(["tune", "quick", f"out={tmp_path}", "seed=0", "sessions=1", "train.epochs=1",
                 "strategy=[full-ft,lora-llm]", f"vqa.model=llava:{tiny_llava}", "train.lr=[1e-3,1e-1]",
                 "--validation-per-class", "3", "--no-progress", "--out", str(tmp_path / "tuned.yaml")]) == 0
    table = list(csv.DictReader((tmp_path / "quick-tune" / "tune.csv").open()))
    assert {(r["strategy"], r["basis"]) for r in table} == {("full-ft", "zeroshot"), ("lora-llm", "vqa")}


def test_ties_go_to_the_earlier_candidate_and_all_failed_is_left_out():
    rows = [{"strategy": "lora", "candidate": {"train.lr": lr}, "ti": 0.1, "cc": 0.0} for lr in (1e-5, 1e-4)]
    rows.append({"strategy": "spu", "candidate": {"train.lr": 1e-5}, "ti": None, "cc": None})
    assert choose(rows, "constrained", 1.0) == {"lora": {"train.lr": 1e-5}}


def test_tune_grid_sweeps_the_strategies_that_train_and_keeps_controls_with_a_training_split():
    base = load_config("mini", ["controls=[mini-shapes,dalle]", "lorsu.train.lr=1e-3"])
    grid, left_out = tune_grid(base, TuneOptions(validation_per_class=7))
    assert left_out == ["dalle"] and grid.controls == ["mini-shapes"] and grid.name == "mini-tune"
    assert "zeroshot" not in grid.strategy and grid.validation_per_class == 7
    assert grid.sweeps == {"train.lr": lr_grid(5e-5)} == {"train.lr": [1.6e-5, 5e-5, 1.6e-4, 5e-4, 1.6e-3]}
    lorsu = [r for r in grid.expand() if r.strategy == "lorsu"]
    assert sorted(r.train.lr for r in lorsu) == sorted(lr_grid(5e-5) * 6)  # the sweep decides lorsu's lr too
    with pytest.raises(ConfigError, match="a tune sweeps train.. keys or the options of a strategy it tunes"):
        tune_grid(load_config("mini", ["mini-signs.train_per_class=[20,40]"]), TuneOptions())


def test_validation_images_are_held_out_of_the_training_split_disjoint_and_seeded():
    stream = Digits("unused")
    view = stream.validation(8, seed=0)
    train, held = view.dataset("train"), view.dataset("test")
    assert len(held) == 80 and set(held.ids) | set(train.ids) == set(stream.dataset("train").ids)
    assert not set(held.ids) & set(train.ids)
    assert Digits("unused").validation(8, seed=0).dataset("test").ids == held.ids  # seeded
    assert Digits("unused").validation(8, seed=1).dataset("test").ids != held.ids
    sessions = view.sessions(5, 5, shot_seed=0)
    assert not {i for s in sessions for i in s.ids} & set(held.ids)
    assert held_out([0, 0, 0, 1], 5, 0, "x") in ([0], [1], [2])  # at most half of a class: class 1 keeps its image


def test_tune_shards_its_grid_and_writes_the_config_once_every_run_is_done(tmp_path, monkeypatch, capsys):
    argv = ["tune", "quick", f"out={tmp_path}", "seed=0", "train.epochs=1", "sessions=1", "strategy=full-ft",
            "train.lr=[1e-4,1e-3]", "--no-progress"]
    assert main([*argv, "--dry-run"]) == 0
    assert "2 run(s) of 'quick-tune'" in capsys.readouterr().out
    tuned = tmp_path / "quick-tune" / "tuned.yaml"
    monkeypatch.setenv("FSCL_SHARD_COUNT", "2")
    monkeypatch.setenv("FSCL_SHARD_INDEX", "0")
    assert main(argv) == 0
    assert "1 tune run(s) not finished" in capsys.readouterr().err and not tuned.exists()
    monkeypatch.setenv("FSCL_SHARD_INDEX", "1")
    assert main(argv) == 0 and tuned.is_file()  # the last shard to finish writes it
    monkeypatch.delenv("FSCL_SHARD_COUNT")
    capsys.readouterr()
    assert main(argv) == 0  # again: every run is skipped, the same choice
    assert "0 finished, 2 skipped" in capsys.readouterr().out
