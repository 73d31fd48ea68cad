"""Runs a configuration grid: one continual run per grid point, each into its run record.

A run: load the backbone, sample the sessions, evaluate zero-shot before training (row 0)
and after every session on the target (per session class group) and on every control,
then write the accuracy matrix and the summary. Finished runs are skipped; a run that
fails (e.g. a non-finite loss) is marked ``failed`` with its reason, keeps the sessions
already evaluated, and the rest of the grid goes on.

Resume: after every session a checkpoint is saved (:mod:`benchmark.checkpoints`); an
interrupted run started again continues after its last saved session and ends with the same
numbers. A run folder is written by one process at a time (:class:`RunLock`). Several
processes shard the grid or, with ``ddp: true``, share each run (:mod:`benchmark.distributed`).
"""
from __future__ import annotations

import logging
import random
import resource
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin
from tqdm.auto import tqdm

from benchmark import checkpoints
from benchmark.backbones import load_backbone
from benchmark.config import Config
from benchmark.distributed import (
    all_reduce_sum,
    check_data_parallel,
    grid_shard,
    init_data_parallel,
    is_main_process,
    local_device,
)
from benchmark.evaluation import EvalSet, ZeroShotAccuracy, ZeroShotEvaluator
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.plugins import CostMeter
from benchmark.records import (
    STATUS_FAILED,
    STATUS_FINISHED,
    RunInUseError,
    RunLock,
    RunRecord,
    atomic_write,
    slug,
    write_json,
)
from benchmark.registry import STRATEGIES, STREAMS
from benchmark.template import CLIPTemplate, NonFiniteLossError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one grid point."""

    path: Path
    status: str  # finished | skipped | failed | busy (another live process holds the run folder)
    reason: str = ""


def run_dir(cfg: Config) -> Path:
    """``<out>/<name>/<stream>/<backbone>/<strategy>/<shots>-s<seed>`` of a scalar config."""
    return Path(cfg.out) / cfg.name / cfg.stream / slug(cfg.backbone) / cfg.strategy / f"{cfg.shots}-s{cfg.seed}"


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


def record_data(record: RunRecord, data_streams: dict[str, Any], subsets: dict[str, Any]) -> None:
    """Write what a run must keep about its data into the manifest: skipped unreadable images,
    seeded splits (their id lists in ``splits.json``) and the control subsets' ids."""
    fields: dict[str, Any] = {}
    split_ids = {}
    for name, data_stream in data_streams.items():
        info = data_stream.data_record()
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
    if subsets:
        fields["control_subsets"] = subsets
    if fields:
        record.update_manifest(**fields)


def run_grid(cfg: Config, progress: bool = True) -> list[RunOutcome]:
    """Run this process's grid points of ``cfg`` in order; returns one outcome per point.

    Started as several processes (``accelerate launch``, ``torchrun``, a SLURM array), each
    runs its own shard of the grid (:func:`benchmark.distributed.grid_shard`). With
    ``ddp: true`` the launched processes instead run every point together, data parallel
    (a SLURM array still shards the grid between its tasks).
    """
    outcomes = []
    if cfg.ddp:
        init_data_parallel(local_device(cfg.device))
    shard = grid_shard(launcher=not cfg.ddp)
    runs = shard.select(cfg.expand())
    if shard.count > 1:
        log.info("grid shard %s: %d run(s)", shard, len(runs))
    bar = tqdm(runs, desc="runs", unit="run", disable=not (progress and is_main_process()))
    for run_cfg in bar:
        bar.set_postfix_str(f"{run_cfg.stream}/{run_cfg.strategy}/{run_cfg.shots}-s{run_cfg.seed}")
        outcomes.append(run_one(run_cfg, progress=progress and is_main_process()))
    return outcomes


def run_one(cfg: Config, progress: bool = False) -> RunOutcome:
    """One continual run of a scalar config into its run record (resumed if interrupted).

    Under ``ddp: true`` rank 0 writes the record and decides for every rank whether the run
    is skipped (finished) or busy (locked by another process).
    """
    path = run_dir(cfg)
    record = RunRecord(path, writable=is_main_process())
    lock = RunLock(path)
    decision, reason = 0, ""  # 0: run, 1: skip (finished), 2: busy
    if record.writable:
        if record.is_finished():
            decision = 1
        else:
            try:
                lock.acquire()
            except RunInUseError as err:
                decision, reason = 2, str(err)
            else:
                decision = 1 if record.is_finished() else 0  # finished by another process meanwhile
                if decision:
                    lock.release()
    (decision,) = all_reduce_sum([decision])
    if decision == 1:
        log.info("skipping finished run %s", path)
        return RunOutcome(path, "skipped")
    if decision == 2:
        log.error("%s", reason)
        return RunOutcome(path, "busy", reason or f"run folder {path} is in use by another process")
    try:
        return _Run(cfg, record, progress).execute()
    finally:
        if record.writable:
            lock.release()


class _Run:
    """State of one run while it executes."""

    def __init__(self, cfg: Config, record: RunRecord, progress: bool) -> None:
        self.cfg, self.record, self.progress = cfg, record, progress
        self.device = local_device(cfg.device)
        if self.device.type == "cuda":  # tensors made on "cuda" land on this process's GPU, not all on GPU 0
            torch.cuda.set_device(self.device)

    def execute(self) -> RunOutcome:
        cfg = self.cfg
        seed_everything(cfg.seed)
        backbone = load_backbone(cfg.backbone, str(self.device))
        if cfg.ddp:
            check_data_parallel(backbone.visual, cfg.backbone)
        stream_entry = STREAMS.get(cfg.stream)
        stream = stream_entry.obj(cfg.data_root, cfg.options_for(cfg.stream, stream_entry.options),
                                  skip_bad_images=cfg.skip_bad_images)
        sessions = stream.sessions(cfg.sessions, cfg.shots, cfg.shot_seed)
        scenario = stream.benchmark(sessions, backbone.preprocess(True, cfg.train.augment), backbone.preprocess(False))

        zeroshot = ZeroShotEvaluator(backbone, cfg.train.eval_batch_size)
        spec = stream.spec
        for i, exp in enumerate(scenario.test_stream):
            zeroshot.add(EvalSet(f"{cfg.stream}@s{i + 1}", cfg.stream, spec.class_names, spec.templates, exp.dataset))
        data_streams, subsets = {cfg.stream: stream}, {}
        for name in cfg.controls:
            entry = STREAMS.get(name)
            control = data_streams[name] = entry.obj(cfg.data_root, cfg.options_for(name, entry.options),
                                                     skip_bad_images=cfg.skip_bad_images)
            test = control.dataset("test")
            if cfg.control_subset is not None and len(test) > cfg.control_subset:
                test = test.subset(control_subset(len(test), cfg.control_subset, cfg.shot_seed, name))
                subsets[name] = {"size": len(test), "of": len(control.dataset("test")), "seed": cfg.shot_seed,
                                 "ids": test.ids}
            zeroshot.add(EvalSet(name, name, control.spec.class_names, control.spec.templates,
                                 test.with_transform(backbone.preprocess(False))))
        eval_stream = zeroshot.stream()

        strategy_entry = STRATEGIES.get(cfg.strategy)
        plugin = strategy_entry.obj(backbone, cfg.options_for(cfg.strategy, strategy_entry.options))
        meter = CostMeter(plugin)
        self.metric = ZeroShotAccuracy()
        resume = checkpoints.load_latest(self.record.path, cfg.to_dict(), self.device)
        if resume is None:
            if self.record.writable:
                checkpoints.clear(self.record.path)
            self.record.start(cfg.to_dict(), {"seed": cfg.seed, "shot_seed": cfg.shot_seed},
                              {f"session_{s.index}": s.ids for s in sessions})
        else:
            log.info("resuming %s after session %d", self.record.path, resume.session)
            self.record.resume(resume.session)
        self.record.update_manifest(
            classes_with_fewer_shots={f"session_{s.index}": s.short_classes for s in sessions if s.short_classes})
        record_data(self.record, data_streams, subsets)
        template = CLIPTemplate(
            backbone=backbone, class_names=spec.class_names, templates=spec.templates, train=cfg.train, zeroshot=zeroshot,
            seed=cfg.seed, device=self.device, plugins=[plugin, meter],
            evaluator=EvaluationPlugin(
                self.metric, loggers=make_loggers(cfg.loggers, self.record.path) if self.record.writable else []),
        )
        self.matrix = AccuracyMatrix.empty(cfg.stream, list(cfg.controls), len(sessions))
        costs: dict[str, Any] = {"sessions": []}
        done = 0  # sessions already trained and evaluated (by the interrupted process)
        if resume is not None:
            backbone.visual.load_state_dict(resume.encoder)
            plugin.load_state_dict(resume.strategy)
            self.matrix, costs, done = resume.matrix, resume.costs, resume.session
            checkpoints.restore_rng(resume.rng, template.caption_rng)
        bar = tqdm(total=len(sessions) + 1, initial=done + 1 if done else 0, desc=f"{cfg.strategy} s{cfg.seed}",
                   unit="eval", leave=False, disable=not self.progress)
        try:
            if not done:
                self.evaluate(template, eval_stream, 0)
                bar.update()
            for exp in scenario.train_stream:
                session = exp.current_experience + 1
                if session <= done:
                    continue
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                start = time.perf_counter()
                if plugin.trains:
                    template.train(exp, eval_streams=[])
                costs["sessions"].append({
                    "session": session,
                    "train_seconds": round(time.perf_counter() - start, 4),
                    "train_samples": len(exp.dataset),
                    "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                    **meter.session_costs(),  # trainable counts, FLOPs per sample, setup (mask) time
                })
                self.evaluate(template, eval_stream, session)
                self.checkpoint(session, backbone, plugin, template, costs)
                bar.update()
        except NonFiniteLossError as err:
            reason = f"session {len(costs['sessions']) + 1}: {err}"
            log.error("run %s failed: %s", self.record.path, reason)
            self.finish(costs, backbone.visual_parameter_count(), STATUS_FAILED, reason)
            return RunOutcome(self.record.path, STATUS_FAILED, reason)
        finally:
            bar.close()
        self.finish(costs, backbone.visual_parameter_count(), STATUS_FINISHED)
        if self.record.writable:
            checkpoints.prune(self.record.path, cfg.keep_checkpoints)
        return RunOutcome(self.record.path, STATUS_FINISHED)

    def checkpoint(self, session: int, backbone, plugin, template: CLIPTemplate, costs: dict[str, Any]) -> None:
        """Save what the sessions after ``session`` depend on (rank 0 only)."""
        if not self.record.writable:
            return
        checkpoints.save(self.record.path, checkpoints.SessionState(
            session=session, config=self.cfg.to_dict(), encoder=backbone.visual.state_dict(),
            strategy=plugin.state_dict(), rng=checkpoints.capture_rng(template.caption_rng),
            matrix=self.matrix, costs=costs), self.cfg.keep_checkpoints)

    def evaluate(self, template: CLIPTemplate, eval_stream, session: int) -> None:
        """Zero-shot evaluation after ``session``: log rows, fill the matrix row."""
        template.eval(eval_stream)
        counts = self.metric.counts
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

    def finish(self, costs: dict[str, Any], visual_params: int, status: str, reason: str = "") -> None:
        path = self.record.path
        summary = summarize(self.matrix) if self.matrix.last >= 0 else {}
        summary["costs"] = {"visual_parameters": visual_params, **costs}
        if self.record.writable:
            atomic_write(path / "matrix.csv", self.matrix.to_csv())
            write_json(path / "summary.json", summary)
        self.record.update_manifest(status=status, **({"reason": reason} if reason else {}))
