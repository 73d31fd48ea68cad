"""Runs a configuration grid: one continual run per grid point, each into its run record.

Stages: (1) the data of the whole grid is resolved and checked — every stream's root and
layout, its sessions and its controls — before any model is built (:func:`check_data`, one
message for every problem); (2) per run: the decision (run, skip a finished run, or leave a
folder another process holds), the backbone, the strategy and the template; (3) the sessions:
zero-shot evaluation before training (row 0) and after every session on the target (per
session class group) and every control, and with ``vqa.model`` the VQA scores of the VLM with
the current encoder in its tower (:mod:`benchmark.vqa.evaluate`); (4) the accuracy matrices and
the summary. A run that fails (a non-finite loss, an unreadable image) is marked ``failed`` with
its reason (naming the stage: ``evaluation before training (session 0)``, ``training session k``, ...),
keeps the sessions already evaluated, and the rest of the grid goes on. A storage error (a full disk, a
read-only folder) marks the run ``failed`` and Ctrl-C marks it ``interrupted``; both stop the grid, and the
same command resumes it. A run with
``validation_per_class`` (``fscl tune``, :mod:`benchmark.tune`) sees every stream through its
validation view (``Stream.validation``): no test split is read.

Resume: after every session a checkpoint is saved (:mod:`benchmark.checkpoints`); an
interrupted run started again continues after its last saved session and ends with the same
numbers. A run folder is written by one process at a time (:class:`RunLock`). Several
processes shard the grid or, with ``ddp: true``, share each run (:mod:`benchmark.distributed`).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import random
import resource
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin
from tqdm.auto import tqdm

from benchmark import checkpoints
from benchmark.backbones import backbone_skeleton, load_backbone
from benchmark.config import Config, ConfigError, sweep_tag
from benchmark.distributed import (
    all_reduce_sum,
    check_data_parallel,
    grid_shard,
    init_data_parallel,
    is_main_process,
    local_device,
    world_size,
)
from benchmark.dryrun import grid_warnings
from benchmark.errors import DataError, FsclError, Interrupted
from benchmark.evaluation import EvalSet, ZeroShotAccuracy, ZeroShotEvaluator, autocast_dtype, model_fingerprint
from benchmark.jobs import resolve_jobs, run_jobs
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.plugins import CostMeter, StrategyPlugin
from benchmark.records import (
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    RunInUseError,
    RunLock,
    RunRecord,
    atomic_write,
    slug,
    storage_problem,
    write_json,
    write_problem,
)
from benchmark.registry import STRATEGIES, STREAMS, VLMS
from benchmark.shared_rows import read_counts, shared_folder, write_counts
from benchmark.template import CLIPTemplate, NonFiniteLossError
from benchmark.vlm.recipe import with_vlm_defaults
from benchmark.vlm.spec import VLMError, allowed_vlms, resolve_vlm
from benchmark.vqa.evaluate import VQASet, build_sets, score_set, vqa_row_key, vqa_rows
from benchmark.vqa.questions import QuestionSetError

log = logging.getLogger(__name__)


PARTIAL_SUMMARY = ("sessions", "target", "controls", "target_initial", "target_curve", "control_curve")
# summary.json's vqa block: the metrics that mean the same over the sessions VQA evaluated (no AUC, no BWT)
VQA_SUMMARY = ("sessions", "target", "controls", "target_initial", "target_final", "target_improvement",
               "control_change", "target_curve", "control_curve", "forgetting")


class RunDecision(enum.IntEnum):
    """What one process does with a grid point (summed over the ranks of a data-parallel run:
    only rank 0 decides, the others contribute RUN = 0)."""

    RUN = 0
    SKIP = 1  # finished already
    BUSY = 2  # another live process holds the run folder


class RunStorageError(FsclError):
    """A run could not write its record or cache (a full disk, a quota, a read-only folder): the run is recorded
    as failed where the disk allows it, and the grid stops (every later run would meet the same)."""


STORAGE_ADVICE = ("The grid stops here; what the runs saved is intact: free space (or fix the folder) and run the "
                  "same command again to resume")


class GridCheckError(ConfigError):
    """The grid's data failed its checks; the message lists every problem, one per line."""


@dataclass
class RunData:
    """The data of one run, resolved and checked before any model is built."""

    stream: Any  # the target stream (a registered Stream)
    sessions: list  # its few-shot sessions (streams.Session)
    controls: dict[str, Any] = field(default_factory=dict)  # control name -> its stream
    control_tests: dict[str, Any] = field(default_factory=dict)  # control name -> test images (subset applied)
    subsets: dict[str, Any] = field(default_factory=dict)  # control name -> the seeded subset's record


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one grid point."""

    path: Path
    status: str  # finished | skipped | failed | busy (another live process holds the run folder)
    reason: str = ""


NAME_MAX = 255  # bytes in one folder name on the usual file systems (ext4, XFS, Btrfs, APFS), where none is found


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def make_loggers(names: list[str], path: Path) -> list:
    """Avalanche loggers writing into the run folder (``interactive`` draws to the terminal)."""
    loggers = []
    for name in names:
        if name == "text":
            loggers.append(TextLogger(open(path / "avalanche.log", "a")))
        elif name == "csv":
            loggers.append(CSVLogger(log_folder=str(path / "csv")))
        elif name == "tensorboard":
            loggers.append(TensorboardLogger(tb_log_dir=str(path / "tensorboard")))
        elif name == "interactive":
            loggers.append(InteractiveLogger())
        elif name == "wandb":
            from avalanche.logging import WandBLogger

            loggers.append(WandBLogger(project_name="fscl-bench", run_name=str(path)))
    return loggers


def control_subset(n_items: int, size: int, seed: int, name: str) -> list[int]:
    """Indices (ascending) of a fixed, seeded subset of ``size`` of ``n_items`` control images.

    Seeded from (seed, CRC-32 of the control's name): the same on every machine and
    whatever ``PYTHONHASHSEED`` is.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    return sorted(rng.choice(n_items, size=min(size, n_items), replace=False).tolist())


def record_data(record: RunRecord, data_streams: dict[str, Any], subsets: dict[str, Any],
                sessions: dict[str, Any] | None = None) -> None:
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


def _stream(cfg: Config, name: str, cache: dict[tuple, Any]) -> Any:
    """The stream ``name`` on ``cfg.data_root`` with its options, built once per grid (scans are cached in it);
    with ``validation_per_class`` its validation view (``Stream.validation``: no test split is read)."""
    entry = STREAMS.get(name)
    options = cfg.options_for(name, entry.options)
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
    data = RunData(stream, stream.sessions(cfg.sessions, cfg.shots, cfg.shot_seed))
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


def changed_finished_runs(runs: list[Config]) -> list[str]:
    """The finished runs of the grid whose record was made with another configuration, each with
    the keys that differ (a finished run is never silently reused for other settings)."""
    found = []
    for run in runs:
        record = RunRecord(run_dir(run), writable=False)
        if record.is_finished():
            changed = checkpoints.config_differences(record.config() or {}, run.to_dict())
            if changed:
                found.append(f"{record.path} finished with another configuration: {'; '.join(changed)}")
    return found


def long_folder_names(runs: list[Config]) -> dict[str, list[Config]]:
    """Each folder name of the grid's run records (``out``'s own included) longer than a folder name may be on
    the file system that will hold it (its ``PC_NAME_MAX``, else :data:`NAME_MAX` bytes), as a problem naming
    its key, with the runs it belongs to."""
    found: dict[str, list[Config]] = {}
    limits: dict[Path, int] = {}
    for run in runs:
        out = Path(run.out).absolute()
        if out not in limits:
            existing = next(p for p in (out, *out.parents) if p.exists())
            try:
                limits[out] = os.pathconf(existing, "PC_NAME_MAX")
            except (OSError, ValueError):
                limits[out] = NAME_MAX
        for key, folder in [*(("out", part) for part in out.parts[1:]), *run_folders(run)]:
            size = len(os.fsencode(folder))
            if size > limits[out]:
                shown = folder if len(folder) <= 20 else folder[:20] + "..."
                found.setdefault(f"{key}: the folder name {shown!r} is {size} bytes long; at most {limits[out]} bytes "
                                 f"fit in a folder name under {out}", []).append(run)
    return found


def unwritable_outputs(runs: list[Config]) -> list[str]:
    """The runs folders of the grid that this process cannot write into (:func:`~benchmark.records.write_problem`)."""
    folders = sorted({Path(run.out).absolute() / run.name for run in runs})
    return [f"out: cannot write run records into {folder} ({problem})"
            for folder in folders if (problem := write_problem(folder)) is not None]


def unusable_cache(runs: list[Config]) -> list[str]:
    """The cache folder's problem (:func:`~benchmark.cache.cache_problem`) when a run of the grid writes there:
    its evaluation cache (``eval_cache`` not ``off``) or its VQA question sets (``vqa.model``)."""
    from benchmark.cache import cache_problem

    uses = any(run.eval_cache != "off" or run.vqa.model is not None for run in runs)
    problem = cache_problem() if uses else None
    return [] if problem is None else [problem]


def strategy_problems(runs: list[Config]) -> list[str]:
    """What each (backbone, strategy, options) of the grid refuses, found by building the strategy on
    the backbone's skeleton (its architecture on the meta device: no weights, no download): e.g.
    ``lorsu.top_k_heads`` above the model's heads, a strategy that needs blocks on a ResNet tower, an
    encoder that ``ddp: true`` cannot split, a VLM-loss strategy (``*-ppl``) without ``vqa.model``, or a
    backbone that cannot be built here at all."""
    skeletons: dict[str, Any] = {}
    problems, seen = [], set()
    for run in runs:
        entry = STRATEGIES.get(run.strategy)
        options = run.options_for(run.strategy, entry.options)
        if (run.backbone, run.strategy, repr(options), run.ddp, run.vqa.model) in seen:
            continue
        seen.add((run.backbone, run.strategy, repr(options), run.ddp, run.vqa.model))
        if entry.obj.objective == "vlm" and run.vqa.model is None:
            problems.append(f"{run.strategy} trains the encoder with a VLM's answer loss and needs vqa.model: "
                            f"{allowed_vlms()} (a VLM whose vision tower takes '{run.backbone}'; vqa.model=mini: the "
                            f"mini world's VLM, with backbone=mini)")
        try:
            if entry.obj.objective == "vlm" and run.vqa.model is not None and not resolve_vlm(run.vqa.model).has_answer_loss:
                raise VLMError(f"vqa.model '{run.vqa.model}': its family has no answer loss to train through; "
                               f"{run.strategy} needs one (families with one: "
                               f"{', '.join(n for n in VLMS.names() if VLMS.get(n).obj.has_answer_loss)})")
            options = with_vlm_defaults(options, run.vqa.model)
            if run.backbone not in skeletons:
                skeletons[run.backbone] = backbone_skeleton(run.backbone)
            entry.obj(skeletons[run.backbone], options)
            if run.ddp:
                check_data_parallel(skeletons[run.backbone].visual, run.backbone)
        except FsclError as err:
            problems.append(f"{run.strategy} on {run.backbone}: {err}")
    return problems


def vqa_controls(cfg: Config) -> list[str]:
    """The controls a run's VQA evaluation asks (``vqa.sets``; the target is always asked)."""
    return [c for c in cfg.controls if cfg.vqa.sets is None or c in cfg.vqa.sets]


def vqa_problems(runs: list[Config]) -> list[str]:
    """What the VQA evaluation of the grid refuses: a ``vqa.sets`` name that is neither a run's target nor one
    of its controls, a ``vqa.model`` whose model is missing or of another family (its config is read, no weights),
    a saved model without its weights files or a processor that loads
    (:meth:`~benchmark.vlm.base.VLMFamily.check_loadable`), or a backbone whose encoder its vision tower cannot take
    (checked on the backbone's skeleton)."""
    problems, seen = [], set()
    for run in runs:
        if run.vqa.model is None:
            continue
        unknown = [name for name in run.vqa.sets or [] if name != run.stream and name not in run.controls]
        if unknown:
            problems.append(f"vqa.sets: {', '.join(map(repr, unknown))} is neither the target nor a control of the "
                            f"run on '{run.stream}'; allowed: {', '.join([run.stream, *run.controls])}")
        if (run.vqa.model, run.backbone) in seen:
            continue
        seen.add((run.vqa.model, run.backbone))
        try:
            family = resolve_vlm(run.vqa.model)
            family.config()
            family.check_loadable()  # weights files present, processor loads (no weights loaded)
            family.check_encoder(backbone_skeleton(run.backbone))
        except FsclError as err:
            problems.append(str(err))
    return list(dict.fromkeys(problems))


def _where(run: Config) -> str:
    return f"{run.stream}/{run.strategy}/{run.shots}-s{run.seed}"


def check_grid(runs: list[Config], force: bool = False, jobs: int | str = 1) -> list[RunData]:
    """Every run's :class:`RunData`, or :class:`GridCheckError` listing every problem of the grid:
    ``jobs`` (local processes) other than 1 with ``ddp: true``, what a strategy refuses on its backbone
    (:func:`strategy_problems`), what VQA refuses (:func:`vqa_problems`), its data (a missing root, a
    wrong layout, too many sessions for a stream's classes, ...), a runs folder or a cache folder it cannot
    write, a folder name too long (:func:`long_folder_names`), and (unless ``force``) a finished run whose
    configuration changed. A run and ``--dry-run`` make these same checks."""
    cache: dict[tuple, Any] = {}
    found: list[RunData] = []
    problems: dict[str, list[str]] = {
        message: [] for message in
        unwritable_outputs(runs) + unusable_cache(runs) + strategy_problems(runs) + vqa_problems(runs)}
    if runs and runs[0].ddp and jobs not in (1, "auto"):  # ddp is one value for the whole grid
        problems[f"--jobs: invalid value {jobs!r} with ddp: true; --jobs runs whole runs in local processes, with "
                 f"ddp: true the launched processes share each run instead: leave --jobs at 1"] = []
    for message, long in long_folder_names(runs).items():
        problems[message] = [_where(run) for run in long]
    for run in runs:
        where = _where(run)
        try:
            found.append(run_data(run, cache))
        except (DataError, ValueError, ConfigError) as err:
            problems.setdefault(str(err), []).append(where)
            continue
        if run.vqa.model is not None:
            for stream in [found[-1].stream, *(found[-1].controls[c] for c in vqa_controls(run))]:
                if stream.spec.vqa_question is None:
                    problems.setdefault(f"vqa: stream '{stream.spec.name}' has no question: add 'vqa_question: ...' "
                                        f"to its data file, or set vqa.model: null", []).append(where)
    if not force:
        for message in changed_finished_runs(runs):
            problems[message + " (--force runs it again, replacing its record; or give the grid another name=)"] = []
    if problems:
        lines = [f"- {message}" + (f"\n  (runs: {', '.join(where[:3])}{' ...' if len(where) > 3 else ''})" if where else "")
                 for message, where in problems.items()]
        raise GridCheckError(f"the grid's data has {len(problems)} problem(s); nothing was run:\n" + "\n".join(lines))
    return found


def run_grid(cfg: Config, progress: bool = True, force: bool = False, jobs: int | str = 1) -> list[RunOutcome]:
    """Run this process's grid points of ``cfg`` in order; returns one outcome per point.

    Every point is checked first (:func:`check_grid`): a problem anywhere stops the
    grid before any model is built; so does a finished run whose configuration changed, unless
    ``force`` (it then runs again from the start). Started as several processes (``accelerate launch``,
    ``torchrun``, a SLURM array), each runs its own shard of the grid
    (:func:`benchmark.distributed.grid_shard`). With ``ddp: true`` the launched processes instead
    run every point together, data parallel (a SLURM array still shards the grid between its tasks).
    ``jobs`` (an integer, or ``auto``: :func:`benchmark.jobs.resolve_jobs`) runs the process's pending
    points in that many local processes (:mod:`benchmark.jobs`), each run still in one process.
    """
    outcomes = []
    device = local_device(cfg.device)  # a device this machine lacks: refused before any work
    shard = grid_shard(launcher=not cfg.ddp)
    runs = shard.select(cfg.expand())
    if shard.count > 1:
        log.info("grid shard %s: %d run(s)", shard, len(runs))
    data = check_grid(runs, force, jobs)
    if cfg.ddp:
        init_data_parallel(device)
    if is_main_process():
        for warning in grid_warnings(cfg, runs):
            log.warning("%s", warning)
    if not cfg.ddp and jobs != 1:
        pending = [i for i, run in enumerate(runs) if not is_done(RunRecord(run_dir(run), writable=False),
                                                                  run.to_dict(), force)]
        n_jobs = resolve_jobs(jobs, device, len(pending))
        if n_jobs > 1:
            outcomes = [RunOutcome(run_dir(run), "skipped") for run in runs]
            done = run_jobs([runs[i] for i in pending], [data[i] for i in pending], n_jobs, progress, force)
            for i, outcome in zip(pending, done):
                outcomes[i] = outcome
            return outcomes
    bar = tqdm(runs, desc="runs", unit="run", disable=not (progress and is_main_process()))
    for run_cfg, run_data_ in zip(bar, data):
        bar.set_postfix_str(f"{run_cfg.stream}/{run_cfg.strategy}/{run_cfg.shots}-s{run_cfg.seed}")
        outcomes.append(run_one(run_cfg, run_data_, progress=progress and is_main_process(), force=force))
    return outcomes


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


def run_one(cfg: Config, data: RunData | None = None, progress: bool = False, force: bool = False) -> RunOutcome:
    """One continual run of a scalar config into its run record (resumed if interrupted).

    ``data``: the run's checked data (default: resolved here); ``force``: run a finished run again when
    its configuration changed. Under ``ddp: true`` rank 0 writes
    the record and decides for every rank whether the run is skipped (finished) or busy (locked
    by another process).
    """
    path = run_dir(cfg)
    record = RunRecord(path, writable=is_main_process())
    lock = RunLock(path)
    try:
        decision, reason = decide(record, lock, cfg.to_dict(), force)
    except OSError as err:
        if storage_problem(err) is None:
            raise
        raise RunStorageError(f"{path}: {storage_problem(err)} (taking its {RunLock.NAME}). {STORAGE_ADVICE}") from err
    (total,) = all_reduce_sum([int(decision)])
    decision = RunDecision(total)
    if decision is RunDecision.SKIP:
        log.info("skipping finished run %s", path)
        return RunOutcome(path, "skipped")
    if decision is RunDecision.BUSY:
        log.error("%s", reason)
        return RunOutcome(path, "busy", reason or f"run folder {path} is in use by another process")
    try:
        return _Run(cfg, record, progress).execute(data or run_data(cfg))
    finally:
        if record.writable:
            lock.release()
            _remove_empty_folders(path, Path(cfg.out))


def _remove_empty_folders(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents below ``top`` while empty (a run refused before it wrote anything)."""
    while path != top and top in path.parents and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


class _Run:
    """State of one run while it executes: built in :meth:`build`, trained in :meth:`sessions`."""

    def __init__(self, cfg: Config, record: RunRecord, progress: bool) -> None:
        self.cfg, self.record, self.progress = cfg, record, progress
        self.device = local_device(cfg.device)
        if self.device.type == "cuda":  # tensors made on "cuda" land on this process's GPU, not all on GPU 0
            torch.cuda.set_device(self.device)
        self.metric = ZeroShotAccuracy()
        self.matrix: AccuracyMatrix | None = None
        self.vqa_sets: list[VQASet] = []  # with vqa.model: the target's set, then each control's
        self.vqa_matrix: AccuracyMatrix | None = None  # VQA accuracy (vqa_acc), NaN rows where not evaluated
        self.vqa_subset_matrix: AccuracyMatrix | None = None  # with subsets between the ends: on them, every session
        self.costs: dict[str, Any] = {"sessions": []}
        self.trains = True  # False: a strategy that never changes the model, whose every row is row 0
        self.row0: dict[str, tuple[int, int]] | None = None  # (correct, total) per eval set before training
        self.eval_timing = {"images": 0, "seconds": 0.0}  # images this run's process evaluated, and how long
        self.pretrained: str | None = None  # the pretrained encoder's fingerprint (shared rows' keys)
        self.vqa_row0: dict[str, dict[str, int | float]] | None = None  # VQA counts per VQASet.key before training
        self.vqa_timing = {"questions": 0, "seconds": 0.0}  # questions this run's processes scored, and how long
        self.stage = "setup"  # what the run is doing, in words (the reasons of failures and interruptions)

    def execute(self, data: RunData) -> RunOutcome:
        """Run (or resume) the run. A non-finite loss or an unreadable image fails it (recorded, the grid goes on);
        Ctrl-C marks it ``interrupted`` and a storage error (a full disk) ``failed``, and both stop the grid
        (:class:`~benchmark.errors.Interrupted`, :class:`RunStorageError`)."""
        try:
            return self._execute(data)
        except KeyboardInterrupt:
            recorded = self.stop(STATUS_INTERRUPTED, f"interrupted in {self.stage}")
            raise Interrupted(f"{self.record.path} in {self.stage} ({recorded})") from None
        except (OSError, RuntimeError) as err:
            problem = storage_problem(err)
            if problem is None:
                raise
            recorded = self.stop(STATUS_FAILED, f"{self.stage}: {problem}")
            raise RunStorageError(
                f"{self.record.path}: {problem} (in {self.stage}; {recorded}). {STORAGE_ADVICE}") from err

    def _execute(self, data: RunData) -> RunOutcome:
        cfg = self.cfg
        seed_everything(cfg.seed)
        backbone, plugin, meter, template, scenario, eval_stream = self.build(data)
        done = self.start_or_resume(data, backbone, plugin, template)
        try:
            self.sessions(done, plugin, meter, template, scenario, eval_stream)
        except (NonFiniteLossError, DataError) as err:
            reason = f"{self.stage}: {err}"
            log.error("run %s failed: %s", self.record.path, reason)
            self.finish(backbone.visual_parameter_count(), STATUS_FAILED, reason)
            return RunOutcome(self.record.path, STATUS_FAILED, reason)
        self.stage = "summary"
        self.finish(backbone.visual_parameter_count(), STATUS_FINISHED)
        if self.record.writable:
            checkpoints.prune(self.record.path, cfg.keep_checkpoints)
        return RunOutcome(self.record.path, STATUS_FINISHED)

    def stop(self, status: str, reason: str) -> str:
        """Record a run cut short as ``status`` with ``reason`` when its manifest exists (a run that had not
        started has nothing to record); what was recorded, in words (a full disk may refuse even this write)."""
        if not self.record.writable:
            return "rank 0 records it"
        if self.record.manifest() is None:
            return "nothing was recorded yet"
        try:
            self.record.update_manifest(status=status, reason=reason)
        except OSError as err:
            return f"its status could not be recorded: {err.strerror}"
        return f"recorded as {status}"

    def build(self, data: RunData):
        """The backbone, the strategy and its cost meter, the template, the scenario and the eval stream."""
        cfg = self.cfg
        backbone = load_backbone(cfg.backbone, str(self.device))
        if cfg.ddp:
            check_data_parallel(backbone.visual, cfg.backbone)
        spec = data.stream.spec
        entry = STRATEGIES.get(cfg.strategy)
        options = with_vlm_defaults(cfg.options_for(cfg.strategy, entry.options), cfg.vqa.model)
        vlm = entry.obj.objective == "vlm"
        plain = vlm and not options.train_augment  # the released Ppl trainer: no augmentation
        train_tf = backbone.preprocess(False) if plain else backbone.preprocess(True, cfg.train.augment)
        scenario = data.stream.benchmark(data.sessions, train_tf, backbone.preprocess(False))
        zeroshot = ZeroShotEvaluator(backbone, cfg.train.eval_batch_size,
                                     dtype=autocast_dtype(cfg.train.precision, self.device),
                                     num_workers=cfg.train.num_workers, cache=cfg.eval_cache, progress=self.progress)
        test = data.stream.dataset("test")  # as the scenario's test stream: per session its classes' images
        for session in data.sessions:
            zeroshot.add(EvalSet(f"{cfg.stream}@s{session.index}", cfg.stream, spec.class_names, spec.templates,
                                 test.with_classes(session.classes).with_transform(backbone.preprocess(False))))
        for name, test in data.control_tests.items():
            control = data.controls[name].spec
            zeroshot.add(EvalSet(name, name, control.class_names, control.templates,
                                 test.with_transform(backbone.preprocess(False))))
        plugin: StrategyPlugin = entry.obj(backbone, options)
        self.trains = plugin.trains
        meter = CostMeter(plugin)
        common = dict(
            backbone=backbone, class_names=spec.class_names, templates=spec.templates, train=cfg.train,
            zeroshot=zeroshot, seed=cfg.seed, device=self.device, plugins=[plugin, meter],
            evaluator=EvaluationPlugin(
                self.metric, loggers=make_loggers(cfg.loggers, self.record.path) if self.record.writable else []),
        )
        template = self.vlm_template(spec, backbone, options, common) if vlm else CLIPTemplate(**common)
        self.matrix = AccuracyMatrix.empty(cfg.stream, list(cfg.controls), len(data.sessions))
        if cfg.vqa.model is not None:
            self.build_vqa(data)
        return backbone, plugin, meter, template, scenario, zeroshot.stream()

    def vlm_template(self, spec, backbone, recipe, common: dict[str, Any]) -> CLIPTemplate:
        """The VLM template of a ``*-ppl`` strategy: the VLM of ``vqa.model`` (shared with the VQA evaluation)
        around the backbone's encoder, and the stream's question/answer pair of every class."""
        from benchmark.vlm_template import VLMTemplate
        from benchmark.vqa.pairs import AnswerPairs

        family = resolve_vlm(self.cfg.vqa.model)
        family.check_encoder(backbone)
        vlm = family.loaded(self.device)
        pairs = AnswerPairs(vlm, spec.vqa_question, spec.ppl_answer, spec.class_names)
        return VLMTemplate(vlm=vlm, pairs=pairs, recipe=recipe, **common)

    def build_vqa(self, data: RunData) -> None:
        """The VQA question sets of the run's test images (the target: every session's classes as one set) with
        their seeded subsets (``vqa.subset``), and the empty VQA matrices (:meth:`vqa_bases`)."""
        cfg, vqa = self.cfg, self.cfg.vqa
        classes = sorted({c for session in data.sessions for c in session.classes})
        controls = vqa_controls(cfg)
        tests = {cfg.stream: (data.stream, data.stream.dataset("test").with_classes(classes)),
                 **{name: (data.controls[name], data.control_tests[name]) for name in controls}}
        self.vqa_sets = [
            dataclasses.replace(qset, subset=control_subset(len(qset.questions.items), vqa.subset, vqa.seed, qset.name))
            if vqa.subset is not None and vqa.subset < len(qset.questions.items) else qset
            for qset in build_sets(tests, vqa.mode, vqa.seed, cfg.backbone)]
        self.vqa_matrix = AccuracyMatrix.empty(cfg.stream, controls, len(data.sessions))
        if vqa.sessions == "all" and any(qset.subset is not None for qset in self.vqa_sets):
            self.vqa_subset_matrix = AccuracyMatrix.empty(cfg.stream, controls, len(data.sessions))

    def start_or_resume(self, data: RunData, backbone, plugin: StrategyPlugin, template: CLIPTemplate) -> int:
        """Start the record, or restore the last checkpoint of an interrupted run; the sessions already done."""
        cfg = self.cfg
        resume = checkpoints.load_latest(self.record.path, cfg.to_dict(), self.device)
        if resume is None:
            if self.record.writable:
                checkpoints.clear(self.record.path)
            self.record.start(cfg.to_dict(), {"seed": cfg.seed, "shot_seed": cfg.shot_seed},
                              {f"session_{s.index}": s.ids for s in data.sessions})
        else:
            log.info("resuming %s after session %d", self.record.path, resume.session)
            self.record.resume(resume.session)
        device = {"device": str(self.device)}  # as resolved (auto -> cuda:0 or cpu), and the GPU's name
        if self.device.type == "cuda":
            device["gpu"] = torch.cuda.get_device_name(self.device)
        classes = {name: len(s.spec.class_names) for name, s in {cfg.stream: data.stream, **data.controls}.items()}
        self.record.update_manifest(**device, classes=classes, classes_with_fewer_shots={
            f"session_{s.index}": s.short_classes for s in data.sessions if s.short_classes})
        record_data(self.record, {cfg.stream: data.stream, **data.controls}, data.subsets,
                    sessions={cfg.stream: data.sessions})
        if self.vqa_sets:
            sets = {q.name: q.record(cfg.vqa.mode, cfg.vqa.seed) for q in self.vqa_sets}
            if resume is not None:
                check_recorded_sets((self.record.manifest() or {}).get("vqa_sets") or {}, sets, self.record.path)
            self.record.update_manifest(vqa_sets=sets)
        if resume is None:
            return 0
        backbone.visual.load_state_dict(resume.encoder)
        plugin.load_state_dict(resume.strategy)
        self.matrix, self.costs = resume.matrix, resume.costs
        if self.vqa_sets:
            self.vqa_matrix = resume.vqa_matrix
            self.vqa_subset_matrix = resume.vqa_subset_matrix or self.vqa_subset_matrix
        template.load_carried_state(resume.template or {})
        checkpoints.restore_rng(resume.rng, template.caption_rng)
        return resume.session

    def sessions(self, done: int, plugin: StrategyPlugin, meter: CostMeter, template: CLIPTemplate,
                 scenario, eval_stream) -> None:
        """Evaluate before training (unless resumed), then train and evaluate every session after ``done``."""
        sessions = scenario.train_stream
        bar = tqdm(total=len(sessions) + 1, initial=done + 1 if done else 0, desc=f"{self.cfg.strategy} s{self.cfg.seed}",
                   unit="eval", leave=False, disable=not self.progress)
        try:
            if not done:
                self.stage = "evaluation before training (session 0)"
                self.evaluate(template, eval_stream, 0)
                bar.update()
            for exp in sessions:
                session = exp.current_experience + 1
                if session <= done:
                    continue
                self.stage = f"training session {session}"
                held_mb = template.zeroshot.held_bytes() / 2**20  # eval_cache: device's images, not training's
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                start = time.perf_counter()
                if plugin.trains:
                    template.train(exp, eval_streams=[])
                self.costs["sessions"].append({
                    "session": session,
                    "train_seconds": round(time.perf_counter() - start, 4),
                    "train_samples": len(exp.dataset),
                    "peak_memory_mb": round(peak_memory_mb(self.device) - held_mb, 1),
                    **meter.session_costs(),  # trainable counts, FLOPs per sample, setup (mask) time
                })
                self.stage = f"evaluation after session {session}"
                self.evaluate(template, eval_stream, session)
                self.stage = f"checkpoint after session {session}"
                self.checkpoint(session, template.backbone, plugin, template)
                bar.update()
        finally:
            bar.close()

    def checkpoint(self, session: int, backbone, plugin: StrategyPlugin, template: CLIPTemplate) -> None:
        """Save what the sessions after ``session`` depend on (rank 0 only)."""
        if not self.record.writable:
            return
        checkpoints.save(self.record.path, checkpoints.SessionState(
            session=session, config=self.cfg.to_dict(), encoder=backbone.visual.state_dict(),
            strategy=plugin.state_dict(), rng=checkpoints.capture_rng(template.caption_rng),
            matrix=self.matrix, costs=self.costs, vqa_matrix=self.vqa_matrix, vqa_subset_matrix=self.vqa_subset_matrix,
            template=template.carried_state()),
            self.cfg.keep_checkpoints)

    def evaluate(self, template: CLIPTemplate, eval_stream, session: int) -> None:
        """Zero-shot evaluation after ``session``: log rows, fill the matrix row."""
        counts = self.eval_counts(template, eval_stream, session)
        target, n = self.cfg.stream, self.matrix.n_sessions
        groups = [counts[f"{target}@s{i + 1}"] for i in range(n)]
        rows: list[dict[str, Any]] = []

        def add(dataset: str, metric: str, correct: int, total: int) -> float:
            value = correct / total if total else None
            rows.append({"session": session, "dataset": dataset, "metric": metric, "value": value,
                         "correct": correct, "total": total})
            return float("nan") if value is None else value

        self.matrix.values[session, 0] = add(target, "top1", sum(c for c, _ in groups), sum(t for _, t in groups))
        if session:
            seen = groups[:session]
            self.matrix.seen[session] = add(target, "top1_seen", sum(c for c, _ in seen), sum(t for _, t in seen))
        for i, (c, t) in enumerate(groups):
            self.matrix.groups[session, i] = add(target, f"top1_s{i + 1}", c, t)
        for j, name in enumerate(self.matrix.controls, start=1):
            self.matrix.values[session, j] = add(name, "top1", *counts[name])
        self.record.append_metrics(rows)
        if self.vqa_sets and (session in (0, self.matrix.n_sessions) or self.cfg.vqa.sessions == "all"):
            self.evaluate_vqa(template.backbone, session)

    # -- evaluation counts: row 0 shared by the grid, a strategy that never trains evaluated once ---------------
    def eval_counts(self, template: CLIPTemplate, eval_stream, session: int) -> dict[str, tuple[int, int]]:
        """``(correct, total)`` per eval set after ``session``: evaluated, except row 0 (and every row of a
        strategy that never trains), which comes from :meth:`session_zero`."""
        if session and self.trains:
            return self.run_eval(template, list(eval_stream))
        if self.row0 is None:
            self.row0 = self.session_zero(template, eval_stream)
        return self.row0

    def run_eval(self, template: CLIPTemplate, experiences: list) -> dict[str, tuple[int, int]]:
        """Evaluate ``experiences`` (eval sets) with Avalanche's loop; their counts, timed in the manifest."""
        start = time.perf_counter()
        template.eval(experiences)
        names = [template.zeroshot.sets[exp.current_experience].key for exp in experiences]
        self.eval_timing["images"] += sum(self.metric.counts[name][1] for name in names)
        self.eval_timing["seconds"] = round(self.eval_timing["seconds"] + time.perf_counter() - start, 3)
        self.record.update_manifest(eval_timing=self.eval_timing)
        return {name: self.metric.counts[name] for name in names}

    def session_zero(self, template: CLIPTemplate, eval_stream) -> dict[str, tuple[int, int]]:
        """Row 0's counts: each set's from the grid's shared store (:mod:`benchmark.shared_rows`) when a run
        stored them already (under ``ddp: true``: when every rank finds them), else evaluated and stored. The
        manifest records the keys of the sets' cached images and of their shared counts."""
        zeroshot = template.zeroshot
        keys = zeroshot.row_keys(self.eval_context(), self.fingerprint(template.backbone))
        folder = shared_folder(self.cfg.out, self.cfg.name)
        found = {name: read_counts(folder, key) for name, key in keys.items() if key is not None}
        everywhere = all_reduce_sum([int(found.get(s.key) is not None) for s in zeroshot.sets])
        counts = {s.key: (found[s.key]["correct"], found[s.key]["total"])
                  for s, n in zip(zeroshot.sets, everywhere) if n == world_size()}
        missing = [exp for exp in eval_stream if zeroshot.sets[exp.current_experience].key not in counts]
        evaluated = self.run_eval(template, missing) if missing else {}
        if self.record.writable:
            for name, (correct, total) in evaluated.items():
                if keys[name] is not None:
                    write_counts(folder, keys[name], {"correct": correct, "total": total}, name)
        counts.update(evaluated)
        self.record.update_manifest(evaluation={
            "cache": self.cfg.eval_cache, "images": zeroshot.image_keys(),
            "session0": {"keys": keys, "shared": sorted(set(counts) - set(evaluated))}})
        return {s.key: counts[s.key] for s in zeroshot.sets}

    def eval_context(self) -> dict[str, Any]:
        """What shared row-0 counts depend on beyond the model and the set: the device type, the GPU, torch."""
        return {"device": self.device.type, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}

    def fingerprint(self, backbone) -> str:
        """:func:`~benchmark.evaluation.model_fingerprint` of the pretrained ``backbone``, computed once per run."""
        if self.pretrained is None:
            self.pretrained = model_fingerprint(backbone)
        return self.pretrained

    def vqa_bases(self, session: int) -> list[tuple[bool, AccuracyMatrix]]:
        """(full, matrix) of each VQA matrix that scores after ``session``, each on one basis so that its sessions
        compare the same questions: all questions (``full``) at the ends, and between them too when no set has a
        subset; with subsets (``vqa.subset`` under ``sessions: all``) each set's subset at every session, the ends
        included (a set smaller than the subset: all its questions)."""
        ends = session in (0, self.matrix.n_sessions)
        bases = [(True, self.vqa_matrix)] if ends or self.vqa_subset_matrix is None else []
        return bases + ([(False, self.vqa_subset_matrix)] if self.vqa_subset_matrix is not None else [])

    def evaluate_vqa(self, backbone, session: int) -> None:
        """VQA after ``session`` with the current encoder in the VLM's tower, on each basis of :meth:`vqa_bases`: the
        rows of :func:`~benchmark.vqa.evaluate.vqa_rows` per dataset (``vqa_acc``, and by ``vqa.scoring``; on the
        subsets named ``..._subset``); ``vqa_acc`` fills the basis' matrix. Under ``ddp: true`` every process
        scores its share of the questions. Row 0 (and every row of a strategy that never trains) comes from
        :meth:`vqa_session_zero`."""
        vqa = self.cfg.vqa
        vlm = resolve_vlm(vqa.model).loaded(self.device)
        vlm.swap_encoder(backbone)
        pretrained = session == 0 or not self.trains  # row 0's counts, the grid's
        if pretrained and self.vqa_row0 is None:
            self.vqa_row0 = self.vqa_session_zero(vlm, backbone)
        scored = dict(self.vqa_row0) if pretrained else {}
        rows: list[dict[str, Any]] = []
        for full, matrix in self.vqa_bases(session):
            for j, qset in enumerate(self.vqa_sets):
                if qset.key(full) not in scored:  # a set without subset is scored once for both bases
                    scored[qset.key(full)] = self.score(vlm, qset, full)
                counts = scored[qset.key(full)]
                rows += vqa_rows(session, qset.name, counts, vqa.scoring, "" if full else "_subset")
                matrix.values[session, j] = counts["correct"] / counts["total"]
        self.record.append_metrics(rows)

    def score(self, vlm, qset: VQASet, full: bool) -> dict[str, int | float]:
        """:func:`~benchmark.vqa.evaluate.score_set` of ``qset`` (all its questions, or its subset unless ``full``;
        counts summed over ddp ranks), timed in the manifest's ``vqa_timing``."""
        start = time.perf_counter()
        counts = score_set(vlm, qset, self.cfg.vqa.batch_size, full, self.cfg.vqa.scoring, self.progress)
        self.vqa_timing["questions"] += int(counts["total"])
        self.vqa_timing["seconds"] = round(self.vqa_timing["seconds"] + time.perf_counter() - start, 3)
        self.record.update_manifest(vqa_timing=self.vqa_timing)
        return counts

    def vqa_session_zero(self, vlm, backbone) -> dict[str, dict[str, int | float]]:
        """VQA row 0's counts per :meth:`~benchmark.vqa.evaluate.VQASet.key` (all of a set's questions, and its
        subset on a subset basis; the pretrained encoder in the VLM's tower): from the grid's shared store when
        a run stored them (under ``ddp: true``: when every rank finds them), else scored and stored; the manifest's
        ``vqa_session0`` names the keys and the sets read."""
        vqa = self.cfg.vqa
        asks = {qset.key(full): (qset, full) for full, _ in self.vqa_bases(0) for qset in self.vqa_sets}
        keys = {name: vqa_row_key(vqa, qset, self.fingerprint(backbone), self.eval_context(), full)
                for name, (qset, full) in asks.items()}
        folder = shared_folder(self.cfg.out, self.cfg.name)
        found = {name: read_counts(folder, key) for name, key in keys.items()}
        everywhere = all_reduce_sum([int(found[name] is not None) for name in asks])
        counts, shared = {}, []
        for (name, (qset, full)), n in zip(asks.items(), everywhere):
            if n == world_size():
                counts[name] = found[name]
                shared.append(name)
                continue
            counts[name] = self.score(vlm, qset, full)
            if self.record.writable:
                write_counts(folder, keys[name], counts[name], name)
        self.record.update_manifest(vqa_session0={"keys": keys, "shared": shared})
        return counts

    def finish(self, visual_params: int, status: str, reason: str = "") -> None:
        """Write the matrix and the summary, and the run's status (with its reason when it failed).

        A failed run's summary keeps what it evaluated (sessions, initial accuracy, the curves so far)
        and no final metric (TI, CC, forgetting...): those describe a run that reached its last session.
        """
        path = self.record.path
        summary = summarize(self.matrix) if self.matrix.last >= 0 else {}
        if status == STATUS_FAILED:
            summary = {k: v for k, v in summary.items() if k in PARTIAL_SUMMARY}
        vqa_keys = PARTIAL_SUMMARY if status == STATUS_FAILED else VQA_SUMMARY
        if self.vqa_matrix is not None:
            summary["vqa"] = {**vqa_summary(self.vqa_matrix, vqa_keys), **self.vqa_basis(True)}
        if self.vqa_subset_matrix is not None:
            summary["vqa_subset"] = {**vqa_summary(self.vqa_subset_matrix, vqa_keys), **self.vqa_basis(False)}
        summary["costs"] = {"visual_parameters": visual_params, **self.costs}
        if self.record.writable:
            atomic_write(path / "matrix.csv", self.matrix.to_csv())
            if self.vqa_matrix is not None:
                atomic_write(path / "vqa_matrix.csv", self.vqa_matrix.to_csv(per_group=False))
            if self.vqa_subset_matrix is not None:
                atomic_write(path / "vqa_subset_matrix.csv", self.vqa_subset_matrix.to_csv(per_group=False))
            write_json(path / "summary.json", summary)
        self.record.update_manifest(status=status, **({"reason": reason} if reason else {}))

    def vqa_basis(self, full: bool) -> dict[str, Any]:
        """What the VQA numbers of a basis (:meth:`vqa_bases`) are on: ``basis`` (``all``: every question of
        each set; ``subset``: each set's seeded subset) and ``items``, the questions per set."""
        items = {q.name: len(q.questions.items) if full or q.subset is None else len(q.subset) for q in self.vqa_sets}
        return {"basis": "all" if full else "subset", "items": items}


def check_recorded_sets(recorded: dict[str, Any], sets: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run whose question sets (``sets``, the manifest's ``vqa_sets`` form) are not those its
    manifest ``recorded``: the scores before and after the interruption would answer other questions."""
    changed = [f"{name} (sha256 {recorded.get(name, {}).get('sha256')} recorded, {entry['sha256']} now)"
               for name, entry in sets.items() if recorded.get(name, {}).get("sha256") != entry["sha256"]]
    if changed:
        raise QuestionSetError(f"cannot resume {path}: its VQA question sets changed since it started: "
                               f"{'; '.join(changed)}. Run it again from the start (--force), or restore the data "
                               f"it was started on")


def vqa_summary(m: AccuracyMatrix, keys: tuple[str, ...]) -> dict[str, Any]:
    """``keys`` of :func:`summarize` on the VQA matrix's evaluated sessions only (with ``vqa.sessions: ends``,
    rows 0 and T: TI = A[T] − A[0]); ``evaluated`` lists those sessions."""
    rows = np.flatnonzero(~np.isnan(m.values[:, 0]))
    if not len(rows):
        return {}
    evaluated = AccuracyMatrix(m.target, m.datasets, m.values[rows], m.seen[rows], m.groups[rows])
    summary = {k: v for k, v in summarize(evaluated).items() if k in keys}
    return {**summary, "sessions": int(rows[-1]), "evaluated": rows.tolist()}
