"""A grid in several local processes (``fscl run --jobs N``): one machine's cores used by whole runs.

Small models (the mini world, a tiny ViT on the CPU) keep one core busy far better than they split
one forward pass over many threads, so a grid of such runs finishes sooner as ``N`` processes of
``threads // N`` torch threads each, every process taking the next pending run from a shared queue.
Each run is still one process's, with the same seeds: the records are the ones one process writes
(only the order in which runs finish changes). One-thread processes on the CPU are forked (they start at
once); others are spawned (each imports the packages again, a few seconds): :func:`start_method`. Every
process reports each run's outcome back.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmark.config import Config, ConfigError
from benchmark.errors import FsclError, Interrupted
from benchmark.records import RunRecord
from benchmark.runner import run_one
from benchmark.runs import RunOutcome, run_dir

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often the parent looks whether its job processes are still alive
INTERRUPT_GRACE_SECONDS = 30.0  # after Ctrl-C, how long the parent waits for a job to record its run interrupted


class JobError(FsclError):
    """A job process raised an error that stops the grid (as it would have stopped it in one process)."""


def resolve_jobs(jobs: int | str, device: torch.device, pending: int) -> int:
    """How many processes run ``pending`` runs: ``jobs`` (an integer ≥ 1, or ``auto``: on the CPU one per
    torch intra-op thread, i.e. per core or per ``OMP_NUM_THREADS``; on a GPU one), never more than
    ``pending``; 1 means the runs go in this process."""
    if jobs == "auto":
        jobs = torch.get_num_threads() if device.type == "cpu" else 1
    elif not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"--jobs: invalid value {jobs!r}; allowed: a whole number >= 1, or auto")
    return max(1, min(jobs, pending))


def run_jobs(runs: Sequence[Config], data: Sequence[Any], jobs: int, progress: bool = True,
             force: bool = False) -> list:
    """Run ``runs`` (with their checked ``data``, :func:`~benchmark.grid.check_grid`'s) in ``jobs`` local
    processes of ``max(1, torch threads // jobs)`` threads each; one :class:`~benchmark.runs.RunOutcome` per
    run, in the order of ``runs``.

    An error a run does not record as its failure (the same that would stop a grid in one process)
    stops the other processes and is raised here as :class:`JobError`; a run whose process died
    before reporting it is a failed outcome saying so (its record resumes at the next ``fscl run``). Ctrl-C
    reaches every process of the group: each job marks its run interrupted and exits, and this raises
    :class:`~benchmark.errors.Interrupted` once they have (or after :data:`INTERRUPT_GRACE_SECONDS`).
    """
    from benchmark.distributed import local_device

    build_models(runs)
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context(start_method({local_device(run.device) for run in runs}, threads))
    tasks, results = context.Queue(), context.Queue()
    for i in range(len(runs)):
        tasks.put(i)
    for _ in range(jobs):
        tasks.put(None)  # one stop per process
    level = logging.getLogger().getEffectiveLevel()
    processes = [context.Process(target=_job, args=(list(runs), list(data), force, jobs, threads, level, tasks,
                                                    results),
                                 name=f"fscl-job-{k}") for k in range(jobs)]
    log.info("%d run(s) in %d processes of %d thread(s)", len(runs), jobs, threads)
    outcomes: dict[int, RunOutcome] = {}
    for process in processes:
        process.start()
    bar = tqdm(total=len(runs), desc=f"runs ({jobs} jobs)", unit="run", disable=not progress)  # after: not forked
    try:
        while len(outcomes) < len(runs):
            try:
                i, outcome, error = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
                continue
            if error is not None:
                raise JobError(f"{run_dir(runs[i])}: {error}")
            outcomes[i] = outcome
            bar.set_postfix_str(f"{runs[i].stream}/{runs[i].strategy}/{runs[i].shots}-s{runs[i].seed}")
            bar.update()
    except KeyboardInterrupt:  # Ctrl-C reaches the job processes too: each marks its run interrupted and exits
        for process in processes:
            process.join(INTERRUPT_GRACE_SECONDS)
        raise Interrupted(f"the runs in progress in {jobs} job processes ({len(outcomes)} of {len(runs)} "
                          f"runs were done; the others are marked interrupted or not started)") from None
    finally:
        bar.close()
        for process in processes:
            if len(outcomes) < len(runs) and process.is_alive():
                process.terminate()  # an error or an interrupt: the others stop too (their runs resume later)
            process.join()
    codes = ", ".join(str(p.exitcode) for p in processes)
    return [outcomes.get(i) or RunOutcome(run_dir(run), "failed", f"its job process exited before finishing it "
                                                                  f"(exit codes {codes}); 'fscl run' again resumes it")
            for i, run in enumerate(runs)]


def start_method(devices: Iterable[torch.device], threads: int) -> str:
    """``fork`` when the runs' ``devices`` are all the CPU and each process has one thread (the processes start
    at once, with this one's imports, models and registries, as a CPU DataLoader's workers do), else ``spawn``:
    CUDA cannot be used in a forked child once initialised in its parent, and GNU OpenMP hangs in a forked child
    that runs more than one thread after its parent ran a parallel region."""
    on_cpu = all(device.type == "cpu" for device in devices)
    return "fork" if on_cpu and threads == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def build_models(runs: Sequence[Config]) -> None:
    """Load each backbone of ``runs`` once here, and make each VQA model folder a registered family builds
    (``vqa.model: mini``): what is built on first use (the mini world's models) is built once, with this
    process's threads, before the job processes start (rather than by one of them, with one thread, while
    the others wait on its lock)."""
    from benchmark.backbones import load_backbone
    from benchmark.vlm.spec import resolve_vlm

    for spec in dict.fromkeys(run.backbone for run in runs):
        load_backbone(spec)
    for spec in dict.fromkeys(run.vqa.model for run in runs if run.vqa.model is not None):
        resolve_vlm(spec).prepare()


def _job(runs: list[Config], data: list[Any], force: bool, jobs: int, threads: int, level: int, tasks,
         results) -> None:
    """One job process: take run indices from ``tasks`` until a ``None``, run each, put
    ``(index, outcome, None)`` — or ``(index, None, message)`` for an error that stops the grid — on ``results``.
    A finished run's manifest records ``jobs`` and ``threads``: its timings were taken beside the other processes'."""
    from benchmark.image_cache import CORES_ENV

    torch.set_num_threads(threads)
    os.environ[CORES_ENV] = str(threads)  # loader workers (train.num_workers: auto) count this process's share
    logging.basicConfig(level=level, format="[%(processName)s] %(levelname)s %(name)s: %(message)s")
    try:
        while (i := tasks.get()) is not None:
            try:
                outcome = run_one(runs[i], data[i], progress=False, force=force)
                if outcome.status == "finished":
                    RunRecord(outcome.path).update_manifest(jobs=jobs, threads=threads)
                results.put((i, outcome, None))
            except FsclError as err:
                results.put((i, None, str(err)))
                return
            except Exception:  # noqa: BLE001 - handed to the parent, which raises it
                results.put((i, None, traceback.format_exc()))
                return
    except KeyboardInterrupt:  # Ctrl-C: the run is marked interrupted (run_one); the parent says so once
        return
