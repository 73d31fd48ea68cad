"""The VLM training template: the CLIP template's session loop with the VLM's next-token loss on the answer.

For the strategies whose objective is ``vlm`` (``lorsu-ppl``, ``lora-ppl``, the LoRSU paper's "Ppl" methods; and the
VLM-side baselines ``lora-llm``, ``lora-llm-last``, ``lora-vlm``).
Everything of :class:`benchmark.template.CLIPTemplate` stays (Avalanche's loop, the strategies' session
contract, evaluation, precision, checkpoints, resume, the cost meter); what changes:

* the loss: a training batch ``(images, labels)`` becomes a question about each image and its class's
  answer (:class:`benchmark.vqa.pairs.AnswerPairs`), and the loss is the VLM's mean next-token
  cross-entropy over the answer tokens and the end of sequence, with the tokens the run's encoder gives
  (:meth:`benchmark.vlm.base.VLMFamily.encoder_tokens`) in place of its tower's
  (:meth:`benchmark.vlm.base.LoadedVLM.answer_loss`). :meth:`training_loss` is that loss, so the shared
  importance pass, EWC's Fisher and the cost meter use it unchanged. The VLM is frozen and outside the
  backbone; only a VLM-side strategy (``updates`` holding ``vlm``: ``lora-llm``, ...) makes some of its own
  parameters (adapters) trainable, and the optimizer then holds those too. The template talks to it only through
  the VLM protocol;
* the optimizer and schedule (the released LoRSU-Ppl trainer): AdamW (betas 0.9/0.999) with weight decay on
  every trainable parameter except biases and normalisation weights, a linear warm-up from ``train.min_lr``
  to ``train.lr`` over the first epoch (or ``train.warmup_steps``), then a cosine of the step count over the
  whole session down to ``train.min_lr``, stepped every step;
* optionally (the released code's quirk, off by default) each session's optimizer starts from the state
  the previous session's ended with, matched by position, as ``torch.optim.Optimizer.load_state_dict`` does.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.template import CLIPTemplate
from benchmark.vlm.base import LoadedVLM
from benchmark.vlm.recipe import VLMRecipe
from benchmark.vqa.pairs import AnswerPairs

log = logging.getLogger(__name__)


def warmup_cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """The released LoRSU-Ppl schedule at ``step`` (0-based) of ``total``: linear from ``min_lr`` to ``lr`` over
    ``warmup`` steps, then ``min_lr + (lr − min_lr)·(1 + cos(π·step/total))/2`` (the cosine counts every step of
    the session, the warm-up's too, so it resumes below ``lr``)."""
    if step < warmup:
        return min_lr + (lr - min_lr) * step / warmup
    return min_lr + 0.5 * (1 + math.cos(math.pi * step / max(1, total))) * (lr - min_lr)


def decay_groups(*models: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters of ``models`` with weight decay and without it (biases, and every parameter of a
    norm layer), the rule of the released trainer (``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` minus
    ``bias``)."""
    decay, plain = [], []
    for model in models:
        norms = {id(p) for m in model.modules()
                 if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) for p in m.parameters()}
        for name, p in model.named_parameters():
            if p.requires_grad:
                (plain if "bias" in name or id(p) in norms else decay).append(p)
    return decay, plain


class VLMTemplate(CLIPTemplate):
    """Trains the backbone's vision encoder with the VLM's answer loss (see the module docstring).

    Args (besides :class:`CLIPTemplate`'s):
        vlm: the run's loaded VLM (frozen), on the template's device.
        pairs: the tokenized question/answer pair of every class of the target stream.
        recipe: the strategy's :class:`~benchmark.vlm.recipe.VLMRecipe`.
    """

    def __init__(self, *, vlm: LoadedVLM, pairs: AnswerPairs, recipe: VLMRecipe, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vlm = vlm  # frozen, unless a VLM-side strategy adapts its own modules (the optimizer then holds those)
        self.pairs = pairs
        self.recipe = recipe
        self._warmup = 0
        self._carried: dict[str, Any] | None = None  # the last session's optimizer state (carry_optimizer_state)
        autocast, weights = self._autocast_dtype(), vlm.dtype
        if autocast is not None and weights in (torch.float16, torch.bfloat16) and autocast != weights:
            log.warning("the VLM's weights are %s but train.precision autocasts to %s: the frozen language model's "
                        "residual stream then runs in float32 (about twice the activation memory); "
                        "train.precision: %s matches it (fp16: the released setting)", weights, autocast,
                        "fp16" if weights == torch.float16 else "bf16")

    # -- the loss ---------------------------------------------------------------------------------
    def training_loss(self, batch) -> Tensor:
        """The VLM's answer loss of ``batch`` (scalar), as training computes it, without strategy penalties."""
        batch = self._to_device(batch)
        return self.answer_loss(batch[0], batch[1])

    def answer_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token loss of the answers of ``labels`` [B] about ``images`` [B, 3, S, S] (fp32 scalar)."""
        with self._autocast():
            tokens = self.vlm.family.encoder_tokens(self.backbone, images)
            return self.vlm(tokens, self.pairs.batch(labels.cpu()).to(self.device))

    def forward(self) -> Tensor:
        """Training: the answer loss of the mini-batch; evaluation: its zero-shot logits [B, C]."""
        if not self.is_training:
            return super().forward()
        return self.answer_loss(self.mb_x, self.mb_y)

    def batch_loss(self) -> Tensor:
        return self.mb_output

    # -- optimizer and schedule -------------------------------------------------------------------
    def make_optimizer(self, **kwargs) -> None:
        """AdamW over the trainable parameters of the encoder and of the VLM (a VLM-side strategy's adapters; decay /
        no-decay groups, each split by the strategies' own learning rates, which the schedule scales as it scales
        ``train.lr``: ``lr_scale``) and this session's schedule."""
        decay, plain = decay_groups(self.model, self.vlm)
        if not decay and not plain:
            raise RuntimeError("the strategy left no trainable parameter; use the 'zeroshot' strategy instead")
        own = {id(p): lr for strategy in self.strategies for p, lr in strategy.learning_rates().items()}
        groups = []
        for params, weight_decay in ((decay, self.recipe.weight_decay), (plain, 0.0)):
            by_lr: dict[float, list[nn.Parameter]] = {}
            for p in params:  # a strategy's own learning rates (e.g. the projector's): groups of their own
                by_lr.setdefault(own.get(id(p), self.train_cfg.lr), []).append(p)
            groups += [{"params": ps, "weight_decay": weight_decay, "lr_scale": lr / self.train_cfg.lr}
                       for lr, ps in by_lr.items()]
        self.optimizer = torch.optim.AdamW(groups, lr=self.train_cfg.lr, betas=(0.9, 0.999))
        if self.recipe.carry_optimizer_state and self._carried is not None:
            self._load_carried(self._carried)
        self._total_steps = self.session_steps()
        self._warmup = len(self.dataloader) if self.recipe.warmup == "epoch" else self.train_cfg.warmup_steps
        self._step = 0

    def _load_carried(self, state: dict[str, Any]) -> None:
        """The previous session's optimizer state, by position (groups and shapes must match)."""
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.optimizer.param_groups]
        if shapes != state["shapes"]:
            raise RuntimeError("carry_optimizer_state: this session's trainable parameters do not match the "
                               f"previous session's by position and shape ({shapes} vs {state['shapes']})")
        self.optimizer.load_state_dict(state["optimizer"])

    def scheduled_lr(self) -> float:
        cfg = self.train_cfg
        return warmup_cosine_lr(self._step, self._total_steps, cfg.lr, cfg.min_lr, self._warmup)

    def _after_training_exp(self, **kwargs) -> None:
        if self.recipe.carry_optimizer_state:
            self._carried = {"optimizer": copy.deepcopy(self.optimizer.state_dict()),
                             "shapes": [[tuple(p.shape) for p in g["params"]] for g in self.optimizer.param_groups]}
        super()._after_training_exp(**kwargs)

    # -- checkpoints and costs --------------------------------------------------------------------
    def carried_state(self) -> dict:
        return {} if self._carried is None else {"optimizer": self._carried}

    def load_carried_state(self, state: dict) -> None:
        self._carried = state.get("optimizer")

    def flop_groups(self) -> dict[str, list[str]]:
        """``lm``: the VLM's language model and output head (frozen; its forward and the backward to its inputs)."""
        names = {id(m): n for n, m in self.vlm.named_modules()}  # the counter names them under the loaded VLM
        root = type(self.vlm).__name__
        return {"lm": [f"{root}.{names[id(m)]}" for m in self.vlm.language_modules()]}
