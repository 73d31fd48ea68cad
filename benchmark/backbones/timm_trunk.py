"""Block views of open_clip models whose vision tower is a timm trunk (``visual.trunk``).

Two timm attention layouts are covered:

* a fused ``qkv`` ``nn.Linear`` [3W, W] with its own bias (timm ``VisionTransformer``, the trunk
  of open_clip's SigLIP models): q rows ``0:W``, k ``W:2W``, v ``2W:3W``, like open_clip's
  ``in_proj_weight`` but called as a module, so updates hook it;
* separate ``q_proj``/``k_proj``/``v_proj`` linears (timm ``Eva`` with ``qkv_fused=False``: the
  EVA02 CLIP configs; ``k_proj`` has no bias).

EVA01 (``eva_giant_*``) fuses q/k/v into a bias-less linear and adds separate ``q_bias``/
``v_bias`` through ``F.linear``, bypassing the module: no hook can see it, so it is refused
with a message rather than half-supported.
"""
from __future__ import annotations

from torch import nn

from benchmark.backbones.base import BlockView, ProjectionRows

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _projections(index: int, attn: nn.Module) -> tuple[ProjectionRows, ProjectionRows, ProjectionRows]:
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        if getattr(attn, "q_bias", None) is not None or getattr(attn, "v_bias", None) is not None:
            raise TypeError(
                f"block {index}: {type(attn).__name__} adds separate q/v biases to a fused qkv projection outside "
                f"the module (EVA01 layout); not supported. EVA02 models (separate q/k/v) and SigLIP work.")
        width = qkv.out_features // 3
        return tuple(ProjectionRows(qkv.weight, qkv.bias, slice(j * width, (j + 1) * width)) for j in range(3))
    linears = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if all(isinstance(lin, nn.Linear) for lin in linears):
        return tuple(ProjectionRows(lin.weight, lin.bias, slice(0, lin.out_features)) for lin in linears)
    raise TypeError(f"block {index}: unsupported timm attention {type(attn).__name__} "
                    f"(neither a fused qkv linear nor q_proj/k_proj/v_proj)")


def _fc1(index: int, mlp: nn.Module) -> nn.Linear:
    """The first MLP linear; of a split SwiGLU (EVA02) its value branch ``fc1_x``."""
    for name in ("fc1", "fc1_x"):
        layer = getattr(mlp, name, None)
        if isinstance(layer, nn.Linear):
            return layer
    raise TypeError(f"block {index}: unsupported timm MLP {type(mlp).__name__} (no fc1 / fc1_x linear)")


def timm_block_views(trunk: nn.Module) -> list[BlockView]:
    """One :class:`BlockView` per block of a timm ViT/EVA trunk (``trunk.blocks``), first to last."""
    views = []
    for i, block in enumerate(trunk.blocks):
        attn = block.attn
        q, k, v = _projections(i, attn)
        width = q.rows.stop - (q.rows.start or 0)
        extra = [m for m in (getattr(attn, "norm", None), getattr(block.mlp, "norm", None)) if isinstance(m, NORM_TYPES)]
        views.append(BlockView(
            index=i, num_heads=attn.num_heads, head_dim=width // attn.num_heads, q=q, k=k, v=v,
            fc1=_fc1(i, block.mlp), norms=(block.norm1, block.norm2, *extra), module=block,
        ))
    return views


def timm_image_projection(visual: nn.Module) -> tuple[nn.Module, str] | None:
    """The linear that maps pooled trunk features to the joint embedding, if the model has one.

    open_clip puts it in ``visual.head.proj`` (``timm_proj: linear``) or, with ``timm_proj: null``
    (the EVA configs), uses the trunk's classifier ``trunk.head``; SigLIP (``timm_proj: none``)
    has none.
    """
    for module in (getattr(getattr(visual, "head", None), "proj", None), getattr(visual.trunk, "head", None)):
        if isinstance(module, nn.Linear):
            return (module, "weight")
    return None
