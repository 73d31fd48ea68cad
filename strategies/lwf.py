"""``lwf``: Learning without Forgetting as ZSCL runs it (``mtil/scripts/lwf.sh``: its ZSCL method with the reference
data and the reference texts those of the dataset being trained, the reference model the previous step's).

Every vision-encoder parameter trains, and each step adds ``weight`` · D, D the distillation of
:func:`strategies.distill.distillation_terms` (temperature ``temperature``; image term, plus the transposed text
term with ``text_loss``) of the mini-batch's images, over the session's class texts in their first template, from
the encoder as the session started (a frozen copy taken at setup: the previous session's result, and in session 1
the pretrained encoder, as lwf.sh's first step, which names no ``--ref-model`` and so distils toward the zero-shot
model). The teacher is taken again at each session's setup, so a resume needs no state.
"""
from __future__ import annotations

from torch import Tensor

from benchmark.backbones import Backbone
from benchmark.plugins import StrategyPlugin, TrainingSession
from strategies.distill import FrozenEncoder, distillation_terms
from strategies.options import LwFOptions


class LwF(StrategyPlugin[LwFOptions]):
    """LwF: every vision parameter + distillation toward the encoder at the session's start."""

    def __init__(self, backbone: Backbone, options: LwFOptions | None = None) -> None:
        super().__init__(backbone, options or LwFOptions())
        self.session: TrainingSession | None = None
        self.teacher: FrozenEncoder | None = None
        self.texts: Tensor | None = None  # the session's class text features [C_s, D]

    def setup(self, session: TrainingSession) -> None:
        self.session, self.teacher = session, FrozenEncoder(self.backbone)
        self.texts = session.session_text_features()
        self.backbone.visual.requires_grad_(True)

    def penalty(self) -> Tensor:
        """``weight`` · the distillation of the mini-batch's logits toward the teacher's (scalar)."""
        images, features = self.session.training_batch()
        teacher = self.teacher.encode(self.session.encode_images, images)
        opts = self.options
        return opts.weight * distillation_terms(teacher, features, self.texts, self.backbone.logit_scale,
                                                opts.temperature, opts.text_loss)

    def finish(self, session: TrainingSession) -> None:
        self.session = self.teacher = self.texts = None  # the copy's memory back
