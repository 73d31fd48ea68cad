"""Run records → pandas frames.

A runs folder holds run records (``<name>/<stream>/<backbone>/<strategy>/<shots>-s<seed>/``,
see :mod:`benchmark.records`) at any depth. :func:`scan_runs` finds them and sorts the
finished runs from the failed and partial ones, which are kept in the ``runs`` frame with
their reason but never enter ``scores`` or any aggregate.

- ``runs``: one row per run folder: the run keys (:data:`RUN_KEYS`), ``sweep`` (the folder name of
  its swept values, empty outside a sweep) and a ``swept:<key>`` column per swept key, ``status``, ``reason``,
  ``lr`` (the run's effective ``train.lr``), ``jobs`` (the local processes it ran beside, ``fscl run --jobs``;
  NaN when not recorded), ``own_questions`` (its target brings its own questions: its sessions are released rows,
  not per-class shots), ``encoder_unchanged`` (its strategy trained only the VLM's own modules: its zero-shot
  scalars are NaN, its encoder being the pretrained one), the chance accuracies of its target and mean control (``chance_target``,
  ``chance_control``, ``vqa_chance_*``; NaN when the manifest has no class counts), and for finished runs the
  scalars of ``summary.json`` (accuracies as fractions in [0, 1]), those of its ``vqa`` block prefixed ``vqa_``
  (runs with VQA; ``vqa_scored_sessions``: how many sessions VQA scored; ``vqa_set:<dataset>:<metric>``: a set's
  own metric after the last scored session, MMVP's pair accuracy, HM's AUROC), and its costs (:func:`cost_scalars`);
  a sequence run (MTIL's protocol) adds ``sequence`` (its datasets in session order), ``session_order`` and its
  Transfer, Avg and Last (:func:`sequence_key`).
- ``scores``: tidy, one row per (run, session, dataset, metric) from ``metrics.jsonl``.

A run is scored by one or two :class:`Evaluation` s, those its config's ``evaluate`` lists: CLIP zero-shot
classification and, with ``vqa.model``, multiple-choice VQA through the VLM; every table and figure is made per
evaluation, from the runs that have it (a run without zero-shot has NaN in its columns, one without VQA in the
``vqa_`` ones; its ``sessions`` and ``controls`` come from whichever evaluation it has).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from benchmark.config import sweep_tag
from benchmark.errors import FsclError
from benchmark.records import STATUS_FAILED, STATUS_FINISHED, STATUS_INTERRUPTED, STATUS_RUNNING, RunRecord
from benchmark.vqa.questions import LETTERS

RUN_KEYS = ("name", "stream", "backbone", "strategy", "shots", "seed")
SWEEP, SWEPT_PREFIX = "sweep", "swept:"  # the runs' sweep_tag ("" outside a sweep); a column per swept key
GROUP_KEYS = ("name", "stream", "backbone", "shots")  # one results table per group; strategies × seeds inside
STATUS_INCOMPLETE = "incomplete"  # a record with a file missing or unreadable
ROLE_TARGET, ROLE_CONTROL = "target", "control"  # the ``role`` of a dataset in a run
TOP1 = "top1"  # the runner's metric name for a dataset's top-1 accuracy over all its classes
SUMMARY_SCALARS = ("target_initial", "target_final", "target_improvement", "control_change", "target_auc",
                   "control_auc", "backward_transfer")


@dataclass(frozen=True)
class Evaluation:
    """How runs are scored, and where its numbers sit in the frames.

    Attributes:
        name: ``zeroshot`` or ``vqa``.
        title: its name in headings and captions.
        metric: the ``scores`` metric of a dataset's accuracy (``top1``, ``vqa_acc``).
        prefix: of its summary scalars in the ``runs`` frame (``vqa_target_improvement``, ...).
        accuracy: the accuracy's name on axes (shown in %).
    """

    name: str
    title: str
    metric: str
    prefix: str
    accuracy: str

    def key(self, scalar: str) -> str:
        """The ``runs`` column of one of its summary scalars (e.g. ``target_improvement``)."""
        return self.prefix + scalar


ZEROSHOT = Evaluation("zeroshot", "Zero-shot classification (top-1)", TOP1, "", "top-1 accuracy")
VQA = Evaluation("vqa", "VQA (the VLM's multiple-choice accuracy)", "vqa_acc", "vqa_", "VQA accuracy")
EVALUATIONS = (VQA, ZEROSHOT)  # report order: VQA, the paper's headline, first


def evaluations(runs: pd.DataFrame) -> list[Evaluation]:
    """The evaluations with results among ``runs`` (rows of the ``runs`` frame), in report order."""
    return [e for e in EVALUATIONS if e.key("target_final") in runs and runs[e.key("target_final")].notna().any()]


def scored(runs: pd.DataFrame, evaluation: Evaluation) -> pd.Series:
    """Per row of ``runs`` (the ``runs`` frame) whether it has results of ``evaluation``."""
    key = evaluation.key("target_final")
    return runs[key].notna() if key in runs else pd.Series(False, index=runs.index)


def basis(runs: pd.DataFrame) -> Evaluation:
    """The one evaluation a choice among ``runs`` rests on (a sweep's table): zero-shot where any run has it,
    else VQA (runs with ``evaluate: [vqa]``)."""
    return ZEROSHOT if scored(runs, ZEROSHOT).any() or not scored(runs, VQA).any() else VQA


def named(evaluated: Sequence[Evaluation]) -> bool:
    """Whether headings and captions name the evaluation of their numbers: when there are several, or the one is
    not zero-shot classification (the report of a grid without VQA reads as it always has)."""
    return list(evaluated) != [ZEROSHOT]


class ReportError(FsclError, RuntimeError):
    """The runs folder cannot be reported on; the message says why and what was expected."""


@dataclass(frozen=True)
class RunSet:
    """Everything a report needs from a runs folder.

    Attributes:
        root: the runs folder scanned.
        runs: one row per run folder, all statuses (see the module docstring).
        scores: tidy scores of the finished runs (or of all runs, if scanned so).
        configs: resolved ``config.yaml`` of each run, by the ``run`` column (its relative path).
        manifests: ``manifest.json`` of each run, by ``run``.
    """

    root: Path
    runs: pd.DataFrame
    scores: pd.DataFrame
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> pd.DataFrame:
        """The runs that enter the aggregates."""
        return self.runs[self.runs["status"] == STATUS_FINISHED]

    @property
    def excluded(self) -> pd.DataFrame:
        """Failed, interrupted or incomplete runs, with the reason each is left out."""
        return self.runs.loc[self.runs["status"] != STATUS_FINISHED, ["run", "status", "reason"]]


def is_mini_world(stream: str, backbone: str) -> bool:
    """True for results of the offline mini world, which must never be presented as CLIP."""
    return stream.startswith("mini") or backbone.startswith("mini")


def has_random_weights(backbone: str) -> bool:
    """True for an open_clip backbone named without weights (``openclip:fscl-tiny``, no ``@TAG``): randomly
    initialised, so its numbers say nothing about a pretrained model."""
    family, _, rest = backbone.partition(":")
    return family == "openclip" and "@" not in rest and not rest.startswith("local-dir:")


def group_label(name: str, stream: str, backbone: str, shots: int) -> str:
    """The human-readable name of a setting, used by every table, figure and heading."""
    label = f"{stream} · {backbone} · {shots}-shot · {name}"
    if has_random_weights(backbone):
        label += " [random weights]"
    return f"{label} [mini world, not CLIP]" if is_mini_world(stream, backbone) else label


def strategy_order(strategies: Sequence[str], reference: str) -> list[str]:
    """The reference strategy first, then the others alphabetically (rows and legends)."""
    unique = sorted(set(strategies))
    return [s for s in unique if s == reference] + [s for s in unique if s != reference]


def cost_scalars(costs: dict[str, Any]) -> dict[str, float]:
    """Per-run cost numbers from the ``costs`` of ``summary.json``.

    Top-level numbers (e.g. ``visual_parameters``) are kept as they are. Numbers recorded per
    session are reduced over the sessions: durations (``*_seconds``) are summed into the run's
    total, peaks (``peak_*``) take their maximum, and anything else (parameter counts, FLOPs
    per sample) takes the mean.
    """
    row = {k: float(v) for k, v in costs.items() if _is_number(v)}
    sessions = pd.DataFrame(costs.get("sessions") or [])
    for key in sessions.columns.drop("session", errors="ignore"):
        values = pd.to_numeric(sessions[key], errors="coerce")
        if values.isna().all():
            continue
        if key.endswith("_seconds"):
            row[key] = float(values.sum())
        elif key.startswith("peak_"):
            row[key] = float(values.max())
        else:
            row[key] = float(values.mean())
    return row


def scan_runs(runs_dir: str | Path, include_unfinished: bool = False) -> RunSet:
    """Find and read every run record under ``runs_dir``.

    Args:
        runs_dir: a folder holding run records at any depth.
        include_unfinished: also put the logged scores of failed and partial runs into
            ``scores`` (their ``status`` column tells them apart); aggregates never use them.

    Raises:
        ReportError: the folder is missing, holds no run record, or holds two finished runs
            with the same keys (their seeds could not be paired unambiguously).
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise ReportError(f"runs folder '{root}' does not exist or is not a folder")
    folders = _run_folders(root)
    if not folders:
        raise ReportError(
            f"no run records under '{root}': expected folders <name>/<stream>/<backbone>/<strategy>/"
            f"<shots>-s<seed>/ holding manifest.json and config.yaml (written by 'fscl run')")
    rows, scores, configs, manifests = [], [], {}, {}
    for folder in folders:
        row, config, manifest = _read_run(folder, root)
        rows.append(row)
        configs[row["run"]], manifests[row["run"]] = config, manifest
        if row["status"] == STATUS_FINISHED or include_unfinished:
            scores.extend({**{k: row[k] for k in ("run", *RUN_KEYS, "status")}, **m}
                          for m in RunRecord(folder).metrics())
    runs = pd.DataFrame(rows)
    _check_unique(runs[runs["status"] == STATUS_FINISHED])
    return RunSet(root, runs, _tidy_scores(scores), configs, manifests)


def load_runs(runs_dir: str | Path, include_unfinished: bool = False) -> pd.DataFrame:
    """The tidy scores frame of a runs folder: one row per (run, session, dataset, metric).

    Columns: ``run`` (folder relative to ``runs_dir``), the run keys (:data:`RUN_KEYS`),
    ``status``, ``session`` (0 = before training), ``dataset``, ``role`` (``target`` or
    ``control``), ``metric`` (``top1``, ``top1_seen``, ``top1_s<i>``; with VQA ``vqa_acc`` and the rows of
    its scoring, e.g. ``vqa_acc_strict``), ``value`` (accuracy, a fraction), ``correct`` and ``total``
    (image or question counts). Only finished runs unless ``include_unfinished``.
    """
    return scan_runs(runs_dir, include_unfinished).scores


def filter_runs(frame: pd.DataFrame, **criteria: Any) -> pd.DataFrame:
    """Rows of ``frame`` whose columns match every criterion: a value, or a list of allowed values.

    Example: ``filter_runs(scores, strategy=["lorsu", "lora"], metric="top1", session=5)``.
    """
    unknown = set(criteria) - set(frame.columns)
    if unknown:
        raise KeyError(f"no column(s) {sorted(unknown)}; columns: {list(frame.columns)}")
    keep = np.ones(len(frame), dtype=bool)
    for column, wanted in criteria.items():
        allowed = list(wanted) if isinstance(wanted, (list, tuple, set)) else [wanted]
        keep &= frame[column].isin(allowed).to_numpy()
    return frame[keep]


def _run_folders(root: Path) -> list[Path]:
    """Folders holding a manifest or a config, outermost only (a run's own subfolders are not runs)."""
    candidates = sorted({p.parent for name in ("manifest.json", "config.yaml") for p in root.rglob(name)})
    folders: list[Path] = []
    for path in candidates:
        if not any(parent in path.parents for parent in folders):
            folders.append(path)
    return folders


def _read_run(folder: Path, root: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One ``runs`` row, the config and the manifest of a run folder."""
    record = RunRecord(folder)
    manifest = record.manifest() or {}
    config = _read_yaml(folder / "config.yaml")
    row: dict[str, Any] = {"run": folder.relative_to(root).as_posix(), **{k: config.get(k) for k in RUN_KEYS}}
    swept = config.get("swept") or {}  # a swept grid's values of this run: a column each, and their folder name
    row.update({SWEEP: sweep_tag(swept), **{f"{SWEPT_PREFIX}{k}": v for k, v in swept.items()}})
    own = manifest.get("chance") or {}  # the datasets with their own questions (their chance per item's options)
    row.update(lr=_number((config.get("train") or {}).get("lr")), jobs=_number(manifest.get("jobs")),
               own_questions=config.get("stream") in own, **_chance(config, manifest.get("classes") or {}, own))
    status, reason = _status(manifest, config)
    summary: dict[str, Any] = {}
    if status == STATUS_FINISHED:
        summary, problem = record.read_summary()
        if problem is not None:
            status, reason = STATUS_INCOMPLETE, f"status 'finished' but {problem} (a rerun rebuilds it)"
    if status == STATUS_FINISHED and not record.metrics():
        status, reason = STATUS_INCOMPLETE, "metrics.jsonl missing or empty"
    row.update(status=status, reason=reason)
    if status == STATUS_FINISHED:
        row.update(_summary_row(summary))
        if summary.get("sequence"):  # a sequence run (MTIL's protocol): its order's origin beside its metrics
            row[SESSION_ORDER] = config.get(SESSION_ORDER, "released")
    updates = manifest.get("updates")  # what the strategy trained (runs before it was recorded: unknown)
    row["encoder_unchanged"] = bool(updates) and "encoder" not in updates
    if row["encoder_unchanged"]:  # only the VLM trained: its zero-shot numbers are the pretrained encoder's
        row.update({key: math.nan for key in (*SUMMARY_SCALARS, "target_forgetting", "control_forgetting")})
    return row, config, manifest


def _chance(config: dict[str, Any], classes: dict[str, int], own: dict[str, float]) -> dict[str, float]:
    """Chance accuracies of a run's target and mean control: 1 / classes for zero-shot classification, 1 / options
    for VQA (a question offers min(5, classes) options, one per letter A-E); a dataset with its own questions
    (``own``: the manifest's ``chance``) the mean of 1 / its items' options in both; NaN where the manifest's
    ``classes`` lacks a dataset."""
    def mean_chance(datasets: list[str], options: float) -> float:
        levels = [own[d] if d in own else 1 / min(classes[d], options) if classes.get(d) else None for d in datasets]
        return float(np.mean(levels)) if levels and None not in levels else math.nan

    target, controls = [config.get("stream")], [c for c in config.get("controls") or [] if c != config.get("stream")]
    return {"chance_target": mean_chance(target, math.inf), "chance_control": mean_chance(controls, math.inf),
            VQA.key("chance_target"): mean_chance(target, len(LETTERS)),
            VQA.key("chance_control"): mean_chance(controls, len(LETTERS))}


def _status(manifest: dict[str, Any], config: dict[str, Any]) -> tuple[str, str]:
    """(status, reason the run is left out; empty when finished) from the manifest and config (a finished run's
    summary is checked by the caller)."""
    if not config:
        return STATUS_INCOMPLETE, "config.yaml missing or unreadable"
    if not manifest:
        return STATUS_INCOMPLETE, "manifest.json missing or unreadable"
    status = manifest.get("status")
    if status == STATUS_FAILED:
        return STATUS_FAILED, str(manifest.get("reason") or "failed (no reason recorded)")
    if status == STATUS_RUNNING:
        return STATUS_RUNNING, "still running or interrupted (status 'running')"
    if status == STATUS_INTERRUPTED:
        return STATUS_INTERRUPTED, f"{manifest.get('reason') or 'interrupted'} (the command that started it resumes it)"
    if status != STATUS_FINISHED:
        return STATUS_INCOMPLETE, f"unknown status {status!r} in manifest.json"
    return STATUS_FINISHED, ""


def _summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """Scalars of a finished run's summary: metrics (NaN where undefined), controls, VQA metrics, costs."""
    vqa = summary.get("vqa")
    first = summary if "target" in summary else vqa or {}  # whichever evaluation the run has (evaluate: [vqa])
    return {
        "sessions": first.get("sessions"),
        "controls": ", ".join(first.get("controls") or []),
        **_metric_scalars(summary),
        **({VQA.key(k): v for k, v in _metric_scalars(vqa).items()} if vqa else {}),
        **({VQA.key("scored_sessions"): len(vqa["evaluated"])} if vqa and "evaluated" in vqa else {}),
        **{set_metric_key(dataset, metric): _number(ends.get("final"))
           for dataset, metrics in ((vqa or {}).get("sets") or {}).items() for metric, ends in metrics.items()},
        **cost_scalars(summary.get("costs") or {}),
        **_sequence_scalars(summary.get("sequence") or {}),
    }


SEQUENCE = "sequence"  # the runs frame's column of a sequence run's datasets in session order (comma-joined)
SESSION_ORDER = "session_order"  # and of its config's ``session_order`` (``released`` or ``seed``)
SEQUENCE_METRIC = "sequence:"  # prefix of the runs frame's columns of a sequence run's Transfer, Avg and Last


def sequence_key(metric: str, dataset: str | None = None) -> str:
    """The runs frame's column of a sequence run's ``metric`` (``transfer``, ``avg``, ``last``; a fraction) on
    ``dataset`` (``sequence:<metric>:<dataset>``), or of its mean over the datasets (``sequence:<metric>_mean``)."""
    return f"{SEQUENCE_METRIC}{metric}:{dataset}" if dataset is not None else f"{SEQUENCE_METRIC}{metric}_mean"


def _sequence_scalars(sequence: dict[str, Any]) -> dict[str, Any]:
    """The ``sequence`` block of a sequence run's summary (:func:`benchmark.metrics.sequence_metrics`) as runs
    frame columns: :data:`SEQUENCE` and, per metric, one :func:`sequence_key` per dataset and the mean (none for
    a summary without the block)."""
    if not sequence.get("datasets"):
        return {}
    row: dict[str, Any] = {SEQUENCE: ", ".join(sequence["datasets"])}
    for metric in ("transfer", "avg", "last"):
        row.update({sequence_key(metric, d): _number(v) for d, v in (sequence.get(metric) or {}).items()})
        row[sequence_key(metric)] = _number(sequence.get(f"{metric}_mean"))
    return row


SET_METRIC = "vqa_set:"  # prefix of the runs frame's columns of a VQA set's own metrics (final values)


def set_metric_key(dataset: str, metric: str) -> str:
    """The runs frame's column of a VQA set's own metric after the last scored session (``summary.json`` →
    ``vqa.sets``: MMVP ``pair_acc``, HM ``auroc``): ``vqa_set:<dataset>:<metric>``."""
    return f"{SET_METRIC}{dataset}:{metric}"


def _metric_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """:data:`SUMMARY_SCALARS` and the target's and mean control forgetting of one evaluation's summary."""
    target, controls = summary.get("target"), list(summary.get("controls") or [])
    forgetting = summary.get("forgetting") or {}
    control_forgetting = [_number(forgetting.get(c)) for c in controls]
    return {
        **{k: _number(summary.get(k)) for k in SUMMARY_SCALARS},
        "target_forgetting": _number(forgetting.get(target)),
        "control_forgetting": float(np.mean(control_forgetting)) if controls else math.nan,
    }


def _tidy_scores(scores: list[dict[str, Any]]) -> pd.DataFrame:
    """Scores as a frame, last entry kept per (run, session, dataset, metric), with each dataset's role."""
    columns = ["run", *RUN_KEYS, "status", "session", "dataset", "role", "metric", "value", "correct", "total"]
    if not scores:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(scores).drop_duplicates(["run", "session", "dataset", "metric"], keep="last")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["role"] = np.where(frame["dataset"] == frame["stream"], ROLE_TARGET, ROLE_CONTROL)
    return frame.reindex(columns=columns).reset_index(drop=True)


def _check_unique(finished: pd.DataFrame) -> None:
    duplicated = finished[finished.duplicated([*RUN_KEYS, SWEEP], keep=False)]
    if len(duplicated):
        raise ReportError("several finished runs share the same name/stream/backbone/strategy/shots/seed, so seeds "
                          "cannot be paired; report on one runs folder at a time: " + ", ".join(duplicated["run"]))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan
