"""What a grid costs before it runs (``fscl run --dry-run``): training steps, evaluated images, VQA questions, and
a wall-time estimate.

Counts: a run trains ``epochs x batches`` steps per session (or ``train.steps``) (the batches as the loader makes them,
``train.drop_last`` included) unless its strategy never trains, and evaluates every eval set (each
session's class group of the target's test set, each control's test set or subset) before training and
after every session; row 0 is counted once per (backbone, set, images) for the whole grid (the runs share
it, :mod:`benchmark.shared_rows`) and a strategy that never trains evaluates once. With ``vqa.model`` a run
asks each question set (the target's test images of every session's classes, each control in ``vqa.sets``)
before training (once per grid) and after the last session (a strategy that never trains: not again), and
with ``vqa.sessions: all`` its subset after every session between (a strategy that never trains: not at all), and
at the ends too when the subset is smaller than the set (the per-session numbers compare the same questions).

Rates: measured by the earlier runs under the grid's ``out`` folder on the same backbone and device type
(their ``summary.json`` training seconds and samples, their manifest's ``eval_timing`` and, with the same
``vqa.model``, ``vqa_timing``), or, with ``--probe``, measured now (:func:`probe_rates`). The estimate is
steps / step rate + images / image rate + questions / question rate: start-up, model loading, building
question sets and filling the evaluation cache are not in it. Without rates there is no estimate.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import Tensor

from benchmark.config import Config
from benchmark.distributed import synchronize
from benchmark.jobs import resolve_jobs
from benchmark.registry import STRATEGIES
from benchmark.runs import target_test

PROBE_STEPS = 5  # timed training steps and evaluation batches of --probe (after one warm-up each)


@dataclass
class Cost:
    """Training steps, evaluated images and VQA questions (the grid's share of one backbone)."""

    steps: int = 0
    images: int = 0
    questions: int = 0
    runs: int = 0


@dataclass
class Rates:
    """Training steps, evaluated images and VQA questions per second (None: not measured), and where from."""

    steps: float
    images: float
    questions: float | None
    source: str


def session_steps(samples: int, batch_size: int, epochs: int, drop_last: bool | str, steps: int | None = None) -> int:
    """Optimizer steps of one session of ``samples`` (the template's loader: ``auto`` drops the last partial
    batch only when the session holds more than one batch); ``steps`` (``train.steps``) when set."""
    drop = samples > batch_size if drop_last == "auto" else drop_last
    return steps if steps is not None else epochs * (samples // batch_size if drop else -(-samples // batch_size))


def grid_cost(runs: Sequence[Config], data: Sequence[Any]) -> dict[str, Cost]:
    """Per backbone, the grid's training steps, evaluated images and VQA questions (``data``: each run's checked
    RunData)."""
    from benchmark.vqa.session import vqa_controls

    costs: dict[str, Cost] = defaultdict(Cost)
    row0: set[tuple] = set()
    tests: dict[int, Any] = {}
    for run, run_data in zip(runs, data):
        cost = costs[run.backbone]
        cost.runs += 1
        trains = STRATEGIES.get(run.strategy).obj.trains
        if trains:
            cost.steps += sum(session_steps(len(s.ids), run.train.batch_size, run.train.epochs, run.train.drop_last,
                                            run.train.steps) for s in run_data.sessions)
        test = tests.setdefault(id(run_data.stream), run_data.stream.dataset("test"))
        sets = [(run.stream, tuple(test.ids))] if run_data.stream.spec.own_questions else \
            [(f"{run.stream}@{s.index}", tuple(test.with_classes(s.classes).ids)) for s in run_data.sessions]
        sets += [(name, tuple(images.ids)) for name, images in run_data.control_tests.items()]
        for name, ids in sets if "zeroshot" in run.evaluate else ():
            if (run.backbone, name, ids) not in row0:
                row0.add((run.backbone, name, ids))
                cost.images += len(ids)
            if trains:
                cost.images += len(ids) * len(run_data.sessions)
        if run.vqa.model is None or "vqa" not in run.evaluate:
            continue
        vqa = run.vqa
        asked = [(run.stream, tuple(target_test(run_data.stream, run_data.sessions).ids))]
        asked += [(name, tuple(run_data.control_tests[name].ids)) for name in vqa_controls(run)]
        for name, ids in asked:
            subset = min(len(ids), vqa.subset or len(ids)) if vqa.sessions == "all" else len(ids)
            # all questions at the ends; a subset (smaller) also at the ends, and alone between them
            ends = [len(ids)] + ([subset] if subset < len(ids) else [])
            for asks in ends:
                key = (run.backbone, vqa.model, vqa.scoring, vqa.batch_size, vqa.mode, vqa.seed, name, ids, asks)
                if key not in row0:
                    row0.add(key)
                    cost.questions += asks
                cost.questions += asks * trains
            if vqa.sessions == "all":
                cost.questions += (len(run_data.sessions) - 1) * subset * trains
    return dict(costs)


def _finished_records(out: str | Path) -> Iterator[tuple[dict, dict, dict]]:
    """(config, manifest, summary) of every finished run record under ``out``."""
    for manifest_path in Path(out).rglob("manifest.json"):
        folder = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
            config = yaml.safe_load((folder / "config.yaml").read_text())
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and manifest.get("status") == "finished":
            yield config, manifest, summary


def measured_rates(out: str | Path, backbone: str, device: str, vqa_model: str | None = None) -> Rates | None:
    """The rates of the finished runs under ``out`` on ``backbone`` and the device type ``device`` (questions/s:
    of those with ``vqa.model`` = ``vqa_model``); None when no such run recorded training and evaluation."""
    steps = train_seconds = images = eval_seconds = questions = vqa_seconds = 0.0
    found = 0
    for config, manifest, summary in _finished_records(out):
        timing = manifest.get("eval_timing") or {}
        if config.get("backbone") != backbone or str(manifest.get("device", "")).split(":")[0] != device \
                or not timing.get("seconds"):
            continue
        train = config.get("train", {})
        for session in summary.get("costs", {}).get("sessions", []):
            if session.get("train_seconds"):
                steps += session_steps(session["train_samples"], train.get("batch_size", 16), train.get("epochs", 5),
                                       train.get("drop_last", "auto"), train.get("steps"))
                train_seconds += session["train_seconds"]
        images += timing["images"]
        eval_seconds += timing["seconds"]
        vqa_timing = manifest.get("vqa_timing") or {}
        if vqa_model is not None and (config.get("vqa") or {}).get("model") == vqa_model:
            questions += vqa_timing.get("questions", 0)
            vqa_seconds += vqa_timing.get("seconds", 0.0)
        found += 1
    if not found or not train_seconds or not eval_seconds:
        return None
    return Rates(steps / train_seconds, images / eval_seconds, questions / vqa_seconds if vqa_seconds else None,
                 f"the rates of {found} finished run(s) under {out}")


def probe_rates(run: Config, run_data: Any, device: torch.device, steps: int = PROBE_STEPS) -> Rates:
    """The rates of ``run``'s backbone on ``device``, measured now, each after one untimed warm-up: ``steps``
    full fine-tuning steps (Adam, :func:`~benchmark.template.clip_loss`, ``train.batch_size`` random images of
    the backbone's input size under ``train.precision``'s autocast; the costliest CLIP-loss step, LoRSU's or
    LoRA's is cheaper), ``steps`` evaluation batches of ``train.eval_batch_size`` random uint8 images
    (normalised on the device, encoded in the evaluation's precision, classified:
    :meth:`~benchmark.evaluation.ZeroShotEvaluator.logits`) and, with ``vqa.model``, ``steps`` batches of the
    target's real questions (its question set, built or read as a run does) scored as a run scores them."""
    from benchmark.backbones import load_backbone
    from benchmark.evaluation import ZeroShotEvaluator, autocast_dtype
    from benchmark.image_cache import split_eval_transform
    from benchmark.template import clip_loss

    train = run.train
    backbone = load_backbone(run.backbone, str(device))
    split = split_eval_transform(backbone.preprocess(False))
    height, width = backbone.preprocess(False)(Image.new("RGB", (256, 256))).shape[1:]
    generator = torch.Generator().manual_seed(0)

    def uint8_images(n: int) -> Tensor:
        return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator).to(device)

    def timed(step: Callable[[], Any]) -> float:
        step()  # warm-up: kernels chosen, memory allocated
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        return steps / (time.perf_counter() - start)

    dtype = autocast_dtype(train.precision, device)
    texts = torch.nn.functional.normalize(torch.randn(train.batch_size, backbone.text_features(["x"]).shape[1],
                                                      generator=generator), dim=-1).to(device)
    images = split.normalise(uint8_images(train.batch_size)) if split else uint8_images(train.batch_size).float()
    backbone.visual.requires_grad_(True)
    optimizer = torch.optim.Adam(backbone.visual.parameters(), lr=1e-6)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            features = backbone.encode_image(images)
        clip_loss(features.float(), texts, backbone.logit_scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_rate = timed(train_step)
    backbone.requires_grad_(False)
    evaluator = ZeroShotEvaluator(backbone, train.eval_batch_size, dtype=dtype)
    batch, classes = uint8_images(train.eval_batch_size), texts[:2]

    @torch.no_grad()
    def eval_step() -> None:
        evaluator.logits(split.normalise(batch) if split else batch.float(), classes).argmax(1).cpu()

    image_rate = timed(eval_step) * train.eval_batch_size
    asks = run.vqa.model is not None and "vqa" in run.evaluate
    question_rate = _probe_questions(run, run_data, backbone, device, timed) if asks else None
    return Rates(step_rate, image_rate, question_rate,
                 f"measured now ({steps} full fine-tuning steps and evaluation batches of random images"
                 f"{f', {steps} batches of the target questions' if question_rate else ''}; LoRSU, LoRA and the other "
                 f"partial updates train faster, the VLM-loss strategies slower)")


def _probe_questions(run: Config, run_data: Any, backbone, device: torch.device,
                     timed: Callable[[Callable[[], Any]], float]) -> float:
    """Questions per second of ``run``'s VQA scoring: ``timed`` batches of the first questions of the target's set
    with ``backbone`` in the VQA model's tower."""
    from benchmark.vlm.spec import resolve_vlm
    from benchmark.vqa.evaluate import build_sets, score_set

    vqa = run.vqa
    vlm = resolve_vlm(vqa.model).loaded(device)
    vlm.swap_encoder(backbone)
    (qset,) = build_sets({run.stream: (run_data.stream, target_test(run_data.stream, run_data.sessions))},
                         vqa.mode, vqa.seed, run.backbone)
    first = replace(qset, subset=list(range(min(vqa.batch_size, len(qset.questions.items)))))
    return timed(lambda: score_set(vlm, first, vqa.batch_size, False, vqa.scoring)) * len(first.subset)


def estimate_lines(runs: Sequence[Config], data: Sequence[Any], device: torch.device,
                   jobs: int | str = 1, probe: bool = False) -> list[str]:
    """The dry run's cost lines: per backbone the counts, the rates (of earlier runs, or with ``probe`` measured
    now by :func:`probe_rates`) and the estimated wall time (with ``jobs`` > 1 local processes: divided among
    them, as if each kept the rates)."""
    lines = []
    for backbone, cost in grid_cost(runs, data).items():
        out = runs[0].out
        first, first_data = next((run, d) for run, d in zip(runs, data) if run.backbone == backbone)
        questions = f", {cost.questions:,} VQA questions" if cost.questions else ""
        head = (f"{backbone}: {cost.runs} run(s), {cost.steps:,} training steps, {cost.images:,} evaluated images"
                f"{questions} (row 0 once per set for the grid, a strategy that never trains evaluated once)")
        rates = probe_rates(first, first_data, device) if probe else \
            measured_rates(out, backbone, device.type, first.vqa.model)
        if rates is None:
            lines += [head, f"  no estimate: no finished run of {backbone} on {device.type} under {out} "
                            f"recorded its rates (--probe measures them now, or run a small grid first)"]
            continue
        seconds = cost.steps / rates.steps + cost.images / rates.images
        left_out = ["start-up", "model loading", "building question sets", "filling the evaluation cache"]
        speeds = f"{rates.steps:.1f} steps/s, {rates.images:,.0f} images/s"
        if cost.questions and rates.questions:
            seconds += cost.questions / rates.questions
            speeds += f", {rates.questions:,.1f} questions/s ({first.vqa.model})"
        elif cost.questions:
            left_out.insert(0, f"VQA (no run under {out} recorded its rate with vqa.model {first.vqa.model})")
        n_jobs = resolve_jobs(jobs, device, cost.runs)
        split = f", in {n_jobs} processes about {_duration(seconds / n_jobs)}" if n_jobs > 1 else ""
        lines += [head, f"  estimate: about {_duration(seconds)} on {device.type}{split} at {speeds}, {rates.source} "
                        f"({', '.join(left_out[:-1])} and {left_out[-1]} not included)"]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
