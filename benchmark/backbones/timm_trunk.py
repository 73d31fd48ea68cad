"""Block views of open_clip models whose vision tower is a timm trunk (``visual.trunk``).

Two timm attention layouts are covered:

* a fused ``qkv`` ``nn.Linear`` [3W, W] with its own bias (timm ``VisionTransformer``, the trunk
  of open_clip's SigLIP models): q rows ``0:W``, k ``W:2W``, v ``2W:3W``, like open_clip's
  ``in_proj_weight`` but called as a module, so updates hook it;
* separate ``q_proj``/``k_proj``/``v_proj`` linears (timm ``Eva`` with ``qkv_fused=False``: the
  EVA02 CLIP configs; ``k_proj`` has no bias).

* EVA01 (``eva_giant_*``): a fused bias-less ``qkv`` linear plus separate ``q_bias``/``v_bias``
  parameters (k has none). timm adds them inside ``F.linear`` with the linear's weight, which
  bypasses the module, so neither a forward hook nor peft's LoRA would see it;
  :func:`route_qkv_through_module` switches such attentions to timm's own
  ``qkv_bias_separate`` path (``qkv(x) + bias``, the same function) when the backbone loads.
"""
from __future__ import annotations

from torch import nn

from benchmark.backbones.base import BlockView, ProjectionRows

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _projections(index: int, attn: nn.Module) -> tuple[ProjectionRows, ProjectionRows, ProjectionRows]:
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        width = qkv.out_features // 3
        rows = [slice(j * width, (j + 1) * width) for j in range(3)]
        if _has_separate_biases(attn):  # EVA01: q_bias, (no k bias), v_bias, each [W]
            if not getattr(attn, "qkv_bias_separate", False):
                raise TypeError(f"block {index}: the EVA01 attention adds its biases inside F.linear, where no update "
                                f"can reach; call route_qkv_through_module(trunk) first (the backbone does)")
            biases = (attn.q_bias, None, attn.v_bias)
            return tuple(ProjectionRows(qkv.weight, b, r) for b, r in zip(biases, rows))
        return tuple(ProjectionRows(qkv.weight, qkv.bias, r) for r in rows)
    linears = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if all(isinstance(lin, nn.Linear) for lin in linears):
        return tuple(ProjectionRows(lin.weight, lin.bias, slice(0, lin.out_features)) for lin in linears)
    raise TypeError(f"block {index}: unsupported timm attention {type(attn).__name__} "
                    f"(neither a fused qkv linear nor q_proj/k_proj/v_proj)")


def _has_separate_biases(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "q_bias", None), nn.Parameter)


def route_qkv_through_module(trunk: nn.Module) -> None:
    """Make EVA01 attentions compute ``qkv(x) + bias`` (timm's ``qkv_bias_separate``), the same function
    as their default ``F.linear(x, qkv.weight, bias)``, so that hooks and LoRA layers on ``qkv`` apply."""
    for module in trunk.modules():
        if isinstance(getattr(module, "qkv", None), nn.Linear) and _has_separate_biases(module):
            module.qkv_bias_separate = True


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
        inner = (getattr(attn, "norm", None), getattr(block.mlp, "norm", None))  # EVA02's scale norms
        extra = [m for m in inner if isinstance(m, NORM_TYPES)]
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
