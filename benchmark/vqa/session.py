"""The VQA of one run (``vqa.model`` set): its question sets, their accuracy matrices, row 0's counts and the
scoring time, owned by the run stage (:class:`benchmark.runner._Run`) and called after each session it scores.

The sets are those of the run's own test images (the target: every session's classes as one set; the controls
``vqa.sets`` asks, :func:`vqa_controls`), with their seeded subsets (``vqa.subset``); each is scored with the
current encoder in the VLM's tower (:mod:`benchmark.vqa.evaluate`) and its ``vqa_acc`` fills the matrix of its
basis (:meth:`RunVQA.bases`); row 0 is shared by the grid (:mod:`benchmark.shared_rows`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import Config
from benchmark.metrics import AccuracyMatrix, summarize
from benchmark.records import RunRecord, atomic_write
from benchmark.runs import RunData, control_subset, target_test
from benchmark.shared_rows import row_context, session_zero, shared_folder
from benchmark.vlm.spec import resolve_vlm
from benchmark.vqa.evaluate import VQASet, build_sets, score_set, vqa_row_key, vqa_rows
from benchmark.vqa.questions import QuestionSetError

# summary.json's vqa block: the metrics that mean the same over the sessions VQA evaluated (no AUC, no BWT)
# the metrics.jsonl rows of a set's own metrics beside accuracy, and their names in summary.json's vqa.sets
SET_METRICS = {"vqa_pair_acc": "pair_acc", "vqa_auroc": "auroc"}
VQA_SUMMARY = ("sessions", "target", "controls", "target_initial", "target_final", "target_improvement",
               "control_change", "target_curve", "control_curve", "forgetting")


def vqa_controls(cfg: Config) -> list[str]:
    """The controls a run's VQA evaluation asks (``vqa.sets``; the target is always asked)."""
    return [c for c in cfg.controls if cfg.vqa.sets is None or c in cfg.vqa.sets]


class RunVQA:
    """The VQA question sets of one run, their accuracy matrices (``vqa_acc``, NaN rows where not scored), row 0's
    counts and the time spent scoring. ``fingerprint(backbone)``: the pretrained encoder's fingerprint (the shared
    row 0's keys)."""

    def __init__(self, cfg: Config, record: RunRecord, device: torch.device, progress: bool,
                 fingerprint: Callable[[Any], str]) -> None:
        self.cfg, self.record, self.device, self.progress = cfg, record, device, progress
        self.fingerprint = fingerprint
        self.sets: list[VQASet] = []  # the target's set, then each control's
        self.matrix: AccuracyMatrix | None = None  # VQA accuracy (vqa_acc), NaN rows where not evaluated
        self.subset_matrix: AccuracyMatrix | None = None  # with subsets between the ends: on them, every session
        self.row0: dict[str, dict[str, int | float]] | None = None  # VQA counts per VQASet.key before training
        self.timing = {"questions": 0, "seconds": 0.0}  # questions this run's processes scored, and how long

    def build(self, data: RunData) -> None:
        """The VQA question sets of the run's test images (the target: every session's classes as one set) with
        their seeded subsets (``vqa.subset``), and the empty VQA matrices (:meth:`bases`)."""
        cfg, vqa = self.cfg, self.cfg.vqa
        controls = vqa_controls(cfg)
        tests = {cfg.stream: (data.stream, target_test(data.stream, data.sessions)),
                 **{name: (data.controls[name], data.control_tests[name]) for name in controls}}
        self.sets = [
            dataclasses.replace(qset, subset=control_subset(len(qset.questions.items), vqa.subset, vqa.seed, qset.name))
            if vqa.subset is not None and vqa.subset < len(qset.questions.items) else qset
            for qset in build_sets(tests, vqa.mode, vqa.seed, cfg.backbone)]
        self.matrix = AccuracyMatrix.empty(cfg.stream, controls, len(data.sessions))
        if vqa.sessions == "all" and any(qset.subset is not None for qset in self.sets):
            self.subset_matrix = AccuracyMatrix.empty(cfg.stream, controls, len(data.sessions))

    def record_sets(self, resuming: bool) -> None:
        """Keep the sets in the manifest (``vqa_sets``); a resumed run must find there the sets it asks now."""
        sets = {q.name: q.record(self.cfg.vqa.mode, self.cfg.vqa.seed) for q in self.sets}
        if resuming:
            check_recorded_sets((self.record.manifest() or {}).get("vqa_sets") or {}, sets, self.record.path)
        self.record.update_manifest(vqa_sets=sets)

    def restore(self, matrix: AccuracyMatrix | None, subset_matrix: AccuracyMatrix | None) -> None:
        """The matrices of a resumed run, as its checkpoint saved them."""
        self.matrix = matrix
        self.subset_matrix = subset_matrix or self.subset_matrix

    def scores_after(self, session: int) -> bool:
        """Whether VQA is scored after ``session``: at the ends, and after every session with ``sessions: all``."""
        return session in (0, self.matrix.n_sessions) or self.cfg.vqa.sessions == "all"

    def bases(self, session: int) -> list[tuple[bool, AccuracyMatrix]]:
        """(full, matrix) of each VQA matrix that scores after ``session``, each on one basis so that its sessions
        compare the same questions: all questions (``full``) at the ends, and between them too when no set has a
        subset; with subsets (``vqa.subset`` under ``sessions: all``) each set's subset at every session, the ends
        included (a set smaller than the subset: all its questions)."""
        ends = session in (0, self.matrix.n_sessions)
        bases = [(True, self.matrix)] if ends or self.subset_matrix is None else []
        return bases + ([(False, self.subset_matrix)] if self.subset_matrix is not None else [])

    def evaluate(self, backbone, session: int, trains: bool) -> None:
        """VQA after ``session`` with the current encoder in the VLM's tower, on each basis of :meth:`bases`: the
        rows of :func:`~benchmark.vqa.evaluate.vqa_rows` per dataset (``vqa_acc``, and by ``vqa.scoring``; on the
        subsets named ``..._subset``); ``vqa_acc`` fills the basis' matrix. Under ``ddp: true`` every process
        scores its share of the questions. Row 0 (and every row of a strategy that never ``trains``) comes from
        :meth:`session_zero`."""
        vqa = self.cfg.vqa
        vlm = resolve_vlm(vqa.model).loaded(self.device)
        vlm.swap_encoder(backbone)
        pretrained = session == 0 or not trains  # row 0's counts, the grid's
        if pretrained and self.row0 is None:
            self.row0 = self.session_zero(vlm, backbone)
        scored = dict(self.row0) if pretrained else {}
        rows: list[dict[str, Any]] = []
        for full, matrix in self.bases(session):
            for j, qset in enumerate(self.sets):
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
        self.timing["questions"] += int(counts["total"])
        self.timing["seconds"] = round(self.timing["seconds"] + time.perf_counter() - start, 3)
        self.record.update_manifest(vqa_timing=self.timing)
        return counts

    def session_zero(self, vlm, backbone) -> dict[str, dict[str, int | float]]:
        """VQA row 0's counts per :meth:`~benchmark.vqa.evaluate.VQASet.key` (all of a set's questions, and its
        subset on a subset basis; the pretrained encoder in the VLM's tower): from the grid's shared store when
        a run stored them (under ``ddp: true``: when every rank finds them), else scored and stored
        (:func:`~benchmark.shared_rows.session_zero`); the manifest's
        ``vqa_session0`` names the keys and the sets read."""
        vqa = self.cfg.vqa
        asks = {qset.key(full): (qset, full) for full, _ in self.bases(0) for qset in self.sets}
        keys = {name: vqa_row_key(vqa, qset, self.fingerprint(backbone), row_context(self.device), full)
                for name, (qset, full) in asks.items()}
        counts, shared = session_zero(shared_folder(self.cfg.out, self.cfg.name), keys,
                                      lambda missing: {name: self.score(vlm, *asks[name]) for name in missing},
                                      self.record.writable)
        self.record.update_manifest(vqa_session0={"keys": keys, "shared": shared})
        return counts

    def summary(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """summary.json's ``vqa`` block (and ``vqa_subset`` with subsets): ``keys`` of :func:`vqa_summary` and the
        basis (:meth:`basis`)."""
        summary = {}
        if self.matrix is not None:
            summary["vqa"] = {**vqa_summary(self.matrix, keys), **self.basis(True)}
            per_set = self.set_metrics(summary["vqa"].get("evaluated", []))
            if per_set:
                summary["vqa"]["sets"] = per_set
        if self.subset_matrix is not None:
            summary["vqa_subset"] = {**vqa_summary(self.subset_matrix, keys), **self.basis(False)}
        return summary

    def set_metrics(self, evaluated: list[int]) -> dict[str, dict[str, dict[str, float]]]:
        """The sets' own metrics beside accuracy (MMVP's pair accuracy, HM's AUROC: :data:`SET_METRICS`) before
        training and after the last session VQA scored, from ``metrics.jsonl``: ``{set: {metric: {initial,
        final}}}`` (all questions; empty when no set has one)."""
        if not evaluated:
            return {}
        ends = {evaluated[0]: "initial", evaluated[-1]: "final"}
        out: dict[str, dict[str, dict[str, float]]] = {}
        for row in self.record.metrics():
            if row["metric"] in SET_METRICS and row["session"] in ends:
                out.setdefault(row["dataset"], {}).setdefault(SET_METRICS[row["metric"]], {})[
                    ends[row["session"]]] = row["value"]
        return out

    def write(self, path: Path) -> None:
        """Write the VQA matrices into the run folder ``path`` (``vqa_matrix.csv``, ``vqa_subset_matrix.csv``)."""
        if self.matrix is not None:
            atomic_write(path / "vqa_matrix.csv", self.matrix.to_csv(per_group=False))
        if self.subset_matrix is not None:
            atomic_write(path / "vqa_subset_matrix.csv", self.subset_matrix.to_csv(per_group=False))

    def basis(self, full: bool) -> dict[str, Any]:
        """What the VQA numbers of a basis (:meth:`bases`) are on: ``basis`` (``all``: every question of
        each set; ``subset``: each set's seeded subset) and ``items``, the questions per set."""
        items = {q.name: len(q.questions.items) if full or q.subset is None else len(q.subset) for q in self.sets}
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
