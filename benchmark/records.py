"""Run records: one folder per run, the contract between the runner and the reports.

``runs/<name>/<stream>/<backbone>/<strategy>/<shots>-s<seed>/`` holds ``config.yaml``,
``manifest.json`` (versions, command line, host, seeds, sampled ids, status),
``samples.json`` (the sampled few-shot ids per session), ``metrics.jsonl`` (appended and
flushed after every evaluation), ``matrix.csv`` and ``summary.json``; while a process works
on it, ``run.lock`` (:class:`RunLock`); ``checkpoints/`` for resuming
(:mod:`benchmark.checkpoints`). Files other than the append-only log are written atomically
(temporary file, then rename).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import yaml
from filelock import FileLock

STATUS_RUNNING, STATUS_FINISHED, STATUS_FAILED = "running", "finished", "failed"
STATUS_INTERRUPTED = "interrupted"  # stopped by Ctrl-C: the same command resumes it
# what a failed write says about the storage: a full disk or quota, a read-only or unwritable folder, I/O
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOTDIR, errno.EIO})
VERSIONED = ("torch", "torchvision", "open_clip_torch", "avalanche-lib", "transformers", "numpy", "fscl-bench")


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path`` through: a temporary file in the same folder, synced and renamed
    over ``path`` when the block ends, removed if it raises (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A folder to fill in place of ``path``: a temporary folder beside it, put in place of ``path`` (an old
    one removed) when the block ends, removed if it raises (readers never see a half-written folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def storage_problem(err: BaseException | None) -> str | None:
    """``err`` in words (``No space left on device: <file>``) when it is, or was raised while handling, a storage
    problem (an ``OSError`` of :data:`STORAGE_ERRNOS`; ``torch.save`` on a full disk raises a ``RuntimeError``
    while handling one) rather than a bug; else None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return f"{err.strerror}: {err.filename}" if err.filename else str(err.strerror or err)
        err = err.__cause__ or err.__context__
    return None


def write_problem(folder: Path) -> str | None:
    """Why files cannot be written into ``folder`` (made when missing), or None when they can: a temporary file
    is made (and removed) in ``folder``, or in its nearest existing parent when it does not exist yet."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(dir=existing, prefix=".fscl-write-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return f"{existing}: {err.strerror or err}"
    return None


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
    """The files of one run folder.

    ``writable=False`` (the non-zero ranks of a data-parallel run) reads the folder but
    turns every write into a no-op: exactly one process writes a record.
    """

    def __init__(self, path: Path, writable: bool = True) -> None:
        self.path = Path(path)
        self.writable = writable

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when there is none (or it cannot be read)."""
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def config(self) -> dict[str, Any] | None:
        """The resolved configuration the run was started with (``config.yaml``), or None."""
        try:
            return yaml.safe_load((self.path / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None

    def read_summary(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(summary.json, None)``, or ``(None, why it cannot be used)``: missing, unreadable, not a JSON object."""
        path = self.path / "summary.json"
        if not path.is_file():
            return None, f"{path.name} is missing"
        try:
            summary = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return None, f"{path.name} is damaged ({err})"
        return (summary, None) if isinstance(summary, dict) else (None, f"{path.name} is damaged (not a JSON object)")

    def summary_problem(self) -> str | None:
        """Why ``summary.json`` cannot be used (:meth:`read_summary`), or None when it can."""
        return self.read_summary()[1]

    def finished_status(self) -> bool:
        """Whether the manifest says ``finished`` (see :meth:`is_finished` for a usable record)."""
        manifest = self.manifest()
        return bool(manifest and manifest.get("status") == STATUS_FINISHED)

    def is_finished(self) -> bool:
        """Whether the run finished and its summary can be read (a damaged summary is rebuilt by a rerun)."""
        return self.finished_status() and self.summary_problem() is None

    def start(self, config: dict[str, Any], seeds: dict[str, int], samples: dict[str, list[str]]) -> None:
        """Begin a (fresh) run: config, sampled ids, manifest with status ``running``."""
        if not self.writable:
            return
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
            "pid": os.getpid(),
            "platform": platform.platform(),
            "versions": versions(),
            "git": git_hash(),
            "seeds": seeds,
            "samples": {"file": "samples.json", "sha256": hashlib.sha256(samples_text.encode()).hexdigest(),
                        "count": sum(len(v) for v in samples.values())},
        })

    def update_manifest(self, **fields: Any) -> None:
        if not self.writable:
            return
        manifest = self.manifest() or {}
        manifest.update(fields)
        write_json(self.manifest_path, manifest)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to ``metrics.jsonl`` and flush them to disk (crash-safe log)."""
        if not self.writable:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``. A torn last line (the process was killed while appending)
        is dropped; :meth:`resume` then rewrites the file without it. Any other bad line is an error."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if i == len(lines) - 1:
                    break  # torn tail
                raise ValueError(f"{path}, line {i + 1}: not a JSON object ({err}); the record is damaged") from None
        return rows

    def resume(self, session: int) -> None:
        """Continue an interrupted run after ``session``: ``metrics.jsonl`` is rewritten
        (atomically) with the rows of sessions 0..``session`` only, so the rows of a session
        that was cut off are not duplicated, and the manifest notes the resumption."""
        if not self.writable:
            return
        rows = [r for r in self.metrics() if r["session"] <= session]
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        for name in ("matrix.csv", "summary.json"):
            (self.path / name).unlink(missing_ok=True)
        manifest = self.manifest() or {}
        resumed = [*manifest.get("resumed", []), {
            "after_session": session, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "command": sys.argv}]
        manifest.pop("reason", None)
        manifest.update(status=STATUS_RUNNING, resumed=resumed)
        write_json(self.manifest_path, manifest)


class RunInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """``run.lock`` in a run folder: at most one live process writes a run.

    The file holds the owner's host, pid and SLURM job id. A lock from a dead process on this
    host is taken over, and so is one left by an earlier incarnation of this same SLURM job (a
    pre-empted, requeued job restarts on any node). A lock from another host cannot be checked
    directly, so the owner refreshes the file's mtime every ``heartbeat`` seconds and a lock
    not refreshed for ``stale_after`` seconds is taken over.
    """

    NAME = "run.lock"

    def __init__(self, path: Path, heartbeat: float = 60.0, stale_after: float = 600.0) -> None:
        self.file = Path(path) / self.NAME
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_held(self) -> bool:
        """Whether a live process holds the lock (a lock left by a dead one is stale, see :meth:`acquire`)."""
        return self.file.exists() and not self._is_stale(self.owner())

    def _is_stale(self, owner: dict[str, Any] | None) -> bool:
        if owner is None:  # unreadable or half-written: only stale once old
            return self._age() > self.stale_after
        if owner.get("host") == socket.gethostname():
            return not _pid_alive(int(owner.get("pid", -1)))
        job = os.environ.get("SLURM_JOB_ID")
        return (job is not None and owner.get("slurm_job") == job) or self._age() > self.stale_after

    def _age(self) -> float:
        try:
            return time.time() - self.file.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def _guard(self) -> FileLock:
        """A short OS lock (``run.lock.guard``) around every look at and change of ``run.lock``: judging
        a lock stale and replacing it is one step, so two processes never both take a stale lock over."""
        return FileLock(self.file.with_name(self.NAME + ".guard"))

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunInUseError` naming the live owner."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with self._guard():
            if self.file.exists():
                owner = self.owner()
                if not self._is_stale(owner):
                    who = f"pid {owner['pid']} on {owner['host']} (since {owner.get('since')})" if owner else "?"
                    raise RunInUseError(
                        f"run folder {self.file.parent} is in use by {who}; if that process is gone, delete "
                        f"{self.file} (a lock from another host expires {self.stale_after:.0f} s after its last "
                        f"heartbeat)")
            atomic_write(self.file, json.dumps(me) + "\n")  # a new lock, or a stale one taken over
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.file)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (only if this process still owns it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._guard():
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.file.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
