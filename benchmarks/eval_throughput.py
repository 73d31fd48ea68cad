"""Evaluated images per second: the run's evaluation path against the raw encoder forward (a benchmark, not a test).

On the same device, in one process, for each model: ``raw forward`` encodes already-preprocessed float
tensors (the images through the backbone's evaluation transform, on the device) in batches, nothing
else; the evaluation rows run the CLIP template's zero-shot evaluation (Avalanche's loop, the
evaluator's batches, logits, the accuracy metric) over the same images as JPEG files: ``off`` decodes
and preprocesses them at every evaluation (loader workers), ``cold`` fills the evaluation cache
(decoding once) and evaluates, ``warm`` evaluates from the cache file, ``warm, on GPU`` from images held
on the GPU (``eval_cache: device``). Both sides run in the run's precision (bf16 autocast on a GPU, fp32
on the CPU). The raw and warm rows alternate over the rounds (medians), so load drifts hit them alike; for
them the process's CPU time gives a second rate (``cpu img/s``), which other jobs on a shared machine
disturb far less than the wall clock (the other rows use loader workers, whose CPU time it would miss).

    python benchmarks/eval_throughput.py                         # mini (when pretrained here) and ViT-B/16 on the CPU
    python benchmarks/eval_throughput.py --device cuda           # + ViT-L/14-336, 2048 images
    python benchmarks/eval_throughput.py --model fscl-tiny --images 64 --threads 1

Models: ``mini`` (the mini world's model, skipped unless it is already in the cache folder), or an
open_clip model name (random weights: ``ViT-B-16``, ``ViT-L-14-336``, ``fscl-tiny``). Goal (issue 16):
warm evaluation at >= 0.9x the raw forward's images/s.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import benchmark  # noqa: F401  (torchvision repair: before avalanche and open_clip)

# isort: split
import numpy as np
import torch
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image

from benchmark.backbones import Backbone, load_backbone
from benchmark.config import TrainConfig
from benchmark.distributed import synchronize
from benchmark.evaluation import EvalSet, ZeroShotAccuracy, ZeroShotEvaluator, autocast_dtype
from benchmark.template import CLIPTemplate
from streams.base import LabelledImages, open_image

CLASSES = tuple(f"class {i}" for i in range(10))
GOAL = 0.9  # warm evaluation / raw forward


def write_images(folder: Path, n: int, seed: int = 0) -> LabelledImages:
    """``n`` JPEG files of 30-130 px sides (GTSRB-like sizes; smooth random content), labels ``i % 10``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(30, 131, 2))
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
        paths.append(folder / f"{i:05d}.jpg")
    return LabelledImages(paths, [i % 10 for i in range(n)], [f"img/{i}" for i in range(n)], open_image)


@torch.no_grad()
def raw_forward(backbone: Backbone, tensors: torch.Tensor, batch: int,
                dtype: torch.dtype | None) -> tuple[float, float]:
    """(wall, process CPU) seconds to encode ``tensors`` [N, 3, S, S] (on the device) in batches: the encoder alone."""
    device = tensors.device
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False):
        for s in range(0, len(tensors), batch):
            backbone.encode_image(tensors[s:s + batch])
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def evaluation(backbone: Backbone, images: LabelledImages, batch: int, cache: str, workers: int | str,
               device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of the run's zero-shot evaluation of ``images`` (a new evaluator: its cache
    state is the folder's)."""
    dtype = autocast_dtype("auto", device)
    zeroshot = ZeroShotEvaluator(backbone, batch, dtype=dtype, num_workers=workers, cache=cache)
    zeroshot.add(EvalSet("images", "images", CLASSES, ("a photo of a {}.",), images))
    zeroshot.embeddings_for(0)  # the frozen text side, outside the measurement (a run encodes it once)
    template = CLIPTemplate(
        backbone=backbone, class_names=CLASSES, templates=("a photo of a {}.",),
        train=TrainConfig(eval_batch_size=batch, num_workers=workers), zeroshot=zeroshot, seed=0, device=device,
        plugins=[], evaluator=EvaluationPlugin(ZeroShotAccuracy(), loggers=[]))
    stream = zeroshot.stream()
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    template.eval(stream)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def measure(name: str, backbone: Backbone, images: LabelledImages, args, device: torch.device) -> list[tuple]:
    """Rows (model, path, images/s, x raw, CPU images/s or None, x raw by CPU) of one model."""
    n, batch, dtype = len(images), args.batch, autocast_dtype("auto", device)
    tensors = torch.stack([images.transform(open_image(p)) for p in images.items]).to(device)
    raw_forward(backbone, tensors[:batch], batch, dtype)  # warm-up (kernels, allocator)
    once = {"off": evaluation(backbone, images, batch, "off", args.workers, device),
            "cold": evaluation(backbone, images, batch, "disk", args.workers, device)}
    rounds: dict[str, list[tuple[float, float]]] = {"raw forward": [], "warm": []}
    for _ in range(args.rounds):
        rounds["raw forward"].append(raw_forward(backbone, tensors, batch, dtype))
        rounds["warm"].append(evaluation(backbone, images, batch, "disk", args.workers, device))
        if device.type == "cuda":
            rounds.setdefault("warm, on GPU", []).append(
                evaluation(backbone, images, batch, "device", args.workers, device))
    rates = {path: (n / statistics.median(w for w, _ in times), n / statistics.median(c for _, c in times))
             for path, times in rounds.items()}
    rates.update({path: (n / wall, None) for path, (wall, _) in once.items()})
    raw, raw_cpu = rates["raw forward"]
    order = ["raw forward", "off", "cold", "warm", "warm, on GPU"]
    return [(name, path, rate, rate / raw, cpu, None if cpu is None else cpu / raw_cpu)
            for path in order if path in rates for rate, cpu in [rates[path]]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", nargs="+", default=None,
                        help="mini and/or open_clip model names (default: mini ViT-B-16, + ViT-L-14-336 on cuda)")
    parser.add_argument("--images", type=int, default=None, help="evaluated images (default: 512 on cpu, 2048 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="evaluation batch (default: 64 on cpu, 256 on cuda)")
    parser.add_argument("--rounds", type=int, default=3, help="raw / warm measurements, alternating (medians)")
    parser.add_argument("--workers", default="auto", help="loader workers (train.num_workers): auto or an integer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    args.images = args.images or (2048 if cuda else 512)
    args.batch = args.batch or (256 if cuda else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model or ["mini", "ViT-B-16", *(["ViT-L-14-336"] if cuda else [])]

    backbones: dict[str, Backbone] = {}
    for name in models:
        if name == "mini":
            from streams.mini.backbone import WEIGHTS, default_model_dir

            if not (default_model_dir() / WEIGHTS).is_file():
                print(f"mini: skipped (no pretrained mini model in {default_model_dir()}; `fscl pretrain-mini`)")
                continue
        backbones[name] = load_backbone(name if name == "mini" else f"openclip:{name}", str(device)).eval()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fscl-eval-throughput-") as tmp:
        os.environ["FSCL_CACHE"] = str(Path(tmp) / "cache")  # cold means cold (models are loaded already)
        (Path(tmp) / "images").mkdir()
        files = write_images(Path(tmp) / "images", args.images)
        print(f"{args.images} JPEG images (30-130 px), batch {args.batch}, {device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, "
              f"{autocast_dtype('auto', device) or torch.float32}, {torch.get_num_threads()} threads, "
              f"workers {args.workers}, {args.rounds} rounds", flush=True)
        for name, backbone in backbones.items():
            images = files.with_transform(backbone.preprocess(False))
            size = images[0][0].shape[-1]
            print(f"  {name}: {backbone.visual_parameter_count() / 1e6:.1f} M visual parameters, {size} px", flush=True)
            rows += measure(name, backbone, images, args, device)

    print(f"\n{'model':<14} {'path':<14} {'images/s':>10} {'x raw':>7} {'cpu img/s':>10} {'x raw':>7}")
    print("-" * 66)
    for name, path, rate, ratio, cpu, cpu_ratio in rows:
        by_cpu = f"{cpu:>10.1f} {cpu_ratio:>7.2f}" if cpu is not None else f"{'-':>10} {'-':>7}"
        print(f"{name:<14} {path:<14} {rate:>10.1f} {ratio:>7.2f} {by_cpu}")
    print()
    for name, path, _, ratio, _, cpu_ratio in rows:
        if path.startswith("warm"):
            met = [r >= GOAL for r in (ratio, cpu_ratio)]
            verdict = "met    " if all(met) else "NOT met" if not any(met) else "split  "
            print(f"{verdict}  {name} {path} evaluation >= {GOAL}x raw forward ({ratio:.2f}x; cpu {cpu_ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
