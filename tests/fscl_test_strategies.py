"""Test-only strategies, registered when this module is imported (tests and their subprocesses).

They are the real EWC and LoRSU plugins with one extra observable behaviour each, so a test
can stop a run at a known point or read what a strategy chose on every rank.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmark import checkpoints
from benchmark.distributed import rank
from benchmark.plugins import StrategyPlugin
from benchmark.registry import STRATEGIES
from strategies.ewc import EWC, EWCOptions
from strategies.full_ft import FullFineTuning
from strategies.llm import LLMLoRA
from strategies.lorsu import LoRSU, LoRSUOptions, LoRSUPpl
from strategies.options import LLMLoRAOptions, LoRSUPplOptions

PAUSE_ENV = "FSCL_TEST_PAUSE"  # a file path: created in the middle of session 2, then the run sleeps
MASKS_ENV = "FSCL_TEST_MASKS"  # a folder: each rank writes the LoRSU selection of every session there
DISK_FULL_ENV = "FSCL_TEST_DISK_FULL"  # a file path: at session 2 it is put aside and linked to /dev/full


@STRATEGIES.register("test-ewc-pause", options=EWCOptions)
class PausingEWC(EWC):
    """EWC; with ``$FSCL_TEST_PAUSE`` set, after the first iteration of session 2 it creates
    that file and sleeps, so a test can kill the process in the middle of session 2."""

    def after_training_iteration(self, strategy, **kwargs) -> None:
        marker = os.environ.get(PAUSE_ENV)
        if marker and strategy.experience.current_experience == 1:
            Path(marker).touch()
            time.sleep(600)


@STRATEGIES.register("test-lorsu-ppl-pause", options=LoRSUPplOptions)
class PausingLoRSUPpl(LoRSUPpl):
    """LoRSU-Ppl; with ``$FSCL_TEST_PAUSE`` set, pauses in the middle of session 2 as :class:`PausingEWC` does."""

    after_training_iteration = PausingEWC.after_training_iteration


@STRATEGIES.register("test-lora-llm-pause", options=LLMLoRAOptions)
class PausingLLMLoRA(LLMLoRA):
    """lora-llm; with ``$FSCL_TEST_PAUSE`` set, pauses in the middle of session 2 as :class:`PausingEWC` does."""

    after_training_iteration = PausingEWC.after_training_iteration


@STRATEGIES.register("test-lorsu-record", options=LoRSUOptions)
class RecordingLoRSU(LoRSU):
    """LoRSU; with ``$FSCL_TEST_MASKS`` set, writes each session's heads and fc1 indices per
    block to ``rank<r>-session<k>.json`` in that folder before merging."""

    def finish(self, session) -> None:
        folder = os.environ.get(MASKS_ENV)
        if folder:
            chosen = [{"heads": list(s.heads), "fc1": s.fc1_index.tolist() if s.fc1_index is not None else None}
                      for s in self.selection]
            (Path(folder) / f"rank{rank()}-session{session.session_index}.json").write_text(json.dumps(chosen))
        super().finish(session)


@STRATEGIES.register("test-last-block")
class LastBlock(StrategyPlugin[None]):
    """The last transformer block of the vision encoder, nothing else (LLaVA reads that block's input, not it)."""

    needs_blocks = True

    def setup(self, session) -> None:
        self.backbone.blocks()[-1].module.requires_grad_(True)


@STRATEGIES.register("test-full-ft-disk-full")
class DiskFullFineTuning(FullFineTuning):
    """Full fine-tuning; with ``$FSCL_TEST_DISK_FULL`` set (a file's path), when session 2 starts that file is
    moved to ``<path>.kept`` and replaced by a link to ``/dev/full``, whose every write fails with ENOSPC as on
    a full disk; moving ``.kept`` back is what freeing the disk would be."""

    def setup(self, session) -> None:
        super().setup(session)
        path = os.environ.get(DISK_FULL_ENV)
        if path and session.session_index == 2:
            os.replace(path, path + ".kept")
            os.symlink("/dev/full", path)


def kill_in_session_2(args: list[str], marker: Path, threads: str | None = None) -> int:
    """Run ``fscl ARGS`` (a grid of a ``test-*-pause`` strategy) in a child process with :data:`PAUSE_ENV` set to
    ``marker``, and SIGKILL it once it is in the middle of session 2 (the marker exists); its pid. ``threads``:
    the child's ``OMP_NUM_THREADS`` (a test that compares numbers with its own one-thread runs)."""
    env = {**os.environ, PAUSE_ENV: str(marker), **({"OMP_NUM_THREADS": threads} if threads else {}),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, fscl_test_strategies; from benchmark.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached session 2"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return proc.pid


def interrupted_copy(reference: Path, run: Path, session: int) -> None:
    """Copy the finished run folder ``reference`` to ``run`` as a process stopped during ``session`` leaves it: the
    checkpoint of that session and the summary not written, the manifest still ``running``."""
    shutil.copytree(reference, run)
    (run / "checkpoints" / f"session-{session}.pt").unlink()
    (run / "summary.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))


def saved_session(run: Path, session: int) -> dict[str, Any]:
    """The checkpoint of ``session`` in run folder ``run`` (``keep_checkpoints: all``)."""
    return torch.load(checkpoints.checkpoint_dir(run) / f"session-{session}.pt", weights_only=False)


def same(a: Any, b: Any) -> bool:
    """Whether two checkpoint states (nested dicts, lists, tensors, numbers) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b
