"""The run stage: one run of a grid (:func:`run_one`), from its checked data to its run record.

The grid stage (:mod:`benchmark.grid`) has checked the whole grid and resolved each run's data
(:class:`~benchmark.runs.RunData`) before any model is built; here, per run: (1) the decision (run, skip a
finished run, or leave a folder another process holds); (2) the backbone, the strategy and the template
(:meth:`_Run.build`); (3) the sessions: zero-shot evaluation before training (row 0) and after every session on
the target (per session class group) and every control, and with ``vqa.model`` the VQA scores of the VLM with the
current encoder in its tower (:class:`benchmark.vqa.session.RunVQA`); (4) the accuracy matrices and the summary.
A run that fails (a non-finite loss, an unreadable image) is marked ``failed`` with its reason (naming the stage:
``evaluation before training (session 0)``, ``training session k``, ...), keeps the sessions already evaluated,
and the rest of the grid goes on. A storage error (a full disk, a read-only folder) marks the run ``failed`` and
Ctrl-C marks it ``interrupted``; both stop the grid, and the same command resumes it. A run with
``validation_per_class`` (``fscl tune``, :mod:`benchmark.tune`) sees every stream through its
validation view (``Stream.validation``): no test split is read.

Resume: after every session a checkpoint is saved (:mod:`benchmark.checkpoints`); an
interrupted run started again continues after its last saved session and ends with the same
numbers. A run folder is written by one process at a time (:class:`RunLock`). Several
processes shard the grid or, with ``ddp: true``, share each run (:mod:`benchmark.distributed`).
"""
from __future__ import annotations

import logging
import random
import time
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
from benchmark.distributed import all_reduce_sum, check_data_parallel, is_main_process, local_device
from benchmark.errors import DataError, FsclError, Interrupted
from benchmark.evaluation import (
    EvalSet,
    ZeroShotAccuracy,
    ZeroShotEvaluator,
    autocast_dtype,
    model_fingerprint,
    own_question_eval_set,
)
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.plugins import CostMeter, StrategyPlugin, peak_memory_mb
from benchmark.records import (
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    RunLock,
    RunRecord,
    atomic_write,
    storage_problem,
    write_json,
)
from benchmark.registry import STRATEGIES
from benchmark.runs import RunData, RunDecision, RunOutcome, decide, record_data, run_data, run_dir
from benchmark.shared_rows import row_context, session_zero, shared_folder
from benchmark.template import CLIPTemplate, NonFiniteLossError
from benchmark.vlm.recipe import with_vlm_defaults
from benchmark.vlm.spec import resolve_vlm
from benchmark.vqa.session import VQA_SUMMARY, RunVQA

log = logging.getLogger(__name__)


PARTIAL_SUMMARY = ("sessions", "target", "controls", "target_initial", "target_curve", "control_curve")


class RunStorageError(FsclError):
    """A run could not write its record or cache (a full disk, a quota, a read-only folder): the run is recorded
    as failed where the disk allows it, and the grid stops (every later run would meet the same)."""


STORAGE_ADVICE = ("The grid stops here; what the runs saved is intact: free space (or fix the folder) and run the "
                  "same command again to resume")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        self.vqa: RunVQA | None = None  # with vqa.model: the run's question sets and VQA matrices
        self.costs: dict[str, Any] = {"sessions": []}
        self.trains = True  # False: a strategy that never changes the model, whose every row is row 0
        self.trains_encoder = True  # False: also a strategy that trains only the VLM (every zero-shot row is row 0)
        self.row0: dict[str, tuple[int, int]] | None = None  # (correct, total) per eval set before training
        self.eval_timing = {"images": 0, "seconds": 0.0}  # images this run's process evaluated, and how long
        self.pretrained: str | None = None  # the pretrained encoder's fingerprint (shared rows' keys)
        self.session_datasets: list[str] | None = None  # a sequence of datasets: the one each session trains
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
        seed_everything(self.cfg.seed)
        backbone, plugin, meter, template, scenario, eval_stream = self.build(data)
        try:
            return self._train(data, backbone, plugin, meter, template, scenario, eval_stream)
        finally:
            plugin.release()  # the process's loaded VLM as it was loaded, for the next run

    def _train(self, data: RunData, backbone, plugin: StrategyPlugin, meter: CostMeter, template: CLIPTemplate,
               scenario, eval_stream) -> RunOutcome:
        """Start or resume the record, run the sessions and write the results."""
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
            checkpoints.prune(self.record.path, self.cfg.keep_checkpoints)
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
        options = with_vlm_defaults(cfg.options_of(cfg.strategy), cfg.vqa.model)
        vlm = entry.obj.objective == "vlm"
        plain = vlm and not options.train_augment  # the released Ppl trainer: no augmentation
        train_tf = backbone.preprocess(False) if plain else backbone.preprocess(True, cfg.train.augment)
        scenario = data.stream.benchmark(data.sessions, train_tf, backbone.preprocess(False))
        zeroshot = ZeroShotEvaluator(backbone, cfg.train.eval_batch_size,
                                     dtype=autocast_dtype(cfg.train.precision, self.device),
                                     num_workers=cfg.train.num_workers, cache=cfg.eval_cache, progress=self.progress)
        if spec.own_questions:  # its own questions: the whole test split, one set
            zeroshot.add(own_question_eval_set(cfg.stream, data.stream.dataset("test").with_transform(
                backbone.preprocess(False))))
        for session in data.sessions if not spec.own_questions else ():  # per session: its classes', or its dataset's
            texts_key, names, templates, images = data.stream.session_eval(session)
            zeroshot.add(EvalSet(f"{cfg.stream}@s{session.index}", texts_key, names, templates,
                                 images.with_transform(backbone.preprocess(False))))
        for name, test in data.control_tests.items():
            control = data.controls[name].spec
            test = test.with_transform(backbone.preprocess(False))
            zeroshot.add(own_question_eval_set(name, test) if control.own_questions else
                         EvalSet(name, name, control.class_names, control.templates, test))
        plugin: StrategyPlugin = entry.obj(backbone, options)
        self.trains = plugin.trains
        self.trains_encoder = plugin.trains and "encoder" in plugin.updates
        meter = CostMeter(plugin)
        common = dict(
            backbone=backbone, class_names=spec.class_names, templates=spec.templates, captions=spec.captions,
            train=cfg.train,
            zeroshot=zeroshot, seed=cfg.seed, device=self.device, plugins=[plugin, meter],
            evaluator=EvaluationPlugin(
                self.metric, loggers=make_loggers(cfg.loggers, self.record.path) if self.record.writable else []),
        )
        template = self.vlm_template(data.stream, backbone, options, common) if vlm else CLIPTemplate(**common)
        self.matrix = AccuracyMatrix.empty(cfg.stream, list(cfg.controls), len(data.sessions))
        self.session_datasets = data.stream.session_datasets(data.sessions)  # a sequence: its datasets in order
        if cfg.vqa.model is not None and "vqa" in cfg.evaluate:
            self.vqa = RunVQA(cfg, self.record, self.device, self.progress, self.fingerprint)
            self.vqa.build(data)
        return backbone, plugin, meter, template, scenario, zeroshot.stream()

    def vlm_template(self, stream, backbone, recipe, common: dict[str, Any]) -> CLIPTemplate:
        """The VLM template of a ``*-ppl`` strategy: the VLM of ``vqa.model`` (shared with the VQA evaluation)
        around the backbone's encoder, and the stream's question/answer pair of every class (of every training
        image, for a stream with its own questions)."""
        spec = stream.spec
        from benchmark.vlm_template import VLMTemplate
        from benchmark.vqa.pairs import AnswerPairs

        family = resolve_vlm(self.cfg.vqa.model)
        family.check_encoder(backbone)
        vlm = family.loaded(self.device)
        if spec.own_questions:  # each training image's own pair (its label is its place in the training split)
            pairs = AnswerPairs(vlm, [q.pair for q in stream.listed("train").questions])
        else:
            pairs = AnswerPairs.for_classes(vlm, spec.vqa_question, spec.ppl_answer, spec.class_names)
        return VLMTemplate(vlm=vlm, pairs=pairs, recipe=recipe, **common)

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
        streams = {cfg.stream: data.stream, **data.controls}
        classes = {name: len(s.spec.class_names) for name, s in streams.items()}
        tests = {cfg.stream: data.stream.dataset("test"), **data.control_tests}
        chance = {name: float(np.mean([1 / len(q.answers) for q in tests[name].questions]))  # own questions' options
                  for name, stream in streams.items() if stream.spec.own_questions}
        self.record.update_manifest(**device, classes=classes, **({"chance": chance} if chance else {}),
                                    updates=sorted(plugin.updates) if plugin.trains else [],
                                    classes_with_fewer_shots={f"session_{s.index}": s.short_classes
                                                              for s in data.sessions if s.short_classes})
        record_data(self.record, {cfg.stream: data.stream, **data.controls}, data.subsets,
                    sessions={cfg.stream: data.sessions})
        if self.vqa is not None:
            self.vqa.record_sets(resuming=resume is not None)
        if resume is None:
            return 0
        backbone.visual.load_state_dict(resume.encoder)
        plugin.load_state_dict(resume.strategy)
        self.matrix, self.costs = resume.matrix, resume.costs
        if self.vqa is not None:
            self.vqa.restore(resume.vqa_matrix, resume.vqa_subset_matrix)
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
            matrix=self.matrix, costs=self.costs, vqa_matrix=self.vqa and self.vqa.matrix,
            vqa_subset_matrix=self.vqa and self.vqa.subset_matrix, template=template.carried_state()),
            self.cfg.keep_checkpoints)

    def evaluate(self, template: CLIPTemplate, eval_stream, session: int) -> None:
        """The evaluations of ``evaluate`` after ``session``: zero-shot (log rows, fill the matrix row), then VQA."""
        if "zeroshot" in self.cfg.evaluate:
            self.evaluate_zeroshot(template, eval_stream, session)
        if self.vqa is not None and self.vqa.scores_after(session):
            self.vqa.evaluate(template.backbone, session, self.trains)

    def evaluate_zeroshot(self, template: CLIPTemplate, eval_stream, session: int) -> None:
        """Zero-shot evaluation after ``session``: log rows, fill the matrix row."""
        counts = self.eval_counts(template, eval_stream, session)
        target, n = self.cfg.stream, self.matrix.n_sessions
        # a stream with its own questions is one set, not per session class group (no seen/group accuracies)
        groups = [counts[target]] if target in counts else [counts[f"{target}@s{i + 1}"] for i in range(n)]
        rows: list[dict[str, Any]] = []

        def add(dataset: str, metric: str, correct: int, total: int) -> float:
            value = correct / total if total else None
            rows.append({"session": session, "dataset": dataset, "metric": metric, "value": value,
                         "correct": correct, "total": total})
            return float("nan") if value is None else value

        self.matrix.values[session, 0] = add(target, "top1", sum(c for c, _ in groups), sum(t for _, t in groups))
        if session and target not in counts:
            seen = groups[:session]
            self.matrix.seen[session] = add(target, "top1_seen", sum(c for c, _ in seen), sum(t for _, t in seen))
        for i, (c, t) in enumerate(groups if target not in counts else ()):
            self.matrix.groups[session, i] = add(target, f"top1_s{i + 1}", c, t)
        for j, name in enumerate(self.matrix.controls, start=1):
            self.matrix.values[session, j] = add(name, "top1", *counts[name])
        self.record.append_metrics(rows)

    # -- evaluation counts: row 0 shared by the grid, a strategy that never trains evaluated once ---------------
    def eval_counts(self, template: CLIPTemplate, eval_stream, session: int) -> dict[str, tuple[int, int]]:
        """``(correct, total)`` per eval set after ``session``: evaluated, except row 0 (and every row of a
        strategy that never trains), which comes from :meth:`session_zero`."""
        if session and self.trains_encoder:
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
        keys = zeroshot.row_keys(row_context(self.device), self.fingerprint(template.backbone))

        def evaluate(missing: list[str]) -> dict[str, dict[str, int]]:
            experiences = [exp for exp in eval_stream if zeroshot.sets[exp.current_experience].key in missing]
            return {name: {"correct": c, "total": t} for name, (c, t) in self.run_eval(template, experiences).items()}

        counts, shared = session_zero(shared_folder(self.cfg.out, self.cfg.name), keys, evaluate, self.record.writable)
        indistinct = zeroshot.indistinct_items()
        for name, n in indistinct.items():
            log.warning("%s: %d of %d questions have options whose texts the text encoder cannot tell apart (cut at "
                        "its context length?): zero-shot picks the first of them", name, n,
                        counts[name]["total"])
        self.record.update_manifest(evaluation={"cache": self.cfg.eval_cache, "images": zeroshot.image_keys(),
                                                "session0": {"keys": keys, "shared": sorted(shared)},
                                                **({"indistinct": indistinct} if indistinct else {})})
        return {s.key: (counts[s.key]["correct"], counts[s.key]["total"]) for s in zeroshot.sets}

    def fingerprint(self, backbone) -> str:
        """:func:`~benchmark.evaluation.model_fingerprint` of the pretrained ``backbone``, computed once per run."""
        if self.pretrained is None:
            self.pretrained = model_fingerprint(backbone)
        return self.pretrained

    def finish(self, visual_params: int, status: str, reason: str = "") -> None:
        """Write the matrix and the summary, and the run's status (with its reason when it failed).

        A failed run's summary keeps what it evaluated (sessions, initial accuracy, the curves so far)
        and no final metric (TI, CC, forgetting...): those describe a run that reached its last session.
        """
        path = self.record.path
        summary = summarize(self.matrix, self.session_datasets) if self.matrix.last >= 0 else {}
        if status == STATUS_FAILED:
            summary = {k: v for k, v in summary.items() if k in PARTIAL_SUMMARY}
        vqa_keys = PARTIAL_SUMMARY if status == STATUS_FAILED else VQA_SUMMARY
        if self.vqa is not None:
            summary.update(self.vqa.summary(vqa_keys))
        summary["costs"] = {"visual_parameters": visual_params, **self.costs}
        if self.record.writable:
            if "zeroshot" in self.cfg.evaluate:
                atomic_write(path / "matrix.csv", self.matrix.to_csv())
            if self.vqa is not None:
                self.vqa.write(path)
            write_json(path / "summary.json", summary)
        self.record.update_manifest(status=status, **({"reason": reason} if reason else {}))
