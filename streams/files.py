"""Streams read from image files on disk: layout checks, class folders, seeded splits.

Every loader of a real on-disk layout derives from :class:`FileStream`. It only says how
to find ``(item, class key, sample id)`` triples for a split (:meth:`FileStream.scan`);
this module turns them into a :class:`~streams.base.LabelledImages` the same way for all
of them: keys mapped to labels through the stream's data file, unknown and empty classes
refused with a message naming the path, samples sorted by id (so file-system order never
matters), and, with ``skip_bad_images``, unreadable files left out and counted.
"""
from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from benchmark.config import check
from streams.base import LabelledImages, Split, Stream, StreamDataError, open_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class Sample(NamedTuple):
    """One image of a split before labelling: what to load, its class key, its stable id."""

    item: Any  # usually a Path; anything :meth:`FileStream.load_item` understands
    key: Hashable
    id: str


@dataclass
class SplitOptions:
    """Options of a stream without an official train/test split (a seeded, stratified one)."""

    test_fraction: float = 0.2  # share of every class's images that goes to the test split
    split_seed: int = 0

    def __post_init__(self) -> None:
        check(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a float in (0, 1)")
        check(self.split_seed >= 0, "split_seed", self.split_seed, "an integer >= 0")


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly inside ``folder`` (extension matched case-insensitively), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


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
    split return every sample from :meth:`scan_all` instead and take ``SplitOptions``.
    """

    required: tuple[str, ...] = ()  # paths under the root that must exist

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        self._datasets: dict[Split, LabelledImages] = {}
        self._split_record: dict[str, Any] | None = None
        self._seeded: dict[Split, list[Sample]] | None = None  # both parts of a seeded split, once computed
        for rel in self.required:
            self.require(self.root / rel)

    # -- what a subclass provides ------------------------------------------------------
    def scan(self, split: Split) -> list[Sample]:
        """Every sample of ``split`` (any order). Default: the seeded split of :meth:`scan_all`."""
        if self._seeded is None:
            samples = self.known(self.scan_all())
            opts = self.options or SplitOptions()
            chosen = stratified_split([s.id for s in samples], [s.key for s in samples],
                                      opts.test_fraction, opts.split_seed, self.spec.name)
            self._seeded = {part: [samples[i] for i in idx] for part, idx in chosen.items()}
            self._split_record = {"method": "seeded stratified", "test_fraction": opts.test_fraction,
                                  "split_seed": opts.split_seed,
                                  "ids": {part: [s.id for s in members] for part, members in self._seeded.items()}}
        return self._seeded[split]

    def scan_all(self) -> list[Sample]:
        """Every sample of a stream without an official split."""
        raise NotImplementedError(f"{type(self).__name__} must implement scan() or scan_all()")

    def load_item(self, item: Any) -> Image.Image:
        """Decode one item (a path by default) to an RGB image."""
        return open_image(item)

    def class_location(self, key: Hashable, split: Split) -> str:
        """Where the images of class ``key`` are expected (named in error messages)."""
        return f"images of class {key!r} under {self.root}"

    # -- shared machinery --------------------------------------------------------------
    def require(self, path: Path, what: str = "") -> None:
        """Fail with the expected layout unless ``path`` exists."""
        if not path.exists():
            raise StreamDataError(f"{self.spec.name}: {what or 'missing'}: {path}\nexpected layout:\n{self.layout}")

    def sample(self, path: Path, key: Hashable) -> Sample:
        """A file sample whose id is its path relative to the stream's root."""
        return Sample(path, key, path.relative_to(self.root).as_posix())

    def class_folders(self, parent: Path, folders: dict[Hashable, str],
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Sample]:
        """The images of a folder-per-class layout: ``parent/<folders[key]>/*``.

        A missing or empty class folder is an error naming it.
        """
        samples = []
        for key, name in folders.items():
            folder = parent / name
            self.require(folder, f"class folder missing (class {key!r})")
            files = list_images(folder, extensions)
            if not files:
                raise StreamDataError(f"{self.spec.name}: empty class folder (no {'/'.join(extensions)} "
                                      f"images): {folder}\nexpected layout:\n{self.layout}")
            samples += [self.sample(f, key) for f in files]
        return samples

    def dataset(self, split: Split) -> LabelledImages:
        if split not in self.splits:
            raise StreamDataError(f"{self.spec.name} has no {split} split (it has: {', '.join(self.splits)}); "
                                  "use it as a control")
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def _build(self, split: Split) -> LabelledImages:
        samples = sorted(self.known(self.scan(split)), key=lambda s: s.id)
        index = self.spec.key_index()
        targets = [index[s.key] for s in samples]
        present = set(targets)
        for label, key in enumerate(self.spec.keys):
            if label not in present:
                raise StreamDataError(f"{self.spec.name}: empty class {self.spec.class_names[label]!r} in the "
                                      f"{split} split: no {self.class_location(key, split)}\n"
                                      f"expected layout:\n{self.layout}")
        data = LabelledImages([s.item for s in samples], targets, [s.id for s in samples], self.load_item,
                              captions=self.captions_for(split, samples))
        return self._drop_unreadable(split, data) if self.skip_bad_images else data

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

    def _drop_unreadable(self, split: Split, data: LabelledImages) -> LabelledImages:
        bad = unreadable(data)
        if bad:
            log.warning("%s: skipping %d unreadable image(s) of the %s split, e.g. %s",
                        self.spec.name, len(bad), split, bad[0][1])
        self.skipped[split] = [data.ids[i] for i, _ in bad]
        drop = {i for i, _ in bad}
        return data.subset([i for i in range(len(data)) if i not in drop])

    def data_record(self) -> dict[str, Any]:
        record = super().data_record()
        if self._split_record is not None:
            ids = self._split_record["ids"]
            digest = hashlib.sha256("\n".join(ids["test"]).encode()).hexdigest()
            record["split"] = {**{k: v for k, v in self._split_record.items() if k != "ids"},
                               "train": len(ids["train"]), "test": len(ids["test"]), "test_ids_sha256": digest,
                               "ids": ids}
        return record


def unreadable(data: LabelledImages, limit: int | None = None, progress: str = "") -> list[tuple[int, str]]:
    """(index, error message) of the images of ``data`` that cannot be decoded.

    Stops after ``limit`` bad images when given; ``progress`` (a label) draws a bar on
    stderr. Decodes every image: slow on big sets.
    """
    bad: list[tuple[int, str]] = []
    items = tqdm(data.items, desc=progress, unit="img", leave=False, disable=not progress)
    for i, item in enumerate(items):
        try:
            data.load(item)
        except StreamDataError as err:
            bad.append((i, str(err)))
            if limit is not None and len(bad) >= limit:
                break
    return bad
