"""What every stream is made of: a :class:`StreamSpec` (data), labelled images and a loader.

A user adds a stream in one file: a data file with class names, templates and the session
class order, plus a :class:`Stream` subclass whose :meth:`Stream.dataset` reads the real
on-disk layout, registered with ``@STREAMS.register("name", options=...)``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import yaml
from PIL import Image
from torch.utils.data import Dataset

from benchmark.errors import DataError
from streams.sampling import FewShotSampler, Session

DATA_DIR = Path(__file__).parent / "data"
Split = Literal["train", "test"]


class StreamDataError(DataError):
    """A dataset root or file is missing or unreadable; the message names the path."""


@dataclass(frozen=True)
class StreamSpec:
    """A stream's data: class names, prompt templates and the session class order.

    ``class_order`` lists class indices in the order sessions receive them; sessions take
    consecutive groups ``numpy.array_split(class_order, n_sessions)``. ``class_keys`` are
    the dataset's own identifiers of the classes (folder names, ImageNet ids, ...), aligned
    with ``class_names``; without them a class's key is its index. In a data file the
    order may be written with keys instead of indices (``class_order_keys``).
    """

    name: str
    version: int
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    class_order: tuple[int, ...]
    class_keys: tuple[Hashable, ...] | None = None

    @classmethod
    def from_file(cls, path: Path) -> StreamSpec:
        data = yaml.safe_load(Path(path).read_text())
        n = len(data["class_names"])
        keys = tuple(data["class_keys"]) if "class_keys" in data else None
        if keys is not None and (len(keys) != n or len(set(keys)) != n):
            raise ValueError(f"{path}: class_keys must be {n} distinct keys, one per class name")
        order = data.get("class_order", range(n))
        if "class_order_keys" in data:
            position = {k: i for i, k in enumerate(keys or ())}
            unknown = [k for k in data["class_order_keys"] if k not in position]
            if unknown:
                raise ValueError(f"{path}: class_order_keys names unknown keys {unknown[:5]}")
            order = [position[k] for k in data["class_order_keys"]]
        spec = cls(
            name=data["name"],
            version=int(data["version"]),
            class_names=tuple(data["class_names"]),
            templates=tuple(data["templates"]),
            class_order=tuple(order),
            class_keys=keys,
        )
        if sorted(spec.class_order) != list(range(n)):
            raise ValueError(f"{path}: class_order must be a permutation of 0..{n - 1}")
        if not all("{}" in t for t in spec.templates):
            raise ValueError(f"{path}: every template needs a '{{}}' for the class name")
        return spec

    @property
    def keys(self) -> tuple[Hashable, ...]:
        """Every class's key, in label order (the indices themselves when there are no keys)."""
        return self.class_keys if self.class_keys is not None else tuple(range(len(self.class_names)))

    def key_index(self) -> dict[Hashable, int]:
        """Class key → label."""
        return {k: i for i, k in enumerate(self.keys)}

    def session_classes(self, n_sessions: int) -> list[list[int]]:
        """Class indices of each session (disjoint, in ``class_order``)."""
        if n_sessions > len(self.class_order):
            raise ValueError(f"{self.name}: {n_sessions} sessions but only {len(self.class_order)} classes")
        return [g.tolist() for g in np.array_split(np.array(self.class_order), n_sessions)]

    def captions(self, label: int) -> list[str]:
        """Every prompt of class ``label`` (one per template)."""
        return [t.format(self.class_names[label]) for t in self.templates]


def open_image(path: Path) -> Image.Image:
    """Decode an image file to RGB, naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise StreamDataError(f"cannot read image {path}: {err}") from err


class LabelledImages(Dataset):
    """Images with integer labels and stable sample ids; yields ``(image, label)``, or
    ``(image, label, caption)`` when the dataset has its own per-image captions.

    ``items[i]`` is whatever ``load`` turns into a PIL image (a path, an array, ...);
    ``transform`` (PIL → tensor [3, H, W]) is applied on access.
    """

    def __init__(
        self,
        items: Sequence[Any],
        targets: Sequence[int],
        ids: Sequence[str],
        load: Callable[[Any], Image.Image],
        transform: Callable | None = None,
        captions: Sequence[str] | None = None,
    ) -> None:
        if not len(items) == len(targets) == len(ids):
            raise ValueError("items, targets and ids must have the same length")
        if captions is not None and len(captions) != len(items):
            raise ValueError("captions must have one entry per item")
        self.items = list(items)
        self.targets = [int(t) for t in targets]
        self.ids = list(ids)
        self.load = load
        self.transform = transform
        self.captions = list(captions) if captions is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image = self.load(self.items[i])
        image = self.transform(image) if self.transform else image
        if self.captions is not None:
            return image, self.targets[i], self.captions[i]
        return image, self.targets[i]

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages([self.items[i] for i in indices], [self.targets[i] for i in indices],
                              [self.ids[i] for i in indices], self.load, self.transform,
                              None if self.captions is None else [self.captions[i] for i in indices])

    def with_classes(self, classes: Sequence[int]) -> LabelledImages:
        keep = set(classes)
        return self.subset([i for i, t in enumerate(self.targets) if t in keep])

    def with_transform(self, transform: Callable | None) -> LabelledImages:
        return LabelledImages(self.items, self.targets, self.ids, self.load, transform, self.captions)


class Stream(ABC):
    """A registered data stream: its spec plus a loader of its on-disk layout.

    Subclasses set :attr:`spec` and :attr:`folder` (its folder name under ``data_root``) and
    implement :meth:`dataset`; ``options`` is the stream's validated options dataclass.
    """

    spec: ClassVar[StreamSpec]
    folder: ClassVar[str | None] = None  # None: needs no files on disk
    layout: ClassVar[str] = ""  # the expected tree, shown when the root is wrong
    splits: ClassVar[tuple[Split, ...]] = ("train", "test")  # ("test",): a control-only stream

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        self.root = Path(data_root) / self.folder if self.folder else None
        self.options = options
        self.skip_bad_images = skip_bad_images
        self.skipped: dict[str, list[str]] = {}  # split -> ids of unreadable images left out
        if self.root is not None and not self.root.is_dir():
            raise StreamDataError(
                f"{self.spec.name}: data folder not found: {self.root}\nexpected layout:\n{self.layout}"
            )

    def data_record(self) -> dict[str, Any]:
        """What a run record must keep about this stream's data: where its texts come from
        (data file version, dataset files read instead), skipped files, the split."""
        record: dict[str, Any] = {"texts": {"version": self.spec.version, **self.text_sources()}}
        skipped = sorted(i for ids in self.skipped.values() for i in ids)
        if skipped:
            record["skipped_images"] = {"count": len(skipped), "ids": skipped}
        return record

    def text_sources(self) -> dict[str, str]:
        """Dataset files that replace texts of the stream's data file, by what they hold
        (``class_names``, ``captions``: training captions); empty when none does."""
        return {}

    @abstractmethod
    def dataset(self, split: Split) -> LabelledImages:
        """The whole ``split`` (images untransformed)."""

    def sessions(self, n_sessions: int, shots: int, shot_seed: int) -> list[Session]:
        """The few-shot training sessions (sample ids drawn by :class:`FewShotSampler`)."""
        train = self.dataset("train")
        sampler = FewShotSampler(self.spec.name, shots, shot_seed)
        return [sampler.sample(train.targets, train.ids, i + 1, classes)
                for i, classes in enumerate(self.spec.session_classes(n_sessions))]

    def benchmark(self, sessions: list[Session], train_transform: Callable, eval_transform: Callable):
        """An Avalanche benchmark: train stream = sessions, test stream = their classes' test images."""
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils import as_classification_dataset

        train, test = self.dataset("train"), self.dataset("test")
        index = {sid: i for i, sid in enumerate(train.ids)}
        return benchmark_from_datasets(
            train=[as_classification_dataset(train.subset([index[s] for s in sess.ids]).with_transform(train_transform))
                   for sess in sessions],
            test=[as_classification_dataset(test.with_classes(sess.classes).with_transform(eval_transform))
                  for sess in sessions],
        )
