"""The ``l2sp`` strategy, declared (with its options) in :mod:`fscl_l2sp`."""
from __future__ import annotations

from torch import Tensor

from benchmark.plugins import StrategyPlugin
from fscl_l2sp import L2SPOptions


class L2SP(StrategyPlugin[L2SPOptions]):
    """L2-SP: every vision-encoder parameter + (alpha / 2) · ‖θ − θ⁰‖² toward the starting weights."""

    supports_ddp = True  # the penalty depends on the weights only, which every rank shares

    def __init__(self, backbone, options: L2SPOptions | None = None) -> None:
        super().__init__(backbone, options or L2SPOptions())
        self.params = list(backbone.visual.parameters())
        self.start: list[Tensor] = []  # θ⁰, an fp32 copy of every parameter; empty until session 1

    def setup(self, session) -> None:
        if not self.start or self.options.anchor == "session":
            self.start = [p.detach().float().clone() for p in self.params]
        self.backbone.visual.requires_grad_(True)

    def penalty(self) -> Tensor:
        distance = sum((p.float() - p0).square().sum() for p, p0 in zip(self.params, self.start))
        return self.options.alpha / 2 * distance

    def state_dict(self) -> dict:
        """θ⁰, so that a resumed run keeps pulling toward the weights it started from."""
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = list(state["start"])
