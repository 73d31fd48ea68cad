"""Unreadable images, released folder names, every missing class, hidden entries (issue 13, items 7 and 9).

Real image files in the streams' real layouts, written by the ``write_*`` builders of
``test_streams_layouts`` / ``test_streams_controls``; every pixel comes from its own seeded
generator; nothing touches the network.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_streams_controls import write_caltech, write_sun397
from test_streams_layouts import (
    corrupt,
    write_aircraft,
    write_counteranimal,
    write_dalle,
    write_eurosat,
    write_gtsrb,
    write_image,
    write_tsi,
)

from benchmark.cli import main
from benchmark.registry import STREAMS
from streams.aircraft import Aircraft
from streams.base import StreamDataError
from streams.eurosat import EuroSAT
from streams.sampling import FewShotSampler
from streams.tsi import TSI

SHOTS, SESSIONS = 3, 5


def _ids(sessions) -> list[list[str]]:
    return [s.ids for s in sessions]


def _check(capsys, *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def eurosat_root(tmp_path) -> Path:
    """EuroSAT, 10 images a class: a seeded split of 8 train / 2 test images per class."""
    write_eurosat(tmp_path, per_class=10)
    return tmp_path


def _undrawn(root: Path, sessions, label: int) -> str:
    """A training image of class ``label`` that none of ``sessions`` drew."""
    train = EuroSAT(root).dataset("train")
    drawn = {i for s in sessions for i in s.ids}
    return next(i for i, t in zip(train.ids, train.targets) if t == label and i not in drawn)


def _candidates(root: Path, shot_seed: int, session: int, label: int) -> list[str]:
    """The ids the sampler would put in place of unreadable drawn images of class ``label``, in
    order: its generator, continued after the draw, permutes the images not drawn (in id order)."""
    train = EuroSAT(root).dataset("train")
    pool = [i for i, t in enumerate(train.targets) if t == label]
    rng = FewShotSampler("eurosat", SHOTS, shot_seed).class_rng(session, label)
    drawn = {int(i) for i in rng.choice(pool, size=SHOTS, replace=False)}
    rest = [i for i in pool if i not in drawn]
    return [train.ids[rest[j]] for j in rng.permutation(len(rest))]


# --------------------------------------------------------------------------- item 7: unreadable images
@pytest.mark.parametrize("shot_seed", [0, 1])
def test_draws_of_good_images_do_not_depend_on_an_unrelated_bad_file(eurosat_root, shot_seed):
    reference = EuroSAT(eurosat_root).sessions(SESSIONS, SHOTS, shot_seed)
    test_ids = EuroSAT(eurosat_root).dataset("test").ids
    # an unreadable image that no session draws, in a drawn class and in another class
    bad = [_undrawn(eurosat_root, reference, label) for label in (0, 7)]
    for sid in bad:
        corrupt(eurosat_root / "eurosat" / sid)
    for skip in (False, True):
        stream = EuroSAT(eurosat_root, skip_bad_images=skip)
        sessions = stream.sessions(SESSIONS, SHOTS, shot_seed)
        assert _ids(sessions) == _ids(reference)  # the same draws, with or without skip_bad_images
        assert stream.dataset("test").ids == test_ids  # and the same split
        assert not any(s.replaced or s.unreadable for s in sessions)
        assert "skipped_images" not in stream.data_record(sessions)  # never drawn: never read
        assert set(bad) <= set(stream.dataset("train").ids)  # the pool is what is listed


def test_a_drawn_bad_image_is_replaced_by_the_next_of_its_class_warned_and_recorded(eurosat_root, caplog):
    reference = EuroSAT(eurosat_root).sessions(SESSIONS, SHOTS, 0)
    bad = reference[0].ids[0]  # session 1's first class is label 0 (docs/protocol.md's order)
    assert bad.startswith("2750/AnnualCrop/")
    candidates = _candidates(eurosat_root, 0, 1, 0)
    corrupt(eurosat_root / "eurosat" / bad)

    with caplog.at_level(logging.WARNING, logger="streams"):
        stream = EuroSAT(eurosat_root, skip_bad_images=True)
        sessions = stream.sessions(SESSIONS, SHOTS, 0)
    replacement = candidates[0]
    assert sessions[0].ids == sorted([*(i for i in reference[0].ids if i != bad), replacement])
    assert _ids(sessions[1:]) == _ids(reference[1:])  # the other sessions are untouched
    assert sessions[0].replaced == {bad: replacement} and sessions[0].unreadable == [bad]
    assert not sessions[0].short_classes
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"drawn training image {bad} is unreadable" in warning and f"replaced by {replacement}" in warning
    record = stream.data_record(sessions)["skipped_images"]
    assert record == {"count": 1, "ids": [bad], "replaced": {"session_1": {bad: replacement}}}
    assert stream.data_record()["skipped_images"] == {"count": 1, "ids": [bad]}  # what the runner copies today
    assert _ids(EuroSAT(eurosat_root, skip_bad_images=True).sessions(SESSIONS, SHOTS, 0)) == _ids(sessions)

    corrupt(eurosat_root / "eurosat" / replacement)  # the first candidate is bad too: the next one
    stream = EuroSAT(eurosat_root, skip_bad_images=True)
    sessions = stream.sessions(SESSIONS, SHOTS, 0)
    assert sessions[0].replaced == {bad: candidates[1]}
    assert stream.data_record(sessions)["skipped_images"] == {
        "count": 2, "ids": sorted([bad, replacement]), "replaced": {"session_1": {bad: candidates[1]}}}


HASH_SCRIPT = """
import json, sys, benchmark
from streams.eurosat import EuroSAT
sessions = EuroSAT(sys.argv[1], skip_bad_images=True).sessions(5, 3, shot_seed=2)
print(json.dumps([[s.ids, s.replaced] for s in sessions]))
"""


def test_replacements_do_not_depend_on_the_hash_seed(eurosat_root):
    reference = EuroSAT(eurosat_root).sessions(SESSIONS, SHOTS, 2)
    for session in reference[:2]:  # two drawn images of two classes
        corrupt(eurosat_root / "eurosat" / session.ids[0])
    outputs = []
    for hash_seed in ("0", "98765"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", HASH_SCRIPT, str(eurosat_root)], env=env, capture_output=True,
                             text=True, check=True)
        outputs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    here = [[s.ids, s.replaced] for s in EuroSAT(eurosat_root, skip_bad_images=True).sessions(SESSIONS, SHOTS, 2)]
    assert outputs[0] == outputs[1] == here
    assert [len(replaced) for _, replaced in here[:2]] == [1, 1]


def test_without_skip_nothing_is_decoded_and_a_drawn_bad_image_fails_when_read(eurosat_root):
    reference = EuroSAT(eurosat_root).sessions(SESSIONS, SHOTS, 0)
    bad = reference[2].ids[-1]
    corrupt(eurosat_root / "eurosat" / bad)
    stream = EuroSAT(eurosat_root)
    sessions = stream.sessions(SESSIONS, SHOTS, 0)
    assert _ids(sessions) == _ids(reference) and "skipped_images" not in stream.data_record(sessions)
    train = stream.dataset("train")
    with pytest.raises(StreamDataError, match=f"cannot read image .*{bad}"):
        train[train.ids.index(bad)]  # what the run meets: it fails, naming the file


def test_a_class_short_of_readable_images_keeps_the_rest_and_an_emptied_class_is_named(tmp_path):
    write_eurosat(tmp_path, per_class=5)  # 4 training images a class, 4 shots: every class keeps all
    train = EuroSAT(tmp_path).dataset("train")
    forest = [i for i, t in zip(train.ids, train.targets) if t == 1]
    corrupt(tmp_path / "eurosat" / forest[0])
    stream = EuroSAT(tmp_path, skip_bad_images=True)
    first = stream.sessions(SESSIONS, 4, 0)[0]
    assert first.ids == [i for i, t in zip(train.ids, train.targets) if t == 0] + forest[1:]
    assert first.replaced == {forest[0]: None} and sorted(first.short_classes) == [0, 1]
    for sid in forest[1:]:
        corrupt(tmp_path / "eurosat" / sid)
    with pytest.raises(StreamDataError, match="no readable training image of class\\(es\\) 'forest'"):
        EuroSAT(tmp_path, skip_bad_images=True).sessions(SESSIONS, 4, 0)


def test_unreadable_test_images_are_left_out_with_a_warning(eurosat_root, caplog):
    test = EuroSAT(eurosat_root).dataset("test")
    bad = test.ids[3]
    corrupt(eurosat_root / "eurosat" / bad)
    with caplog.at_level(logging.WARNING, logger="streams"):
        stream = EuroSAT(eurosat_root, skip_bad_images=True)
        kept = stream.dataset("test")
    assert kept.ids == [i for i in test.ids if i != bad]
    assert "leaving out 1 unreadable image(s) of the test split" in caplog.text and bad in caplog.text
    assert stream.data_record(stream.sessions(SESSIONS, SHOTS, 0))["skipped_images"] == {"count": 1, "ids": [bad]}


# --------------------------------------------------------------------------- item 9: released folder names
def test_the_released_folder_names_are_found_by_runs_and_by_data_check(tmp_path, capsys):
    tsi_root = tmp_path / "a"
    write_tsi(tsi_root)
    (tsi_root / "tsi").rename(tsi_root / "toyota_smarthome_images")
    stream = TSI(tsi_root)
    assert stream.root == tsi_root / "toyota_smarthome_images"
    assert (len(stream.dataset("train")), len(stream.dataset("test"))) == (54, 27)
    for root in (tsi_root, tsi_root / "toyota_smarthome_images"):
        code, out = _check(capsys, "tsi", "--root", str(root))
        assert code == 0 and f"at {tsi_root / 'toyota_smarthome_images'}" in out, out

    air_root = tmp_path / "b"
    write_aircraft(air_root)
    (air_root / "fgvc_aircraft").mkdir()
    (air_root / "fgvc-aircraft-2013b").rename(air_root / "fgvc_aircraft" / "fgvc-aircraft-2013b")
    assert len(Aircraft(air_root).dataset("test")) == 100  # torchvision reads <data_root>/fgvc_aircraft
    for root in (air_root, air_root / "fgvc_aircraft", air_root / "fgvc_aircraft" / "fgvc-aircraft-2013b"):
        code, out = _check(capsys, "aircraft", "--root", str(root))
        assert code == 0 and "images: train 200, test 100" in out, out

    write_tsi(tsi_root, captions=False)  # our name as well: ours is taken
    assert TSI(tsi_root).root == tsi_root / "tsi" and TSI(tsi_root).dataset("train").captions is None
    with pytest.raises(StreamDataError) as err:
        TSI(tmp_path)
    assert f"data folder not found: {tmp_path / 'tsi'}" in str(err.value)
    assert str(tmp_path / "toyota_smarthome_images") in str(err.value)


# --------------------------------------------------------------------------- item 9: every problem, once
def test_data_check_names_every_missing_class_once(tmp_path, capsys):
    base = write_counteranimal(tmp_path)  # a seeded split: train and test meet the same problem
    gone = ["9 ostrich", "10 brambling", "150 sea lion"]
    for folder in gone:
        shutil.rmtree(base / "LAION-final" / folder)
    code, out = _check(capsys, "counteranimal", "--root", str(tmp_path))
    assert code == 1 and "NOT USABLE: 1 problem(s) with counteranimal" in out
    for folder in gone:
        key, name = folder.split(" ", 1)
        assert out.count(f"LAION-final/{key} <name> (ImageNet class {key}, '{name}')") == 1, out

    base = write_eurosat(tmp_path)
    for folder in ("Forest", "River"):
        shutil.rmtree(base / "2750" / folder)
    code, out = _check(capsys, "eurosat", "--root", str(tmp_path))
    assert code == 1 and "NOT USABLE: 1 problem(s)" in out
    assert all(out.count(f"class folder missing (class '{c}'): {base / '2750' / c}") == 1 for c in ("Forest", "River"))

    base = write_gtsrb(tmp_path)
    for c in (5, 17):
        shutil.rmtree(base / "GTSRB" / "Training" / f"{c:05d}")
    code, out = _check(capsys, "gtsrb", "--root", str(tmp_path))
    assert code == 1 and all(f"class folder missing (class {c}): " in out for c in (5, 17)), out

    base = write_tsi(tmp_path)
    for action in ("Walk", "Readbook"):
        for f in (base / "images_trunc").glob(f"{action}_p02_*"):
            f.unlink()
    code, out = _check(capsys, "tsi", "--root", str(tmp_path))
    assert code == 1 and "NOT USABLE: 1 problem(s)" in out
    assert out.count("empty class 'walking' in the test split") == 1
    assert out.count("empty class 'reading a book' in the test split") == 1, out


def test_badly_named_tsi_frames_are_all_reported_once(tmp_path, capsys):
    base = write_tsi(tmp_path)
    bad = [write_image(base / "images_trunc" / name, seed) for seed, name in enumerate(("Walk.jpg", "Walk-p03-x.jpg"))]
    code, out = _check(capsys, "tsi", "--root", str(tmp_path))
    assert code == 1 and "NOT USABLE: 1 problem(s) with tsi" in out
    assert out.count("2 frame(s) not named '<Action>_<pXX>_...'") == 1 and all(out.count(str(p)) == 1 for p in bad)


# --------------------------------------------------------------------------- item 9: hidden entries
def _hide_counteranimal(root: Path) -> None:
    laion = root / "counteranimal" / "LAION-final"
    write_image(laion / ".ipynb_checkpoints" / "counter-x" / "0.jpg", 1)  # a hidden "class" with an image
    (laion / "9 ostrich" / ".ipynb_checkpoints").mkdir()
    write_image(laion / "9 ostrich" / ".counter-old" / "0.jpg", 2)
    corrupt(write_image(laion / "9 ostrich" / "counter-snow" / "._0.jpg", 3))


def _hide_eurosat(root: Path) -> None:
    base = root / "eurosat" / "2750"
    (base / ".ipynb_checkpoints").mkdir()  # empty: torchvision's listing would stop on it
    write_image(base / ".cache" / "Forest_9.jpg", 4)
    corrupt(write_image(base / "Forest" / "._Forest_1.jpg", 5))


def _hide_gtsrb(root: Path) -> None:
    training = root / "gtsrb" / "GTSRB" / "Training"
    (training / ".ipynb_checkpoints").mkdir()
    corrupt(write_image(training / "00000" / "._00000_00000_00000.ppm", 6))


def _hide_tsi(root: Path) -> None:
    frames = root / "tsi" / "images_trunc"
    (frames / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    corrupt(write_image(frames / "._Walk_p03_r00_v00_c01_f0001.jpg", 7))
    (frames / ".ipynb_checkpoints").mkdir()


def _hide_dalle(root: Path) -> None:
    corrupt(write_image(root / "dalle" / "v2" / "._walking_0.png", 8))
    write_image(root / "dalle" / "v2" / ".ipynb_checkpoints" / "walking_9.png", 9)


def _hide_caltech(root: Path) -> None:
    base = root / "caltech101" / "101_ObjectCategories"
    (base / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (base / ".ipynb_checkpoints").mkdir()
    corrupt(write_image(base / "car_side" / "._image_0001.jpg", 10))


def _hide_sun397(root: Path) -> None:
    base = root / "SUN397"
    write_image(base / ".ipynb_checkpoints" / "sun_hidden.jpg", 11, size=4)
    corrupt(write_image(base / "a" / "abbey" / ".sun_old.jpg", 12, size=4))


def _write_imagefolder(root: Path) -> Path:
    for c, name in enumerate(("cats", "dogs")):
        for i in range(3):
            write_image(root / "pets" / name / f"{i}.png", 10 * c + i)
    return root


def _hide_imagefolder(root: Path) -> None:
    write_image(root / "pets" / ".ipynb_checkpoints" / "0.png", 13)
    corrupt(write_image(root / "pets" / "dogs" / "._0.png", 14))


HIDDEN = {
    "counteranimal": (write_counteranimal, _hide_counteranimal, []),
    "eurosat": (write_eurosat, _hide_eurosat, []),
    "gtsrb": (write_gtsrb, _hide_gtsrb, []),
    "tsi": (write_tsi, _hide_tsi, []),
    "dalle": (write_dalle, _hide_dalle, []),
    "caltech101": (lambda root: write_caltech(root, per_class=2), _hide_caltech, []),
    "sun397": (lambda root: write_sun397(root, per_class=2), _hide_sun397, []),
    "imagefolder": (_write_imagefolder, _hide_imagefolder, ["-o", "root=pets"]),
}


@pytest.mark.parametrize("name", sorted(HIDDEN))
def test_hidden_entries_are_ignored_everywhere(tmp_path, capsys, name):
    write, hide, options = HIDDEN[name]
    write(tmp_path)
    entry = STREAMS.get(name)
    opts = entry.options(**dict(o.split("=", 1) for o in options[1::2])) if entry.options else None

    def ids() -> dict[str, list[str]]:
        stream = entry.obj(tmp_path, opts)
        return {split: stream.dataset(split).ids for split in stream.splits}

    before = ids()
    hide(tmp_path)
    assert ids() == before
    code, out = _check(capsys, name, "--root", str(tmp_path), *options)
    assert code == 0, out  # the corrupt hidden files were never listed (the check decodes every image)


def test_data_check_names_symbolic_links_that_point_to_nothing(eurosat_root, capsys):
    forest = eurosat_root / "eurosat" / "2750" / "Forest"
    (forest / "Forest_99.jpg").symlink_to(eurosat_root / "moved-away" / "Forest_99.jpg")
    (forest / ".hidden.jpg").symlink_to(eurosat_root / "nowhere")  # hidden: never read, not named
    code, out = _check(capsys, "eurosat", "--root", str(eurosat_root))
    assert code == 1 and "NOT USABLE: 1 problem(s)" in out
    assert (f"problem: 1 symbolic link(s) under {eurosat_root / 'eurosat'} point to nothing (first 1):\n"
            f"  {forest / 'Forest_99.jpg'}\n  (a run leaves them out without a word") in out
