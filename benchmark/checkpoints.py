"""Per-session checkpoints of a run, for resuming it where it stopped.

After session ``k`` is trained, evaluated and its metric rows are on disk, the runner saves
``checkpoints/session-k.pt`` (atomically: temporary file, then rename) with everything the
rest of the run depends on:

* the vision encoder's weights (strategies merge their updates after every session, so the
  encoder is plain; the text side never trains);
* the strategy's cross-session state (:meth:`StrategyPlugin.state_dict`, e.g. EWC's Fisher
  and anchor weights, LoRA's kept adapter factors (``across_sessions: keep``, their update
  merged into the saved encoder); LoRSU and SPU recompute everything from the merged weights);
* the RNG states that drive the next sessions: torch (CPU and CUDA), numpy, Python's
  ``random`` and the template's caption generator (the training data loader shuffles and
  augments from the global torch RNG);
* the accuracy matrix (and the VQA one, when the run evaluates VQA) and the cost rows so far,
  and the resolved config it belongs to.

The optimizer is not saved: the template builds a fresh Adam for every session, so none of
its state survives a session boundary. A resumed run therefore continues with exactly the
state an uninterrupted run has at the same point and ends with the same numbers.
"""
from __future__ import annotations

import logging
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from benchmark.config import compared
from benchmark.metrics import AccuracyMatrix
from benchmark.records import atomic_writer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
KeepCheckpoints = Literal["last", "all", "none"]
_NAME = re.compile(r"session-(\d+)\.pt")
# config keys that do not change a run's numbers: a checkpoint resumes across them
RESUME_INDEPENDENT = ("out", "device", "loggers", "keep_checkpoints", "ddp", "swept",  # swept: values also in place
                      "eval_cache", "train.num_workers", "data_root")  # data_root: where the data is, not what


@dataclass
class SessionState:
    """What a run needs to continue after ``session`` (1-based)."""

    session: int
    config: dict[str, Any]  # the run's resolved config (a checkpoint only resumes the same run)
    encoder: dict[str, torch.Tensor]  # vision-encoder state dict
    strategy: dict[str, Any]
    rng: dict[str, Any]
    matrix: AccuracyMatrix
    costs: dict[str, Any]
    vqa_matrix: AccuracyMatrix | None = None  # VQA accuracies so far (None: VQA off, or a checkpoint from before it)
    vqa_subset_matrix: AccuracyMatrix | None = None  # those on the sets' subsets (None: no subset, or from before it)
    template: dict[str, Any] | None = None  # the training template's carried state (e.g. a carried optimizer)


def capture_rng(caption_rng: torch.Generator) -> dict[str, Any]:
    """Every RNG state a session draws from (global torch/CUDA, numpy, random, captions)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "captions": caption_rng.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], caption_rng: torch.Generator) -> None:
    """Put back the states saved by :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    caption_rng.set_state(state["captions"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_path: Path) -> Path:
    return Path(run_path) / CHECKPOINT_DIR


def saved_sessions(run_path: Path) -> list[int]:
    """Sessions with a checkpoint in the run folder, ascending."""
    folder = checkpoint_dir(run_path)
    found = [_NAME.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def lacks_kept(run_path: Path, keep: KeepCheckpoints, sessions: int) -> bool:
    """Whether the finished run at ``run_path`` lacks a checkpoint that ``keep`` keeps (it ran with less kept)."""
    wanted = {"none": set(), "last": {sessions}, "all": set(range(1, sessions + 1))}[keep]
    return not wanted <= set(saved_sessions(run_path))


def save(run_path: Path, state: SessionState, keep: KeepCheckpoints) -> Path:
    """Write ``session-k.pt`` atomically; unless ``keep == "all"`` drop the older ones."""
    folder = checkpoint_dir(run_path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"session-{state.session}.pt"
    with atomic_writer(target, "wb") as f:
        torch.save(state.__dict__, f)
    if keep != "all":
        for session in saved_sessions(run_path):
            if session < state.session:
                (folder / f"session-{session}.pt").unlink(missing_ok=True)
    return target


def load_latest(run_path: Path, config: dict[str, Any], map_location: torch.device | str = "cpu") -> SessionState | None:
    """The newest readable checkpoint of this exact config, or None (then the run starts over).

    An unreadable file (e.g. a disk that filled up) falls back to the previous session's.
    """
    for session in reversed(saved_sessions(run_path)):
        path = checkpoint_dir(run_path) / f"session-{session}.pt"
        try:
            # our own files: they hold numpy/random states, which the weights-only unpickler refuses
            data = torch.load(path, map_location=map_location, weights_only=False)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:  # truncated or corrupt: the one before
            log.warning("ignoring unreadable checkpoint %s: %s", path, err)
            continue
        changed = config_differences(data.get("config") or {}, config)
        if changed:
            log.warning("checkpoints in %s belong to another configuration (%s); starting the run over", run_path,
                        "; ".join(changed))
            return None
        return SessionState(**data)
    return None


def _vlm_resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` (:func:`~benchmark.config.compared`'s form) with a null ``skip_last_blocks`` (the VLM-loss strategies'
    default) made the value a run resolves it to (:func:`~benchmark.vlm.recipe.with_vlm_defaults`), so that a record
    that wrote that value (before the default was the VLM's) compares equal; left null when the VLM cannot be read."""
    from benchmark.errors import FsclError
    from benchmark.vlm.recipe import default_skip

    for key in [k for k, v in flat.items() if k.endswith(".skip_last_blocks") and v is None]:
        try:
            flat[key] = default_skip(flat.get("vqa.model"))
        except FsclError:
            pass
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every (dotted) key whose resolved value differs between two run configs
    (:func:`~benchmark.config.compared`: a key either lacks counts as its default; only the option sections
    that reach the run), leaving out the keys that do not change a run's numbers (:data:`RESUME_INDEPENDENT`,
    and ``vqa.*`` when neither evaluates VQA)."""
    flat_old = _vlm_resolved(compared(old)) if old else {}
    flat_new = _vlm_resolved(compared(new))
    unused = ("vqa",) if flat_old.get("vqa.model") is None and flat_new.get("vqa.model") is None else ()
    keys = sorted(k for k in flat_old.keys() | flat_new.keys()
                  if k not in RESUME_INDEPENDENT and k.split(".")[0] not in (*RESUME_INDEPENDENT, *unused))
    missing = "(unset)"
    return [f"{k}: {flat_old.get(k, missing)!r} -> {flat_new.get(k, missing)!r}" for k in keys
            if flat_old.get(k, missing) != flat_new.get(k, missing)]


def prune(run_path: Path, keep: KeepCheckpoints) -> None:
    """After a finished run: keep all, the last, or no checkpoint (and no half-written file
    of a killed process)."""
    folder = checkpoint_dir(run_path)
    for partial in folder.glob(".session-*"):
        partial.unlink(missing_ok=True)
    if keep == "none":
        shutil.rmtree(folder, ignore_errors=True)
    elif keep == "last":
        sessions = saved_sessions(run_path)
        for session in sessions[:-1]:
            (folder / f"session-{session}.pt").unlink(missing_ok=True)


def clear(run_path: Path) -> None:
    """Remove every checkpoint (a run that starts over)."""
    shutil.rmtree(checkpoint_dir(run_path), ignore_errors=True)
