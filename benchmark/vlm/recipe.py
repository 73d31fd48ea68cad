"""The VLM-loss strategies' shared options: the VLM template's optimizer settings (the released LoRSU-Ppl
trainer's) and the blocks the VLM never reads. Kept light (no torch), as every options dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from benchmark.config import check

R = TypeVar("R", bound="VLMRecipe")


@dataclass
class VLMRecipe:
    """Options of every strategy that trains through the VLM's answer loss (``objective = "vlm"``; the ``*-ppl``
    strategies inherit them): AdamW, its warm-up, the optimizer state across sessions, augmentation, and the
    encoder blocks left alone because the VLM never reads them."""

    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay of every trainable parameter but biases and norms (the released command line's "
                "0.01)"})
    warmup: Literal["epoch", "steps"] = field(default="epoch", metadata={
        "help": "linear warm-up from train.min_lr to train.lr over the first epoch (the released Ppl trainer), or "
                "over train.warmup_steps"})
    carry_optimizer_state: bool = field(default=False, metadata={
        "help": "start each session's AdamW from the state the previous session ended with, by position (the "
                "released code's quirk)"})
    train_augment: bool = field(default=False, metadata={
        "help": "false: train on the evaluation transform, no augmentation (the released Ppl trainer); "
                "true: train.augment, as the CLIP path"})
    skip_last_blocks: int | None = field(default=None, metadata={
        "help": "leave the last N blocks untouched (not scored, not trained); null: the blocks past the VLM's "
                "feature layer, which its answer loss never reaches (its family says; LLaVA-1.5 reads the input of "
                "the last block: 1)"})

    def _check_recipe(self) -> None:
        check(self.weight_decay >= 0, f"{getattr(self, 'section', 'vlm')}.weight_decay", self.weight_decay, "a float >= 0")


def default_skip(vqa_model: str | None) -> int:
    """What ``skip_last_blocks: null`` becomes with the VLM of ``vqa_model``: the blocks it never reads
    (:meth:`~benchmark.vlm.base.VLMFamily.unread_blocks`), 0 without a VLM (whose absence the grid check reports).
    Reads the VLM's config, loads no weights."""
    from benchmark.vlm.spec import resolve_vlm

    return resolve_vlm(vqa_model).unread_blocks() if vqa_model else 0


def with_vlm_defaults(options: R, vqa_model: str | None) -> R:
    """``options`` (a strategy's; unchanged unless a :class:`VLMRecipe`) with ``skip_last_blocks: null`` made
    :func:`default_skip`."""
    if not isinstance(options, VLMRecipe) or options.skip_last_blocks is not None:
        return options
    return replace(options, skip_last_blocks=default_skip(vqa_model))
