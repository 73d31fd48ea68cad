"""The CLIP training template: Avalanche's SupervisedTemplate trained with the CLIP loss.

Only the vision encoder learns; the text side is frozen, so caption embeddings are computed
once (per class and template, or per distinct caption string) and cached. Strategies are
plugins on this template through the session contract of :mod:`benchmark.plugins`: it runs
their ``setup`` as Avalanche's model adaptation and builds the optimizer and schedule right
after them, adds their ``penalty`` to the loss, and runs their ``finish`` after the session.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from benchmark.backbones import Backbone
from benchmark.config import TrainConfig
from benchmark.distributed import all_reduce_mean, any_rank, batch_slice, eval_indices, gather_batch, world_size
from benchmark.evaluation import ZeroShotEvaluator, autocast_dtype
from benchmark.image_cache import loader_workers
from benchmark.plugins import Batch, StrategyPlugin, batch_captions


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


class SeededItems(Dataset):
    """A training dataset whose item ``i`` draws its augmentations from a torch generator seeded by
    (:attr:`epoch_seed`, ``i``), not from wherever it is loaded: the same images with any number of loader
    workers. :attr:`epoch_seed` is set in the main process before each epoch (the workers start after it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        generator = torch.default_generator  # the CPU generator torchvision's random transforms draw from
        state = generator.get_state()
        generator.manual_seed((self.epoch_seed + i * 0x9E3779B97F4A7C15) % 2**63)
        try:
            return self.dataset[i]
        finally:
            generator.set_state(state)


class CLIPTemplate(SupervisedTemplate):
    """Trains ``backbone``'s vision encoder on (image, caption) batches with :func:`clip_loss`.

    Implements :class:`benchmark.plugins.TrainingSession` for the strategies among its plugins.
    Captions: a training batch yields ``(images, labels)`` and each caption is the class name
    in one template drawn per sample (a seeded generator), or ``(images, labels, captions)``
    when the dataset provides its own caption strings. Evaluation is zero-shot classification
    against the current eval set's class embeddings, with the cross-entropy as its loss.

    Under ``ddp: true`` (a process group of W ranks) every rank loads the same global batch
    (same seed, so the same shuffling, augmentations and captions as one process), encodes
    its slice of it, and the features are gathered so the CLIP loss is the full-batch loss;
    gradients are averaged over the ranks before the strategies' ``after_backward`` and the
    optimizer step. Evaluation runs on disjoint strided shares of each eval set.

    Loading: ``train.num_workers`` loader workers; every training sample's augmentations come from its
    own generator (:class:`SeededItems`, one seed per epoch drawn from the torch RNG), so the numbers do
    not depend on the worker count. Evaluation batches come from the evaluator
    (:meth:`ZeroShotEvaluator.set_batches`), already on the device and normalised.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        class_names: tuple[str, ...],
        templates: tuple[str, ...],
        train: TrainConfig,
        captions: Callable[[int], list[str]] | None = None,
        zeroshot: ZeroShotEvaluator,
        seed: int,
        device: torch.device,
        plugins: list | None = None,
        evaluator=None,
    ) -> None:
        super().__init__(
            model=backbone,
            optimizer=None,  # one per session, by make_optimizer once the strategies chose the trainables
            criterion=torch.nn.CrossEntropyLoss(),  # evaluation's loss on the zero-shot logits
            train_mb_size=train.batch_size,
            train_epochs=train.epochs,
            eval_mb_size=train.eval_batch_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
        )
        self.backbone = backbone
        self.vlm = None  # the VLM template's loaded VLM (the session contract's ``vlm``)
        self.train_cfg = train
        self.zeroshot = zeroshot
        self.class_names = class_names
        # label -> its training captions, the same number for every label (default: its name in each template; a
        # sequence of datasets gives each label its own dataset's training template, streams.sequence)
        self.captions = captions or (lambda label: [t.format(class_names[label]) for t in templates])
        self.seed = seed  # the run's seed (the session contract's)
        self.caption_rng = torch.Generator().manual_seed(seed)
        self.strategies = [p for p in self.plugins if isinstance(p, StrategyPlugin)]
        self.setup_seconds = 0.0  # the strategies' setup (importance passes, masks) of the last session
        self.eval_class_embeddings: Tensor | None = None
        self._caption_cache: dict[str, Tensor] = {}
        self._class_text: Tensor | None = None  # [C, T, D]
        self._total_steps = 0
        self._step = 0
        # fp16 needs loss scaling (bf16's range does not): the released code's GradScaler
        self.grad_scaler = torch.amp.GradScaler(device.type) if self._autocast_dtype() == torch.float16 else None

    # -- the session contract (benchmark.plugins.TrainingSession) -----------------------------
    @property
    def session_index(self) -> int:
        """The session being trained, 1-based."""
        return self.experience.current_experience + 1

    def session_batches(self, ordered: bool = False) -> DataLoader:
        """This session's training batches: the training loader (``ordered=False``), or every sample
        once in dataset order with the last partial batch kept (``ordered=True``: the loader of
        Avalanche's ``EWCPlugin``, ``experience.dataset`` with its own transforms)."""
        if not ordered:
            return self.dataloader
        dataset = self.experience.dataset
        return DataLoader(dataset, batch_size=self.train_mb_size, collate_fn=getattr(dataset, "collate_fn", None))

    def training_loss(self, batch: Batch) -> Tensor:
        """The CLIP loss of ``batch`` (scalar), as training computes it, without strategy penalties."""
        image_features, text_features = self.batch_features(batch)
        return clip_loss(image_features, text_features, self.backbone.logit_scale)

    def batch_features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Image features [B, D] (fp32, not normalised; under ``ddp: true`` gathered, this rank's rows
        carrying the gradient) and caption features [B, D] (normalised) of ``batch``."""
        batch = self._to_device(batch)
        return self.encode_images(batch[0]).float(), self.caption_features(batch)

    def training_batch(self) -> tuple[Tensor, Tensor]:
        """The mini-batch being trained: its images [B, 3, H, W] on the device and its image features [B, D] from
        :meth:`forward` (fp32, not normalised, carrying the gradient); valid inside a strategy's ``penalty()``."""
        return self.mb_x, self.mb_output.float()

    def session_text_features(self) -> Tensor:
        """Normalised features [C_s, D] of this session's classes (the labels of its training set, sorted) in the
        first template."""
        classes = sorted(self.experience.dataset.targets.uniques)
        return self.class_text_features()[classes, 0]

    @contextmanager
    def preserved_rng(self) -> Iterator[None]:
        """Restore the torch generators (CPU, and this device's CUDA one) and the caption generator
        afterwards: an extra pass over the data (augmentations, captions) leaves training's draws as they were."""
        captions = self.caption_rng.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            try:
                yield
            finally:
                self.caption_rng.set_state(captions)

    # -- captions and images ------------------------------------------------------------------
    def class_text_features(self) -> Tensor:
        """Normalised features [C, T, D] of every class's T training captions (:attr:`captions`)."""
        if self._class_text is None:
            texts = [c for label in range(len(self.class_names)) for c in self.captions(label)]
            feats = self.backbone.text_features(texts)
            self._class_text = feats.view(len(self.class_names), -1, feats.shape[-1])
        return self._class_text

    def caption_features(self, batch: Batch) -> Tensor:
        """Text features [B, D] of ``batch``'s captions: its own caption strings, or per sample its class
        name in a template drawn from the caption generator."""
        captions = batch_captions(batch)
        if captions is not None:
            missing = [c for c in dict.fromkeys(captions) if c not in self._caption_cache]
            if missing:
                self._caption_cache.update(zip(missing, self.backbone.text_features(missing)))
            return torch.stack([self._caption_cache[c] for c in captions])
        labels = batch[1]
        bank = self.class_text_features()
        choice = torch.randint(bank.shape[1], (len(labels),), generator=self.caption_rng)
        return bank[labels.cpu(), choice].to(self.device)

    def encode_images(self, images: Tensor) -> Tensor:
        """Image features [B, D] of the whole batch ``images`` [B, 3, H, W], under the precision's autocast.

        Under ``ddp: true`` this rank encodes only its slice; the others' features arrive by
        :func:`benchmark.distributed.gather_batch` (this rank's rows carry the gradient).
        """
        with self._autocast():
            local = self.backbone.encode_image(images[batch_slice(len(images))])
        return gather_batch(local, len(images))

    def _to_device(self, batch: Batch) -> list:
        """The batch with its tensors on the device (caption strings stay as they are)."""
        return [m.to(self.device, non_blocking=True) if isinstance(m, Tensor) else m for m in batch]

    def _unpack_minibatch(self) -> None:
        self.mbatch = self._to_device(self.mbatch)

    # -- Avalanche hooks ------------------------------------------------------------------
    def check_model_and_optimizer(self, **kwargs) -> None:
        """Avalanche's model adaptation of a session: the strategies' ``setup`` (timed; the encoder is
        frozen before it), then the optimizer over what they left trainable."""
        start = time.perf_counter()
        for strategy in self.strategies:
            strategy.setup(self)
        self.setup_seconds = time.perf_counter() - start
        self.make_optimizer()

    def make_optimizer(self, **kwargs) -> None:
        """A new Adam (no weight decay) over the trainable parameters, and the schedule of this session.

        The schedule spans all steps of the session. With ``scheduler_step=epoch`` it only advances
        once per epoch (the released LoRSU code): epoch 0 runs at the warm-up start (min_lr) and the
        cosine barely decays over the few epochs.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the strategy left no trainable parameter; use the 'zeroshot' strategy instead")
        self.optimizer = torch.optim.Adam(params, lr=self.train_cfg.lr, weight_decay=0.0)
        self._total_steps = self.session_steps()
        self._step = 0

    def session_steps(self) -> int:
        """The optimizer steps of this session: ``epochs`` passes over the loader, or ``train.steps`` (the
        passes it needs, the last cut by :meth:`_after_training_iteration`); sets ``train_epochs`` (Avalanche's
        pass count) to those passes."""
        steps = self.train_cfg.steps
        self.train_epochs = self.train_cfg.epochs if steps is None else -(-steps // len(self.dataloader))
        return len(self.dataloader) * self.train_epochs if steps is None else steps

    def _after_training_exp(self, **kwargs) -> None:
        for strategy in self.strategies:
            strategy.finish(self)
        self.backbone.requires_grad_(False)
        super()._after_training_exp(**kwargs)

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
        if isinstance(self.dataloader, DataLoader):  # one task (no task-balanced loader): ours, seeded per sample
            n_batches = len(self.dataloader)
            self.dataloader = DataLoader(
                SeededItems(self.adapted_dataset), batch_size=self.train_mb_size, shuffle=kwargs.get("shuffle", True),
                drop_last=kwargs["drop_last"], pin_memory=self.device.type == "cuda",
                num_workers=loader_workers(self.train_cfg.num_workers, n_batches))
        if len(self.dataloader) == 0:
            raise ValueError(f"train.drop_last=true leaves no batch: the session has {len(self.adapted_dataset)} "
                             f"samples, fewer than train.batch_size={self.train_mb_size}; use drop_last=auto")
        if world_size() > 1 and not isinstance(self.dataloader, DataLoader):
            # Avalanche's task-balanced loader would give each rank other samples (DistributedSampler)
            raise RuntimeError("ddp: true needs every rank to load the same global batches; this stream's "
                               "experiences have task labels, which Avalanche splits across ranks")

    def _before_training_epoch(self, **kwargs) -> None:
        if isinstance(getattr(self.dataloader, "dataset", None), SeededItems):
            self.dataloader.dataset.epoch_seed = int(torch.randint(2**62, (1,)))
        super()._before_training_epoch(**kwargs)

    def make_eval_dataloader(self, **kwargs) -> None:
        """The evaluator's batches of the current eval set (under ``ddp: true`` this rank's strided share:
        Avalanche's DistributedSampler would pad with repeated samples)."""
        index = self.experience.current_experience
        share = eval_indices(len(self.zeroshot.sets[index].dataset)) if world_size() > 1 else None
        self.dataloader = self.zeroshot.set_batches(index, share)

    def scheduled_lr(self) -> float:
        """The learning rate of the coming training step (:func:`cosine_lr` over the session's steps)."""
        cfg = self.train_cfg
        step = self._step if cfg.scheduler_step == "step" else self.clock.train_exp_epochs
        return cosine_lr(step, self._total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)

    def _before_training_iteration(self, **kwargs) -> None:
        lr = self.scheduled_lr()
        for group in self.optimizer.param_groups:  # a group at a learning rate of its own: scaled alike
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self._step += 1
        super()._before_training_iteration(**kwargs)

    def _after_training_iteration(self, **kwargs) -> None:
        super()._after_training_iteration(**kwargs)
        if self._step >= self._total_steps:  # train.steps reached (epochs: the end of the last pass anyway)
            self.stop_training()

    def _before_eval_exp(self, **kwargs) -> None:
        super()._before_eval_exp(**kwargs)
        self.eval_class_embeddings = self.zeroshot.embeddings_for(self.experience.current_experience).to(self.device)

    def _autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``train.precision`` on this device (None: fp32, no autocast)."""
        return autocast_dtype(self.train_cfg.precision, self.device)

    def _autocast(self):
        dtype = self._autocast_dtype()
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def backward(self) -> None:
        """Backward of the (fp16: scaled) loss; strategies' ``after_backward`` see the scaled gradients."""
        loss = self.loss if self.grad_scaler is None else self.grad_scaler.scale(self.loss)
        loss.backward(retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        """Adam step (fp16: unscaled by the gradient scaler, skipped when a gradient is not finite)."""
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def forward(self) -> Tensor:
        """Training: the image features [B, D] of the mini-batch; evaluation: its zero-shot logits [B, C] (a set of
        own questions: each image's outside its item's options at −inf, :meth:`EvalSet.restrict`)."""
        if not self.is_training:
            eval_set = self.zeroshot.sets[self.experience.current_experience]
            return eval_set.restrict(self.zeroshot.logits(self.mb_x, self.eval_class_embeddings), self.mb_y)
        return self.encode_images(self.mb_x)

    def criterion(self) -> Tensor:
        """Training: the CLIP loss plus every strategy's penalty; evaluation: the cross-entropy."""
        if not self.is_training:
            return super().criterion()
        loss = self.batch_loss()
        for strategy in self.strategies:
            term = strategy.penalty()
            if term is not None:
                loss = loss + term
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) in epoch {self.clock.train_exp_epochs + 1}, "
                f"iteration {self.clock.train_epoch_iterations + 1}"
            )
        return loss

    def batch_loss(self) -> Tensor:
        """The training loss of the current mini-batch from :meth:`forward`'s output (no penalties)."""
        return clip_loss(self.mb_output.float(), self.caption_features(self.mbatch), self.backbone.logit_scale)

    # -- what a checkpoint and the cost meter read beyond the strategies' own state -------------
    def carried_state(self) -> dict:
        """State of the template that the next session depends on (saved in every checkpoint; none here)."""
        return {}

    def load_carried_state(self, state: dict) -> None:
        """Restore :meth:`carried_state` at a resume."""

    def flop_groups(self) -> dict[str, list[str]]:
        """Parts of a training step whose FLOPs the cost meter reports apart: name -> module names as
        ``torch.utils.flop_counter.FlopCounterMode`` keys them (none here)."""
        return {}
