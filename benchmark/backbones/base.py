"""The uniform model interface every strategy talks to: :class:`Backbone` and :class:`BlockView`.

Strategies never reach into module paths. Whatever a model's attention looks like — one
fused ``[3W, W]`` input projection (open_clip's ``nn.MultiheadAttention``, timm ViT's ``qkv``
``nn.Linear``) or separate ``q_proj``/``k_proj``/``v_proj`` linears (timm EVA02, HF CLIP/SigLIP) — a block is seen as
three :class:`ProjectionRows` (q, k, v), its first MLP layer and its norms.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import transforms

from benchmark.errors import FsclError


@dataclass(frozen=True)
class ProjectionRows:
    """One of a block's q/k/v projections: ``rows`` of ``weight`` [out, W] (and of ``bias``).

    For a fused projection the three views share one parameter and differ in ``rows``; for
    separate projections each view owns a whole parameter (``rows`` = all of it). ``bias`` is
    shared with ``weight``'s rows when it is as long as ``weight`` (open_clip, timm ViT), or the
    projection's own [W] vector (separate projections; EVA01's ``q_bias``/``v_bias`` beside a fused
    weight), or None.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    rows: slice

    def weight_rows(self) -> Tensor:
        """The projection's weight, [W, W]."""
        return self.weight[self.rows]

    def grad_rows(self) -> Tensor | None:
        """The accumulated gradient of those rows, [W, W], or None before any backward."""
        return None if self.weight.grad is None else self.weight.grad[self.rows]


class QKVRowUpdate(Protocol):
    """An additive update of some rows of a block's stacked ``[q; k; v]`` projection output.

    ``rows`` [R] (int64, on the model's device) indexes the stacked output of width 3W: row
    ``j * W + i`` is output ``i`` of projection ``j`` (0 = q, 1 = k, 2 = v). Called on the
    projection input ``x`` [..., W] it returns what to add to those rows, [..., R]. A
    low-rank ``ΔW`` of those rows is ``x ↦ x · ΔWᵀ``: only the chosen rows are computed.
    """

    rows: Tensor

    def __call__(self, x: Tensor) -> Tensor: ...


class UpdateHandle:
    """Removes an installed :class:`QKVRowUpdate` (like torch's ``RemovableHandle``)."""

    def __init__(self, *removers: Callable[[], object]) -> None:
        self._removers = list(removers)

    def remove(self) -> None:
        while self._removers:
            self._removers.pop()()


def parameter_owner(root: nn.Module, param: nn.Parameter) -> tuple[nn.Module, str]:
    """The module under ``root`` that holds ``param`` directly, and the attribute name."""
    for module in root.modules():
        for name, p in module.named_parameters(recurse=False):
            if p is param:
                return module, name
    raise LookupError(f"parameter of shape {tuple(param.shape)} is not held by any module under {type(root).__name__}")


def _fused_self_attention(
    attn: nn.MultiheadAttention,
    update: QKVRowUpdate,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    """``nn.MultiheadAttention.forward`` for self-attention, with ``update`` added to q/k/v.

    Same signature and result as the module's forward (attention weights are not returned),
    so the block that calls it is unchanged. x is [B, L, W] (``batch_first``) or [L, B, W].
    """
    if not (key is query and value is query) or key_padding_mask is not None or need_weights:
        raise ValueError("a q/k/v update supports self-attention without key padding masks or "
                                  "returned attention weights (the vision-transformer case)")
    x = query if attn.batch_first else query.transpose(0, 1)  # [B, L, W]
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3W]
    qkv = qkv.index_add(-1, update.rows, update(x).to(qkv.dtype))
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, hd]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MHA: True = masked out; SDPA: True = may attend
        if attn_mask.dim() == 3:  # [B * H, L, L]
            attn_mask = attn_mask.view(batch, heads, length, length)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.dropout if attn.training else 0.0,
        is_causal=is_causal and attn_mask is None,
    )  # [B, H, L, hd]
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    return (out if attn.batch_first else out.transpose(0, 1)), None


@dataclass(frozen=True)
class BlockView:
    """One vision-transformer block as strategies see it.

    Attributes:
        index: position of the block in the encoder (0 = closest to the patches).
        num_heads / head_dim: attention heads; ``width = num_heads * head_dim``.
        q, k, v: the three input projections; head ``h`` owns rows
            ``h * head_dim : (h + 1) * head_dim`` of each.
        fc1: the first MLP linear, weight [hidden, W].
        norms: the block's normalisation layers (pre-attention, pre-MLP, any extra).
        module: the block itself (for hooks; do not rely on its attribute names).
    """

    index: int
    num_heads: int
    head_dim: int
    q: ProjectionRows
    k: ProjectionRows
    v: ProjectionRows
    fc1: nn.Linear
    norms: tuple[nn.Module, ...]
    module: nn.Module

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def qkv(self) -> tuple[ProjectionRows, ProjectionRows, ProjectionRows]:
        return (self.q, self.k, self.v)

    def head_rows(self, head: int) -> slice:
        """Rows of ``head`` inside each of q, k and v (relative to :attr:`ProjectionRows.rows`)."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range for a block of {self.num_heads} heads")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def qkv_rows(self, heads: list[int] | tuple[int, ...]) -> Tensor:
        """Stacked ``[q; k; v]`` row indices of ``heads`` (see :class:`QKVRowUpdate`), sorted.

        Returns [3 * len(heads) * head_dim] int64 on the block's device.
        """
        device = self.q.weight.device
        starts = [self.head_rows(h).start for h in sorted(heads)]  # validates the head indices
        offsets = [j * self.width + start for j in range(3) for start in starts]
        base = torch.arange(self.head_dim, device=device)
        return torch.cat([o + base for o in offsets]) if offsets else base[:0]

    def add_qkv_update(self, update: QKVRowUpdate) -> UpdateHandle:
        r"""Add ``update(x)`` to the chosen rows of this block's q/k/v projection outputs.

        Works on the activations (``qkv[..., rows] += update(x)``), so no dense ``[3W, W]``
        weight or weight gradient is formed. Fused ``nn.MultiheadAttention``: its forward is
        replaced by an equivalent self-attention that adds the update; separate q/k/v
        ``nn.Linear``\ s, or one fused ``[3W, W]`` ``nn.Linear`` (timm's ``qkv``): forward hooks
        add each projection's share of the rows (``update`` runs once per input). One update per
        block at a time; ``handle.remove()`` restores the block.
        """
        owner, _ = parameter_owner(self.module, self.q.weight)
        if self.q.weight is self.k.weight is self.v.weight and not isinstance(owner, nn.Linear):
            attn = owner
            stacked = [(p.rows.start or 0, p.rows.stop) for p in self.qkv]
            if not isinstance(attn, nn.MultiheadAttention) or stacked != [(j * self.width, (j + 1) * self.width)
                                                                         for j in range(3)]:
                raise TypeError(f"block {self.index}: a fused q/k/v update needs an nn.MultiheadAttention "
                                f"with rows q, k, v in order, got {type(attn).__name__}")
            if "forward" in vars(attn):
                raise RuntimeError(f"block {self.index} already has a q/k/v update")
            attn.forward = functools.partial(_fused_self_attention, attn, update)
            return UpdateHandle(lambda: vars(attn).pop("forward", None))
        return self._add_separate_qkv_update(update)

    def _add_separate_qkv_update(self, update: QKVRowUpdate) -> UpdateHandle:
        cache: dict[str, Tensor] = {}  # the update of the current input, shared by q, k and v

        def make_hook(target: Tensor, picked: Tensor):
            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
                x = inputs[0]
                if cache.get("x") is not x:
                    cache["x"], cache["out"] = x, update(x)
                return output.index_add(-1, target, cache["out"][..., picked].to(output.dtype))

            return hook

        handles = []
        for j, proj in enumerate(self.qkv):
            linear, name = parameter_owner(self.module, proj.weight)
            if not isinstance(linear, nn.Linear) or name != "weight":
                raise TypeError(f"block {self.index}: hooked q/k/v updates need nn.Linear projections, "
                                f"got {type(linear).__name__}.{name}")
            picked = ((update.rows >= j * self.width) & (update.rows < (j + 1) * self.width)).nonzero().squeeze(1)
            if len(picked):
                target = update.rows[picked] - j * self.width + (proj.rows.start or 0)
                handles.append(linear.register_forward_hook(make_hook(target, picked)))
        handles.append(self.module.register_forward_hook(lambda *_: cache.clear()))
        return UpdateHandle(*(h.remove for h in handles))

    @torch.no_grad()
    def merge_qkv_rows(self, rows: Tensor, delta: Tensor) -> None:
        """Add ``delta`` [R, W] to the stacked q/k/v weight ``rows`` [R] in place (fused or separate)."""
        for j, proj in enumerate(self.qkv):
            picked = (rows >= j * self.width) & (rows < (j + 1) * self.width)
            if picked.any():
                target = rows[picked] - j * self.width + (proj.rows.start or 0)
                proj.weight.index_add_(0, target, delta[picked].to(proj.weight.dtype))


RELEASED_JITTER = (0.32, 0.32, 0.32, 0.08)  # brightness, contrast, saturation, hue of the released code
RELEASED_JITTER_P, RELEASED_GRAYSCALE_P = 0.8, 0.2


def with_colour_augment(train_tf: Callable) -> transforms.Compose:
    """``train_tf`` (a Compose of PIL steps, then ``ToTensor``) with the released LoRSU code's colour
    augmentation inserted before ``ToTensor``: colour jitter :data:`RELEASED_JITTER` with probability
    0.8, then grayscale (3 channels) with probability 0.2, both drawn from the torch RNG."""
    steps = list(getattr(train_tf, "transforms", ()))
    at = next((i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None)
    if at is None:
        raise ValueError(f"train.augment=released needs a training transform with a ToTensor step; got {train_tf!r}")
    colour = [transforms.RandomApply([transforms.ColorJitter(*RELEASED_JITTER)], p=RELEASED_JITTER_P),
              transforms.RandomGrayscale(p=RELEASED_GRAYSCALE_P)]
    return transforms.Compose(steps[:at] + colour + steps[at:])


class WeightsSource(NamedTuple):
    """Where a backbone's weights come from (``fscl run --dry-run`` reports it before any download)."""

    where: str  # in words: a local file or folder, a cache, a hub that needs internet, none (random weights)
    ready: bool  # False: loading them on this machine fails (missing file, hub unreachable)

    @classmethod
    def folder(cls, folder: Path, marker: str) -> WeightsSource:
        """A local folder, ready when it holds the file ``marker`` (e.g. ``config.json``)."""
        found = (folder / marker).is_file()
        return cls(f"local folder {folder}" + ("" if found else f" (no {marker} there)"), found)


class NoHiddenStatesError(FsclError, TypeError):
    """A VLM asked for the hidden states of an encoder whose layout no VLM reads (a ResNet, a timm trunk)."""


class Backbone(nn.Module, ABC):
    """An image–text model with a trainable vision side and a frozen text side.

    Subclasses implement the encoders for one model family. After construction every
    parameter is frozen; a strategy unfreezes (or adds) what it trains.
    """

    # False for a vision tower alone (a VLM's own tower): no zero-shot scoring and no CLIP loss; its text
    # side (encode_text, tokenize, logit_scale) raises an error that says so.
    has_text_tower: bool = True

    def __init__(self, spec: str, model: nn.Module, visual: nn.Module,
                 transforms: tuple[Callable, Callable]) -> None:
        """``transforms``: (training, evaluation) preprocessing, PIL image → tensor [3, H, W]."""
        super().__init__()
        self.spec = spec  # the load string, e.g. "openclip:ViT-B-16@openai"
        self.model = model
        self.visual = visual
        self._train_tf, self._eval_tf = transforms
        self.model.requires_grad_(False)
        # Modules a strategy adds for one session (e.g. low-rank adapters): registered here so that
        # the optimizer, built from this module's parameters, sees them; emptied on merge.
        self.adapters = nn.ModuleDict()

    @classmethod
    def check_spec(cls, rest: str) -> None:
        """Raise ValueError if ``rest`` (the load string after ``family:``) is malformed."""

    @classmethod
    def weights_source(cls, rest: str) -> WeightsSource | None:
        """Where the weights of ``rest`` would come from, found without loading or downloading them; None:
        the family does not say."""
        return None

    # -- encoders -----------------------------------------------------------------
    @abstractmethod
    def encode_image(self, images: Tensor) -> Tensor:
        """Image features, [B, D] (not normalised), from images [B, 3, H, W]."""

    @abstractmethod
    def encode_text(self, tokens: Tensor) -> Tensor:
        """Text features, [B, D] (not normalised), from token ids [B, L]."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [len(texts), L] for :meth:`encode_text`."""

    def hidden_states(self, images: Tensor, layer: int) -> Tensor:
        """The encoder's hidden states after its first ``layer`` blocks (transformers' ``hidden_states[layer]``:
        0 = the embeddings after any pre-norm; negative counts from the end, -1 = the last block's output), for the
        VLMs that read them (:mod:`benchmark.vlm`): [B, T, W], the class token first where the encoder has one;
        only the blocks up to ``layer`` run. Families whose encoder no VLM takes leave it unimplemented."""
        raise NoHiddenStatesError(f"'{self.spec}': no VLM reads this encoder's hidden states")

    def preprocess(self, train: bool, augment: Literal["released", "openclip"] = "openclip") -> Callable:
        """PIL image → tensor [3, H, W]; with ``train`` the training augmentations: open_clip's
        random resized crop (``openclip``), plus the released LoRSU code's colour jitter and
        random grayscale after it (``released``, :func:`with_colour_augment`)."""
        if not train:
            return self._eval_tf
        return self._train_tf if augment == "openclip" else with_colour_augment(self._train_tf)

    @property
    def logit_scale(self) -> Tensor:
        """The log of CLIP's temperature multiplier (scalar, frozen); ``model.logit_scale`` by default."""
        return self.model.logit_scale

    @abstractmethod
    def blocks(self) -> list[BlockView]:
        """The vision transformer's blocks, first to last."""

    # -- other parts strategies may train (families override when their layout differs) ----
    def image_projection(self) -> tuple[nn.Module, str] | None:
        """(module, attribute) of the final image projection weight, or None if there is none."""
        return None

    def norm_layers(self) -> list[nn.Module]:
        """Every normalisation layer of the vision encoder (blocks, pre/post norms), in order."""
        kinds = tuple(k for k in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if k is not None)
        return [m for m in self.visual.modules() if isinstance(m, kinds)]

    def bias_parameters(self) -> list[nn.Parameter]:
        """Every bias of the vision encoder's layers (linear, attention, norm), in order."""
        return [p for name, p in self.visual.named_parameters() if name.rsplit(".", 1)[-1].endswith("bias")]

    # -- shared behaviour ----------------------------------------------------------
    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """L2-normalised text features [len(texts), D] in eval mode, no gradient."""
        device = self.logit_scale.device
        was_training = self.model.training
        self.model.eval()
        feats = [
            self.encode_text(self.tokenize(texts[i : i + batch_size]).to(device))
            for i in range(0, len(texts), batch_size)
        ]
        self.model.train(was_training)
        return nn.functional.normalize(torch.cat(feats).float(), dim=-1)

    def visual_parameter_count(self) -> int:
        return sum(p.numel() for p in self.visual.parameters())
