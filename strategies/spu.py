"""``spu``: Sparse Parameter Update (Zhang et al., CVPR 2024) on the vision encoder.

Defaults follow SPU's code (trainer/spu.py, config/baseline/spu.yaml): per session the
top-``sparsity`` entries of every fc1 weight by |score| train (per block) as sparse values; the
fc1 biases and the image projection train densely. (Its ``edit_layer: c_fc`` also matches the
text tower's MLPs; here the text side stays frozen.)

Scores: the gradient of the mean squared norm of the image–text logits, in training mode, over
the session's training batches. The code never zeroes ``.grad`` while it scores, so after batch b
it adds the running sum Σ_{j≤b} ∇L_j; it stops once the 0-based batch index exceeds
``importance_fraction`` · T (T batches in a pass) *and* every accumulated score of the parameters
it trains (fc1 weights, fc1 biases, projection) has magnitude ≥ 1e-12; never past one pass.
"""
from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.backbones import Backbone, BlockView
from benchmark.plugins import StrategyPlugin, session_gradients
from strategies.lorsu import masks
from strategies.lorsu.update import SparseEntries, attach, merge
from strategies.options import SPUOptions

SPU_MIN_ABS = 1e-12  # SPU's code keeps scoring while an accumulated |score| is below this


def output_norm(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Mean over images of the squared norm of their logits against the batch's captions (scalar)."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return logits.square().sum(1).mean()


def scored_batches(total: int, fraction: float, rule: Literal["released", "ceil"]) -> int:
    """Batches scored (at least, for ``released``) of a pass of ``total``: ``released``: ⌊fraction·total⌋ + 2
    (SPU's loop breaks once the 0-based index exceeds fraction·total); ``ceil``: ⌈fraction·total⌉, at least 1."""
    count = math.floor(fraction * total) + 2 if rule == "released" else max(1, math.ceil(fraction * total))
    return min(total, count)


def _fc1_biases(blocks: list[BlockView]) -> list[nn.Parameter]:
    return [b.fc1.bias for b in blocks if b.fc1.bias is not None]


def _projection(backbone: Backbone) -> list[nn.Parameter]:
    projection = backbone.image_projection()
    return [getattr(*projection)] if projection is not None else []


class SPU(StrategyPlugin[SPUOptions]):
    """SPU: sparse fc1 entries by score + dense fc1 biases (or all biases) + the image projection."""

    needs_blocks = True
    supports_ddp = True  # scores come from session_gradients (averaged over ranks per batch)

    def __init__(self, backbone: Backbone, options: SPUOptions | None = None) -> None:
        super().__init__(backbone, options or SPUOptions())
        self.fc1_index: list[Tensor] = []  # this session's flat fc1 indices, per block
        self._parametrized: list[nn.Module] = []

    def setup(self, session) -> None:
        blocks = self.backbone.blocks()
        self.fc1_index = [masks.top_entries(s, masks.mask_size(s.numel(), self.options.sparsity))
                          for s in self.score(session, blocks)]
        for block, index in zip(blocks, self.fc1_index):
            attach(block.fc1, "weight", SparseEntries(block.fc1.weight, index))
            self._parametrized.append(block.fc1)
        for p in self.trained_biases() + _projection(self.backbone):
            p.requires_grad_(True)

    def score(self, session, blocks: list[BlockView]) -> list[Tensor]:
        """Signed scores [hidden, W] of every block's fc1 weight (SPU ranks them by magnitude).

        The stop rule checks the scores of the fc1 weights, fc1 biases and image projection: SPU's
        code checks every parameter with ``requires_grad`` when it scores, which is what it trains
        (with its default ``train_biases``), text tower aside."""
        opts = self.options
        weights = [b.fc1.weight for b in blocks]
        logit_scale = self.backbone.logit_scale
        scores = session_gradients(
            session, weights + _fc1_biases(blocks) + _projection(self.backbone),
            (lambda batch: output_norm(*session.batch_features(batch), logit_scale))
            if opts.importance == "output_norm" else None,  # None: the CLIP loss, the session's training loss
            reduce="running" if opts.importance_sum == "running" else "sum",
            training=True,
            min_batches=scored_batches(len(session.session_batches()), opts.importance_fraction, opts.importance_stop),
            min_abs=SPU_MIN_ABS if opts.importance_stop == "released" else None,
        )
        return scores[: len(weights)]

    def trained_biases(self) -> list[nn.Parameter]:
        """The biases that train densely: fc1's, or every bias of the encoder (``train_biases: all``)."""
        blocks = self.backbone.blocks()
        return _fc1_biases(blocks) if self.options.train_biases == "fc1" else self.backbone.bias_parameters()

    def finish(self, session) -> None:
        for fc1 in self._parametrized:
            merge(fc1, "weight")
        self._parametrized = []

    def trainable_counts(self) -> dict[str, int]:
        """fc1 mask sizes + the projection; ``trainable_with_biases`` adds the biases that train."""
        masked = sum(len(i) for i in self.fc1_index) + sum(p.numel() for p in _projection(self.backbone))
        return {"trainable": masked, "trainable_with_biases": masked + sum(p.numel() for p in self.trained_biases())}
