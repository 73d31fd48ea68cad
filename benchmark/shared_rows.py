"""The pretrained model's zero-shot counts, computed once per grid and shared by its runs.

Before any training every run of a grid with the same backbone evaluates the same model on the same
sets: row 0 of its accuracy matrix. Each set's ``(correct, total)`` is stored beside the runs, in
``<out>/<name>/.session0/<key>.json``, the key a SHA-256 of everything the counts depend on
(:meth:`benchmark.evaluation.ZeroShotEvaluator.row_keys`: the backbone's weights, the set's classes,
templates and images, the preprocessing, precision, device and batch size). The first run that needs
a set evaluates it and writes the file (atomically: processes of a sharded grid may race, and they
write the same counts); the others read it. A file that cannot be read, or does not hold its own key,
is ignored and written again.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmark.records import write_json

FOLDER = ".session0"


def shared_folder(out: str | Path, name: str) -> Path:
    """Where the grid ``name`` under ``out`` keeps its shared session-0 counts."""
    return Path(out) / name / FOLDER


def read_counts(folder: Path, key: str) -> tuple[int, int] | None:
    """The stored ``(correct, total)`` of ``key``, or None (none yet, or an unreadable file)."""
    try:
        data = json.loads((folder / f"{key}.json").read_text())
        if data.get("key") == key:
            return int(data["correct"]), int(data["total"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def write_counts(folder: Path, key: str, counts: tuple[int, int], dataset: str) -> None:
    """Store ``(correct, total)`` of ``key`` (``dataset``: the set's name, for a reader of the folder)."""
    write_json(folder / f"{key}.json", {"key": key, "dataset": dataset, "correct": counts[0], "total": counts[1]})
