"""Backbone families and the load-string parser (``family:rest``, or a bare family name)."""
from __future__ import annotations

from benchmark.backbones import hf, openclip  # noqa: F401  (register the families)
from benchmark.backbones.base import Backbone, BlockView, ProjectionRows, QKVRowUpdate, UpdateHandle
from benchmark.registry import BACKBONES

__all__ = ["Backbone", "BlockView", "ProjectionRows", "QKVRowUpdate", "UpdateHandle", "check_backbone_string",
           "load_backbone"]


def _split(spec: str) -> tuple[str, str]:
    family, _, rest = spec.partition(":")
    return family, rest


def check_backbone_string(spec: str) -> None:
    """Raise ValueError unless ``spec`` names a registered family in a valid form (no loading)."""
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
