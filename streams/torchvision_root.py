"""Streams read with torchvision's dataset classes from a local root (download only on request).

Our folder of such a stream is the folder torchvision's class creates under its ``root``
(``gtsrb``, ``fgvc-aircraft-2013b``, ``cifar-10-batches-py``, ...), so torchvision is given
``data_root`` itself. torchvision only enumerates the files; labels are re-derived from the
class names (or the dataset's own label numbers) and checked against the stream's data
file, because several of these classes number the classes they *found* — a missing class
folder would otherwise shift every later label without a word. Where torchvision lists class
folders itself (and would take a hidden folder such as ``.ipynb_checkpoints`` for a class),
the stream lists them instead (:meth:`~streams.files.FileStream.class_folders`).
"""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, ClassVar

from streams.base import Split, StreamDataError
from streams.files import FileStream, Sample, hidden_part
from streams.options import ChecksumOptions, DownloadOptions, DownloadSplitOptions  # noqa: F401  (re-exported)

ZSCL_SEED, ZSCL_TRAIN_RATIO = 42, 0.8  # ZSCL's ClassificationDataset.split_dataset


def zscl_split_indices(n: int) -> tuple[list[int], list[int]]:
    """Indices (into a dataset of ``n`` samples) of ZSCL's train and test parts.

    ZSCL's ``split_dataset`` calls ``torch.utils.data.random_split(dataset, [int(0.8 n), n - int(0.8 n)],
    generator=torch.Generator().manual_seed(42))``, which takes ``torch.randperm(n)`` under that generator
    and cuts it there: the first ``int(0.8 n)`` indices are the train part, in that order.
    """
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(ZSCL_SEED)).tolist()
    n_train = int(ZSCL_TRAIN_RATIO * n)
    return order[:n_train], order[n_train:]


class TorchvisionStream(FileStream):
    """A stream whose files are enumerated by a ``torchvision.datasets`` class.

    ``split_args`` holds the constructor arguments of each split; when it is empty the
    class has no official split and the stream takes a seeded, stratified one.
    ``keys_are_labels``: the dataset's label numbers are authoritative (read from its
    annotation files); otherwise a sample's key is its class name, ``classes[label]``.

    ``split: zscl`` (streams whose options have it, :class:`~streams.options.ZSCLSplitOptions`): the split of
    ZSCL's MTIL code. With an official split, ``zscl_split_args`` replaces the constructor arguments of the
    splits where ZSCL's differ; without one, ZSCL's seeded 80/20 ``random_split`` of torchvision's listing
    (:meth:`zscl_split`) replaces ours.
    """

    dataset_class: ClassVar[str]
    split_args: ClassVar[dict[str, dict[str, Any]]] = {}
    zscl_split_args: ClassVar[dict[str, dict[str, Any]]] = {}
    keys_are_labels: ClassVar[bool] = False

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        if getattr(options, "download", False):
            self.download(Path(data_root))
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)

    def torchvision_class(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self.dataset_class)

    def download(self, data_root: Path) -> None:
        """Let torchvision fetch every split into ``data_root`` (it skips what is there)."""
        cls = self.torchvision_class()
        for kwargs in self.split_args.values() or [{}]:
            try:
                cls(str(data_root), download=True, **kwargs)
            except Exception as err:  # network and archive errors come in many types
                raise StreamDataError(f"{self.spec.name}: torchvision could not download {cls.__name__} "
                                      f"into {data_root}: {err}") from err

    def open_torchvision(self, split: Split | None) -> Any:
        """torchvision's dataset object of ``split`` (None: the whole dataset), errors named."""
        cls = self.torchvision_class()
        try:
            return self.construct(cls, self.split_kwargs(split) if split else {})
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            raise StreamDataError(f"{self.spec.name}: torchvision's {cls.__name__} could not read {self.root}: "
                                  f"{err}\nexpected layout:\n{self.layout}") from err

    @property
    def zscl(self) -> bool:
        """Whether the stream reads ZSCL's split (option ``split: zscl``)."""
        return getattr(self.options, "split", "suite") == "zscl"

    def split_kwargs(self, split: Split) -> dict[str, Any]:
        """torchvision's constructor arguments of the official ``split`` (ZSCL's with ``split: zscl``)."""
        return self.zscl_split_args.get(split, self.split_args[split]) if self.zscl else self.split_args[split]

    def choose_split(self, samples: list[Sample]) -> tuple[dict[Split, list[Sample]], dict[str, Any]]:
        return self.zscl_split(samples) if self.zscl else super().choose_split(samples)

    def zscl_split(self, samples: list[Sample]) -> tuple[dict[Split, list[Sample]], dict[str, Any]]:
        """ZSCL's split of torchvision's listing of the whole dataset (:func:`zscl_split_indices`) and its record.

        The split is made over torchvision's order, so every image torchvision lists must be one of
        ``samples`` (the stream's own listing): a hidden or unreadable entry torchvision counts would shift
        every index after it, and is refused.
        """
        ds = self.open_torchvision(None)
        listed = self.torchvision_ids(ds)
        by_id = {s.id: s for s in samples}
        extra = [i for i in listed if i not in by_id]
        if extra:
            raise StreamDataError(
                f"{self.spec.name}: split: zscl splits torchvision's listing of {self.root}, which holds "
                f"{len(extra)} entr(ies) the stream does not read as images (hidden entries, missing files), e.g. "
                f"{', '.join(extra[:3])}; remove them, or use split: suite\nexpected layout:\n{self.layout}")
        train, test = zscl_split_indices(len(listed))
        parts: dict[Split, list[Sample]] = {"train": [by_id[listed[i]] for i in train],
                                            "test": [by_id[listed[i]] for i in test]}
        return parts, {"method": "zscl random_split", "train_ratio": ZSCL_TRAIN_RATIO, "seed": ZSCL_SEED,
                       "listed": len(listed)}

    def torchvision_ids(self, ds: Any) -> list[str]:
        """Our sample ids of torchvision's dataset object ``ds``, in torchvision's order (hidden entries kept)."""
        return [self.sample(path, None).id for path, _ in self.files_and_labels(ds)]

    def construct(self, cls: type, kwargs: dict[str, Any]) -> Any:
        """Instantiate torchvision's class on our data root (never downloading here)."""
        return cls(str(self.root.parent), **kwargs)

    def files_and_labels(self, ds: Any) -> list[tuple[Path, int]]:
        """(file, label) of every sample of torchvision's dataset object.

        torchvision keeps these in attributes without a public accessor: ``samples`` in
        ImageFolder-based classes, ``_image_files``/``_labels`` in most others.
        """
        if hasattr(ds, "samples"):
            return [(Path(p), int(y)) for p, y in ds.samples]
        return [(Path(p), int(y)) for p, y in zip(ds._image_files, ds._labels)]

    def key(self, ds: Any, path: Path, label: int) -> Hashable:
        return label if self.keys_are_labels else ds.classes[label]

    def samples_of(self, ds: Any) -> list[Sample]:
        """Our samples of torchvision's dataset object; files in hidden entries are not used."""
        return [self.sample(path, self.key(ds, path, label)) for path, label in self.files_and_labels(ds)
                if not hidden_part(path, self.root)]

    def scan(self, split: Split) -> list[Sample]:
        if not self.split_args:
            return super().scan(split)  # seeded split of scan_all()
        return self.samples_of(self.open_torchvision(split))

    def scan_all(self) -> list[Sample]:
        return self.samples_of(self.open_torchvision(None))
