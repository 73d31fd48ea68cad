"""The pretrained model's counts, computed once per grid and shared by its runs.

Before any training every run of a grid with the same backbone evaluates the same model on the same
sets: row 0 of its accuracy matrices. Each set's counts (zero-shot: ``correct``, ``total``; VQA: those of
:func:`benchmark.vqa.evaluate.score_set`) are stored beside the runs, in
``<out>/<name>/.session0/<key>.json``, the key a SHA-256 of everything the counts depend on (zero-shot:
:meth:`benchmark.evaluation.ZeroShotEvaluator.row_keys`, the backbone's weights, the set's classes,
templates and images, the preprocessing, precision, device and batch size; VQA:
:func:`benchmark.vqa.evaluate.vqa_row_key`, also the VQA model and the question set). The first run that
needs a set evaluates it and writes the file (atomically: processes of a sharded grid may race, and they
write the same counts); the others read it. A file that cannot be read, or does not hold its own key,
is ignored and written again. Both row 0s go through :func:`session_zero`: under ``ddp: true`` a set's stored
counts are used only when every rank finds them, so that the ranks evaluate the same sets together.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmark.distributed import all_reduce_sum, world_size
from benchmark.records import write_json

FOLDER = ".session0"
Counts = dict[str, int | float]  # a set's counts: at least correct and total


def shared_folder(out: str | Path, name: str) -> Path:
    """Where the grid ``name`` under ``out`` keeps its shared session-0 counts."""
    return Path(out) / name / FOLDER


def read_counts(folder: Path, key: str) -> Counts | None:
    """The stored counts of ``key`` (at least ``correct`` and ``total``), or None (none yet, or an unreadable
    file)."""
    try:
        data = json.loads((folder / f"{key}.json").read_text())
        counts = {name: value for name, value in data.items() if name not in ("key", "dataset")}
        if data.get("key") == key and {"correct", "total"} <= counts.keys() and all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in counts.values()):
            return counts
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def write_counts(folder: Path, key: str, counts: Counts, dataset: str) -> None:
    """Store the counts of ``key`` (``dataset``: the set's name, for a reader of the folder)."""
    write_json(folder / f"{key}.json", {"key": key, "dataset": dataset, **counts})


def row_context(device: torch.device) -> dict[str, Any]:
    """What shared row-0 counts depend on beyond the model and the set: the device type, the GPU, torch."""
    return {"device": device.type, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def session_zero(folder: Path, keys: dict[str, str | None], evaluate: Callable[[list[str]], dict[str, Counts]],
                 writable: bool) -> tuple[dict[str, Counts], list[str]]:
    """Row 0's counts of each set named in ``keys`` (name -> its key; None: a set whose counts are not shared):
    read from the store in ``folder`` when a run stored them (under ``ddp: true``: when every rank finds them),
    else ``evaluate``-d (called once, with the names missing, in the order of ``keys``) and stored (when
    ``writable``: rank 0). The counts in the order of ``keys``, and the names read from the store."""
    found = {name: read_counts(folder, key) if key is not None else None for name, key in keys.items()}
    everywhere = all_reduce_sum([int(counts is not None) for counts in found.values()])
    shared = [name for name, n in zip(keys, everywhere) if n == world_size()]
    missing = [name for name in keys if name not in shared]
    evaluated = evaluate(missing) if missing else {}
    if writable:
        for name, counts in evaluated.items():
            if keys[name] is not None:
                write_counts(folder, keys[name], counts, name)
    return {name: found[name] if name in shared else evaluated[name] for name in keys}, shared
