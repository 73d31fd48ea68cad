"""``zscl``: Zero-Shot Continual Learning (Zheng et al., ICCV 2023; ``Thunderbeee/ZSCL``, ``mtil/scripts/ZSCL.sh``).

Every vision-encoder parameter trains; each step adds

* ``weight`` · D: the distillation (:func:`strategies.distill.distillation_terms`, temperature ``temperature``; the
  image term, plus the transposed text term with ``text_loss``) of ``reference_batch`` reference images, drawn
  per step, over the reference captions, from the pretrained encoder (ZSCL's reference model without
  ``--ref-model``: the zero-shot one; a copy taken when the strategy is built, before a resume restores weights);
* ``l2`` · Σ_i (θ_i − θ_start,i)², θ_start the encoder as the session started (ZSCL's ``--l2``);

and with ``avg_freq`` the session's result is the weight ensemble (ZSCL's ``--we``): the running mean of the
encoder's weights, starting from θ_start, into which the weights after step 1, 1 + avg_freq, 1 + 2·avg_freq, …
are folded (ZSCL's 0-based ``iteration % avg_freq == 0``).

Reference data: ``reference_images`` (every image file under the folder, sorted by path, loaded per draw with the
evaluation preprocessing, as ZSCL's reference loader) and ``reference_captions`` (one caption a line), or
``reference: mini``: :data:`MINI_REFERENCE` clean renders of the mini world's pretraining distribution and their
captions (a draw pretraining never made). The draws come from a generator of the session's own
(:func:`strategies.seeding.session_generator`), so a resume needs no state.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from benchmark.backbones import Backbone
from benchmark.config import ConfigError
from benchmark.plugins import StrategyPlugin, TrainingSession
from strategies.distill import FrozenEncoder, distillation_terms
from strategies.options import ZSCLOptions
from strategies.seeding import session_generator
from streams.base import open_image
from streams.files import IMAGE_EXTENSIONS, hidden_part

MINI_REFERENCE = 256  # reference renders of the mini world (one pretraining batch)
MINI_REFERENCE_SEED = 2**20  # the draw of the pretraining corpus they come from: a seed no mini build uses


class ReferenceData:
    """ZSCL's reference set: images, loaded per draw and preprocessed, and captions (unpaired)."""

    def __init__(self, images: Sequence[Callable[[], Image.Image]], captions: list[str],
                 transform: Callable[[Image.Image], Tensor]) -> None:
        self.images, self.captions, self.transform = images, captions, transform

    @classmethod
    def of(cls, options: ZSCLOptions, transform: Callable[[Image.Image], Tensor]) -> ReferenceData:
        """The reference set ``options`` name (:class:`ConfigError` for a folder without images or a file without
        captions)."""
        if options.reference == "mini":
            from streams.mini.pretrain import corpus_batch
            from streams.mini.world import world

            renders, captions = corpus_batch(world(), MINI_REFERENCE_SEED, 0, MINI_REFERENCE)
            return cls([lambda a=a: Image.fromarray(a) for a in renders], captions, transform)
        folder = Path(options.reference_images)
        paths = sorted(p for p in folder.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not hidden_part(p, folder))
        if not paths:
            raise ConfigError(f"zscl.reference_images: no image files ({'/'.join(IMAGE_EXTENSIONS)}) under {folder}")
        captions = [line.strip() for line in Path(options.reference_captions).read_text().splitlines()]
        captions = [c for c in captions if c]
        if not captions:
            raise ConfigError(f"zscl.reference_captions: no caption in {options.reference_captions}")
        return cls([lambda p=p: open_image(p) for p in paths], captions, transform)

    def draw(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` distinct images (all of them when fewer), a seeded draw: [count, 3, H, W]."""
        chosen = torch.randperm(len(self.images), generator=generator)[:count]
        return torch.stack([self.transform(self.images[int(i)]()) for i in chosen])


class ZSCL(StrategyPlugin[ZSCLOptions]):
    """ZSCL: full fine-tuning + reference distillation toward the pretrained encoder + l2 + weight ensemble."""

    def __init__(self, backbone: Backbone, options: ZSCLOptions) -> None:
        super().__init__(backbone, options)
        self.pretrained = FrozenEncoder(backbone)
        self.reference = ReferenceData.of(options, backbone.preprocess(False))
        self.texts: Tensor | None = None  # the reference captions' features [M, D], encoded once
        self.session: TrainingSession | None = None
        self.start: list[Tensor] = []  # θ_start: the encoder's parameters as the session started (detached copies)
        self.generator: torch.Generator | None = None
        self.mean: list[Tensor] = []  # the weight ensemble's running mean, per parameter
        self.folded = 0  # models in the mean
        self.step = 0  # steps of this session so far

    def setup(self, session: TrainingSession) -> None:
        if self.texts is None:
            self.texts = self.backbone.text_features(self.reference.captions)
        self.session = session
        self.start = [p.detach().clone() for p in self.backbone.visual.parameters()]
        self.generator = session_generator(session.seed, session.session_index, "zscl-reference")
        self.mean = [t.clone() for t in self.start] if self.options.avg_freq is not None else []
        self.folded, self.step = 1, 0
        self.backbone.visual.requires_grad_(True)

    def penalty(self) -> Tensor:
        """``weight`` · the reference distillation + ``l2`` · the squared distance to θ_start (scalar)."""
        opts = self.options
        images = self.reference.draw(opts.reference_batch, self.generator).to(self.texts.device)
        teacher = self.pretrained.encode(self.session.encode_images, images)
        student = self.session.encode_images(images)
        loss = opts.weight * distillation_terms(teacher, student, self.texts, self.backbone.logit_scale,
                                                opts.temperature, opts.text_loss)
        if opts.l2 > 0:
            params = self.backbone.visual.parameters()
            loss = loss + opts.l2 * sum((p.float() - a.float()).square().sum()
                                        for p, a in zip(params, self.start))
        return loss

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs) -> None:
        """After the optimizer step: fold the weights into the ensemble at steps 1, 1 + avg_freq, …
        (ZSCL's ``merge_we``: mean ← (mean · n + θ) / (n + 1))."""
        if self.options.avg_freq is not None and self.step % self.options.avg_freq == 0:
            for mean, p in zip(self.mean, self.backbone.visual.parameters()):
                mean.mul_(self.folded).add_(p).div_(self.folded + 1)
            self.folded += 1
        self.step += 1

    @torch.no_grad()
    def finish(self, session: TrainingSession) -> None:
        if self.options.avg_freq is not None:
            for mean, p in zip(self.mean, self.backbone.visual.parameters()):
                p.copy_(mean)
        self.session = self.generator = None
        self.start, self.mean = [], []
