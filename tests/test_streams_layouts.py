"""The paper's streams on tiny trees of real image files in their exact on-disk layouts.

The ``write_*`` builders here are shared with the other ``test_streams_*`` modules: each
writes a few small PIL-generated images per class, laid out exactly as the real release
(and torchvision's dataset class) expects.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.registry import STREAMS
from streams.aircraft import Aircraft
from streams.base import StreamDataError
from streams.counteranimal import CounterAnimal
from streams.dalle import Dalle
from streams.eurosat import EuroSAT
from streams.files import stratified_split
from streams.gtsrb import GTSRB
from streams.tsi import TSI

TSI_TRAIN_SUBJECTS, TSI_TEST_SUBJECTS = ("p03", "p25"), ("p02",)


# --------------------------------------------------------------------------- builders
def write_image(path: Path, seed: int, size: int = 8) -> Path:
    """A small RGB image of random pixels, in the format of ``path``'s extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def corrupt(path: Path) -> Path:
    """Overwrite an image with bytes no decoder accepts (the file keeps its name)."""
    path.write_bytes(b"this is not an image")
    return path


def write_gtsrb(data_root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    """torchvision GTSRB: Training/000NN/*.ppm, Final_Test/Images/*.ppm + GT-final_test.csv."""
    base = data_root / "gtsrb"
    rows = []
    for c in range(43):
        for i in range(train_per_class):
            write_image(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{i:05d}_00000.ppm", 1000 * c + i)
        for _ in range(test_per_class):
            name = f"{len(rows):05d}.ppm"
            write_image(base / "GTSRB" / "Final_Test" / "Images" / name, 10**6 + len(rows))
            rows.append([name, 8, 8, 0, 0, 7, 7, c])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)
    return base


def write_aircraft(data_root: Path, train_per_class: int = 2) -> Path:
    """torchvision FGVCAircraft: data/variants.txt, data/images/*.jpg, images_variant_{trainval,test}.txt."""
    data = data_root / "fgvc-aircraft-2013b" / "data"
    variants = list(Aircraft.spec.class_names)
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    n = 0
    for v in variants:
        for split, count in (("trainval", train_per_class), ("test", 1)):
            for _ in range(count):
                image_id = f"{1000000 + n:07d}"
                write_image(data / "images" / f"{image_id}.jpg", n)
                lines[split].append(f"{image_id} {v}\n")
                n += 1
    for split, rows in lines.items():
        (data / f"images_variant_{split}.txt").write_text("".join(rows))
    return data.parent


def write_eurosat(data_root: Path, per_class: int = 5) -> Path:
    """torchvision EuroSAT: eurosat/2750/<Class>/<Class>_<n>.jpg."""
    base = data_root / "eurosat" / "2750"
    for c, folder in enumerate(EuroSAT.spec.keys):
        for i in range(per_class):
            write_image(base / folder / f"{folder}_{i + 1}.jpg", 100 * c + i)
    return base.parent


def write_counteranimal(data_root: Path, counter_per_class: int = 4) -> Path:
    """LAION-final/<id> <name>/{common-*,counter-*}/*.jpg."""
    base = data_root / "counteranimal" / "LAION-final"
    for key, name in zip(CounterAnimal.spec.keys, CounterAnimal.spec.class_names):
        folder = base / f"{key} {name}"
        write_image(folder / "common-grass" / "0.jpg", key)
        for i in range(counter_per_class):
            write_image(folder / "counter-snow" / f"{i}.jpg", 1000 * key + i)
    return base.parent


def write_tsi(data_root: Path, captions: bool = True, folder: str = "images_trunc") -> Path:
    """images_trunc/<Action>_<pXX>_<...>.jpg (+ the captions pickle: file name -> caption)."""
    base = data_root / "tsi"
    table = {}
    for c, action in enumerate(TSI.spec.keys):
        for s, subject in enumerate(TSI_TRAIN_SUBJECTS + TSI_TEST_SUBJECTS + ("p99",)):
            name = f"{action}_{subject}_r00_v0{s}_c01_f0001.jpg"
            write_image(base / folder / name, 100 * c + s)
            table[name] = f"a person is {TSI.spec.class_names[c]} in the kitchen"
    if captions:
        with open(base / "images_text_description_short_trunc.pkl", "wb") as f:
            pickle.dump(table, f)
    return base


def write_dalle(data_root: Path, per_class: int = 2, folder: str = "v2") -> Path:
    """<root>/v2/<activity words joined by dashes>_<n>.png."""
    base = data_root / "dalle"
    for c, key in enumerate(Dalle.spec.keys):
        for i in range(per_class):
            write_image(base / folder / f"{key}_{i}.png", 100 * c + i)
    return base


PAPER_WRITERS = {"gtsrb": write_gtsrb, "aircraft": write_aircraft, "eurosat": write_eurosat,
                 "counteranimal": write_counteranimal, "tsi": write_tsi, "dalle": write_dalle}


@pytest.fixture(scope="module")
def paper_root(tmp_path_factory) -> Path:
    """A data_root holding tiny trees of all six paper streams (read-only in tests)."""
    root = tmp_path_factory.mktemp("data")
    for write in PAPER_WRITERS.values():
        write(root)
    return root


def _label_of(stream, split: str, id_suffix: str) -> str:
    data = stream.dataset(split)
    (i,) = [i for i, sid in enumerate(data.ids) if sid.endswith(id_suffix)]
    return stream.spec.class_names[data.targets[i]]


# --------------------------------------------------------------------------- docs/protocol.md
PROTOCOL_ORDERS = {
    "gtsrb": "25,2,11,1,40,27,5,9,17 | 32,29,20,39,21,15,23,10,3 | 18,38,42,14,22,35,34,19,33 | 12,26,41,0,37,6,13,24 "
             "| 30,28,31,7,16,4,36,8",
    "aircraft": "23,8,11,7,48,13,1,91,94,54,16,63,52,41,80,2,47,87,78,66 | 19,6,24,10,59,30,22,29,83,37,93,81,43,99,86,"
                "28,34,88,44,14 | 84,70,4,20,15,21,31,76,57,67,73,50,69,25,98,46,96,0,72,35 | 58,92,3,95,56,90,26,"
                "40,55,89,75,71,60,42,9,82,39,18,77,68 | 32,79,12,85,36,17,64,27,74,45,61,38,51,62,65,33,5,53,97,49",
    "eurosat": "0,1 | 2,3 | 4,5 | 6,7 | 8,9",
    "counteranimal": "150,296,79,57,144,133,349,293,100 | 49,305,128,54,80,16,275,76,360 | 30,316,33,39,71,89,37,23,42 "
                     "| 337,81,357,9,290,41,70,102,279 | 130,291,20,10,56,277,276,58,83",
    "tsi": "WatchTV,Laydown,Sitdown,Pour.Fromkettle,Enter,Drink.Frombottle | Eat.Attable,Pour.Frombottle,"
           "Cook.Cleandishes,Maketea.Boilwater,Leave,Cook.Cleanup | Maketea.Insertteabag,Makecoffee.Pourwater,"
           "Drink.Fromcan,Readbook,Cutbread | Drink.Fromcup,Drink.Fromglass,Usetablet,Pour.Fromcan,Usetelephone | "
           "Walk,Cook.Stir,Makecoffee.Pourgrains,Cook.Cut,Uselaptop",
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_ORDERS))
def test_session_classes_follow_protocol_order(name):
    spec = STREAMS.get(name).obj.spec
    # counteranimal's order is in ImageNet ids and tsi's in action names: compare keys
    as_key = (lambda k: k) if name == "tsi" else int
    expected = [[as_key(k.strip()) for k in group.split(",")] for group in PROTOCOL_ORDERS[name].split("|")]
    keys = spec.keys if name in ("counteranimal", "tsi") else range(len(spec.class_names))
    assert [[keys[c] for c in group] for group in spec.session_classes(5)] == expected


def test_spec_names_and_templates_of_protocol():
    assert GTSRB.spec.class_names[0] == "red and white circle 20 kph speed limit" and len(GTSRB.spec.class_names) == 43
    assert GTSRB.spec.templates == ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
                                    'a close up photo of a "{}" traffic sign.')
    assert ", ".join(EuroSAT.spec.class_names) == (
        "annual crop land, forest, brushland or shrubland, highway or road, industrial buildings or commercial "
        "buildings, pasture land, permanent crop land, residential buildings or homes or apartments, river, lake or sea")
    # templates: the released code's strings
    assert EuroSAT.spec.templates == ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                                      "a centered satellite photo of the {}.")
    assert Aircraft.spec.templates == ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft.")
    assert list(Aircraft.spec.class_names) == sorted(Aircraft.spec.class_names) and len(Aircraft.spec.class_names) == 100
    assert CounterAnimal.spec.templates == ("a photo of a {}",) and len(CounterAnimal.spec.keys) == 45
    assert dict(zip(TSI.spec.keys, TSI.spec.class_names))["Cook.Cleandishes"] == "washing dishes"
    assert len(Dalle.spec.class_names) == 22 and Dalle.spec.templates == ("a photo of a person {}",)  # the released prompt


# --------------------------------------------------------------------------- loaders
def test_gtsrb_counts_labels_and_names(paper_root):
    stream = GTSRB(paper_root)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert (len(train), len(test)) == (86, 43)
    assert Counter(train.targets) == {c: 2 for c in range(43)} and sorted(test.targets) == list(range(43))
    assert _label_of(stream, "train", "Training/00014/00014_00001_00000.ppm") == "stop"
    # the test label comes from GT-final_test.csv (row 14 is ClassId 14)
    assert _label_of(stream, "test", "Images/00014.ppm") == "stop"


def test_aircraft_counts_labels_and_names(paper_root):
    stream = Aircraft(paper_root)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert (len(train), len(test)) == (200, 100)
    lines = (paper_root / "fgvc-aircraft-2013b/data/images_variant_test.txt").read_text().splitlines()
    for line in lines[::17]:
        image_id, variant = line.split(" ", 1)
        assert _label_of(stream, "test", f"{image_id}.jpg") == variant


def test_eurosat_seeded_stratified_split(paper_root):
    stream = EuroSAT(paper_root)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert Counter(test.targets) == {c: 1 for c in range(10)} and Counter(train.targets) == {c: 4 for c in range(10)}
    assert not set(train.ids) & set(test.ids)
    assert _label_of(stream, "train", "2750/Forest/Forest_2.jpg") == "forest" or \
        _label_of(stream, "test", "2750/Forest/Forest_2.jpg") == "forest"
    record = stream.data_record()["split"]
    assert record["test_fraction"] == 0.2 and record["split_seed"] == 0 and record["ids"]["test"] == test.ids
    other = EuroSAT(paper_root, STREAMS.get("eurosat").options(split_seed=1))
    assert other.dataset("test").ids != test.ids  # the seed matters
    assert EuroSAT(paper_root).dataset("test").ids == test.ids  # and fixes the split


def test_stratified_split_is_per_class_and_order_free():
    ids = [f"c{c}/{i}" for c in range(3) for i in range(10)]
    keys = [c for c in range(3) for _ in range(10)]
    split = stratified_split(ids, keys, 0.3, 0, "s")
    shuffled = list(reversed(range(30)))
    again = stratified_split([ids[i] for i in shuffled], [keys[i] for i in shuffled], 0.3, 0, "s")
    assert sorted(ids[i] for i in split["test"]) == sorted(ids[shuffled[i]] for i in again["test"])
    assert Counter(keys[i] for i in split["test"]) == {0: 3, 1: 3, 2: 3}
    more_ids, more_keys = [*ids, "c2/x"], [*keys, 2]  # one more image of class 2
    more = stratified_split(more_ids, more_keys, 0.3, 0, "s")
    assert [more_ids[i] for i in more["test"] if more_keys[i] < 2] == [ids[i] for i in split["test"] if keys[i] < 2]


def test_counteranimal_uses_counter_images_keyed_by_imagenet_id(paper_root):
    stream = CounterAnimal(paper_root)
    train, test = stream.dataset("train"), stream.dataset("test")
    assert len(train) + len(test) == 45 * 4 and all("/counter-snow/" in i for i in train.ids + test.ids)
    assert Counter(test.targets) == {c: 1 for c in range(45)}
    assert _label_of(stream, "train", "9 ostrich/counter-snow/0.jpg") == "ostrich" or \
        _label_of(stream, "test", "9 ostrich/counter-snow/0.jpg") == "ostrich"


def test_tsi_splits_by_subject_with_captions(paper_root):
    stream = TSI(paper_root, STREAMS.get("tsi").options(captions=True))
    train, test = stream.dataset("train"), stream.dataset("test")
    assert (len(train), len(test)) == (27 * 2, 27)  # p99 is in neither list
    assert all("_p02_" in i for i in test.ids) and not any("_p02_" in i for i in train.ids)
    image, label, caption = train[train.ids.index("images_trunc/Cook.Cleandishes_p03_r00_v00_c01_f0001.jpg")]
    assert TSI.spec.class_names[label] == "washing dishes" and caption == "a person is washing dishes in the kitchen"
    assert isinstance(image, Image.Image) and len(test[0]) == 2  # test images: no captions


def test_tsi_accepts_images_folder_and_captions_follow_the_pickle(tmp_path, paper_root):
    write_tsi(tmp_path, captions=False, folder="images")
    train = TSI(tmp_path).dataset("train")
    assert train.captions is None and len(train) == 54  # no pickle: the class templates
    assert len(TSI(paper_root).dataset("train").captions) == 54  # a pickle: its captions by default
    assert TSI(paper_root, STREAMS.get("tsi").options(captions=False)).dataset("train").captions is None


def test_dalle_is_a_control_with_its_22_activities(paper_root, tmp_path):
    stream = Dalle(paper_root)
    test = stream.dataset("test")
    assert len(test) == 44 and Counter(test.targets) == {c: 2 for c in range(22)}
    assert _label_of(stream, "test", "v2/cutting-bread_1.png") == "cutting bread"
    with pytest.raises(StreamDataError, match="no train split"):
        stream.dataset("train")
    write_dalle(tmp_path, folder=".")  # the PNGs directly under the root
    assert len(Dalle(tmp_path).dataset("test")) == 44


def test_few_shot_sessions_are_deterministic_and_follow_the_order(paper_root):
    stream = TSI(paper_root)
    first = stream.sessions(5, 1, shot_seed=3)
    assert [s.ids for s in first] == [s.ids for s in TSI(paper_root).sessions(5, 1, shot_seed=3)]
    assert [s.ids for s in first] != [s.ids for s in TSI(paper_root).sessions(5, 1, shot_seed=4)]
    train = stream.dataset("train")
    by_id = dict(zip(train.ids, train.targets))
    assert [sorted({by_id[i] for i in s.ids}) for s in first] == [sorted(g) for g in stream.spec.session_classes(5)]
    assert all(len(s.ids) == len(s.classes) and not s.short_classes for s in first)
    short = stream.sessions(5, 5, shot_seed=3)  # 2 images per class < 5 shots: all kept, and said so
    assert all(sorted(s.short_classes) == sorted(s.classes) and len(s.ids) == 2 * len(s.classes) for s in short)


HASH_SCRIPT = """
import json, sys, benchmark
from streams.eurosat import EuroSAT
from streams.tsi import TSI
root = sys.argv[1]
print(json.dumps([EuroSAT(root).dataset("test").ids, [s.ids for s in TSI(root).sessions(5, 1, shot_seed=1)]]))
"""


def test_splits_and_shots_do_not_depend_on_the_hash_seed(paper_root):
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    out = subprocess.run([sys.executable, "-c", HASH_SCRIPT, str(paper_root)], env=env, capture_output=True,
                         text=True, check=True)
    here = [EuroSAT(paper_root).dataset("test").ids, [s.ids for s in TSI(paper_root).sessions(5, 1, shot_seed=1)]]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["gtsrb", "aircraft", "eurosat", "counteranimal", "tsi", "dalle", "cifar10",
                                  "cifar100", "dtd", "food101", "pets", "flowers102", "caltech101", "sun397"])
def test_missing_root_names_the_folder_and_shows_the_layout(tmp_path, name):
    entry = STREAMS.get(name)
    with pytest.raises(StreamDataError) as err:
        entry.obj(tmp_path, entry.options() if entry.options else None)
    message = str(err.value)
    assert f"data folder not found: {tmp_path / entry.obj.folder}" in message and "expected layout:" in message


def test_wrong_layout_names_the_missing_part(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(StreamDataError, match=f"missing: {tmp_path / 'gtsrb' / 'GT-final_test.csv'}"):
        GTSRB(tmp_path)
    (tmp_path / "tsi").mkdir()
    with pytest.raises(StreamDataError, match=r"image folder missing .*images_trunc") as err:
        TSI(tmp_path)
    assert "<Action>_<pXX>" in str(err.value)


def test_missing_class_folder_is_named(tmp_path):
    import shutil

    base = write_gtsrb(tmp_path)
    shutil.rmtree(base / "GTSRB" / "Training" / "00005")
    with pytest.raises(StreamDataError, match=r"class folder missing \(class 5\): .*Training/00005"):
        GTSRB(tmp_path).dataset("train")
    base = write_counteranimal(tmp_path)
    shutil.rmtree(base / "LAION-final" / "9 ostrich")
    with pytest.raises(StreamDataError, match=r"class folder missing: .*LAION-final/9 <name> .*'ostrich'"):
        CounterAnimal(tmp_path).dataset("train")


def test_empty_class_is_named(tmp_path):
    base = write_eurosat(tmp_path)
    for f in (base / "2750" / "Forest").iterdir():
        f.unlink()
    with pytest.raises(StreamDataError, match=r"empty class folder .*2750/Forest"):
        EuroSAT(tmp_path).dataset("test")
    base = write_tsi(tmp_path)
    for f in (base / "images_trunc").glob("Walk_p02_*"):
        f.unlink()
    with pytest.raises(StreamDataError, match=r"empty class 'walking' in the test split: no frames .*Walk_<pXX>_"):
        TSI(tmp_path).dataset("test")


def test_unknown_class_is_refused(tmp_path):
    base = write_eurosat(tmp_path)
    write_image(base / "2750" / "Clouds" / "Clouds_1.jpg", 0)
    with pytest.raises(StreamDataError, match="not in the stream's class list, e.g. Clouds"):
        EuroSAT(tmp_path).dataset("train")


def test_corrupted_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    base = write_dalle(tmp_path)
    bad = corrupt(base / "v2" / "walking_1.png")
    data = Dalle(tmp_path).dataset("test")
    with pytest.raises(StreamDataError, match=f"cannot read image {bad}"):
        data[data.ids.index("v2/walking_1.png")]
    skipping = Dalle(tmp_path, skip_bad_images=True)
    assert len(skipping.dataset("test")) == 43 and "v2/walking_1.png" not in skipping.dataset("test").ids
    assert skipping.data_record()["skipped_images"] == {"count": 1, "ids": ["v2/walking_1.png"]}
