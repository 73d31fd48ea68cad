"""``l2sp``: full fine-tuning of the vision encoder plus the L2-SP penalty (alpha / 2) · ‖θ − θ⁰‖².

L2-SP (Li, Grandvalet, Davoine, ICML 2018) pulls every weight θ toward its starting point θ⁰
instead of toward zero. Here θ⁰ is the encoder at the start of the stream, the pretrained
weights (``anchor: stream``), or at the start of each session (``anchor: session``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from benchmark.config import check
from benchmark.plugins import StrategyPlugin
from benchmark.registry import STRATEGIES


@dataclass
class L2SPOptions:
    """Options of ``l2sp``."""

    alpha: float = field(default=0.01, metadata={"help": "weight α of the penalty (α / 2) · ‖θ − θ⁰‖²"})
    anchor: Literal["stream", "session"] = field(default="stream", metadata={
        "help": "θ⁰: the encoder at the start of the stream (L2-SP), or at the start of each session"})

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "l2sp.alpha", self.alpha, "a float >= 0")


@STRATEGIES.register("l2sp", options=L2SPOptions)
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
