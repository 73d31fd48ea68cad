"""What a grid costs before it runs (``fscl run --dry-run``): training steps, evaluated images, a wall-time estimate.

Counts: a run trains ``epochs x batches`` steps per session (the batches as the loader makes them,
``train.drop_last`` included) unless its strategy never trains, and evaluates every eval set (each
session's class group of the target's test set, each control's test set or subset) before training and
after every session; row 0 is counted once per (backbone, set, images) for the whole grid (the runs share
it, :mod:`benchmark.shared_rows`) and a strategy that never trains evaluates once.

Rates: measured by the earlier runs under the grid's ``out`` folder on the same backbone and device type
(their ``summary.json`` training seconds and samples, their manifest's ``eval_timing``), or, with
``--probe``, measured now (:func:`probe_rates`: full fine-tuning steps and evaluation batches of random
images on the run's device). The estimate is steps / step rate + images / image rate: start-up, model
loading and filling the evaluation cache are not in it. Without either there is no estimate.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import Tensor

from benchmark.config import Config, TrainConfig
from benchmark.jobs import resolve_jobs
from benchmark.registry import STRATEGIES

PROBE_STEPS = 5  # timed training steps and evaluation batches of --probe (after one warm-up each)


@dataclass
class Cost:
    """Training steps and evaluated images (the grid's share of one backbone)."""

    steps: int = 0
    images: int = 0
    runs: int = 0


def session_steps(samples: int, batch_size: int, epochs: int, drop_last: bool | str) -> int:
    """Optimizer steps of one session of ``samples`` (the template's loader: ``auto`` drops the last partial
    batch only when the session holds more than one batch)."""
    drop = samples > batch_size if drop_last == "auto" else drop_last
    return epochs * (samples // batch_size if drop else -(-samples // batch_size))


def grid_cost(runs: Sequence[Config], data: Sequence[Any]) -> dict[str, Cost]:
    """Per backbone, the grid's training steps and evaluated images (``data``: each run's checked RunData)."""
    costs: dict[str, Cost] = defaultdict(Cost)
    row0: set[tuple] = set()
    tests: dict[int, Any] = {}
    for run, run_data in zip(runs, data):
        cost = costs[run.backbone]
        cost.runs += 1
        trains = STRATEGIES.get(run.strategy).obj.trains
        if trains:
            cost.steps += sum(session_steps(len(s.ids), run.train.batch_size, run.train.epochs, run.train.drop_last)
                              for s in run_data.sessions)
        test = tests.setdefault(id(run_data.stream), run_data.stream.dataset("test"))
        sets = [(f"{run.stream}@{s.index}", tuple(test.with_classes(s.classes).ids)) for s in run_data.sessions]
        sets += [(name, tuple(images.ids)) for name, images in run_data.control_tests.items()]
        for name, ids in sets:
            if (run.backbone, name, ids) not in row0:
                row0.add((run.backbone, name, ids))
                cost.images += len(ids)
            if trains:
                cost.images += len(ids) * len(run_data.sessions)
    return dict(costs)


def measured_rates(out: str | Path, backbone: str, device: str) -> tuple[float, float, int] | None:
    """(training steps/s, evaluated images/s, runs measured) of the finished runs under ``out`` on ``backbone``
    and the device type of ``device``; None when no such run recorded both."""
    steps = train_seconds = images = eval_seconds = 0.0
    found = 0
    for manifest_path in Path(out).rglob("manifest.json"):
        folder = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
            config = yaml.safe_load((folder / "config.yaml").read_text())
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        timing = manifest.get("eval_timing") or {}
        if config.get("backbone") != backbone or str(manifest.get("device", "")).split(":")[0] != device \
                or not timing.get("seconds"):
            continue
        train = config.get("train", {})
        for session in summary.get("costs", {}).get("sessions", []):
            if session.get("train_seconds"):
                steps += session_steps(session["train_samples"], train.get("batch_size", 16), train.get("epochs", 5),
                                       train.get("drop_last", "auto"))
                train_seconds += session["train_seconds"]
        images += timing["images"]
        eval_seconds += timing["seconds"]
        found += 1
    if not found or not train_seconds or not eval_seconds:
        return None
    return steps / train_seconds, images / eval_seconds, found


def probe_rates(spec: str, train: TrainConfig, device: torch.device, steps: int = PROBE_STEPS) -> tuple[float, float]:
    """(training steps/s, evaluated images/s) of backbone ``spec`` on ``device``, measured now on random images
    of its input size (one seeded generator), each after one untimed warm-up: ``steps`` full fine-tuning steps
    (Adam, :func:`~benchmark.template.clip_loss`, ``train.batch_size`` images under ``train.precision``'s
    autocast; the costliest CLIP-loss step, LoRSU's or LoRA's is cheaper) and ``steps`` evaluation batches of
    ``train.eval_batch_size`` uint8 images (normalised on the device, encoded in the evaluation's precision,
    classified: :meth:`~benchmark.evaluation.ZeroShotEvaluator.logits`)."""
    from benchmark.backbones import load_backbone
    from benchmark.evaluation import ZeroShotEvaluator, autocast_dtype
    from benchmark.image_cache import split_eval_transform
    from benchmark.template import clip_loss

    backbone = load_backbone(spec, str(device))
    split = split_eval_transform(backbone.preprocess(False))
    height, width = backbone.preprocess(False)(Image.new("RGB", (256, 256))).shape[1:]
    generator = torch.Generator().manual_seed(0)

    def uint8_images(n: int) -> Tensor:
        return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator).to(device)

    def timed(step: Callable[[], Any]) -> float:
        step()  # warm-up: kernels chosen, memory allocated
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)
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

    return step_rate, timed(eval_step) * train.eval_batch_size


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_lines(runs: Sequence[Config], data: Sequence[Any], device: torch.device,
                   jobs: int | str = 1, probe: bool = False) -> list[str]:
    """The dry run's cost lines: per backbone the counts, the rates (of earlier runs, or with ``probe`` measured
    now by :func:`probe_rates`) and the estimated wall time (with ``jobs`` > 1 local processes: divided among
    them, as if each kept the rates)."""
    lines = []
    for backbone, cost in grid_cost(runs, data).items():
        out, first = runs[0].out, next(run for run in runs if run.backbone == backbone)
        head = (f"{backbone}: {cost.runs} run(s), {cost.steps:,} training steps, {cost.images:,} evaluated images "
                f"(row 0 once per set for the grid, a strategy that never trains evaluated once)")
        if probe:
            step_rate, image_rate = probe_rates(backbone, first.train, device)
            source = (f"measured now ({PROBE_STEPS} full fine-tuning steps and evaluation batches of random images; "
                      f"LoRSU, LoRA and the other partial updates train faster, the VLM-loss strategies slower)")
        else:
            rates = measured_rates(out, backbone, device.type)
            if rates is None:
                lines += [head, f"  no estimate: no finished run of {backbone} on {device.type} under {out} "
                                f"recorded its rates (--probe measures them now, or run a small grid first)"]
                continue
            step_rate, image_rate, found = rates
            source = f"the rates of {found} finished run(s) under {out}"
        seconds = cost.steps / step_rate + cost.images / image_rate
        n_jobs = resolve_jobs(jobs, device, cost.runs)
        split = f", in {n_jobs} processes about {_duration(seconds / n_jobs)}" if n_jobs > 1 else ""
        vqa = ", VQA" if any(run.vqa.model for run in runs if run.backbone == backbone) else ""
        lines += [head, f"  estimate: about {_duration(seconds)} on {device.type}{split} at {step_rate:.1f} steps/s "
                        f"and {image_rate:,.0f} images/s, {source} (start-up, model loading{vqa} and filling the "
                        f"evaluation cache not included)"]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
