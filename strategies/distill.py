"""What ``lwf``, ``wise-ft`` and ``zscl`` share: frozen copies of the vision encoder's weights, run through the
backbone's own forward, and ZSCL's logit distillation (``mtil/src/models/helpers.py``: ``distillation``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from benchmark.backbones import Backbone


def distillation(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """ZSCL's distillation of logits [N, K] at temperature T, in its KL form: KL(softmax(t / T) ‖ softmax(s / T)) · T²,
    the mean over the N rows (scalar). ZSCL computes CE(s / T, softmax(t / T)) · T², which is this plus the
    teacher's entropy, a constant of the student: the same gradients, and here exactly zero when the student's
    logits equal the teacher's."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature**2


class _Encoding(nn.Module):
    """``encode(images)`` as a module whose parameters are the backbone's (what :func:`functional_call` swaps)."""

    def __init__(self, backbone: Backbone, encode: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.encode = encode

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)


class FrozenEncoder:
    """A copy of ``backbone.visual``'s weights (parameters and buffers) taken now, detached: a teacher or an
    anchor. Its forward runs the backbone's own (whatever the family) with these weights swapped in for the call."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.state = {name: t.detach().clone() for name, t in backbone.visual.state_dict().items()}

    def parameters(self) -> list[Tensor]:
        """The copied parameters (detached), in ``backbone.visual.named_parameters()`` order."""
        return [self.state[name].detach() for name, _ in self.backbone.visual.named_parameters()]

    @torch.no_grad()
    def encode(self, encode: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        """``encode(images)`` (e.g. the session's ``encode_images``: its precision) with these weights: features
        [B, D], no gradient. The call swaps module attributes, never tensors in place, so the current weights and
        any graph built on them are untouched. (``tie_weights=False``: open_clip's encoder is both ``visual`` and
        ``model.visual``; swapping it under both names would restore the copy, not the weights.) Each copied
        parameter carries the ``requires_grad`` flag of the weight it stands in for (no graph is built under
        ``no_grad``): torch picks some CPU kernels by that flag, so equal weights give bit-equal features."""
        for name, live in self.backbone.visual.named_parameters():
            self.state[name].requires_grad_(live.requires_grad)
        swapped = {f"backbone.visual.{name}": t for name, t in self.state.items()}
        return functional_call(_Encoding(self.backbone, encode), swapped, (images,), tie_weights=False)


def distillation_terms(teacher_images: Tensor, student_images: Tensor, texts: Tensor, logit_scale: Tensor,
                       temperature: float, text_loss: bool) -> Tensor:
    """ZSCL's ``image_loss`` (+ ``text_loss``): the distillation of the student's image-to-text logits toward the
    teacher's, and with ``text_loss`` of the transposed (text-to-image) logits.

    Args:
        teacher_images: the teacher's image features [B, D] (not normalised; no gradient).
        student_images: the student's features of the same images [B, D] (not normalised; with gradient).
        texts: normalised text features [K, D] (the frozen text tower's: the same for teacher and student).
        logit_scale: the log temperature multiplier (scalar, frozen).
    Returns: a scalar, zero when the student's features equal the teacher's.
    """
    scale = logit_scale.exp()
    teacher = scale * F.normalize(teacher_images.float(), dim=-1) @ texts.T
    student = scale * F.normalize(student_images.float(), dim=-1) @ texts.T
    loss = distillation(teacher, student, temperature)
    if text_loss:
        loss = loss + distillation(teacher.T, student.T, temperature)
    return loss
