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


class TorchvisionStream(FileStream):
    """A stream whose files are enumerated by a ``torchvision.datasets`` class.

    ``split_args`` holds the constructor arguments of each split; when it is empty the
    class has no official split and the stream takes a seeded, stratified one.
    ``keys_are_labels``: the dataset's label numbers are authoritative (read from its
    annotation files); otherwise a sample's key is its class name, ``classes[label]``.
    """

    dataset_class: ClassVar[str]
    split_args: ClassVar[dict[str, dict[str, Any]]] = {}
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
            return self.construct(cls, self.split_args[split] if split else {})
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            raise StreamDataError(f"{self.spec.name}: torchvision's {cls.__name__} could not read {self.root}: "
                                  f"{err}\nexpected layout:\n{self.layout}") from err

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
