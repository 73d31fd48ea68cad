"""Pretraining the mini model: a tiny open_clip ViT trained with the CLIP loss on clean renders.

Both towers train (this is the model's "pretraining", not a benchmark session). Each step
renders a fresh batch of clean compositions (never a held-out pair) with their captions,
deterministically from (seed, step, world version, recipe), and the build runs in one thread
(:func:`one_thread`), so the same seed gives the same weights for any thread count. The
result is saved in open_clip's ``local-dir`` layout::

    <folder>/open_clip_config.json       {"model_cfg", "preprocess_cfg"}
    <folder>/open_clip_model.safetensors
    <folder>/manifest.json               seed, steps, data version, wall time, zero-shot accuracies

It is written to a temporary sibling folder and renamed into place when complete.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.backbones.openclip import OpenCLIPBackbone
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.records import atomic_folder, write_json
from benchmark.template import clip_loss, cosine_lr
from streams.mini.datasets import MiniColours, MiniDigits, MiniHandwritten, MiniShapes, MiniSigns
from streams.mini.render import render
from streams.mini.world import DATA_DIR, Composition, World, rng_for, world

log = logging.getLogger(__name__)

RECIPE = 2  # bump when the training recipe changes: part of the cache key, like the world version (2: one thread)
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults, written into preprocess_cfg
STD = (0.26862954, 0.26130258, 0.27577711)
CONTROLS = (MiniShapes, MiniColours, MiniDigits)
TARGETS = (MiniHandwritten, MiniSigns)
MAX_LOGIT_SCALE = math.log(100.0)  # clamp of CLIP's temperature, as in open_clip's training code


def default_model() -> dict[str, Any]:
    """The mini model's open_clip config (``streams/mini/data/mini-vit.json``)."""
    return json.loads((DATA_DIR / "mini-vit.json").read_text())


@dataclass
class PretrainConfig:
    """The pretraining recipe. ``steps`` × ``batch_size`` fresh renders; lr in AdamW units."""

    seed: int = 0
    steps: int = 1200
    batch_size: int = 256
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    model: dict[str, Any] = field(default_factory=default_model)


def corpus_scenes(w: World, seed: int, step: int, batch_size: int) -> list[tuple[Composition, str]]:
    """Step ``step``'s pretraining scenes and captions, in minimal groups (never a held-out pair)."""
    rng = rng_for(RECIPE, "pretrain", seed, step)
    pairs = w.pairs(held_out=False)
    scenes: list[tuple[Composition, str]] = []
    while len(scenes) < batch_size:
        scenes.extend(w.minimal_group(rng, pairs, bare_fraction=w.bare_glyph_fraction))
    return scenes[:batch_size]


def corpus_batch(w: World, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """Step ``step``'s pretraining batch: (clean renders uint8 [B, S, S, 3], B captions)."""
    scenes = corpus_scenes(w, seed, step, batch_size)
    return np.stack([render(w, c) for c, _ in scenes]), [caption for _, caption in scenes]


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [B, S, S, 3] → normalised float [B, 3, S, S], as the eval preprocessing does to an
    S-pixel image (resize and centre crop are identities at the model's own size)."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on gains, biases, embeddings and the temperature (open_clip's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: PretrainConfig, progress: bool = True) -> tuple[open_clip.CLIP, list[float]]:
    """Pretrain a model from scratch; returns it (eval mode) and the loss of every step."""
    w = world()
    if cfg.model["vision_cfg"]["image_size"] != w.image_size:
        raise ValueError(f"the model's image_size must be the world's ({w.image_size} px)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.CLIP(**cfg.model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.model["text_cfg"]["context_length"])
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretraining the mini model", unit="step", disable=not progress)
    for step in bar:
        images, captions = corpus_batch(w, cfg.seed, step, cfg.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        loss = clip_loss(model.encode_image(to_tensor(images)), model.encode_text(tokenizer(captions)),
                         model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), losses


def save_local_dir(model: open_clip.CLIP, model_cfg: dict[str, Any], folder: Path) -> None:
    """Write ``model`` in open_clip's local-dir layout (config + safetensors weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def zero_shot_accuracies(folder: Path) -> dict[str, float]:
    """Zero-shot top-1 (in [0, 1]) of the model in ``folder`` on every control and target test set."""
    backbone = OpenCLIPBackbone("openclip:local-dir", f"local-dir:{folder}")
    evaluator = ZeroShotEvaluator(backbone, batch_size=256)
    result = {}
    for stream_cls in CONTROLS + TARGETS:
        stream, spec = stream_cls("."), stream_cls.spec
        test = stream.dataset("test").with_transform(backbone.preprocess(False))
        result[spec.name] = round(evaluator.accuracy(test, spec.name, spec.class_names, spec.templates), 4)
    return result


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's CPU threads set to one, restored afterwards: a build's matmuls and sums then add in one order.
    Split over two threads they add in another, the last bits differ and training amplifies them, so a build
    would give other weights for another thread count. Also a decorator (``@one_thread()``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_facts(start: float, train_seconds: float) -> dict[str, Any]:
    """What a mini model's manifest records about its build: seconds training and in all (since ``start``, a
    ``time.perf_counter()``), torch, its threads, the machine's cores and host."""
    return {"train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "host": platform.node()}


@one_thread()
def pretrain(folder: Path, cfg: PretrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Pretrain (recipe ``cfg``, default :class:`PretrainConfig`), evaluate zero-shot and save
    into ``folder`` (replaced atomically), in one thread (:func:`one_thread`: the same weights for any
    thread count); returns the manifest."""
    folder, cfg = Path(folder), cfg or PretrainConfig()
    start = time.perf_counter()
    model, losses = train(cfg, progress)
    train_seconds = time.perf_counter() - start
    with atomic_folder(folder) as tmp:
        save_local_dir(model, cfg.model, tmp)
        accuracies = zero_shot_accuracies(tmp)
        controls = [accuracies[c.spec.name] for c in CONTROLS]
        targets = [accuracies[c.spec.name] for c in TARGETS]
        manifest = {
            "what": "the mini world's tiny open_clip ViT (not CLIP; its numbers never stand in for the paper's)",
            "seed": cfg.seed,
            "steps": cfg.steps,
            "data_version": world().version,
            "recipe": RECIPE,
            "config": asdict(cfg),
            "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
            "zero_shot_top1": accuracies,
            "zero_shot_top1_controls_mean": round(float(np.mean(controls)), 4),
            "zero_shot_top1_targets_mean": round(float(np.mean(targets)), 4),
            **build_facts(start, train_seconds),
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("mini model saved to %s: %s", folder, accuracies)
    return manifest
