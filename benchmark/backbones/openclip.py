"""open_clip models: ``openclip:NAME[@TAG|@/path/ckpt]`` and ``openclip:local-dir:/path``."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import Tensor, nn

from benchmark.backbones.base import Backbone, BlockView, ProjectionRows
from benchmark.registry import BACKBONES

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # our tiny configs, e.g. "fscl-tiny"
INIT_SEED = 0  # untrained models (no tag) are initialised from this seed, whatever the run seed
HUB_HOST = "huggingface.co"


class BackboneLoadError(RuntimeError):
    """A backbone could not be built; the message says what to pass instead."""


def parse(rest: str) -> tuple[str, str | None]:
    """``NAME@TAG`` → (NAME, TAG); ``local-dir:/p`` → ("local-dir:/p", None); ``NAME`` → (NAME, None)."""
    if rest.startswith("local-dir:"):
        if not rest[len("local-dir:") :]:
            raise ValueError("openclip:local-dir: needs a folder path, e.g. openclip:local-dir:/models/mini")
        return rest, None
    name, _, tag = rest.partition("@")
    if not name:
        raise ValueError(f"openclip backbone '{rest}' needs a model name, e.g. openclip:ViT-B-16@openai")
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model '{name}'; see open_clip.list_models() (e.g. ViT-B-16, ViT-L-14-336, fscl-tiny)"
        )
    return name, tag or None


def _is_path(tag: str) -> bool:
    return "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return True  # the user asked for the local cache; let huggingface_hub read it
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _create(name: str, tag: str | None) -> tuple[nn.Module, Callable, Callable]:
    if tag is not None and _is_path(tag) and not Path(tag).is_file():
        raise BackboneLoadError(f"checkpoint file not found: {tag}")
    if tag is not None and not _is_path(tag) and not _hub_reachable():
        raise BackboneLoadError(
            f"pretrained weights '{name}@{tag}' come from the Hugging Face hub, which cannot be reached "
            f"from this machine. Pass a local checkpoint instead: 'openclip:{name}@/path/to/weights.pt' "
            f"(a state dict; OpenAI weights need the '-quickgelu' model name), or a folder saved in "
            f"open_clip's layout: 'openclip:local-dir:/path/to/folder'."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=tag)
        except (FileNotFoundError, RuntimeError, ValueError) as err:
            raise BackboneLoadError(f"could not load open_clip model '{name}' (weights: {tag}): {err}") from err
    if tag is None and not name.startswith("local-dir:"):
        log.warning("openclip:%s has no pretrained weights: random initialisation (seed %d)", name, INIT_SEED)
    return model, train_tf, eval_tf


@BACKBONES.register("openclip")
class OpenCLIPBackbone(Backbone):
    """open_clip CLIP models (fused attention ViTs): NAME@TAG, NAME@/path/ckpt, local-dir:/path."""

    def __init__(self, spec: str, rest: str) -> None:
        name, tag = parse(rest)
        model, self._train_tf, self._eval_tf = _create(name, tag)
        super().__init__(spec, model, model.visual)
        self._tokenizer = open_clip.get_tokenizer(name)

    @classmethod
    def check_spec(cls, rest: str) -> None:
        parse(rest)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(texts)

    def preprocess(self, train: bool) -> Callable:
        return self._train_tf if train else self._eval_tf

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def image_projection(self) -> tuple[nn.Module, str] | None:
        """``visual.proj`` [W, D] (a tensor test: a strategy may have parametrized it)."""
        proj = getattr(self.visual, "proj", None)
        return (self.visual, "proj") if isinstance(proj, Tensor) and proj.dim() == 2 else None

    def blocks(self) -> list[BlockView]:
        transformer = getattr(self.visual, "transformer", None)
        if transformer is None:
            return []  # e.g. a timm trunk: handled by its own backbone family
        views = []
        for i, block in enumerate(transformer.resblocks):
            attn = block.attn
            if not isinstance(attn, nn.MultiheadAttention):
                raise TypeError(f"block {i}: unsupported attention module {type(attn).__name__}")
            width = attn.embed_dim
            q, k, v = (ProjectionRows(attn.in_proj_weight, attn.in_proj_bias, slice(j * width, (j + 1) * width))
                       for j in range(3))
            views.append(
                BlockView(
                    index=i,
                    num_heads=attn.num_heads,
                    head_dim=attn.head_dim,
                    q=q,
                    k=k,
                    v=v,
                    fc1=block.mlp.c_fc,
                    norms=(block.ln_1, block.ln_2),
                    module=block,
                )
            )
        return views
