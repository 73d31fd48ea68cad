"""``l2sp``: full fine-tuning of the vision encoder plus the L2-SP penalty (alpha / 2) · ‖θ − θ⁰‖².

L2-SP (Li, Grandvalet, Davoine, ICML 2018) pulls every weight θ toward its starting point θ⁰
instead of toward zero. Here θ⁰ is the encoder at the start of the stream, the pretrained
weights (``anchor: stream``), or at the start of each session (``anchor: session``).

This module, the package's ``fscl.plugins`` entry, declares the strategy and holds its options
without importing torch, so that ``fscl ls`` stays fast with the package installed; the strategy
itself (:mod:`fscl_l2sp.strategy`) is imported when a run first asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from benchmark.config import check
from benchmark.registry import STRATEGIES


@dataclass
class L2SPOptions:
    """Options of ``l2sp``."""

    alpha: float = field(default=0.01, metadata={"help": "weight α of the penalty (α / 2) · ‖θ − θ⁰‖²"})
    anchor: Literal["stream", "session"] = field(default="stream", metadata={
        "help": "θ⁰: the encoder at the start of the stream (L2-SP), or at the start of each session"})

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "l2sp.alpha", self.alpha, "a float >= 0")


STRATEGIES.declare("l2sp", "fscl_l2sp.strategy:L2SP", options="fscl_l2sp:L2SPOptions",
                   summary="L2-SP: every vision-encoder parameter + (alpha / 2) · ‖θ − θ⁰‖² toward the starting weights.")
