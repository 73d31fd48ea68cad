"""Run records: one folder per run, the contract between the runner and the reports.

``runs/<name>/<stream>/<backbone>/<strategy>/<shots>-s<seed>/`` holds ``config.yaml``,
``manifest.json`` (versions, command line, host, seeds, sampled ids, status),
``samples.json`` (the sampled few-shot ids per session), ``metrics.jsonl`` (appended and
flushed after every evaluation), ``matrix.csv`` and ``summary.json``. Files other than
the append-only log are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

STATUS_RUNNING, STATUS_FINISHED, STATUS_FAILED = "running", "finished", "failed"
VERSIONED = ("torch", "torchvision", "open_clip_torch", "avalanche-lib", "transformers", "numpy", "fscl-bench")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def slug(text: str, limit: int = 60) -> str:
    """A folder-safe form of ``text`` (long ones keep a short hash for uniqueness)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"
    if len(clean) > limit:
        clean = f"{clean[: limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return clean


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunRecord:
    """The files of one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_finished(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest.get("status") == STATUS_FINISHED and (self.path / "summary.json").is_file())

    def start(self, config: dict[str, Any], seeds: dict[str, int], samples: dict[str, list[str]]) -> None:
        """Begin a (fresh) run: config, sampled ids, manifest with status ``running``."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "metrics.jsonl").unlink(missing_ok=True)
        for name in ("matrix.csv", "summary.json"):
            (self.path / name).unlink(missing_ok=True)
        atomic_write(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        samples_text = json.dumps(samples, indent=1)
        atomic_write(self.path / "samples.json", samples_text + "\n")
        write_json(self.manifest_path, {
            "status": STATUS_RUNNING,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "versions": versions(),
            "git": git_hash(),
            "seeds": seeds,
            "samples": {"file": "samples.json", "sha256": hashlib.sha256(samples_text.encode()).hexdigest(),
                        "count": sum(len(v) for v in samples.values())},
        })

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest() or {}
        manifest.update(fields)
        write_json(self.manifest_path, manifest)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to ``metrics.jsonl`` and flush them to disk (crash-safe log)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
