"""The grid stage: a configuration's grid checked as a whole before any model is built, then run.

:func:`check_grid` resolves every run's data (:func:`benchmark.runs.run_data`) and gathers every problem of the
grid into one message (:class:`GridCheckError`): what a strategy refuses on its backbone
(:func:`strategy_problems`), what VQA refuses (:func:`vqa_problems`), the data (a missing root, a wrong layout, too
many sessions...), a runs or cache folder this process cannot write (:func:`unwritable_outputs`,
:func:`unusable_cache`), a folder name too long (:func:`long_folder_names`) and a finished run whose configuration
changed (:func:`changed_finished_runs`). :func:`run_grid` then hands each run of this process's shard to the run
stage (:func:`benchmark.runner.run_one`), in this process or in several local ones (:mod:`benchmark.jobs`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmark import checkpoints
from benchmark.backbones import backbone_skeleton
from benchmark.cache import cache_problem
from benchmark.config import Config, ConfigError
from benchmark.distributed import check_data_parallel, grid_shard, init_data_parallel, is_main_process, local_device
from benchmark.dryrun import grid_warnings
from benchmark.errors import DataError, FsclError
from benchmark.jobs import resolve_jobs, run_jobs
from benchmark.records import RunRecord, write_problem
from benchmark.registry import STRATEGIES, VLMS
from benchmark.runner import run_one
from benchmark.runs import RunData, RunOutcome, is_done, run_data, run_dir, run_folders
from benchmark.vlm.recipe import with_vlm_defaults
from benchmark.vlm.spec import VLMError, allowed_vlms, resolve_vlm
from benchmark.vqa.session import vqa_controls

log = logging.getLogger(__name__)


class GridCheckError(ConfigError):
    """The grid's data failed its checks; the message lists every problem, one per line."""


NAME_MAX = 255  # bytes in one folder name on the usual file systems (ext4, XFS, Btrfs, APFS), where none is found


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
        options = run.options_of(run.strategy)
        if (run.backbone, run.strategy, repr(options), run.ddp, run.vqa.model) in seen:
            continue
        seen.add((run.backbone, run.strategy, repr(options), run.ddp, run.vqa.model))
        if entry.obj.objective == "vlm" and run.vqa.model is None:
            problems.append(f"{run.strategy} trains with a VLM's answer loss and needs vqa.model: "
                            f"{allowed_vlms()} (a VLM whose vision tower takes '{run.backbone}'; vqa.model=mini: the "
                            f"mini world's VLM, with backbone=mini), or leave it out of the grid (strategy=[...])")
        try:
            if entry.obj.objective == "vlm" and run.vqa.model is not None and not resolve_vlm(run.vqa.model).has_answer_loss:
                raise VLMError(f"vqa.model '{run.vqa.model}': its family has no answer loss to train through; "
                               f"{run.strategy} needs one (families with one: "
                               f"{', '.join(n for n in VLMS.names() if VLMS.get(n).obj.has_answer_loss)})")
            options = with_vlm_defaults(options, run.vqa.model)
            if run.vqa.model is not None:  # options the VLM's config refuses (e.g. more layers than it has)
                entry.obj.check_vlm(resolve_vlm(run.vqa.model), options)
            if run.backbone not in skeletons:
                skeletons[run.backbone] = backbone_skeleton(run.backbone)
            entry.obj(skeletons[run.backbone], options)
            if run.ddp:
                check_data_parallel(skeletons[run.backbone].visual, run.backbone)
        except FsclError as err:
            problems.append(f"{run.strategy} on {run.backbone}: {err}")
    return problems


def text_tower_problems(runs: list[Config]) -> list[str]:
    """What a backbone without a text tower (a VLM's vision tower alone, ``hf-vision:``) cannot do, found on its
    skeleton: zero-shot evaluation (``evaluate``), a strategy that trains with the CLIP loss, VQA's ``hard``
    distractors (ranked by text embeddings)."""
    problems, towers = [], {}
    for run in runs:
        if run.backbone not in towers:
            try:
                towers[run.backbone] = backbone_skeleton(run.backbone).has_text_tower
            except FsclError:  # strategy_problems reports a backbone that cannot be built
                towers[run.backbone] = True
        if towers[run.backbone]:
            continue
        entry = STRATEGIES.get(run.strategy)
        needs = [what for what, needed in (
            ("zero-shot evaluation (evaluate: zeroshot; set evaluate: [vqa] with a vqa.model)", "zeroshot" in run.evaluate),
            (f"the CLIP loss of {run.strategy} (train it with a VLM-loss strategy, *-ppl)",
             entry.obj.trains and entry.obj.objective != "vlm"),
            ("vqa.mode: hard (its distractors are ranked by text embeddings; use random)",
             run.vqa.model is not None and run.vqa.mode == "hard")) if needed]
        problems += [f"{run.backbone} has no text tower (a vision tower alone): it cannot give {what}" for what in needs]
    return list(dict.fromkeys(problems))


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
    (:func:`strategy_problems`), what a backbone without a text tower cannot do (:func:`text_tower_problems`), what
    VQA refuses (:func:`vqa_problems`), its data (a missing root, a
    wrong layout, too many sessions for a stream's classes, ...), a runs folder or a cache folder it cannot
    write, a folder name too long (:func:`long_folder_names`), and (unless ``force``) a finished run whose
    configuration changed. A run and ``--dry-run`` make these same checks."""
    cache: dict[tuple, Any] = {}
    found: list[RunData] = []
    problems: dict[str, list[str]] = {
        message: [] for message in
        unwritable_outputs(runs) + unusable_cache(runs) + strategy_problems(runs) + text_tower_problems(runs)
        + vqa_problems(runs)}
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
            if found[-1].stream.session_datasets(found[-1].sessions) is not None:
                problems.setdefault(f"vqa: stream '{run.stream}' is a sequence of datasets, which has no question set "
                                    "of its own (and a VLM-loss strategy no question to train with): set "
                                    "vqa.model: null, with a CLIP-loss strategy", []).append(where)
                continue
            for stream in [found[-1].stream, *(found[-1].controls[c] for c in vqa_controls(run))]:
                if stream.spec.vqa_question is None and not stream.spec.own_questions:
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
