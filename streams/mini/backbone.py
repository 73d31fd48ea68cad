"""The ``mini`` backbone family: the mini world's pretrained tiny open_clip ViT, from the cache.

``mini`` loads ``$FSCL_CACHE/mini-v<world>.<recipe>-s0`` (default cache ``~/.cache/fscl``);
``mini:/path/to/folder`` loads (or builds into) that folder. A missing model is pretrained
first, with a progress bar (a few minutes of one CPU core), exactly as ``fscl
pretrain-mini`` would. Declared in :mod:`streams.mini` because the core never imports
``streams``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import open_clip
from filelock import FileLock

from benchmark.backbones.base import WeightsSource
from benchmark.backbones.openclip import OpenCLIPBackbone
from benchmark.cache import CACHE_ENV, cache_root  # noqa: F401 (CACHE_ENV: this family's documented setting)
from streams.mini.pretrain import RECIPE, PretrainConfig, pretrain
from streams.mini.world import world

log = logging.getLogger(__name__)

WEIGHTS = "open_clip_model.safetensors"
MODEL_CONFIG = Path(__file__).parent / "data" / "mini-vit.json"  # the model's open_clip config


def default_model_dir(seed: int = 0) -> Path:
    """Where the mini model of pretraining seed ``seed`` is cached (versioned by world and recipe)."""
    return cache_root() / f"mini-v{world().version}.{RECIPE}-s{seed}"


def ensure_built(folder: Path, weights: str, what: str, build: Callable[[Path], object]) -> Path:
    """``folder`` (user paths expanded) once it holds the file ``weights``; else ``build(folder)`` makes it first, under a
    lock beside it: of concurrent runs (grid shards, ``--jobs`` processes, ddp ranks) one builds, the rest wait."""
    folder = Path(folder).expanduser()
    if (folder / weights).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if not (folder / weights).is_file():
            log.warning("the %s is not in %s yet: building it now", what, folder)
            build(folder)
    return folder


def ensure_model(folder: Path, cfg: PretrainConfig | None = None, progress: bool = True) -> Path:
    """``folder`` holding a pretrained mini model, pretraining it (recipe ``cfg``) when missing."""
    return ensure_built(folder, WEIGHTS, "mini model", lambda path: pretrain(path, cfg, progress=progress))


class MiniBackbone(OpenCLIPBackbone):
    """The mini world's tiny open_clip ViT (not CLIP), pretrained on clean renders; cached."""

    def __init__(self, spec: str, rest: str, weights: bool = True) -> None:
        if not weights:  # the architecture only: from the mini config, never pretraining
            open_clip.add_model_config(MODEL_CONFIG)
            super().__init__(spec, MODEL_CONFIG.stem, weights=False)
            return
        folder = ensure_model(Path(rest) if rest else default_model_dir())
        super().__init__(spec, f"local-dir:{folder}")

    @classmethod
    def weights_source(cls, rest: str) -> WeightsSource:
        folder = Path(rest).expanduser() if rest else default_model_dir()
        built = (folder / WEIGHTS).is_file()
        return WeightsSource(f"the mini model in {folder}" if built else
                             f"the mini model, pretrained into {folder} on first use (a few minutes on a CPU)", True)

    @classmethod
    def check_spec(cls, rest: str) -> None:
        if rest.startswith("local-dir:"):
            raise ValueError("mini takes a folder path (mini:/path/to/model), not a local-dir: schema; "
                             "use openclip:local-dir:/path for other open_clip folders")
