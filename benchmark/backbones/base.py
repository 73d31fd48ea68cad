"""The uniform model interface every strategy talks to: :class:`Backbone` and :class:`BlockView`.

Strategies never reach into module paths. Whatever a model's attention looks like — one
fused ``[3W, W]`` input projection (open_clip's ``nn.MultiheadAttention``) or separate
``q_proj``/``k_proj``/``v_proj`` linears (timm EVA, HF CLIP/SigLIP) — a block is seen as
three :class:`ProjectionRows` (q, k, v), its first MLP layer and its norms.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ProjectionRows:
    """One of a block's q/k/v projections: ``rows`` of ``weight`` [out, W] (and of ``bias``).

    For a fused projection the three views share one parameter and differ in ``rows``; for
    separate projections each view owns a whole parameter (``rows`` = all of it).
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


class Backbone(nn.Module, ABC):
    """An image–text model with a trainable vision side and a frozen text side.

    Subclasses implement the encoders for one model family. After construction every
    parameter is frozen; a strategy unfreezes (or adds) what it trains.
    """

    def __init__(self, spec: str, model: nn.Module, visual: nn.Module) -> None:
        super().__init__()
        self.spec = spec  # the load string, e.g. "openclip:ViT-B-16@openai"
        self.model = model
        self.visual = visual
        self.model.requires_grad_(False)

    @classmethod
    def check_spec(cls, rest: str) -> None:
        """Raise ValueError if ``rest`` (the load string after ``family:``) is malformed."""

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

    @abstractmethod
    def preprocess(self, train: bool) -> Callable:
        """PIL image → tensor [3, H, W]; with ``train`` the training augmentations."""

    @property
    @abstractmethod
    def logit_scale(self) -> Tensor:
        """The log of CLIP's temperature multiplier (scalar, frozen)."""

    @abstractmethod
    def blocks(self) -> list[BlockView]:
        """The vision transformer's blocks, first to last."""

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
