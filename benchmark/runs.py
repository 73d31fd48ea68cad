"""One run of a grid as both stages see it: its folder (:func:`run_dir`), its data resolved and checked before
any model is built (:class:`RunData`, :func:`run_data`, the controls' seeded subsets), what a run records about
that data (:func:`record_data`), whether it is done or this process runs it (:func:`is_done`, :func:`decide`) and
what happened to it (:class:`RunOutcome`).

The grid stage (:mod:`benchmark.grid`) resolves every run's data and checks the whole grid; the run stage
(:mod:`benchmark.runner`) runs one run on its data; :mod:`benchmark.jobs` hands runs to local processes.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmark import checkpoints
from benchmark.config import ALL_SHOTS, Config, ConfigError, sweep_tag
from benchmark.records import RunInUseError, RunLock, RunRecord, slug, write_json
from benchmark.registry import STREAMS
from benchmark.stream import Images, Session, Stream

log = logging.getLogger(__name__)


class RunDecision(enum.IntEnum):
    """What one process does with a grid point (summed over the ranks of a data-parallel run:
    only rank 0 decides, the others contribute RUN = 0)."""

    RUN = 0
    SKIP = 1  # finished already
    BUSY = 2  # another live process holds the run folder


@dataclass
class RunData:
    """The data of one run, resolved and checked before any model is built."""

    stream: Stream  # the target stream (a registered one)
    sessions: list[Session]  # its few-shot sessions
    controls: dict[str, Stream] = field(default_factory=dict)  # control name -> its stream
    control_tests: dict[str, Images] = field(default_factory=dict)  # control name -> test images (subset applied)
    subsets: dict[str, Any] = field(default_factory=dict)  # control name -> the seeded subset's record


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one grid point."""

    path: Path
    status: str  # finished | skipped | failed | busy (another live process holds the run folder)
    reason: str = ""


def run_folders(cfg: Config) -> list[tuple[str, str]]:
    """The folders of a scalar config's run record below ``out``, each with the key(s) that name it:
    ``<name>/<stream>/<backbone>/<strategy>/<shots>-s<seed>``; a run of a grid with swept keys has their values
    as a folder before the last (``lorsu/lr=0.0005/5-s0``, :func:`sweep_tag`)."""
    swept = [(", ".join(cfg.swept), sweep_tag(cfg.swept))] if cfg.swept else []
    return [("name", cfg.name), ("stream", cfg.stream), ("backbone", slug(cfg.backbone)), ("strategy", cfg.strategy),
            *swept, ("shots, seed", f"{cfg.shots}-s{cfg.seed}")]


def run_dir(cfg: Config) -> Path:
    """The folder of a scalar config's run record: ``out`` and :func:`run_folders`."""
    return Path(cfg.out).joinpath(*(folder for _, folder in run_folders(cfg)))


def control_subset(n_items: int, size: int, seed: int, name: str) -> list[int]:
    """Indices (ascending) of a fixed, seeded subset of ``size`` of ``n_items`` control images.

    Seeded from (seed, CRC-32 of the control's name): the same on every machine and
    whatever ``PYTHONHASHSEED`` is.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    return sorted(rng.choice(n_items, size=min(size, n_items), replace=False).tolist())


def reordered(sessions: list[Session], seed: int, name: str) -> list[Session]:
    """``session_order: seed``: the same sessions (the same draws) in an order drawn from (seed, CRC-32 of the
    stream's name), numbered 1.. again; the same on every machine."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode()), 2]))
    order = rng.permutation(len(sessions)).tolist()
    return [dataclasses.replace(sessions[j], index=i + 1) for i, j in enumerate(order)]


def target_test(stream: Stream, sessions: list[Session]) -> Images:
    """The target's test images a run's VQA asks about: those of its sessions' classes (a stream with its own
    questions: its whole test split, which is not grouped by the sessions' classes)."""
    test = stream.dataset("test")
    if stream.spec.own_questions:
        return test
    return test.with_classes(sorted({c for session in sessions for c in session.classes}))


def record_data(record: RunRecord, data_streams: dict[str, Stream], subsets: dict[str, Any],
                sessions: dict[str, list[Session]] | None = None) -> None:
    """Write what a run must keep about its data into the manifest: unreadable images met (for the
    target: by this run's ``sessions``, with the draws that replaced them), seeded splits (their id
    lists in ``splits.json``) and the control subsets' ids."""
    fields: dict[str, Any] = {}
    split_ids, validation_ids = {}, {}
    for name, data_stream in data_streams.items():
        info = data_stream.data_record((sessions or {}).get(name))
        if "validation" in info:  # validation_per_class: the images held out of the training split
            held = dict(info["validation"])
            validation_ids[name] = held.pop("ids")
            fields.setdefault("validation", {})[name] = {**held, "file": "validation.json"}
        if "skipped_images" in info:
            fields.setdefault("skipped_images", {})[name] = info["skipped_images"]
        if "texts" in info:  # the data file's version and the dataset's own names/captions file, if used
            fields.setdefault("texts", {})[name] = info["texts"]
        if "split" in info:
            split = dict(info["split"])
            split_ids[name] = split.pop("ids")
            fields.setdefault("splits", {})[name] = {**split, "file": "splits.json"}
    if split_ids and record.writable:
        write_json(record.path / "splits.json", split_ids)
    if validation_ids and record.writable:
        write_json(record.path / "validation.json", validation_ids)
    if subsets:
        fields["control_subsets"] = subsets
    if fields:
        record.update_manifest(**fields)


def _stream(cfg: Config, name: str, cache: dict[tuple, Any]) -> Stream:
    """The stream ``name`` on ``cfg.data_root`` with its options, built once per grid (scans are cached in it);
    with ``validation_per_class`` its validation view (``Stream.validation``: no test split is read)."""
    entry = STREAMS.get(name)
    options = cfg.options_of(name)
    key = (name, cfg.data_root, repr(options), cfg.skip_bad_images)
    if key not in cache:
        cache[key] = entry.obj(cfg.data_root, options, skip_bad_images=cfg.skip_bad_images)
    if cfg.validation_per_class is None:
        return cache[key]
    held = (*key, cfg.validation_per_class)
    if held not in cache:
        cache[held] = cache[key].validation(cfg.validation_per_class)
    return cache[held]


def run_data(cfg: Config, cache: dict[tuple, Any] | None = None) -> RunData:
    """Resolve one run's data: the target stream, its sessions, its controls' test sets (raises
    :class:`DataError`, ``ValueError`` or :class:`ConfigError` naming the problem)."""
    cache = {} if cache is None else cache
    stream = _stream(cfg, cfg.stream, cache)
    if cfg.shots == ALL_SHOTS and stream.spec.own_questions:
        raise ConfigError(f"shots: invalid value {ALL_SHOTS!r} for {cfg.stream}, whose sessions are its released rows; "
                          "allowed: an integer >= 1")
    sessions = stream.sessions(cfg.sessions, None if cfg.shots == ALL_SHOTS else cfg.shots, cfg.shot_seed)
    if cfg.session_order == "seed":
        sessions = reordered(sessions, cfg.shot_seed, cfg.stream)
    data = RunData(stream, sessions)
    stream.listed("test")  # listed here (nothing decoded): a bad test split is refused before any run starts
    for name in cfg.controls:
        control = data.controls[name] = _stream(cfg, name, cache)
        full = control.listed("test")  # the subset is drawn from what is listed, readable or not
        if cfg.control_subset is not None and len(full) > cfg.control_subset:
            test = full.subset(control_subset(len(full), cfg.control_subset, cfg.shot_seed, name))
            if cfg.skip_bad_images:
                test = control.readable("test", test)
            data.subsets[name] = {"size": len(test), "of": len(full), "seed": cfg.shot_seed, "ids": test.ids}
        else:
            test = control.dataset("test")
        data.control_tests[name] = test
    return data


def is_done(record: RunRecord, config: dict[str, Any], force: bool = False) -> bool:
    """Whether the run is finished, so a grid skips it; with ``force`` only when finished with this ``config`` and
    holding the checkpoints its ``keep_checkpoints`` keeps (``fscl export`` reads them)."""
    return record.is_finished() and not (force and (
        checkpoints.config_differences(record.config() or {}, config)
        or checkpoints.lacks_kept(record.path, config["keep_checkpoints"], config["sessions"])))


def decide(record: RunRecord, lock: RunLock, config: dict[str, Any], force: bool = False) -> tuple[RunDecision, str]:
    """This process's decision for a run folder (the lock is held when it is RUN), and why. A finished
    run is skipped; with ``force``, one finished with another ``config`` runs again."""
    def done() -> bool:
        return is_done(record, config, force)

    if not record.writable:
        return RunDecision.RUN, ""
    if done():
        return RunDecision.SKIP, ""
    problem = record.summary_problem() if record.finished_status() else None
    if problem is not None:  # not a --force rerun of a sound record
        log.warning("%s is marked finished but its %s: running it again to rebuild it", record.path, problem)
    try:
        lock.acquire()
    except RunInUseError as err:
        return RunDecision.BUSY, str(err)
    if done():  # finished by another process meanwhile
        lock.release()
        return RunDecision.SKIP, ""
    return RunDecision.RUN, ""
