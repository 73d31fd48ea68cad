"""Texts and fixed splits read from the datasets' own files, in the released code's formats.

CounterAnimal's ``LAION-final/imagenet_names.txt`` (class names), TSI's
``images_text_description_short_trunc.pkl`` (training captions), and the split files
``eurosat/eurosat_split.pkl`` and ``counteranimal/LAION-final/counter_animal_ds.pkl``:
each is written here in its real layout, read back, absent (the fallback) and malformed.
"""
from __future__ import annotations

import pickle
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from test_streams_layouts import write_counteranimal, write_eurosat, write_tsi

from benchmark.config import ConfigError, apply_override, parse_config
from benchmark.registry import STREAMS
from streams.base import StreamDataError
from streams.check import check_stream
from streams.counteranimal import CounterAnimal
from streams.eurosat import EuroSAT
from streams.tsi import TSI

POLAR_BEAR = "ice bear, polar bear, Ursus Maritimus, Thalarctos maritimus"


def options(stream: str, **values):
    return STREAMS.get(stream).options(**values)


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_options_in_a_config_and_their_defaults():
    data: dict = {"stream": "tsi"}
    for override in ("tsi.captions=false", "eurosat.split_file=null", "counteranimal.class_names=clip",
                     "counteranimal.split_file=/data/my_split.pkl"):
        apply_override(data, override)
    cfg = parse_config(data)
    assert cfg.options_for("tsi", STREAMS.get("tsi").options).captions is False
    assert cfg.options_for("eurosat", STREAMS.get("eurosat").options).split_file is None
    counteranimal = cfg.options_for("counteranimal", STREAMS.get("counteranimal").options)
    assert (counteranimal.class_names, counteranimal.split_file) == ("clip", "/data/my_split.pkl")
    assert (options("tsi").captions, options("eurosat").split_file, options("counteranimal").class_names) == \
        ("auto", "auto", "dataset")
    with pytest.raises(ConfigError, match="tsi.captions: invalid value 'maybe'"):
        parse_config({"tsi": {"captions": "maybe"}})
    helps = {f.name: f.metadata.get("help") for name in ("tsi", "eurosat", "counteranimal")
             for f in fields(STREAMS.get(name).options)}
    assert all(helps[name] for name in ("captions", "split_file", "class_names"))  # help text as data


# --------------------------------------------------------------------------- CounterAnimal names
def write_imagenet_names(base: Path, line: str = "{i}\t{name}", count: int = 1000) -> Path:
    """LAION-final/imagenet_names.txt: one line per ImageNet class, the name in the last tab field."""
    names = {i: f"class {i}, synonym {i}" for i in range(count)}
    names.update({9: "ostrich, Struthio camelus", 296: POLAR_BEAR})
    path = base / "LAION-final" / "imagenet_names.txt"
    path.write_text("".join(line.format(i=i, wnid=f"n{i:08d}", name=name) + "\n" for i, name in names.items()))
    return path


def counteranimal_name(stream: CounterAnimal, imagenet_id: int) -> str:
    return stream.spec.class_names[stream.spec.key_index()[imagenet_id]]


@pytest.mark.parametrize("line", ["{i}\t{name}", "{wnid}\t{name}", "{i}\t{wnid}\t{name}"])
def test_counteranimal_names_come_from_imagenet_names_file(tmp_path, line):
    names = write_imagenet_names(write_counteranimal(tmp_path, counter_per_class=2), line)
    stream = CounterAnimal(tmp_path)
    assert counteranimal_name(stream, 296) == POLAR_BEAR and counteranimal_name(stream, 20) == "class 20, synonym 20"
    label = stream.spec.key_index()[9]
    assert stream.spec.captions(label) == ["a photo of a ostrich, Struthio camelus"]  # the released template: no period
    assert stream.data_record()["texts"] == {"version": 2, "class_names": str(names)}
    assert CounterAnimal.spec.class_names[label] == "ostrich"  # the class's spec keeps CLIP's names
    train = stream.dataset("train")
    assert {stream.spec.class_names[t] for i, t in zip(train.ids, train.targets) if i.startswith("LAION-final/296 ")} \
        == {POLAR_BEAR}


def test_counteranimal_keeps_clip_names_on_request_or_without_the_file(tmp_path):
    base = write_counteranimal(tmp_path, counter_per_class=2)
    without = CounterAnimal(tmp_path)
    assert counteranimal_name(without, 296) == "polar bear" and without.data_record()["texts"] == {"version": 2}
    write_imagenet_names(base)
    clip = CounterAnimal(tmp_path, options("counteranimal", class_names="clip"))
    assert clip.spec.class_names == CounterAnimal.spec.class_names and clip.text_sources() == {}
    with pytest.raises(ConfigError, match="counteranimal.class_names"):
        options("counteranimal", class_names="imagenet")


def test_data_check_names_the_names_file(tmp_path):
    names = write_imagenet_names(write_counteranimal(tmp_path, counter_per_class=2))
    report = check_stream("counteranimal", tmp_path, options("counteranimal"))
    assert report.ok, report.text()
    assert f"class names from {names}" in report.lines and any(line.endswith(POLAR_BEAR) for line in report.lines)


def test_malformed_imagenet_names_file_is_named(tmp_path):
    base = write_counteranimal(tmp_path, counter_per_class=2)
    path = write_imagenet_names(base, count=300)  # class 305 and later have no line
    with pytest.raises(StreamDataError, match=rf"malformed file {path}: no name for ImageNet class\(es\) \[305, 316"):
        CounterAnimal(tmp_path)
    path.write_text("ImageNet names\n" + "".join(f"{i}\tname {i}\n" for i in range(1000)))  # a header line
    with pytest.raises(StreamDataError, match=r"line 2 is numbered 0, not 1") as err:
        CounterAnimal(tmp_path)
    assert "last tab-separated field" in str(err.value)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(StreamDataError, match=f"cannot read {path}"):
        CounterAnimal(tmp_path)


# --------------------------------------------------------------------------- TSI captions
def test_tsi_trains_on_the_captions_file_by_default(tmp_path):
    base = write_tsi(tmp_path)
    stream = TSI(tmp_path)
    train = stream.dataset("train")
    _, label, caption = train[train.ids.index("images_trunc/Walk_p03_r00_v00_c01_f0001.jpg")]
    assert TSI.spec.class_names[label] == "walking" and caption == "a person is walking in the kitchen"
    assert len(stream.dataset("test")[0]) == 2  # test images: classified among the class names, no captions
    path = base / "images_text_description_short_trunc.pkl"
    assert stream.data_record()["texts"] == {"version": 2, "captions": str(path)}
    off = TSI(tmp_path, options("tsi", captions=False))
    assert off.dataset("train").captions is None and off.text_sources() == {}


def test_tsi_without_the_captions_file(tmp_path):
    write_tsi(tmp_path, captions=False)
    assert TSI(tmp_path).dataset("train").captions is None  # auto: the class templates
    with pytest.raises(StreamDataError, match=r"captions file missing \(tsi.captions: true\): .*short_trunc.pkl"):
        TSI(tmp_path, options("tsi", captions=True))
    with pytest.raises(ConfigError, match="tsi.captions: invalid value 'yes'; allowed: auto | true | false"):
        options("tsi", captions="yes")


@pytest.mark.parametrize("content,message", [
    (["not", "a", "dict"], "a list, not a dict"),
    ({"Walk_p03_r00_v00_c01_f0001.jpg": 3}, r"entry 'Walk_p03_r00_v00_c01_f0001.jpg': 3 is not file name -> caption"),
])
def test_malformed_captions_file_is_named(tmp_path, content, message):
    base = write_tsi(tmp_path)
    path = dump(base / "images_text_description_short_trunc.pkl", content)
    with pytest.raises(StreamDataError, match=rf"tsi: malformed file {path}: {message}"):
        TSI(tmp_path).dataset("train")
    path.write_bytes(b"not a pickle")
    with pytest.raises(StreamDataError, match=f"tsi: cannot read {path}"):
        TSI(tmp_path).dataset("train")


def test_tsi_frame_without_a_caption_is_named(tmp_path):
    base = write_tsi(tmp_path)
    path = base / "images_text_description_short_trunc.pkl"
    table = pickle.loads(path.read_bytes())
    del table["Walk_p03_r00_v00_c01_f0001.jpg"]
    dump(path, table)
    with pytest.raises(StreamDataError, match=r"1 training frame\(s\) have no caption .*Walk_p03_r00_v00_c01_f0001"):
        TSI(tmp_path).dataset("train")


# --------------------------------------------------------------------------- EuroSAT split file
def eurosat_split(per_class: int = 5, seed: int = 0) -> dict[str, list[tuple[str, np.int64]]]:
    """The released format: (path on the authors' machine, numpy label) pairs; per class 2 test
    images, 2 train images and one image the file does not list."""
    rng = np.random.default_rng(seed)
    split: dict[str, list] = {"train": [], "test": []}
    for label, folder in enumerate(EuroSAT.spec.keys):
        files = [f"/home/someone/data/eurosat/2750/{folder}/{folder}_{i + 1}.jpg" for i in rng.permutation(per_class)]
        split["test"] += [(f, np.int64(label)) for f in files[:2]]
        split["train"] += [(f, np.int64(label)) for f in files[2:4]]
    return split


def our_ids(entries: list[tuple[str, int]]) -> list[str]:
    return sorted("2750/" + "/".join(Path(path).parts[-2:]) for path, _ in entries)


def test_eurosat_reads_the_released_split_file(tmp_path):
    base = write_eurosat(tmp_path)
    split = eurosat_split()
    path = dump(base / "eurosat_split.pkl", split)
    stream = EuroSAT(tmp_path)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert train.ids == our_ids(split["train"]) and test.ids == our_ids(split["test"])
    assert Counter(train.targets) == Counter(test.targets) == {c: 2 for c in range(10)}
    assert all(EuroSAT.spec.keys[t] in i for i, t in zip(train.ids, train.targets))
    record = stream.data_record()["split"]
    assert record["method"] == "file" and record["split_file"] == str(path) and len(record["split_file_sha256"]) == 64
    assert (record["train"], record["test"]) == (20, 20) and record["ids"]["test"] == test.ids
    seeded = EuroSAT(tmp_path, options("eurosat", split_file=None))  # null: the seeded split, file or not
    assert len(seeded.dataset("test")) == 10 and seeded.data_record()["split"]["method"] == "seeded stratified"


def test_eurosat_split_file_given_by_path_or_absent(tmp_path):
    write_eurosat(tmp_path)
    assert EuroSAT(tmp_path).dataset("test").ids == EuroSAT(tmp_path, options("eurosat", split_file=None)).dataset(
        "test").ids  # no file: the seeded split
    split = eurosat_split(seed=1)
    elsewhere = dump(tmp_path / "splits" / "mine.pkl", split)
    stream = EuroSAT(tmp_path, options("eurosat", split_file=str(elsewhere)))
    assert stream.dataset("test").ids == our_ids(split["test"])
    missing = tmp_path / "eurosat" / "nowhere.pkl"
    with pytest.raises(StreamDataError, match=rf"split file not found \(eurosat.split_file\): {missing}"):
        EuroSAT(tmp_path, options("eurosat", split_file="nowhere.pkl")).dataset("train")
    with pytest.raises(ConfigError, match="split_file"):
        options("eurosat", split_file=" ")


def _relabel(split, part, i, label):
    split[part][i] = (split[part][i][0], label)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("test"), r"not a dict with keys 'train' and 'test' \(dict\)"),
    (lambda s: s.update(train="2750"), r"'train' is a str, not a list"),
    (lambda s: s["train"].__setitem__(0, "AnnualCrop_1.jpg"), r"'train' entry 0 'AnnualCrop_1.jpg' is not an \(image "),
    (lambda s: _relabel(s, "test", 0, 3), r"'test' entry 0 .*: label 3 is not that of a class folder 'AnnualCrop'"),
    (lambda s: s["test"].append(("/x/2750/Forest/Forest_99.jpg", 1)),
     r"the split file .* lists 1 image\(s\) not found under .*, e.g. 2750/Forest/Forest_99.jpg"),
    (lambda s: s["test"].append(s["train"][0]), r"puts 1 image\(s\) in both train and test"),
    (lambda s: s.update(test=[e for e in s["test"] if "/Forest/" not in e[0]]),
     r"has no test images of 1 class\(es\), e.g. Forest"),
])
def test_malformed_eurosat_split_file_is_named(tmp_path, change, message):
    base = write_eurosat(tmp_path)
    split = eurosat_split()
    change(split)
    path = dump(base / "eurosat_split.pkl", split)
    with pytest.raises(StreamDataError, match=message) as err:
        EuroSAT(tmp_path).dataset("train")
    assert str(path) in str(err.value)


def test_unreadable_split_file_is_named(tmp_path):
    base = write_eurosat(tmp_path)
    path = base / "eurosat_split.pkl"
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(StreamDataError, match=rf"eurosat: cannot read {path}: .*\nexpected: a pickled dict"):
        EuroSAT(tmp_path).dataset("test")


# --------------------------------------------------------------------------- CounterAnimal split file
def counteranimal_split() -> dict[str, dict[str, list[str]]]:
    """The released format: class folder -> file names in its counter-* folder; per class images
    0, 1 train, 2 test, 3 not listed."""
    folders = [f"{k} {n}" for k, n in zip(CounterAnimal.spec.keys, CounterAnimal.spec.class_names)]
    return {"train_ds": {f: ["0.jpg", "1.jpg"] for f in folders}, "test_ds": {f: ["2.jpg"] for f in folders}}


def test_counteranimal_reads_the_released_split_file(tmp_path):
    base = write_counteranimal(tmp_path)
    path = dump(base / "LAION-final" / "counter_animal_ds.pkl", counteranimal_split())
    stream = CounterAnimal(tmp_path)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert Counter(train.targets) == {c: 2 for c in range(45)} and Counter(test.targets) == {c: 1 for c in range(45)}
    assert {i.rsplit("/", 1)[1] for i in train.ids} == {"0.jpg", "1.jpg"} and {i.rsplit("/", 1)[1] for i in test.ids} == {"2.jpg"}
    label = test.targets[test.ids.index("LAION-final/296 polar bear/counter-snow/2.jpg")]
    assert CounterAnimal.spec.keys[label] == 296
    assert stream.data_record()["split"]["split_file"] == str(path)
    assert len(CounterAnimal(tmp_path, options("counteranimal", split_file=None)).dataset("test")) == 45


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("test_ds"), r"not a dict with keys 'train_ds' and 'test_ds'"),
    (lambda s: s["train_ds"].update({"9 ostrich": "0.jpg"}), r"'train_ds' is not a dict of class folder -> list"),
    (lambda s: s["test_ds"]["9 ostrich"].append("7.jpg"),
     r"lists 1 image\(s\) not found under .*, e.g. LAION-final/9 ostrich/counter-\*/7.jpg"),
    (lambda s: s["test_ds"].pop("9 ostrich"), r"has no test images of 1 class\(es\), e.g. 9"),
])
def test_malformed_counteranimal_split_file_is_named(tmp_path, change, message):
    base = write_counteranimal(tmp_path)
    split = counteranimal_split()
    change(split)
    path = dump(base / "LAION-final" / "counter_animal_ds.pkl", split)
    with pytest.raises(StreamDataError, match=message) as err:
        CounterAnimal(tmp_path).dataset("train")
    assert str(path) in str(err.value)
