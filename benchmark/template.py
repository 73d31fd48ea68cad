"""The CLIP training template: Avalanche's SupervisedTemplate trained with the CLIP loss.

Only the vision encoder learns; the text side is frozen, so caption embeddings are computed
once (per class and template, or per distinct caption string) and cached. Strategies are
Avalanche plugins on this template: in ``before_training_exp`` they choose (or add) the
trainable parameters, and the optimizer and schedule are built right after them.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from benchmark.backbones import Backbone
from benchmark.config import TrainConfig
from benchmark.distributed import all_reduce_mean, any_rank, batch_slice, eval_indices, gather_batch, world_size
from benchmark.evaluation import ZeroShotEvaluator


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric CLIP loss with in-batch negatives.

    Args:
        image_features: [B, D] (normalised here), pairs ``i`` match ``text_features[i]``.
        text_features: [B, D] (normalised here).
        logit_scale: log temperature multiplier (scalar).
    Returns: (CE(image→text) + CE(text→image)) / 2, a scalar.
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Learning rate at ``step`` (0-based) of ``total``: a linear warm-up from ``min_lr`` to ``lr``
    over ``warmup`` steps, then a cosine from ``lr`` down to ``min_lr`` at ``total``."""
    if step < warmup:
        return min_lr + (lr - min_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


class CLIPTemplate(SupervisedTemplate):
    """Trains ``backbone``'s vision encoder on (image, caption) batches with :func:`clip_loss`.

    Captions: a training batch yields ``(images, labels)`` and each caption is the class name
    in one template drawn per sample (a seeded generator), or ``(images, labels, captions)``
    when the dataset provides its own caption strings. In eval mode :meth:`forward` returns
    zero-shot logits [B, C] against the current eval set's class embeddings.

    Under ``ddp: true`` (a process group of W ranks) every rank loads the same global batch
    (same seed, so the same shuffling, augmentations and captions as one process), encodes
    its slice of it, and the features are gathered so the CLIP loss is the full-batch loss;
    gradients are averaged over the ranks before the strategies' ``after_backward`` and the
    optimizer step. Evaluation runs on disjoint strided shares of each eval set.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        class_names: tuple[str, ...],
        templates: tuple[str, ...],
        train: TrainConfig,
        zeroshot: ZeroShotEvaluator,
        seed: int,
        device: torch.device,
        plugins: list | None = None,
        evaluator=None,
    ) -> None:
        super().__init__(
            model=backbone,
            optimizer=None,  # built in _before_training_exp, once plugins chose the trainables
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=train.batch_size,
            train_epochs=train.epochs,
            eval_mb_size=train.eval_batch_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
        )
        self.backbone = backbone
        self.train_cfg = train
        self.zeroshot = zeroshot
        self.class_names, self.templates = class_names, templates
        self.caption_rng = torch.Generator().manual_seed(seed)
        self.eval_class_embeddings: Tensor | None = None
        self._caption_cache: dict[str, Tensor] = {}
        self._class_text: Tensor | None = None  # [C, T, D]
        self._total_steps = 0
        self._step = 0
        # fp16 needs loss scaling (bf16's range does not): the released code's GradScaler
        self.grad_scaler = torch.amp.GradScaler(device.type) if self._autocast_dtype() == torch.float16 else None

    # -- captions ------------------------------------------------------------------------
    def class_text_features(self) -> Tensor:
        """Normalised features [C, T, D] of every (class, template) caption."""
        if self._class_text is None:
            texts = [t.format(n) for n in self.class_names for t in self.templates]
            feats = self.backbone.text_features(texts)
            self._class_text = feats.view(len(self.class_names), len(self.templates), -1)
        return self._class_text

    def caption_features(self) -> Tensor:
        """Text features [B, D] of the current mini-batch's captions."""
        if len(self.mbatch) > 2 and isinstance(self.mbatch[2], (list, tuple)) and isinstance(self.mbatch[2][0], str):
            missing = [c for c in dict.fromkeys(self.mbatch[2]) if c not in self._caption_cache]
            if missing:
                self._caption_cache.update(zip(missing, self.backbone.text_features(missing)))
            return torch.stack([self._caption_cache[c] for c in self.mbatch[2]])
        bank = self.class_text_features()
        choice = torch.randint(len(self.templates), (len(self.mb_y),), generator=self.caption_rng)
        return bank[self.mb_y.cpu(), choice].to(self.device)

    # -- Avalanche hooks ------------------------------------------------------------------
    def encode_train_images(self) -> Tensor:
        """Image features [B, D] of the whole training mini-batch ``mb_x`` [B, 3, H, W].

        Under ``ddp: true`` this rank encodes only its slice; the others' features arrive by
        :func:`benchmark.distributed.gather_batch` (this rank's rows carry the gradient).
        """
        with self._autocast():
            local = self.backbone.encode_image(self.mb_x[batch_slice(len(self.mb_x))])
        return gather_batch(local, len(self.mb_x))

    def _after_backward(self, **kwargs) -> None:
        if world_size() > 1:
            self._average_gradients()
        super()._after_backward(**kwargs)

    def _average_gradients(self) -> None:
        """Mean of the ranks' gradients; a parameter without a gradient on every rank keeps none
        (as in one process, so Adam skips it)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        used = any_rank([p.grad is not None for p in params])
        for p, flag in zip(params, used):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean([p.grad for p, flag in zip(params, used) if flag])

    def drop_last(self) -> bool:
        """Whether this session's loader drops its last partial batch (``train.drop_last``; ``auto``:
        when the session holds more samples than one batch, the released loader's rule)."""
        rule = self.train_cfg.drop_last
        return len(self.adapted_dataset) > self.train_mb_size if rule == "auto" else rule

    def make_train_dataloader(self, **kwargs) -> None:
        kwargs["drop_last"] = self.drop_last()
        super().make_train_dataloader(**kwargs)
        if len(self.dataloader) == 0:
            raise ValueError(f"train.drop_last=true leaves no batch: the session has {len(self.adapted_dataset)} "
                             f"samples, fewer than train.batch_size={self.train_mb_size}; use drop_last=auto")
        if world_size() > 1 and not isinstance(self.dataloader, DataLoader):
            # Avalanche's task-balanced loader would give each rank other samples (DistributedSampler)
            raise RuntimeError("ddp: true needs every rank to load the same global batches; this stream's "
                               "experiences have task labels, which Avalanche splits across ranks")

    def make_eval_dataloader(self, **kwargs) -> None:
        super().make_eval_dataloader(**kwargs)
        if world_size() > 1:  # Avalanche's DistributedSampler would pad with repeated samples
            share = self.adapted_dataset.subset(eval_indices(len(self.adapted_dataset)))
            self.dataloader = DataLoader(share, batch_size=self.eval_mb_size, collate_fn=share.collate_fn,
                                         pin_memory=self.device.type == "cuda")

    def _unpack_minibatch(self) -> None:
        """Move the tensors of the mini-batch to the device; caption strings stay as they are."""
        self.mbatch = [m.to(self.device, non_blocking=True) if isinstance(m, Tensor) else m for m in self.mbatch]

    def make_optimizer(self, **kwargs) -> None:
        """No-op: the optimizer is built after the strategy plugins ran (see below)."""

    def _before_training_exp(self, **kwargs) -> None:
        super()._before_training_exp(**kwargs)  # plugins choose the trainable parameters here
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the strategy left no trainable parameter; use the 'zeroshot' strategy instead")
        self.optimizer = torch.optim.Adam(params, lr=self.train_cfg.lr, weight_decay=0.0)
        # The schedule always spans all steps of the session. With scheduler_step=epoch it only
        # advances once per epoch (the released LoRSU code): epoch 0 runs at the warm-up start
        # (min_lr) and the cosine barely decays over the few epochs.
        self._total_steps = len(self.dataloader) * self.train_epochs
        self._step = 0

    def _before_training_iteration(self, **kwargs) -> None:
        cfg = self.train_cfg
        step = self._step if cfg.scheduler_step == "step" else self.clock.train_exp_epochs
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(step, self._total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        self._step += 1
        super()._before_training_iteration(**kwargs)

    def _before_eval_exp(self, **kwargs) -> None:
        super()._before_eval_exp(**kwargs)
        self.eval_class_embeddings = self.zeroshot.embeddings_for(self.experience.current_experience).to(self.device)

    def _autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``train.precision`` on this device (None: fp32, no autocast)."""
        precision = self.train_cfg.precision
        if self.device.type == "cpu" and precision == "auto" or precision == "fp32":
            return None
        return torch.float16 if precision == "fp16" else torch.bfloat16

    def _autocast(self):
        dtype = self._autocast_dtype()
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def backward(self) -> None:
        """Backward of the (fp16: scaled) loss; strategies' ``after_backward`` see the scaled gradients."""
        (self.loss if self.grad_scaler is None else self.grad_scaler.scale(self.loss)).backward(retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        """Adam step (fp16: unscaled by the gradient scaler, skipped when a gradient is not finite)."""
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def forward(self) -> Tensor:
        if not self.is_training:
            return self.zeroshot.logits(self.mb_x, self.eval_class_embeddings)
        return self.encode_train_images()

    def criterion(self) -> Tensor:
        if not self.is_training:
            return F.cross_entropy(self.mb_output, self.mb_y)
        loss = clip_loss(self.mb_output.float(), self.caption_features(), self.backbone.logit_scale)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) in epoch {self.clock.train_exp_epochs + 1}, "
                f"iteration {self.clock.train_epoch_iterations + 1}"
            )
        return loss
