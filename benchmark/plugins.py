"""The base class of every strategy: an Avalanche plugin on :class:`benchmark.template.CLIPTemplate`."""
from __future__ import annotations

from typing import Any, ClassVar

from avalanche.core import SupervisedPlugin

from benchmark.backbones import Backbone


class StrategyPlugin(SupervisedPlugin):
    """A continual-learning method as a plugin on the CLIP template.

    Subclasses choose (or add) trainable parameters in ``before_training_exp``, may change
    gradients in ``after_backward`` and merge or consolidate in ``after_training_exp``.
    ``options`` is the strategy's validated options dataclass (or None).
    """

    trains: ClassVar[bool] = True  # False: the runner never calls training (e.g. zero-shot)

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters now: ``trainable`` (what is really updated, masks counted) and
        ``trainable_with_biases`` (plus dense biases). Default: all ``requires_grad`` entries."""
        n = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        return {"trainable": n, "trainable_with_biases": n}
