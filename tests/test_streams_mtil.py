"""The MTIL datasets: MNIST and Stanford Cars on tiny real torchvision trees, ZSCL's splits (checked against
torch's own random_split over torchvision's own listing) and ZSCL's texts (streams/data/mtil)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from scipy.io import savemat
from test_streams_controls import write_caltech, write_sun397
from test_streams_layouts import write_aircraft, write_eurosat, write_image

from benchmark.registry import STREAMS
from streams import mtil_texts
from streams.base import StreamDataError
from streams.check import check_stream
from streams.controls import MNIST_RAW
from streams.mtil_texts import MTIL_FS_SHOTS, MTIL_ORDERS, mtil_spec
from streams.torchvision_root import zscl_split_indices


def _stream(name: str, root: Path, **options):
    entry = STREAMS.get(name)
    return entry.obj(root, entry.options(**options) if entry.options else None)


# --------------------------------------------------------------------------- builders
def _idx(path: Path, array: np.ndarray) -> None:
    """An idx file (MNIST's format): magic 0x00 0x00 0x08 (uint8) ndim, big-endian sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def mnist_pixels(split: str, n: int) -> np.ndarray:
    return np.random.default_rng(0 if split == "train" else 1).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def write_mnist(data_root: Path, per_class: int = 2) -> Path:
    """MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, ``per_class`` images of each digit per split."""
    raw = data_root / "MNIST" / "raw"
    labels = np.repeat(np.arange(10), per_class)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _idx(raw / f"{prefix}-images-idx3-ubyte", mnist_pixels(split, len(labels)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw.parent


def _annotations(records: list[tuple[str, int]]) -> np.ndarray:
    """A MATLAB struct array of Stanford Cars annotation records (box corners, class 1..196, file name)."""
    dtype = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    return np.array([(0, 0, 7, 7, label, fname) for fname, label in records], dtype=dtype)


def write_stanfordcars(data_root: Path) -> Path:
    """stanford_cars/: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat and
    one image of each class in cars_train/ and cars_test/."""
    names = STREAMS.get("stanfordcars").obj.spec.class_names
    base = data_root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)})
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        records = [(f"{c + 1:05d}.jpg", c + 1) for c in range(len(names))]
        for fname, label in records:
            write_image(base / f"cars_{split}" / fname, 1000 * label + (split == "test"), size=4)
        savemat(mat, {"annotations": _annotations(records)})
    return base


# --------------------------------------------------------------------------- MNIST and Stanford Cars
def test_mnist_reads_torchvision_raw_files(tmp_path):
    write_mnist(tmp_path)
    mnist = _stream("mnist", tmp_path)
    train, test = mnist.dataset("train"), mnist.dataset("test")
    assert (len(train), len(test)) == (20, 20)
    image, label = test[test.ids.index("test/7")]
    assert mnist.spec.class_names[label] == "3" and image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], mnist_pixels("test", 20)[7])
    assert mnist.spec.captions(label) == ['a photo of the number: "3".']


def test_mnist_missing_file_is_named_with_the_layout(tmp_path):
    (write_mnist(tmp_path) / "raw" / MNIST_RAW[3]).unlink()
    with pytest.raises(StreamDataError, match=f"missing: {tmp_path / 'MNIST' / 'raw' / MNIST_RAW[3]}") as err:
        _stream("mnist", tmp_path)
    assert "torchvision.datasets.MNIST(root=<data_root>)" in str(err.value)


def test_stanfordcars_reads_annotation_records(tmp_path):
    write_stanfordcars(tmp_path)
    cars = _stream("stanfordcars", tmp_path)
    test = cars.dataset("test")
    assert len(test) == 196 and len(cars.dataset("train")) == 196
    assert cars.spec.class_names[test.targets[test.ids.index("cars_test/00196.jpg")]] == "smart fortwo Convertible 2012"
    assert cars.spec.class_names[test.targets[test.ids.index("cars_test/00001.jpg")]] == "AM General Hummer SUV 2000"


@pytest.mark.parametrize("missing", ["devkit/cars_meta.mat", "cars_test_annos_withlabels.mat", "cars_train"])
def test_stanfordcars_missing_part_is_named_with_the_layout(tmp_path, missing):
    import shutil

    path = write_stanfordcars(tmp_path) / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(StreamDataError, match=f"missing: {path}") as err:
        _stream("stanfordcars", tmp_path)
    assert "devkit/cars_train_annos.mat" in str(err.value)


def test_data_check_passes_on_both(tmp_path):
    write_mnist(tmp_path), write_stanfordcars(tmp_path)
    for name in ("mnist", "stanfordcars"):
        report = check_stream(name, tmp_path, sessions=2)
        assert report.ok, report.text()


# --------------------------------------------------------------------------- ZSCL's splits
@pytest.mark.parametrize("n", [2, 5, 17, 100, 1003])
def test_zscl_split_indices_are_torch_random_split(n):
    n_train = int(0.8 * n)
    parts = torch.utils.data.random_split(range(n), [n_train, n - n_train], generator=torch.Generator().manual_seed(42))
    assert zscl_split_indices(n) == (list(parts[0].indices), list(parts[1].indices))


def _random_split_ids(ds, path_of) -> tuple[list[str], list[str]]:
    """ZSCL's split_dataset on torchvision's dataset object itself; each part's files as relative paths."""
    n = len(ds)
    parts = torch.utils.data.random_split(ds, [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(42))
    return tuple(sorted(path_of(i) for i in part.indices) for part in parts)


def test_zscl_split_matches_random_split_over_torchvision(tmp_path):
    write_caltech(tmp_path), write_sun397(tmp_path), write_eurosat(tmp_path, per_class=30)
    caltech = torchvision.datasets.Caltech101(str(tmp_path))
    expected = {
        "caltech101": _random_split_ids(caltech, lambda i: f"101_ObjectCategories/{caltech.categories[caltech.y[i]]}/"
                                                           f"image_{caltech.index[i]:04d}.jpg"),
        "sun397": _random_split_ids(sun := torchvision.datasets.SUN397(str(tmp_path)),
                                    lambda i: sun._image_files[i].relative_to(tmp_path / "SUN397").as_posix()),
        "eurosat": _random_split_ids(euro := torchvision.datasets.EuroSAT(str(tmp_path)),
                                     lambda i: Path(euro.samples[i][0]).relative_to(tmp_path / "eurosat").as_posix()),
    }
    for name, (train, test) in expected.items():
        stream = _stream(name, tmp_path, split="zscl")
        assert (sorted(s.id for s in stream.scan("train")), sorted(s.id for s in stream.scan("test"))) == (train, test)
        suite = _stream(name, tmp_path)
        assert sorted(s.id for s in suite.scan("test")) != test, name  # the option changes the split
    euro = _stream("eurosat", tmp_path, split="zscl")
    assert len(euro.dataset("test")) == 60 and euro.data_record()["split"]["method"] == "zscl random_split"


def test_zscl_split_refuses_entries_torchvision_counts_and_we_do_not(tmp_path):
    base = write_caltech(tmp_path)
    (base / "101_ObjectCategories" / "ant" / ".DS_Store").write_bytes(b"")  # torchvision counts it: image_0003.jpg
    with pytest.raises(StreamDataError, match=r"split: zscl .*ant/image_0003\.jpg; remove them, or use split: suite"):
        _stream("caltech101", tmp_path, split="zscl").scan("train")


def test_aircraft_zscl_trains_on_the_train_part(tmp_path):
    data = write_aircraft(tmp_path) / "data"
    with pytest.raises(StreamDataError, match=r"missing \(split: zscl\): .*images_variant_train\.txt"):
        _stream("aircraft", tmp_path, split="zscl")
    trainval = (data / "images_variant_trainval.txt").read_text().splitlines()
    (data / "images_variant_train.txt").write_text("".join(line + "\n" for line in trainval[::2]))
    zscl, suite = _stream("aircraft", tmp_path, split="zscl"), _stream("aircraft", tmp_path)
    assert len(zscl.dataset("train")) == 100 and len(suite.dataset("train")) == 200
    assert zscl.dataset("test").ids == suite.dataset("test").ids


def test_split_option_is_checked():
    with pytest.raises(Exception, match=r"split: invalid value 'ZSCL'; allowed: suite \| zscl"):
        STREAMS.get("sun397").options(split="ZSCL")


# --------------------------------------------------------------------------- ZSCL's texts
# ZSCL's training template (templates[0]) of each dataset, read from its collections.py / cifar10.py
ZSCL_TRAIN_TEMPLATES = {
    "aircraft": "a photo of a {}, a type of aircraft.", "caltech101": "a photo of a {}.",
    "cifar100": "a photo of a {}.", "dtd": "a photo of a {} texture.", "eurosat": "a centered satellite photo of {}.",
    "flowers102": "a photo of a {}, a type of flower.", "food101": "a photo of a {}, a type of food.",
    "mnist": 'a photo of the number: "{}".', "pets": "a photo of a {}, a type of pet.",
    "stanfordcars": "a photo of a {}, a type of car.", "sun397": "a photo of a {}.",
}


@pytest.mark.parametrize("name", MTIL_ORDERS["I"])
def test_mtil_texts_are_a_bijection_onto_our_classes(name):
    data = yaml.safe_load((mtil_texts.MTIL_DIR / f"{name}.yaml").read_text())
    ours = STREAMS.get(name).obj.spec
    assert sorted(map(str, data["class_keys"])) == sorted(map(str, ours.keys)) and len(set(data["class_keys"])) == \
        len(data["class_keys"]) == len(data["class_names"]) == len(ours.keys)
    spec = mtil_spec(name)
    assert spec.templates[0] == ZSCL_TRAIN_TEMPLATES[name]
    assert spec.class_keys == ours.class_keys and spec.class_order == ours.class_order
    named = dict(zip(data["class_keys"], data["class_names"]))
    assert [named[k] for k in ours.keys] == list(spec.class_names)


def test_mtil_names_where_zscl_differs_from_ours():
    def name_of(stream: str, key) -> str:
        spec = mtil_spec(stream)
        return spec.class_names[spec.keys.index(key)]

    assert name_of("mnist", 3) == "3 - three"  # torchvision's MNIST.classes
    assert name_of("sun397", "apartment_building/outdoor") == "apartment building/outdoor"
    assert name_of("caltech101", "crocodile_head") == "head of a  crocodile"  # two spaces, as in ZSCL
    assert name_of("caltech101", "Faces_easy") == "centered face"
    assert name_of("eurosat", "SeaLake") == "lake or sea"
    assert name_of("flowers102", 59) == "pink-yellow dahlia"
    assert name_of("pets", 14) == "German Shorthaired"
    assert len(mtil_spec("stanfordcars").templates) == 9


def test_mtil_spec_refuses_unknown_and_broken_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="mtil: unknown dataset 'cifar10'; allowed: aircraft, caltech101"):
        mtil_spec("cifar10")
    data = yaml.safe_load((mtil_texts.MTIL_DIR / "eurosat.yaml").read_text())
    data["class_keys"][1] = data["class_keys"][0]
    (tmp_path / "eurosat.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(mtil_texts, "MTIL_DIR", tmp_path)
    with pytest.raises(ValueError, match="class_keys must name each of the 10 classes of stream 'eurosat' exactly once"):
        mtil_spec("eurosat")


def test_mtil_orders_and_shots():
    registered = set(STREAMS.names())
    assert set(MTIL_ORDERS["I"]) <= registered and len(set(MTIL_ORDERS["I"])) == 11
    assert MTIL_ORDERS["II"] == tuple(MTIL_ORDERS["I"][i] for i in [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2])  # results.ipynb
    assert MTIL_FS_SHOTS == 5
