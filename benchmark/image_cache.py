"""Evaluated images decoded, resized and cropped once: uint8 tensor files under the cache folder.

An evaluation transform (PIL image → float tensor) is split (:func:`split_eval_transform`) into its
geometric part, which ends in a uint8 tensor [3, H, W] (decode, resize, crop, RGB), and its
normalisation (``/255``, then ``(x - mean) / std``), which :meth:`SplitTransform.normalise` applies to
a whole batch on the device with the same float32 operations as torchvision's ``ToTensor`` and
``Normalize``: a cached image gives exactly the numbers the uncached transform gives.

A set's uint8 images are written once (:func:`cached_images`) to ``<cache>/eval-images/<key>.u8``, the
key a SHA-256 of what they depend on (:func:`images_key`: the images' ids and sources, the geometric
transform, the PIL/torchvision versions). The file is written to a temporary name and renamed (a reader
never sees a partial file), one process builds it while the others wait (a file lock), and it is
memory-mapped when read. Its header holds the key, the shape and the SHA-256 of the pixels: a file of
the wrong size, with a bad header or (checked once per process) a wrong digest is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from filelock import FileLock
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from benchmark.cache import cache_root
from benchmark.records import atomic_writer

log = logging.getLogger(__name__)

FORMAT = 1
CORES_ENV = "FSCL_CORES"  # the cores a process may use (each process of --jobs: its share)
MAGIC = b"FSCLU8\x00\x01"
HEADER_BYTES = 4096  # the pixels start here (page-aligned for the memory map)
FOLDER = "eval-images"
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose digest this process checked


class ToUInt8:
    """PIL image → uint8 tensor [C, H, W], the array ``ToTensor`` divides by 255 (RGB or L images)."""

    def __call__(self, image: PIL.Image.Image) -> Tensor:
        if image.mode not in ("RGB", "L"):
            raise ValueError(f"an evaluated image must be RGB or L after the transform's PIL steps, got {image.mode}")
        array = np.array(image, np.uint8, copy=True).reshape(image.size[1], image.size[0], -1)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "ToUInt8()"


@dataclass(frozen=True)
class SplitTransform:
    """An evaluation transform as ``geometry`` (PIL image → uint8 [3, H, W]) and its normalisation."""

    geometry: transforms.Compose
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 images [B, 3, H, W] (on any device) → float32, exactly as ``ToTensor`` then ``Normalize``."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        return images.to(torch.float32).div(255).sub_(mean).div_(std)

    def description(self) -> str:
        """The geometric steps, stably named (what a cached image depends on, with the library versions)."""
        return " | ".join(describe_step(step) for step in self.geometry.transforms)


def describe_step(step: Any) -> str:
    """A transform step as a string that is the same in every process (functions by qualified name)."""
    if callable(step) and hasattr(step, "__qualname__"):
        return f"{step.__module__}.{step.__qualname__}"
    return " ".join(repr(step).split())


def split_eval_transform(transform: Callable | None) -> SplitTransform | None:
    """``transform`` split at its ``ToTensor`` step, when it is a ``Compose`` of PIL steps, ``ToTensor``
    (or a subclass, e.g. open_clip's ``MaybeToTensor``) and at most one ``Normalize``; else None (the
    images are then evaluated through the transform as it is)."""
    steps = list(getattr(transform, "transforms", ()))
    at = next((i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None)
    if at is None:
        return None
    after = steps[at + 1:]
    if len(after) > 1 or (after and not isinstance(after[0], transforms.Normalize)):
        return None
    mean, std = (tuple(map(float, after[0].mean)), tuple(map(float, after[0].std))) if after else ((0.0,), (1.0,))
    return SplitTransform(transforms.Compose([*steps[:at], ToUInt8()]), mean, std)


def is_labelled_images(dataset: Any) -> bool:
    """Whether ``dataset`` is a set of labelled images with ids that a transform can be swapped on
    (``streams.base.LabelledImages``, duck-typed: the core does not import ``streams``)."""
    return all(hasattr(dataset, name) for name in ("items", "ids", "targets", "load", "transform", "with_transform"))


def _update_with_item(digest: Any, item: Any) -> None:
    """Add what an image's content depends on: a file's path, size and modification time; an array's bytes; an item
    in a file (its ``path``, e.g. a row of a parquet file): that file's, and the item's repr."""
    if isinstance(item, (str, os.PathLike)):
        try:
            stat = os.stat(item)
            digest.update(os.fsencode(item) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(os.fsencode(item) + b"|missing\n")
    elif isinstance(item, np.ndarray):
        digest.update(f"{item.dtype}{item.shape}".encode())
        digest.update(np.ascontiguousarray(item).data)
    else:
        if isinstance(getattr(item, "path", None), (str, os.PathLike)):
            _update_with_item(digest, item.path)
        digest.update(repr(item).encode() + b"\n")


def sources_key(dataset: Any) -> str:
    """SHA-256 (hex) of where labelled images come from: their ids, loader and sources (file paths, sizes and
    modification times; arrays' bytes) and the PIL version."""
    load = getattr(dataset.load, "__qualname__", repr(dataset.load))
    digest = hashlib.sha256(json.dumps({"load": load, "pil": PIL.__version__, "ids": list(dataset.ids)}).encode())
    for item in dataset.items:
        _update_with_item(digest, item)
    return digest.hexdigest()


def images_key(dataset: Any, split: SplitTransform) -> str:
    """SHA-256 (hex) of what the uint8 images of ``dataset`` (labelled images) depend on: their sources
    (:func:`sources_key`), the geometric transform and the torchvision version."""
    described = {"format": FORMAT, "geometry": split.description(), "torchvision": torchvision.__version__,
                 "sources": sources_key(dataset)}
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


class UInt8Images(Dataset):
    """``(uint8 image [3, H, W], label)`` of labelled images through a split transform's geometric part."""

    def __init__(self, dataset: Any, split: SplitTransform) -> None:
        self.dataset = dataset.with_transform(split.geometry)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label, *_ = self.dataset[i]
        return image, label


def cache_path(key: str, folder: Path | None = None) -> Path:
    return (folder or cache_root()) / FOLDER / f"{key}.u8"


def _read_header(path: Path) -> dict[str, Any] | None:
    """The header of a cache file, or None when it is not one (wrong magic, unreadable JSON)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            return None
        (length,) = struct.unpack("<I", head[8:12])
        return json.loads(head[12:12 + length])
    except (OSError, ValueError, struct.error):
        return None


def _pixel_digest(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, key: str) -> tuple[int, ...] | None:
    """The shape [N, 3, H, W] of a sound cache file of ``key``, or None (missing, partial or corrupted:
    wrong size, bad header, or pixels whose SHA-256 is not the header's — checked once per process)."""
    header = _read_header(path)
    if header is None or header.get("key") != key or header.get("format") != FORMAT:
        return None
    shape = tuple(header["shape"])
    stat = path.stat()
    if stat.st_size != HEADER_BYTES + int(np.prod(shape)):
        return None
    stamp = (str(path), stat.st_size, stat.st_mtime_ns)
    if stamp not in _VERIFIED:
        if _pixel_digest(path) != header.get("sha256"):
            return None
        _VERIFIED.add(stamp)
    return shape


def _write(path: Path, key: str, batches: Any, n_images: int, bar: tqdm) -> None:
    """Write the uint8 batches to ``path`` atomically (:func:`~benchmark.records.atomic_writer`)."""
    digest, shape = hashlib.sha256(), None
    with atomic_writer(path, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for images, *_ in batches:
            if shape is None:
                shape = (n_images, *images.shape[1:])
            elif images.shape[1:] != shape[1:]:
                raise ValueError(f"evaluated images of different sizes ({tuple(images.shape[1:])} after "
                                 f"{shape[1:]}): the transform must crop to one size to be cached")
            block = images.numpy().tobytes()
            digest.update(block)
            f.write(block)
            bar.update(len(images))
        header = json.dumps({"format": FORMAT, "key": key, "shape": list(shape or (0, 3, 0, 0)),
                             "sha256": digest.hexdigest()}).encode()
        f.seek(0)
        f.write(MAGIC + struct.pack("<I", len(header)) + header)


def cached_images(dataset: Any, split: SplitTransform, *, key: str | None = None, batch_size: int = 64,
                  num_workers: int = 0, folder: Path | None = None, progress: bool = False,
                  desc: str = "") -> tuple[Tensor, str]:
    """The uint8 images [N, 3, H, W] of labelled images ``dataset`` (memory-mapped from the cache file,
    built first when missing or unsound) and the file's key (``key``: :func:`images_key`, when known)."""
    key = key or images_key(dataset, split)
    path = cache_path(key, folder)
    shape = check_file(path, key) if path.exists() else None
    if shape is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(f".{path.name}.lock")):  # one process builds, the others wait and read
            shape = check_file(path, key) if path.exists() else None
            if shape is None:
                if path.exists():
                    log.warning("evaluation cache %s is damaged or partial: rebuilding it", path)
                    path.unlink()
                loader = DataLoader(UInt8Images(dataset, split), batch_size=batch_size, num_workers=num_workers,
                                    generator=torch.Generator())
                with tqdm(total=len(dataset), desc=f"caching {desc}".strip(), unit="img", leave=False,
                          disable=not progress) as bar:
                    _write(path, key, loader, len(dataset), bar)
                shape = check_file(path, key)
                if shape is None:
                    raise OSError(f"the evaluation cache {path} could not be read back after writing it")
    if shape[0] == 0:
        return torch.empty(shape, dtype=torch.uint8), key
    pixels = np.memmap(path, dtype=np.uint8, mode="c", offset=HEADER_BYTES, shape=shape)  # copy-on-write: never
    return torch.from_numpy(pixels), key  # written, and torch needs a writable array


def usable_cores() -> int:
    """The cores this process may use: ``$FSCL_CORES`` (set in each process of ``--jobs``: its share), else those
    it is allowed to run on."""
    if os.environ.get(CORES_ENV, "").isdigit():
        return max(1, int(os.environ[CORES_ENV]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(setting: int | str, n_batches: int) -> int:
    """Worker processes for a loader of ``n_batches``: ``setting`` (``auto``: one per :func:`usable_cores` but
    one, at most 8), never more than the batches (a loader of one batch gains nothing from a worker)."""
    if setting == "auto":
        setting = min(8, usable_cores() - 1)
    return max(0, min(int(setting), n_batches if n_batches > 1 else 0))


def labels_of(dataset: Any) -> Tensor:
    """The labels [N] (int64) of labelled images, in order."""
    return torch.as_tensor(dataset.targets, dtype=torch.int64)
