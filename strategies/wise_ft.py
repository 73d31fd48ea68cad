"""``wise-ft``: full fine-tuning, then after each session the encoder's weights interpolated with an anchor's
(Wortsman et al., CVPR 2022; ZSCL's ``--wise_merge``): θ ← α θ_ft + (1 − α) θ_anchor over the vision encoder's
parameters, α = ``alpha``.

``anchor: pretrained`` (default) interpolates with the pretrained encoder, as WiSE-FT does (a copy taken when
the strategy is built: the runner builds it on the freshly loaded backbone, before a resume restores trained
weights). ``anchor: previous`` interpolates with the encoder as the session started, which is what ZSCL's
``WiSE_finetune.sh`` runs (``--wise_ft_model n``: the loaded model, i.e. the previous step's result, α 0.8).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from benchmark.backbones import Backbone
from benchmark.plugins import StrategyPlugin, TrainingSession
from strategies.distill import FrozenEncoder
from strategies.options import WiSEFTOptions


@torch.no_grad()
def interpolate(params: Sequence[Tensor], anchors: Sequence[Tensor], alpha: float) -> None:
    """``params`` ← alpha · params + (1 − alpha) · ``anchors``, in place; alpha 1 and 0 give the endpoints bit for
    bit (signed zeros included), other values ``torch.lerp``'s rounding."""
    if alpha == 1:
        return
    for p, anchor in zip(params, anchors):
        if alpha == 0:
            p.copy_(anchor)
        else:
            p.lerp_(anchor.to(p.dtype), 1 - alpha)


class WiSEFT(StrategyPlugin[WiSEFTOptions]):
    """WiSE-FT: full fine-tuning, the encoder interpolated with an anchor after each session."""

    supports_ddp = True  # full fine-tuning, and an interpolation of weights that are the same on every rank

    def __init__(self, backbone: Backbone, options: WiSEFTOptions | None = None) -> None:
        super().__init__(backbone, options or WiSEFTOptions())
        self.pretrained = FrozenEncoder(backbone) if self.options.anchor == "pretrained" else None
        self.anchor: FrozenEncoder | None = None

    def setup(self, session: TrainingSession) -> None:
        self.anchor = self.pretrained or FrozenEncoder(self.backbone)
        self.backbone.visual.requires_grad_(True)

    def finish(self, session: TrainingSession) -> None:
        interpolate(list(self.backbone.visual.parameters()), self.anchor.parameters(), self.options.alpha)
        self.anchor = None
