"""The accuracy matrix of a run and the pure metric functions of docs/protocol.md.

Notation: ``A[t, d]`` is the zero-shot top-1 accuracy (fraction in [0, 1]) on dataset ``d``
after session ``t`` (``t = 0`` is the pretrained model, ``T`` the last session); ``τ`` is
the target and ``C`` the controls. ``R[t, i]`` is the target accuracy on the test images of
the classes of session ``i`` (1-based) after session ``t``.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SEEN = "@seen"


@dataclass
class AccuracyMatrix:
    """Accuracies of one run, sessions 0..T.

    Attributes:
        target: name of the target dataset (the first column of ``values``).
        datasets: column names of ``values``: the target, then the controls.
        values: A, [T+1, D]; NaN where not (yet) evaluated.
        seen: target accuracy on the classes seen so far, [T+1] (NaN at t = 0).
        groups: R, [T+1, T]; target accuracy per session class group.
    """

    target: str
    datasets: list[str]
    values: np.ndarray
    seen: np.ndarray
    groups: np.ndarray

    @classmethod
    def empty(cls, target: str, controls: list[str], n_sessions: int) -> AccuracyMatrix:
        rows = n_sessions + 1
        return cls(target, [target, *controls], np.full((rows, 1 + len(controls)), np.nan),
                   np.full(rows, np.nan), np.full((rows, n_sessions), np.nan))

    @property
    def controls(self) -> list[str]:
        return self.datasets[1:]

    @property
    def n_sessions(self) -> int:
        return self.values.shape[0] - 1

    @property
    def last(self) -> int:
        """The last session with a target accuracy (T for a finished run)."""
        done = np.flatnonzero(~np.isnan(self.values[:, 0]))
        return int(done[-1]) if len(done) else -1

    def column(self, dataset: str) -> np.ndarray:
        return self.values[:, self.datasets.index(dataset)]

    def to_frame(self, per_group: bool = True) -> pd.DataFrame:
        """One row per session: the datasets' columns, then (``per_group``) the seen and per-group columns."""
        frame = pd.DataFrame(self.values, columns=self.datasets)
        if per_group:
            frame[self.target + SEEN] = self.seen
            for i in range(self.n_sessions):
                frame[f"{self.target}@s{i + 1}"] = self.groups[:, i]
        frame.insert(0, "session", range(self.n_sessions + 1))
        return frame

    def to_csv(self, per_group: bool = True) -> str:
        return self.to_frame(per_group).to_csv(index=False, float_format="%.6f")

    @classmethod
    def from_csv(cls, text: str, target: str) -> AccuracyMatrix:
        frame = pd.read_csv(io.StringIO(text))
        group_cols = [c for c in frame.columns if re.fullmatch(re.escape(target) + r"@s\d+", c)]
        datasets = [c for c in frame.columns if c != "session" and c not in group_cols and c != target + SEEN]
        return cls(target, datasets, frame[datasets].to_numpy(float), frame[target + SEEN].to_numpy(float),
                   frame[group_cols].to_numpy(float))


def target_improvement(m: AccuracyMatrix) -> float:
    """TI = A[T, τ] − A[0, τ]."""
    a = m.column(m.target)
    return float(a[m.last] - a[0])


def control_curve(m: AccuracyMatrix) -> np.ndarray:
    """Mean control change after each session, [T+1]: mean_d∈C (A[t, d] − A[0, d]); NaN without controls."""
    if not m.controls:
        return np.full(m.n_sessions + 1, np.nan)
    c = m.values[:, 1:]
    return (c - c[0]).mean(axis=1)


def target_curve(m: AccuracyMatrix) -> np.ndarray:
    """Target improvement after each session, [T+1]: A[t, τ] − A[0, τ]."""
    a = m.column(m.target)
    return a - a[0]


def control_change(m: AccuracyMatrix) -> float:
    """CC = mean over d ∈ C of (A[T, d] − A[0, d]); negative means forgetting. NaN without controls."""
    return float(control_curve(m)[m.last])


def area_under_curve(curve: np.ndarray) -> float:
    """Trapezoidal area under a per-session curve over sessions 0..T, divided by T (its mean height)."""
    t = len(curve) - 1
    if t < 1:
        return float("nan")
    return float(np.trapezoid(curve) / t)


def forgetting(m: AccuracyMatrix, dataset: str) -> float:
    """Classic forgetting of one dataset: max over t < T of A[t, d] − A[T, d] (≥ 0 means lost)."""
    a = m.column(dataset)[: m.last + 1]
    if len(a) < 2:
        return float("nan")
    return float(np.max(a[:-1]) - a[-1])


def backward_transfer(m: AccuracyMatrix) -> float:
    """BWT on the target's session class groups (Lopez-Paz & Ranzato, 2017).

    BWT = 1/(T−1) · Σ_{i=1}^{T−1} (R[T, i] − R[i, i]): how accuracy on the classes of
    session i changed from right after learning them to the end. Negative = forgetting of
    earlier sessions; NaN for T < 2.
    """
    t = m.last
    if t < 2:
        return float("nan")
    r = m.groups
    return float(np.mean([r[t, i - 1] - r[i, i - 1] for i in range(1, t)]))


def sequence_metrics(m: AccuracyMatrix, datasets: list[str]) -> dict[str, Any]:
    """MTIL's Transfer, Avg and Last (ZSCL's ``results.ipynb``) of a sequence run, per dataset and their means.

    With ``X = R[1:T+1]`` (X[j, i]: dataset i's accuracy after session j+1; the pretrained row is not in X):
    Avg_i = mean_j X[j, i]; Last_i = X[T−1, i]; Transfer_i = mean_{j<i} X[j, i], the accuracy of dataset i while
    it was not trained yet (none for the first dataset). Each mean is over its datasets (Transfer's over the
    T−1 that have one). ``datasets``: the dataset of each session, in session order. Needs a finished run.
    """
    x = m.groups[1: m.n_sessions + 1]
    if m.last != m.n_sessions or np.isnan(x).any():
        return {}
    avg, last = x.mean(axis=0), x[-1]
    transfer = {datasets[i]: float(np.mean(x[:i, i])) for i in range(1, len(datasets))}
    return {"datasets": list(datasets),
            "transfer": transfer, "transfer_mean": float(np.mean(list(transfer.values()))) if transfer else None,
            "avg": dict(zip(datasets, avg.tolist())), "avg_mean": float(avg.mean()),
            "last": dict(zip(datasets, last.tolist())), "last_mean": float(last.mean())}


def summarize(m: AccuracyMatrix, datasets: list[str] | None = None) -> dict[str, Any]:
    """Every metric of a matrix as plain JSON-ready numbers (NaN → None); with ``datasets`` (a sequence run: the
    dataset of each session) also MTIL's metrics under ``sequence`` (:func:`sequence_metrics`)."""
    result = {
        "sessions": m.last,
        "target": m.target,
        "controls": m.controls,
        "target_initial": m.column(m.target)[0],
        "target_final": m.column(m.target)[m.last],
        "target_improvement": target_improvement(m),
        "control_change": control_change(m),
        "target_curve": target_curve(m)[: m.last + 1].tolist(),
        "control_curve": control_curve(m)[: m.last + 1].tolist(),
        "target_auc": area_under_curve(target_curve(m)[: m.last + 1]),
        "control_auc": area_under_curve(control_curve(m)[: m.last + 1]),
        "forgetting": {d: forgetting(m, d) for d in m.datasets},
        "backward_transfer": backward_transfer(m),
    }
    if datasets is not None:
        result["sequence"] = sequence_metrics(m, datasets) or {"datasets": list(datasets)}
    return _clean(result)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value
