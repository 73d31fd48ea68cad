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
is ignored and written again.
"""
from __future__ import annotations

import json
from pathlib import Path

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
