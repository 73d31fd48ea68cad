"""Standard zero-shot suites as control datasets: torchvision roots, and any image folder.

Each torchvision-read control uses torchvision's own dataset class on ``data_root`` (its
folder there is the one torchvision expects) and downloads only with ``download: true``.
``imagefolder`` reads a folder of class folders (ImageNet val and the like) with a
class-names file.
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Hashable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.files import FileStream, Sample, list_folders
from streams.options import ImageFolderOptions
from streams.torchvision_root import ChecksumOptions, TorchvisionStream


def _spec(name: str) -> StreamSpec:
    return StreamSpec.from_file(DATA_DIR / f"{name}.yaml")


def _without_checksums(cls: type) -> type:
    """``cls`` (CIFAR-10/100 or Flowers-102) accepting its files when they exist, whatever
    their MD5 sums: torchvision verifies those on every read, which refuses re-packed copies."""

    class Unchecked(cls):  # type: ignore[misc, valid-type]
        def _files(self) -> list[str]:
            if hasattr(self, "_file_dict"):  # Flowers102
                return [os.path.join(self._base_folder, self._file_dict[k][0]) for k in ("label", "setid")]
            return [os.path.join(self.root, self.base_folder, name)
                    for name, _ in [*self.train_list, *self.test_list, (self.meta["filename"], None)]]

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(p) for p in self._files())

        def _load_meta(self) -> None:  # CIFAR only; same as torchvision's without the MD5 check
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Unchecked.__name__ = cls.__name__
    return Unchecked


class _ChecksummedStream(TorchvisionStream):
    """A torchvision stream whose class verifies MD5 sums unless ``verify_checksums: false``."""

    def construct(self, cls: type, kwargs: dict[str, Any]) -> Any:
        if not (self.options or ChecksumOptions()).verify_checksums:
            cls = _without_checksums(cls)
        try:
            return super().construct(cls, kwargs)
        except RuntimeError as err:
            raise RuntimeError(f"{err} (torchvision checks the MD5 sum of every file; for a copy whose "
                               f"files differ from the released ones set {self.spec.name}.verify_checksums: "
                               "false)") from err


class _InMemory(TorchvisionStream):
    """A torchvision dataset held as one uint8 array (CIFAR, MNIST): sample ids are ``<split>/<row>``."""

    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"train": True}, "test": {"train": False}}
    keys_are_labels = True

    def samples_of(self, ds: Any) -> list[Sample]:
        split = "train" if ds.train else "test"
        return [Sample(image, int(label), f"{split}/{i}")
                for i, (image, label) in enumerate(zip(np.asarray(ds.data), ds.targets))]

    def load_item(self, item: Any) -> Image.Image:
        return Image.fromarray(item).convert("RGB")  # uint8 [32, 32, 3] (CIFAR) or [28, 28] (MNIST)

    def class_location(self, key: Hashable, split: Split) -> str:
        return f"images labelled {key} in the {split} files of {self.root}"


class _CIFAR(_InMemory, _ChecksummedStream):
    pass


CIFAR_LAYOUT = """\
<data_root>/{folder}/          (torchvision.datasets.{cls}(root=<data_root>))
  {files}"""


class CIFAR10(_CIFAR):
    """CIFAR-10 (torchvision root), 10 classes; control."""

    spec = _spec("cifar10")
    folder = "cifar-10-batches-py"
    required = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                "batches.meta")
    layout = CIFAR_LAYOUT.format(folder=folder, cls="CIFAR10", files="  ".join(required))
    dataset_class = "CIFAR10"


class CIFAR100(_CIFAR):
    """CIFAR-100 (torchvision root), 100 classes; control."""

    spec = _spec("cifar100")
    folder = "cifar-100-python"
    required = ("train", "test", "meta")
    layout = CIFAR_LAYOUT.format(folder=folder, cls="CIFAR100", files="  ".join(required))
    dataset_class = "CIFAR100"


class DTD(TorchvisionStream):
    """Describable Textures (torchvision root), 47 classes, partition 1; control."""

    spec = _spec("dtd")
    folder = "dtd"
    layout = """\
<data_root>/dtd/                        (torchvision.datasets.DTD(root=<data_root>))
  dtd/images/<class>/*.jpg
  dtd/labels/train1.txt, dtd/labels/test1.txt   '<class>/<file>.jpg' per line"""
    required = ("dtd/images", "dtd/labels/train1.txt", "dtd/labels/test1.txt")
    dataset_class = "DTD"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {
        "train": {"split": "train", "partition": 1}, "test": {"split": "test", "partition": 1}}


class Food101(TorchvisionStream):
    """Food-101 (torchvision root), 101 classes; control."""

    spec = _spec("food101")
    folder = "food-101"
    layout = """\
<data_root>/food-101/                   (torchvision.datasets.Food101(root=<data_root>))
  images/<class>/<id>.jpg
  meta/train.json, meta/test.json        {"<class>": ["<class>/<id>", ...], ...}"""
    required = ("images", "meta/train.json", "meta/test.json")
    dataset_class = "Food101"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "train"}, "test": {"split": "test"}}


class OxfordPets(TorchvisionStream):
    """Oxford-IIIT Pet (torchvision root), 37 breeds; control."""

    spec = _spec("pets")
    folder = "oxford-iiit-pet"
    layout = """\
<data_root>/oxford-iiit-pet/            (torchvision.datasets.OxfordIIITPet(root=<data_root>))
  images/<Breed>_<n>.jpg
  annotations/trainval.txt, annotations/test.txt   '<Breed>_<n> <class id> <species> <breed id>'"""
    required = ("images", "annotations/trainval.txt", "annotations/test.txt")
    dataset_class = "OxfordIIITPet"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "trainval"}, "test": {"split": "test"}}
    keys_are_labels = True

    def files_and_labels(self, ds: Any) -> list[tuple[Path, int]]:
        return [(Path(p), int(y)) for p, y in zip(ds._images, ds._labels)]  # no public accessor


class Flowers102(_ChecksummedStream):
    """Oxford Flowers-102 (torchvision root), 102 classes; control."""

    spec = _spec("flowers102")
    folder = "flowers-102"
    layout = """\
<data_root>/flowers-102/                (torchvision.datasets.Flowers102(root=<data_root>))
  jpg/image_NNNNN.jpg
  imagelabels.mat, setid.mat"""
    required = ("jpg", "imagelabels.mat", "setid.mat")
    dataset_class = "Flowers102"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "train"}, "test": {"split": "test"}}
    keys_are_labels = True


class Caltech101(TorchvisionStream):
    """Caltech-101 (torchvision root), 101 classes, seeded split; control."""

    spec = _spec("caltech101")
    folder = "caltech101"
    layout = """\
<data_root>/caltech101/                 (torchvision.datasets.Caltech101(root=<data_root>))
  101_ObjectCategories/<class>/image_0001.jpg ...   (BACKGROUND_Google is not a class)"""
    required = ("101_ObjectCategories/BACKGROUND_Google",)  # torchvision removes it from the class list
    dataset_class = "Caltech101"

    def scan_all(self) -> list[Sample]:
        # listed here: torchvision counts every entry of a class folder (hidden ones too) as an image
        return self.class_folders(self.root / "101_ObjectCategories", {k: k for k in self.spec.keys},
                                  others=True, ignore=("BACKGROUND_Google",))

    def files_and_labels(self, ds: Any) -> list[tuple[Path, int]]:
        # torchvision numbers each class folder's entries 1..n and names them image_NNNN.jpg
        base = self.root / "101_ObjectCategories"
        return [(base / ds.categories[y] / f"image_{i:04d}.jpg", int(y)) for i, y in zip(ds.index, ds.y)]


class SUN397(TorchvisionStream):
    """SUN397 scenes (torchvision root), 397 classes, seeded split; control."""

    spec = _spec("sun397")
    folder = "SUN397"
    layout = """\
<data_root>/SUN397/                     (torchvision.datasets.SUN397(root=<data_root>))
  ClassName.txt                          '/a/abbey' per line
  a/abbey/sun_*.jpg ...                  one folder per class"""
    required = ("ClassName.txt",)
    dataset_class = "SUN397"

    def scan_all(self) -> list[Sample]:
        # listed here: torchvision takes every sun_*.jpg below the root, hidden folders too
        samples = self.class_folders(self.root, {k: f"{str(k)[0]}/{k}" for k in self.spec.keys}, extensions=(".jpg",))
        return [s for s in samples if s.item.name.startswith("sun_")]


MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_LEGACY = ("processed/training.pt", "processed/test.pt")


class MNIST(_InMemory):
    """MNIST (torchvision root), 10 digits; control."""

    spec = _spec("mnist")
    folder = "MNIST"
    layout = """\
<data_root>/MNIST/                      (torchvision.datasets.MNIST(root=<data_root>))
  raw/train-images-idx3-ubyte  raw/train-labels-idx1-ubyte    train: idx files (unzipped)
  raw/t10k-images-idx3-ubyte   raw/t10k-labels-idx1-ubyte     test
  (or torchvision's older processed/training.pt and processed/test.pt)"""
    dataset_class = "MNIST"

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        if not all((self.root / rel).is_file() for rel in MNIST_LEGACY):  # torchvision reads those first
            for name in MNIST_RAW:
                self.require(self.root / "raw" / name)


class StanfordCars(TorchvisionStream):
    """Stanford Cars (torchvision root), 196 car models; control."""

    spec = _spec("stanfordcars")
    folder = "stanford_cars"
    layout = """\
<data_root>/stanford_cars/              (torchvision.datasets.StanfordCars(root=<data_root>))
  devkit/cars_meta.mat                   the 196 class names
  devkit/cars_train_annos.mat            train: 'annotations' records (fname, class 1..196)
  cars_train/<fname>.jpg
  cars_test_annos_withlabels.mat         test: the same records
  cars_test/<fname>.jpg"""
    required = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_train", "cars_test_annos_withlabels.mat",
                "cars_test")
    dataset_class = "StanfordCars"
    split_args: ClassVar[dict[str, dict[str, Any]]] = {"train": {"split": "train"}, "test": {"split": "test"}}
    keys_are_labels = True

    def files_and_labels(self, ds: Any) -> list[tuple[Path, int]]:
        return [(Path(p), int(y)) for p, y in ds._samples]  # no public accessor

    def class_location(self, key: Hashable, split: Split) -> str:
        annotations = "devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        return f"records of class {int(key) + 1} in {self.root / annotations}"


def read_class_names(path: Path, folders: list[str]) -> list[str]:
    """Names of the sorted class ``folders`` from a class-names file.

    JSON: ``{folder: name}`` or a list in folder order. Text: either ``<folder> <name>``
    lines (e.g. ImageNet's ``LOC_synset_mapping.txt``) or one name a line in folder order.
    """
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        names = [data.get(f) for f in folders] if isinstance(data, dict) else list(data)
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        pairs = dict(line.split(maxsplit=1) for line in lines if len(line.split(maxsplit=1)) == 2)
        names = [pairs.get(f) for f in folders] if set(folders) <= set(pairs) else lines
    if len(names) != len(folders) or any(not isinstance(n, str) for n in names):
        raise StreamDataError(f"imagefolder: {path} must name each of the {len(folders)} class folders "
                              f"({', '.join(folders[:3])}, ...)")
    return names


class ImageFolder(FileStream):
    """Any folder of class folders with a class-names file (e.g. ImageNet val); control."""

    layout = """\
<imagefolder.root>/<class folder>/*.jpg ...    one folder per class (any image format)
<imagefolder.class_names>                      optional: '<folder> <name>' lines, one name a line
                                               in sorted-folder order, or JSON {folder: name}"""

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        opts: ImageFolderOptions = options
        self.folder = opts.root  # absolute, or relative to data_root
        root = Path(data_root) / opts.root
        folders = [p.name for p in list_folders(root)] if root.is_dir() else []
        names = folders
        if opts.class_names and folders:
            names_file = Path(data_root) / opts.class_names
            if not names_file.is_file():
                raise StreamDataError(f"imagefolder: class-names file not found: {names_file}")
            names = read_class_names(names_file, folders)
        self.spec = StreamSpec("imagefolder", 1, tuple(names), tuple(opts.templates), tuple(range(len(names))),
                               tuple(folders))
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        if not folders:
            raise StreamDataError(f"imagefolder: no class folders in {root}\nexpected layout:\n{self.layout}")

    @property
    def splits(self) -> tuple[Split, ...]:  # type: ignore[override]
        return ("test",) if self.options.test_fraction == 1 else ("train", "test")

    def scan(self, split: Split) -> list[Sample]:
        if self.options.test_fraction == 1:
            return self.scan_all()
        return super().scan(split)

    def scan_all(self) -> list[Sample]:
        return self.class_folders(self.root, {k: k for k in self.spec.keys})
