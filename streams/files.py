"""Streams read from image files on disk: layout checks, class folders, seeded splits.

Every loader of a real on-disk layout derives from :class:`FileStream`. It only says how
to find ``(item, class key, sample id)`` triples for a split (:meth:`FileStream.scan`);
this module turns them into a :class:`~streams.base.LabelledImages` the same way for all
of them: keys mapped to labels through the stream's data file, unknown and empty classes
refused with a message naming the path, samples sorted by id (so file-system order never
matters), hidden entries (names starting with '.') ignored wherever a folder is listed, and,
with ``skip_bad_images``, unreadable test files left out and counted (training images are
drawn from the whole listed split; see :class:`~streams.base.Stream`).

A stream without an official split takes a seeded, stratified one, or the fixed split of a
split file in the paper's released format when it has one (docs/protocol.md, "Splits").
"""
from __future__ import annotations

import hashlib
import pickle
import zlib
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from streams.base import LabelledImages, Split, Stream, StreamDataError, open_image, unreadable  # noqa: F401
from streams.options import SplitFileOptions, SplitOptions
from streams.sampling import Session

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class Sample(NamedTuple):
    """One image of a split before labelling: what to load, its class key, its stable id."""

    item: Any  # usually a Path; anything :meth:`FileStream.load_item` understands
    key: Hashable
    id: str


def load_pickle(path: Path, stream: str, expected: str) -> Any:
    """The object pickled in ``path``; an unreadable file is an error naming it and what was expected.

    Unpickling runs code named in the file: read only files from a trusted source.
    """
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError, ValueError) as err:
        raise StreamDataError(f"{stream}: cannot read {path}: {err}\nexpected: {expected}") from err


def malformed(stream: str, path: Path, problem: str, expected: str) -> StreamDataError:
    """The error for a dataset file whose content is not what the stream expects."""
    return StreamDataError(f"{stream}: malformed file {path}: {problem}\nexpected: {expected}")


def text_id(name: str) -> str:
    """``name`` (a path as Python reads it from the file system) as valid Unicode: a file name that is not
    valid UTF-8 (legal on Linux; Python reads each undecodable byte as a lone surrogate) has those bytes
    written as ``\\xNN``, so that ids can be hashed, sorted and written as JSON. Other names are unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def hidden(name: str) -> bool:
    """Whether a file or folder name is a hidden entry (``.ipynb_checkpoints``, ``.DS_Store``,
    macOS's ``._<name>`` copies): such entries are never read as data."""
    return name.startswith(".")


def hidden_part(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in (or is) a hidden entry below ``root``."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = path.parts[-1:]
    return any(hidden(part) for part in parts)


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly inside ``folder`` (extension matched case-insensitively, hidden
    files ignored), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if not hidden(p.name) and p.is_file() and p.suffix.lower() in extensions)


def list_folders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` (hidden ones ignored), sorted by name."""
    return sorted(p for p in folder.iterdir() if not hidden(p.name) and p.is_dir())


def stratified_split(ids: Sequence[str], keys: Sequence[Hashable], test_fraction: float, seed: int,
                     salt: str) -> dict[Split, list[int]]:
    """A seeded, stratified train/test split of samples (indices into ``ids``).

    Each class is split on its own: its samples, sorted by id, are permuted by a generator
    seeded from (seed, CRC-32 of ``salt``, CRC-32 of the class key), and the first
    ``round(test_fraction · n)`` (at least 1, and at most n − 1 when n ≥ 2) go to the test
    split. So the split depends neither on the hash seed nor on file-system order, and
    adding images to one class leaves every other class's split unchanged.
    """
    by_class: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        by_class.setdefault(key, []).append(i)
    out: dict[Split, list[int]] = {"train": [], "test": []}
    for key, members in by_class.items():
        members.sort(key=lambda i: ids[i])
        rng = np.random.default_rng(np.random.SeedSequence(
            [seed, zlib.crc32(salt.encode()), zlib.crc32(str(key).encode())]))
        order = [members[j] for j in rng.permutation(len(members))]
        n_test = min(max(1, round(test_fraction * len(order))), max(1, len(order) - 1))
        out["test"] += order[:n_test]
        out["train"] += order[n_test:]
    return {split: sorted(idx) for split, idx in out.items()}


class FileStream(Stream):
    """A stream whose images are files under :attr:`Stream.root`.

    Subclasses list the paths that must exist (:attr:`required`, relative to the root;
    checked before anything runs) and implement :meth:`scan`. Streams without an official
    split return every sample from :meth:`scan_all` instead and take ``SplitOptions``;
    those whose released code reads a fixed split file also name it
    (:attr:`released_split_file`), read it (:meth:`read_split_file`) and take
    ``SplitFileOptions``.
    """

    required: tuple[str, ...] = ()  # paths under the root that must exist
    released_split_file: str | None = None  # where the released code keeps its split file, under the root

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        self._datasets: dict[Split, LabelledImages] = {}  # each split as listed
        self._split_record: dict[str, Any] | None = None
        self._parts: dict[Split, list[Sample]] | None = None  # both parts of a seeded or file split, once made
        for rel in self.required:
            self.require(self.root / rel)

    # -- what a subclass provides ------------------------------------------------------
    def scan(self, split: Split) -> list[Sample]:
        """Every sample of ``split`` (any order). Default: :meth:`scan_all` split by the split
        file when there is one (:meth:`split_file_path`), else by the seeded split."""
        if self._parts is None:
            self._parts, record = self.choose_split(self.known(self.scan_all()))
            ids = {part: sorted(s.id for s in members) for part, members in self._parts.items()}
            self._split_record = {**record, "ids": ids}
        return self._parts[split]

    def scan_all(self) -> list[Sample]:
        """Every sample of a stream without an official split."""
        raise NotImplementedError(f"{type(self).__name__} must implement scan() or scan_all()")

    def read_split_file(self, path: Path, samples: list[Sample]) -> dict[Split, list[str]]:
        """The sample ids that the split file ``path`` puts in each part (``samples``: every sample found)."""
        raise NotImplementedError(f"{type(self).__name__} does not read split files")

    def load_item(self, item: Any) -> Image.Image:
        """Decode one item (a path by default) to an RGB image."""
        return open_image(item)

    def class_location(self, key: Hashable, split: Split) -> str:
        """Where the images of class ``key`` are expected (named in error messages)."""
        return f"images of class {key!r} under {self.root}"

    # -- shared machinery --------------------------------------------------------------
    def choose_split(self, samples: list[Sample]) -> tuple[dict[Split, list[Sample]], dict[str, Any]]:
        """The split of ``samples`` (every sample found) and its record: the split file's when there is one
        (:meth:`split_file_path`), else the seeded split."""
        path = self.split_file_path()
        return self.seeded_split(samples) if path is None else self.file_split(path, samples)

    def split_file_path(self) -> Path | None:
        """The split file to read, or None for the seeded split (option ``split_file``, see SplitFileOptions)."""
        choice = getattr(self.options or SplitFileOptions(), "split_file", None)
        if choice is None:
            return None
        if choice == "auto":
            path = self.root / self.released_split_file if self.released_split_file else None
            return path if path is not None and path.is_file() else None
        path = self.root / Path(choice).expanduser()  # an absolute choice replaces the root
        self.require(path, f"split file not found ({self.spec.name}.split_file)")
        return path

    def seeded_split(self, samples: list[Sample]) -> tuple[dict[Split, list[Sample]], dict[str, Any]]:
        """The seeded stratified split of ``samples`` (:func:`stratified_split`) and its record."""
        opts = self.options or SplitOptions()
        chosen = stratified_split([s.id for s in samples], [s.key for s in samples],
                                  opts.test_fraction, opts.split_seed, self.spec.name)
        return ({part: [samples[i] for i in idx] for part, idx in chosen.items()},
                {"method": "seeded stratified", "test_fraction": opts.test_fraction, "split_seed": opts.split_seed})

    def file_split(self, path: Path, samples: list[Sample]) -> tuple[dict[Split, list[Sample]], dict[str, Any]]:
        """The split of ``samples`` that the split file ``path`` fixes, and its record.

        Samples the file does not list are left out, as in the released code. Every image it
        lists must be under the root, in one part only, and each part must hold every class.
        """
        listed = self.read_split_file(path, samples)
        by_id = {s.id: s for s in samples}
        where = f"{self.spec.name}: the split file {path}"
        missing = [i for ids in listed.values() for i in ids if i not in by_id]
        if missing:
            raise StreamDataError(f"{where} lists {len(missing)} image(s) not found under {self.root}, "
                                  f"e.g. {', '.join(missing[:3])}")
        both = sorted(set(listed["train"]) & set(listed["test"]))
        if both:
            raise StreamDataError(f"{where} puts {len(both)} image(s) in both train and test, e.g. {', '.join(both[:3])}")
        parts = {part: [by_id[i] for i in dict.fromkeys(ids)] for part, ids in listed.items()}
        for part, members in parts.items():
            absent = sorted(set(self.spec.keys) - {s.key for s in members}, key=str)
            if absent:
                raise StreamDataError(f"{where} has no {part} images of {len(absent)} class(es), e.g. "
                                      f"{', '.join(map(str, absent[:5]))}")
        return parts, {"method": "file", "split_file": str(path),
                       "split_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def require(self, path: Path, what: str = "") -> None:
        """Fail with the expected layout unless ``path`` exists."""
        if not path.exists():
            raise StreamDataError(f"{self.spec.name}: {what or 'missing'}: {path}\nexpected layout:\n{self.layout}")

    def sample(self, path: Path, key: Hashable) -> Sample:
        """A file sample whose id is its path relative to the stream's root (:func:`text_id`)."""
        return Sample(path, key, text_id(path.relative_to(self.root).as_posix()))

    def class_folders(self, parent: Path, folders: dict[Hashable, str],
                      extensions: Sequence[str] = IMAGE_EXTENSIONS, others: bool = False,
                      ignore: Sequence[str] = ()) -> list[Sample]:
        """The images of a folder-per-class layout: ``parent/<folders[key]>/*`` (hidden entries ignored).

        Every missing or empty class folder is named, all in one error. With ``others``, the
        images of any other (non-hidden) folder of ``parent`` not in ``ignore`` are returned
        too, keyed by the folder's name, so that :meth:`known` refuses them as unknown classes.
        """
        samples, problems = [], []
        for key, name in folders.items():
            folder = parent / name
            if not folder.is_dir():
                problems.append(f"{self.spec.name}: class folder missing (class {key!r}): {folder}")
                continue
            files = list_images(folder, extensions)
            if not files:
                problems.append(f"{self.spec.name}: empty class folder (no {'/'.join(extensions)} images): {folder}")
            samples += [self.sample(f, key) for f in files]
        if problems:
            raise StreamDataError("\n".join([*problems, f"expected layout:\n{self.layout}"]))
        if others:
            known = {parent / name for name in folders.values()} | {parent / name for name in ignore}
            for folder in list_folders(parent):
                if folder not in known:
                    samples += [self.sample(f, folder.name) for f in list_images(folder, extensions)]
        return samples

    def listed(self, split: Split) -> LabelledImages:
        """The whole ``split`` as listed on disk (nothing decoded, unreadable images included)."""
        if split not in self.splits:
            raise StreamDataError(f"{self.spec.name} has no {split} split (it has: {', '.join(self.splits)}); "
                                  "use it as a control")
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def dataset(self, split: Split) -> LabelledImages:
        """The ``split`` as listed, its unreadable test images left out with ``skip_bad_images`` (:meth:`usable`)."""
        return self.usable(split)

    def _build(self, split: Split) -> LabelledImages:
        samples = sorted(self.known(self.scan(split)), key=lambda s: s.id)
        index = self.spec.key_index()
        targets = [index[s.key] for s in samples]
        present = set(targets)
        empty = [f"{self.spec.name}: empty class {self.spec.class_names[label]!r} in the {split} split: "
                 f"no {self.class_location(key, split)}"
                 for label, key in enumerate(self.spec.keys) if label not in present]
        if empty:
            raise StreamDataError("\n".join([*empty, f"expected layout:\n{self.layout}"]))
        return LabelledImages([s.item for s in samples], targets, [s.id for s in samples], self.load_item,
                              captions=self.captions_for(split, samples))

    def known(self, samples: list[Sample]) -> list[Sample]:
        """``samples``, refused when one's class is not in the stream's data file."""
        index = self.spec.key_index()
        unknown = sorted({str(s.key) for s in samples if s.key not in index})
        if unknown:
            raise StreamDataError(
                f"{self.spec.name}: {len(unknown)} class(es) not in the stream's class list, e.g. "
                f"{', '.join(unknown[:5])} (under {self.root})\nexpected layout:\n{self.layout}")
        return samples

    def captions_for(self, split: Split, samples: list[Sample]) -> list[str] | None:
        """Per-image captions of ``samples`` (None: captions come from the templates)."""
        return None

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        record = super().data_record(sessions)
        if self._split_record is not None:
            ids = self._split_record["ids"]
            digest = hashlib.sha256("\n".join(ids["test"]).encode()).hexdigest()
            record["split"] = {**{k: v for k, v in self._split_record.items() if k != "ids"},
                               "train": len(ids["train"]), "test": len(ids["test"]), "test_ids_sha256": digest,
                               "ids": ids}
        return record
