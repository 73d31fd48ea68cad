"""Backbone families and the load-string parser (``family:rest``, or a bare family name).

The families are declared here by name, load forms and known tags, so that ``fscl ls
backbones`` and config checks need no torch; a family's module is imported when a backbone
of it is first checked or loaded. The public classes of :mod:`benchmark.backbones.base` are
importable from here too (``from benchmark.backbones import Backbone``), imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from benchmark.errors import FsclError
from benchmark.lazy import lazy_exports
from benchmark.registry import BACKBONES

if TYPE_CHECKING:
    from benchmark.backbones.base import Backbone, WeightsSource

__all__ = ["Backbone", "BackboneLoadError", "BlockView", "ProjectionRows", "QKVRowUpdate", "UpdateHandle",
           "WeightsSource", "backbone_skeleton", "check_backbone_string", "load_backbone", "weights_source"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(
    ["Backbone", "BlockView", "ProjectionRows", "QKVRowUpdate", "UpdateHandle", "WeightsSource"],
    "benchmark.backbones.base"))

BACKBONES.declare(
    "openclip", "benchmark.backbones.openclip:OpenCLIPBackbone",
    summary="open_clip models: OpenAI/LAION ViTs (fused attention), EVA01/EVA02 (timm trunks), SigLIP (timm, fused qkv).",
    load_forms=("openclip:NAME  (random init, e.g. openclip:fscl-tiny)", "openclip:NAME@TAG  (hub weights)",
                "openclip:NAME@/path/to/weights.{pt,bin,safetensors}  (tokenizer files may sit beside it)",
                "openclip:local-dir:/path  (open_clip_config.json + open_clip_model.safetensors [+ tokenizer])"),
    known_tags=("ViT-L-14-336-quickgelu@openai", "ViT-B-16-quickgelu@openai",
                "ViT-B-16@laion2b_s34b_b88k", "EVA01-g-14@laion400m_s11b_b41k",
                "EVA02-B-16@merged2b_s8b_b131k", "EVA02-L-14-336@merged2b_s6b_b61k",
                "ViT-B-16-SigLIP@webli", "ViT-SO400M-14-SigLIP-384@webli"))
BACKBONES.declare(
    "hf", "benchmark.backbones.hf:HFCLIPBackbone",
    summary="HF transformers CLIPModel / SiglipModel (separate q/k/v projections): hf:/local/folder or hf:org/hub-id.",
    load_forms=("hf:/path/to/folder  (save_pretrained of the model and its tokenizer [+ preprocessor_config.json])",
                "hf:org/hub-id  (needs the hub, or HF_HUB_OFFLINE=1 and the local cache)"),
    known_tags=("hf:openai/clip-vit-large-patch14-336", "hf:openai/clip-vit-base-patch16",
                "hf:google/siglip-base-patch16-224", "hf:google/siglip-so400m-patch14-384"))

BACKBONES.declare(
    "hf-vision", "benchmark.backbones.hf:HFVisionBackbone",
    summary="An HF vision tower alone, no text tower: a SiglipVisionModel / CLIPVisionModel, or a PaliGemma / LLaVA's.",
    load_forms=("hf-vision:/path/to/folder  (SiglipVisionModel / CLIPVisionModel save_pretrained, as fscl export "
                "--format hf-siglip-vision / hf-clip-vision writes [+ preprocessor_config.json])",
                "hf-vision:/path/to/vlm-folder  (a PaliGemma or LLaVA save_pretrained: its vision_tower weights alone)",
                "hf-vision:org/hub-id  (needs the hub, or HF_HUB_OFFLINE=1 and the local cache)"),
    known_tags=("hf-vision:google/paligemma-3b-pt-224", "hf-vision:google/siglip-so400m-patch14-224"))


class BackboneLoadError(FsclError, RuntimeError):
    """A backbone could not be built; the message says what to pass instead."""


def _split(spec: str) -> tuple[str, str]:
    family, _, rest = spec.partition(":")
    return family, rest


def check_backbone_string(spec: str) -> None:
    """Raise ValueError unless ``spec`` names a registered family in a valid form (no weights loaded)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{spec!r} is not a backbone string; e.g. openclip:ViT-B-16@openai")
    family, rest = _split(spec)
    entry = BACKBONES.get(family) if family in BACKBONES else None
    if entry is None:
        raise ValueError(BACKBONES.unknown_message(family))
    entry.obj.check_spec(rest)


def load_backbone(spec: str, device: str | None = None) -> Backbone:
    """Build the backbone named by ``spec`` (all parameters frozen), optionally on ``device``."""
    check_backbone_string(spec)
    family, rest = _split(spec)
    backbone = BACKBONES.get(family).obj(spec, rest)
    return backbone.to(device) if device else backbone


def backbone_skeleton(spec: str) -> Backbone:
    """The architecture of ``spec`` on the meta device: its modules, blocks and shapes, with no weights,
    no tokenizer and no download (for checks before any work, e.g. a strategy's block requirements)."""
    check_backbone_string(spec)
    family, rest = _split(spec)
    return BACKBONES.get(family).obj(spec, rest, weights=False)


def weights_source(spec: str) -> WeightsSource | None:
    """Where the weights of ``spec`` would come from (a local file, a cache, a hub needing internet), found
    without loading or downloading them; None when its family does not say."""
    check_backbone_string(spec)
    family, rest = _split(spec)
    return BACKBONES.get(family).obj.weights_source(rest)
