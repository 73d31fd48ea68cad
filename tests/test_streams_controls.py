"""Control datasets from local torchvision roots and from any image folder, on tiny real trees."""
from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat
from test_streams_layouts import write_image

from benchmark.registry import STREAMS
from streams.base import StreamDataError
from streams.controls import DTD, SUN397, Caltech101, Food101, ImageFolder, OxfordPets, read_class_names


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)  # CIFAR rows: R, G, B planes


def write_cifar(data_root: Path, hundred: bool = False, per_class: int = 2) -> Path:
    """torchvision CIFAR-10 (cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta) or
    CIFAR-100 (cifar-100-python/train, test, meta): pickled dicts of uint8 rows and labels."""
    spec = STREAMS.get("cifar100" if hundred else "cifar10").obj.spec
    classes = [name.replace(" ", "_") for name in spec.class_names]
    labels = [c for c in range(len(classes)) for _ in range(per_class)]
    label_key, folder = ("fine_labels", "cifar-100-python") if hundred else ("labels", "cifar-10-batches-py")
    base = data_root / folder
    base.mkdir(parents=True)
    batches = ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for i, name in enumerate(batches):
        with open(base / name, "wb") as f:
            pickle.dump({"data": _pixels(len(labels), i), label_key: labels}, f)
    meta, key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(base / meta, "wb") as f:
        pickle.dump({key: classes}, f)
    return base


def write_dtd(data_root: Path) -> Path:
    base = data_root / "dtd" / "dtd"
    for split in ("train", "val", "test"):
        lines = []
        for c, key in enumerate(DTD.spec.keys):
            name = f"{key}_{split}.jpg"
            write_image(base / "images" / key / name, c)
            lines.append(f"{key}/{name}\n")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("".join(lines))
    return base.parent


def write_food101(data_root: Path) -> Path:
    base = data_root / "food-101"
    for split in ("train", "test"):
        meta = {}
        for c, key in enumerate(Food101.spec.keys):
            image_id = f"{c}{0 if split == 'train' else 1}"
            write_image(base / "images" / key / f"{image_id}.jpg", c)
            meta[key] = [f"{key}/{image_id}"]
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return base


PET_BREEDS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
              "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
              "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
              "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
              "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
              "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier"]


def write_pets(data_root: Path) -> Path:
    """oxford-iiit-pet/images/<Breed>_<n>.jpg + annotations/{trainval,test}.txt ('<id> <class> <species> <breed>')."""
    base = data_root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for n, split in enumerate(("trainval", "test")):
        lines = []
        for c, breed in enumerate(PET_BREEDS):
            image_id = f"{breed}_{n + 1}"
            write_image(base / "images" / f"{image_id}.jpg", c)
            lines.append(f"{image_id} {c + 1} {1 if breed[0].isupper() else 2} 1\n")
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return base


def write_flowers(data_root: Path) -> Path:
    """flowers-102/jpg/image_NNNNN.jpg + imagelabels.mat (1-based labels) + setid.mat (trnid/valid/tstid)."""
    base = data_root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for c in range(102):
        for members in ids.values():
            labels.append(c + 1)
            members.append(len(labels))
            write_image(base / "jpg" / f"image_{len(labels):05d}.jpg", len(labels))
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {k: np.array(v) for k, v in ids.items()})
    return base


def write_caltech(data_root: Path, per_class: int = 2) -> Path:
    base = data_root / "caltech101" / "101_ObjectCategories"
    for c, key in enumerate(("BACKGROUND_Google", *Caltech101.spec.keys)):
        for i in range(per_class):
            write_image(base / key / f"image_{i + 1:04d}.jpg", 10 * c + i)
    return base.parent


def write_sun397(data_root: Path, per_class: int = 2) -> Path:
    """SUN397/ClassName.txt ('/a/abbey' lines) + SUN397/<letter>/<class>/sun_*.jpg."""
    base = data_root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"/{key[0]}/{key}\n" for key in SUN397.spec.keys))
    for c, key in enumerate(SUN397.spec.keys):
        for i in range(per_class):
            write_image(base / key[0] / key / f"sun_{c:03d}{i}.jpg", c, size=4)
    return base


def _names_of(stream, split: str) -> Counter:
    data = stream.dataset(split)
    return Counter(stream.spec.class_names[t] for t in data.targets)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_from_pickled_batches(tmp_path, hundred):
    write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    entry = STREAMS.get(name)
    with pytest.raises(StreamDataError, match="MD5 sum .*verify_checksums: false"):
        entry.obj(tmp_path).dataset("test")  # a re-packed copy: torchvision's checksums refuse it
    stream = entry.obj(tmp_path, entry.options(verify_checksums=False))
    n = len(stream.spec.class_names)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert (len(train), len(test)) == ((5 if not hundred else 1) * 2 * n, 2 * n)
    image, label = test[test.ids.index("test/3")]
    assert stream.spec.class_names[label] == ("aquarium fish" if hundred else "automobile")
    assert image.size == (32, 32) and np.array_equal(np.asarray(image).transpose(2, 0, 1).reshape(-1), _pixels(2 * n, len(
        ["train"] if hundred else range(5)))[3])


def test_dtd_food_pets_flowers_label_alignment(tmp_path):
    write_dtd(tmp_path), write_food101(tmp_path), write_pets(tmp_path), write_flowers(tmp_path)
    dtd = DTD(tmp_path)
    assert _names_of(dtd, "test") == {name: 1 for name in DTD.spec.class_names}
    data = dtd.dataset("train")
    assert dtd.spec.class_names[data.targets[data.ids.index("dtd/images/zigzagged/zigzagged_train.jpg")]] == "zigzagged"
    food = Food101(tmp_path)
    data = food.dataset("test")
    assert food.spec.class_names[data.targets[data.ids.index("images/cheese_plate/161.jpg")]] == "cheese plate"
    assert _names_of(food, "train") == {name: 1 for name in Food101.spec.class_names}
    pets = OxfordPets(tmp_path)
    data = pets.dataset("test")
    assert pets.spec.class_names[data.targets[data.ids.index("images/great_pyrenees_2.jpg")]] == "Great Pyrenees"
    entry = STREAMS.get("flowers102")
    flowers = entry.obj(tmp_path, entry.options(verify_checksums=False))
    data = flowers.dataset("test")
    assert len(data) == 102 and flowers.spec.class_names[data.targets[data.ids.index("jpg/image_00006.jpg")]] == \
        "hard-leaved pocket orchid"  # image 6 = class 2's test image


def test_dtd_train_split_missing_a_class_is_refused_not_renumbered(tmp_path):
    base = write_dtd(tmp_path)
    listing = base / "dtd" / "labels" / "train1.txt"
    listing.write_text("".join(line + "\n" for line in listing.read_text().splitlines() if not line.startswith("banded")))
    with pytest.raises(StreamDataError, match=r"empty class 'banded' in the train split"):
        DTD(tmp_path).dataset("train")
    assert _names_of(DTD(tmp_path), "test")["blotchy"] == 1  # other splits are read as they are


def test_caltech_and_sun397_seeded_splits(tmp_path):
    write_caltech(tmp_path), write_sun397(tmp_path)
    caltech = Caltech101(tmp_path)
    test = caltech.dataset("test")
    assert len(test) == 101 and "BACKGROUND_Google" not in " ".join(test.ids)
    i = next(i for i, sid in enumerate(test.ids) if "/car_side/" in sid)
    assert caltech.spec.class_names[test.targets[i]] == "side of a car"
    assert caltech.data_record()["split"]["test"] == 101
    sun = SUN397(tmp_path)
    test = sun.dataset("test")
    assert len(test) == 397 and len(sun.dataset("train")) == 397
    i = next(i for i, sid in enumerate(test.ids) if sid.startswith("a/apartment_building/outdoor/"))
    assert sun.spec.class_names[test.targets[i]] == "apartment building outdoor"


def test_caltech_without_background_folder_names_it(tmp_path):
    import shutil

    base = write_caltech(tmp_path, per_class=1)
    shutil.rmtree(base / "101_ObjectCategories" / "BACKGROUND_Google")
    with pytest.raises(StreamDataError, match="BACKGROUND_Google"):
        Caltech101(tmp_path)


def test_imagefolder_with_imagenet_style_names(tmp_path):
    val = tmp_path / "imagenet" / "val"
    synsets = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    for c, wnid in enumerate(synsets):
        for i in range(3):
            write_image(val / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", c)
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{k} {v}\n" for k, v in synsets.items()))
    entry = STREAMS.get("imagefolder")
    stream = ImageFolder(tmp_path, entry.options(root="imagenet/val", class_names="LOC_synset_mapping.txt",
                                                 templates=["itap of a {}."]))
    test = stream.dataset("test")
    assert stream.spec.class_names == ("tench", "goldfish", "great white shark")
    assert stream.spec.templates == ("itap of a {}.",) and stream.splits == ("test",)
    assert stream.spec.class_names[test.targets[test.ids.index("n01443537/ILSVRC2012_val_11.JPEG")]] == "goldfish"
    split = ImageFolder(tmp_path, entry.options(root=str(val), test_fraction=0.5))  # absolute root, a seeded split
    assert split.spec.class_names == tuple(synsets) and len(split.dataset("train")) == 3
    with pytest.raises(StreamDataError, match="no train split"):
        stream.dataset("train")


def test_imagefolder_names_file_formats_and_errors(tmp_path):
    folders = ["a", "b"]
    (tmp_path / "n.json").write_text(json.dumps({"b": "bee", "a": "ant"}))
    (tmp_path / "n.txt").write_text("ant\nbee\n")
    (tmp_path / "bad.txt").write_text("ant\n")
    assert read_class_names(tmp_path / "n.json", folders) == ["ant", "bee"]
    assert read_class_names(tmp_path / "n.txt", folders) == ["ant", "bee"]
    with pytest.raises(StreamDataError, match="must name each of the 2 class folders"):
        read_class_names(tmp_path / "bad.txt", folders)
    entry = STREAMS.get("imagefolder")
    with pytest.raises(StreamDataError, match="data folder not found"):
        ImageFolder(tmp_path, entry.options(root="nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamDataError, match="no class folders in"):
        ImageFolder(tmp_path, entry.options(root="empty"))
