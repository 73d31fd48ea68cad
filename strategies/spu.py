"""``spu``: Sparse Parameter Update (Zhang et al., CVPR 2024) on the vision encoder.

Per session: fc1's top-``sparsity`` entries by |importance| (per block) train as sparse
values; every bias of the encoder and the image projection train densely. The reference
scores with the gradient of the mean squared norm of the image–text logits over the first
``importance_fraction`` of the session's batches (``importance: output_norm``);
``clip_loss`` scores with LoRSU's objective instead. Either way the score of an entry is the
signed sample-weighted mean gradient, ranked by magnitude.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from torch import Tensor
from torch.nn import functional as F

from benchmark.config import check
from benchmark.plugins import StrategyPlugin, session_gradients
from benchmark.registry import STRATEGIES
from benchmark.template import clip_loss
from strategies.lorsu import masks
from strategies.lorsu.update import SparseEntries, attach, merge


@dataclass
class SPUOptions:
    """Options of ``spu``."""

    sparsity: float = 0.1  # fraction of each fc1 weight that trains
    importance: Literal["output_norm", "clip_loss"] = "output_norm"
    importance_fraction: float = 0.25  # fraction of one pass's batches used for scoring

    def __post_init__(self) -> None:
        check(0 < self.sparsity <= 1, "spu.sparsity", self.sparsity, "a float in (0, 1]")
        check(0 < self.importance_fraction <= 1, "spu.importance_fraction", self.importance_fraction,
              "a float in (0, 1]")


def output_norm(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Mean over images of the squared norm of their logits against the batch's captions (scalar)."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return logits.square().sum(1).mean()


@STRATEGIES.register("spu", options=SPUOptions)
class SPU(StrategyPlugin):
    """SPU: sparse fc1 entries by importance + all biases + the image projection."""

    needs_blocks = True
    supports_ddp = True  # scores come from session_gradients (averaged over ranks per batch)

    def __init__(self, backbone, options: SPUOptions | None = None) -> None:
        super().__init__(backbone, options or SPUOptions())
        self.fc1_index: list[Tensor] = []  # this session's flat fc1 indices, per block
        self._parametrized: list = []

    def before_training_exp(self, strategy, **kwargs) -> None:
        start = time.perf_counter()
        opts: SPUOptions = self.options
        blocks = self.backbone.blocks()
        objective = output_norm if opts.importance == "output_norm" else clip_loss
        batches = max(1, math.ceil(opts.importance_fraction * len(strategy.dataloader)))
        scores = session_gradients(strategy, [b.fc1.weight for b in blocks], objective, max_batches=batches)
        self.fc1_index = [masks.top_entries(s, masks.mask_size(s.numel(), opts.sparsity)) for s in scores]
        for block, index in zip(blocks, self.fc1_index):
            attach(block.fc1, "weight", SparseEntries(block.fc1.weight, index))
            self._parametrized.append(block.fc1)
        for bias in self.backbone.bias_parameters():
            bias.requires_grad_(True)
        projection = self.backbone.image_projection()
        if projection is not None:
            getattr(*projection).requires_grad_(True)
        self.setup_seconds = time.perf_counter() - start

    def after_training_exp(self, strategy, **kwargs) -> None:
        for fc1 in self._parametrized:
            merge(fc1, "weight")
        self._parametrized = []
        self.backbone.requires_grad_(False)

    def trainable_counts(self) -> dict[str, int]:
        """fc1 mask sizes + the projection; ``trainable_with_biases`` adds every bias."""
        projection = self.backbone.image_projection()
        masked = sum(len(i) for i in self.fc1_index) + (getattr(*projection).numel() if projection else 0)
        return {"trainable": masked,
                "trainable_with_biases": masked + sum(p.numel() for p in self.backbone.bias_parameters())}
