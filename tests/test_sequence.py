"""Sequence streams (MTIL's protocol): whole datasets as sessions, each evaluated among its own classes; ZSCL's
Transfer/Avg/Last; ``shots: all``; ``session_order``; bad sequences refused before any training."""
from __future__ import annotations

import json
import re
from pathlib import Path

import fscl_test_strategies
import numpy as np
import pytest
from test_streams_layouts import write_eurosat, write_image

from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.metrics import AccuracyMatrix, sequence_metrics, summarize
from benchmark.runs import run_data
from streams.options import SequenceOptions
from streams.sequence import Datasets

DATASETS = ["digits", "mini-colours", "mini-shapes"]
SEQUENCE = "sequence.datasets=[digits,mini-colours]"
RUN = "quick/sequence/openclip-fscl-tiny/{}/5-s0"


def zscl_statistics(arr: np.ndarray) -> tuple[float, float, float]:
    """ZSCL's ``results.ipynb`` ``statistics`` (its arithmetic, for a T×T matrix in training order)."""
    avg = arr.mean(axis=0)
    last = np.array(arr[-1, :])
    transfer = np.array([np.mean([arr[j, i] for j in range(i)]) for i in range(1, arr.shape[0])])
    return transfer.mean(), avg.mean(), last.mean()


def test_transfer_avg_last_equal_a_hand_computation_and_zscls_formulas():
    m = AccuracyMatrix.empty("seq", [], 3)
    m.groups[:] = [[0.10, 0.20, 0.30],  # the pretrained row: not part of MTIL's matrix
                   [0.90, 0.40, 0.50],
                   [0.80, 0.70, 0.60],
                   [0.60, 0.50, 1.00]]
    m.values[:, 0] = m.groups.mean(axis=1)
    out = sequence_metrics(m, ["a", "b", "c"])
    # by hand: transfer b = X[0, b] = 0.4; c = (0.5 + 0.6) / 2 = 0.55; avg a = (0.9 + 0.8 + 0.6) / 3
    assert out["transfer"] == pytest.approx({"b": 0.40, "c": 0.55})
    assert out["avg"] == pytest.approx({"a": 2.3 / 3, "b": 1.6 / 3, "c": 2.1 / 3})
    assert out["last"] == pytest.approx({"a": 0.6, "b": 0.5, "c": 1.0})
    assert (out["transfer_mean"], out["avg_mean"], out["last_mean"]) == pytest.approx(
        zscl_statistics(m.groups[1:]))
    assert summarize(m, ["a", "b", "c"])["sequence"]["avg_mean"] == pytest.approx(6.0 / 9)
    assert "sequence" not in summarize(m)
    m.groups[3, 1] = np.nan  # an unfinished run has no MTIL metrics
    assert sequence_metrics(m, ["a", "b", "c"]) == {}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory) -> Datasets:
    return Datasets(tmp_path_factory.mktemp("data"), SequenceOptions(datasets=list(DATASETS)))


def test_a_sequence_has_global_labels_one_session_per_dataset_and_each_datasets_texts(sequence):
    spec = sequence.spec
    assert spec.offsets == (0, 10, 18) and len(spec.class_names) == 24
    train = sequence.listed("train")
    assert train.ids[0] == "digits/" + sequence.members[0].listed("train").ids[0]
    assert sorted(set(train.targets)) == list(range(24))
    assert spec.captions(12) == ["a blue shape."]  # mini-colours' first (training) template
    sessions = sequence.sessions(3, 2, 0)
    assert [s.classes for s in sessions] == [list(range(10)), list(range(10, 18)), list(range(18, 24))]
    assert sequence.session_datasets(sessions) == DATASETS
    key, names, templates, images = sequence.session_eval(sessions[1])
    colours = sequence.members[1]
    assert (key, names, templates) == ("sequence:mini-colours", colours.spec.class_names, colours.spec.templates)
    assert images.targets == colours.dataset("test").targets  # its own (local) labels, its own test images
    with pytest.raises(ValueError, match="sessions: 3"):
        sequence.sessions(2, 2, 0)


def test_shots_all_takes_every_training_image_and_no_class_is_short(sequence):
    (session, *_) = sequence.sessions(3, None, 0)
    assert len(session.ids) == sum(1 for t in sequence.listed("train").targets if t < 10)
    assert session.short_classes == []


def test_a_sequence_records_the_unreadable_test_images_it_leaves_out(tmp_path):
    write_eurosat(tmp_path)
    sequence = Datasets(tmp_path, SequenceOptions(datasets=["digits", "eurosat"]), skip_bad_images=True)
    bad = next(i for i in sequence.listed("test").ids if i.startswith("eurosat/"))
    (tmp_path / "eurosat" / bad.removeprefix("eurosat/")).write_bytes(b"not an image")
    assert bad not in sequence.usable("test").ids
    assert sequence.data_record()["skipped_images"] == {"count": 1, "ids": [bad]}


def test_session_order_seed_permutes_the_same_draws(tmp_path):
    def sessions(order: str, seed: int = 0):
        (cfg,) = load_config("quick", ["stream=digits", "strategy=zeroshot", "seed=0", f"shot_seed={seed}",
                                       f"session_order={order}", "sessions=5", f"data_root={tmp_path}"]).expand()
        return run_data(cfg).sessions

    released, shuffled = sessions("released"), sessions("seed")
    assert [s.index for s in shuffled] == [1, 2, 3, 4, 5]
    assert [s.classes for s in shuffled] != [s.classes for s in released]
    by_classes = {tuple(s.classes): s.ids for s in released}
    assert all(by_classes[tuple(s.classes)] == s.ids for s in shuffled)  # the same shots, another order
    assert [s.classes for s in sessions("seed")] == [s.classes for s in shuffled]  # seeded
    assert [s.classes for s in sessions("seed", 1)] != [s.classes for s in shuffled]


@pytest.mark.parametrize(("overrides", "message"), [
    (["sequence.datasets=[digits,nosuch]"], r"sequence.datasets: invalid value .*nosuch"),
    (["sequence.datasets=[digits]"], r"sequence.datasets: .*at least two distinct"),
    (["sequence.datasets=[digits,eurosat]"], r"sequence: its dataset 'eurosat' cannot be read: .*eurosat"),
    (["sequence.datasets=[digits,dalle]"], r"dataset 'dalle' cannot be a session"),
    (["sequence.datasets=[digits,eurosat]", "sequence.dataset_options={eurosat: {nosuch: 1}}"],
     r"sequence.dataset_options.eurosat: invalid value \{'nosuch': 1\}"),
    ([SEQUENCE, "sessions=3"], r"sessions: 3 cannot be made \(use sessions: 2\)"),
    ([SEQUENCE, "shots=none"], r"shots: invalid value 'none'; allowed: an integer >= 1, or all"),
    ([SEQUENCE, "sessions=2", "vqa.model=mini"], r"vqa: stream 'sequence' is a sequence of datasets"),
])
def test_bad_sequences_are_refused_before_any_training(tmp_path, capsys, overrides, message):
    code = main(["run", "quick", "stream=sequence", "strategy=full-ft", "seed=0", f"data_root={tmp_path}",
                 f"out={tmp_path / 'runs'}", "--no-progress", *overrides])
    assert code != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_sequence_run_records_mtil_metrics_and_resumes_to_the_same_numbers(tmp_path):
    args = ["run", "quick", "stream=sequence", SEQUENCE, "sessions=2", "seed=0", "strategy=test-ewc-pause",
            "train.epochs=2", "train.warmup_steps=0", f"data_root={tmp_path / 'data'}", "--no-progress"]
    assert main([*args, f"out={tmp_path / 'reference'}"]) == 0
    fscl_test_strategies.kill_in_session_2([*args, f"out={tmp_path / 'resumed'}"], tmp_path / "in-session-2")
    assert main([*args, f"out={tmp_path / 'resumed'}"]) == 0
    reference, resumed = (tmp_path / out / RUN.format("test-ewc-pause") for out in ("reference", "resumed"))
    assert (reference / "matrix.csv").read_text() == (resumed / "matrix.csv").read_text()
    summary = json.loads((reference / "summary.json").read_text())["sequence"]
    matrix = AccuracyMatrix.from_csv((reference / "matrix.csv").read_text(), "sequence")
    assert summary["datasets"] == ["digits", "mini-colours"]
    assert summary["transfer"] == {"mini-colours": pytest.approx(matrix.groups[1, 1])}
    assert summary["last_mean"] == pytest.approx(matrix.groups[2].mean())
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["texts"]["sequence"]["datasets"] == ["digits", "mini-colours"]


def test_a_sequence_needs_its_datasets_option():
    with pytest.raises(ConfigError, match="sequence.datasets"):
        load_config("quick", ["stream=sequence"]).expand()


@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory) -> Path:
    """The eleven MTIL datasets' layouts, tiny (a few 8×8 images per class)."""
    from test_streams_controls import (
        write_caltech,
        write_cifar,
        write_dtd,
        write_flowers,
        write_food101,
        write_pets,
        write_sun397,
    )
    from test_streams_layouts import write_aircraft, write_eurosat
    from test_streams_mtil import write_mnist, write_stanfordcars

    root = tmp_path_factory.mktemp("mtil")
    for write in (write_aircraft, write_caltech, write_dtd, write_eurosat, write_flowers, write_food101,
                  write_mnist, write_pets, write_stanfordcars, write_sun397):
        write(root)
    write_cifar(root, hundred=True)
    data = root / "fgvc-aircraft-2013b" / "data"  # ZSCL's split trains on FGVC's 'train' part
    (data / "images_variant_train.txt").write_text((data / "images_variant_trainval.txt").read_text())
    return root


def test_mtil_is_zscls_eleven_datasets_in_its_orders_with_its_texts_and_splits(mtil_root):
    from streams.mtil import MTIL
    from streams.mtil_texts import MTIL_ORDERS, mtil_spec
    from streams.options import MTILOptions

    mtil = MTIL(mtil_root, MTILOptions(order="II"))
    assert mtil.spec.datasets == MTIL_ORDERS["II"]
    assert [m.class_names for m in mtil.spec.members] == [mtil_spec(n).class_names for n in MTIL_ORDERS["II"]]
    assert mtil.spec.captions(0) == [mtil_spec("stanfordcars").templates[0].format(mtil.spec.class_names[0])]
    splits = {name: m.options.split for name, m in zip(mtil.spec.datasets, mtil.members) if hasattr(m.options, "split")}
    assert set(splits) >= {"aircraft", "caltech101", "eurosat", "sun397"} and set(splits.values()) == {"zscl"}
    suite = MTIL(mtil_root, MTILOptions(split="suite"))
    assert {m.options.split for m in suite.members if hasattr(m.options, "split")} == {"suite"}


def test_an_mtil_run_evaluates_every_dataset_among_its_own_classes(mtil_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "quick", "stream=mtil", "mtil.split=suite", "strategy=zeroshot", "sessions=11",
                 f"data_root={mtil_root}", f"out={out}", "--no-progress"]) == 2  # the test files' checksums differ
    assert "mtil.dataset_options={cifar100: {key: value}}" in capsys.readouterr().err
    assert main(["run", "quick", "stream=mtil", "mtil.split=suite", "strategy=zeroshot", "seed=0", "sessions=11",
                 "mtil.dataset_options={cifar100: {verify_checksums: false}, flowers102: {verify_checksums: false}}",
                 "shots=1", f"data_root={mtil_root}", f"out={out}", "--no-progress"]) == 0
    run = out / "quick/mtil/openclip-fscl-tiny/zeroshot/1-s0"
    summary = json.loads((run / "summary.json").read_text())["sequence"]
    matrix = AccuracyMatrix.from_csv((run / "matrix.csv").read_text(), "mtil")
    assert summary["datasets"][0] == "aircraft" and len(summary["datasets"]) == 11
    assert summary["transfer_mean"] == pytest.approx(matrix.groups[0, 1:].mean())  # zero-shot: every row is row 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    totals = {m["metric"]: m["total"] for m in metrics if m["session"] == 0}
    assert totals["top1_s8"] == 20  # mnist, 2 test images of each of its 10 digits, among its own 10 classes


@pytest.mark.parametrize("preset", ["mtil", "mtil-fs"])
def test_the_mtil_presets_check_every_strategy_on_the_eleven_layouts(mtil_root, tmp_path, capsys, preset):
    images = tmp_path / "reference"
    write_image(images / "a.png", 0)
    (tmp_path / "captions.txt").write_text("a photo.\n")
    assert main(["run", preset, f"data_root={mtil_root}", f"out={tmp_path / 'runs'}", "backbone=openclip:fscl-tiny",
                 "mtil.split=suite", "mtil.dataset_options={cifar100: {verify_checksums: false}, flowers102: "
                 "{verify_checksums: false}}", f"zscl.reference_images={images}",
                 f"zscl.reference_captions={tmp_path / 'captions.txt'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "27 run(s)" in out and "9 strategies × 3 seeds" in out
    steps = {"mtil": 1000, "mtil-fs": 500}[preset] * 11 * 8  # every strategy but zeroshot, every dataset
    assert f"{steps * 3:,} training steps" in out
