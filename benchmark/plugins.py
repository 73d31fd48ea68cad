"""The session contract between a training template and the strategies, the session-data gradient
pass that importance-based strategies share, and the cost meter.

A template (the CLIP template, :class:`benchmark.template.CLIPTemplate`, or the VLM one,
:class:`benchmark.vlm_template.VLMTemplate`, for a strategy whose ``objective`` is ``vlm``) trains one
session at a time and, around it, calls every :class:`StrategyPlugin`:

1. ``setup(session)``: the strategy chooses or adds its trainable parameters (the template
   times this and builds the optimizer over whatever then has ``requires_grad``);
2. training: Avalanche's loop, with the strategy's ``penalty()`` added to the loss and any
   Avalanche hook it overrides (e.g. ``after_backward`` to change gradients);
3. ``finish(session)``: the strategy merges or consolidates; the template then freezes the
   encoder again.

``session`` is the template seen through :class:`TrainingSession`: its data
(``session_batches``), its loss (``training_loss``) and its random generators
(``preserved_rng``). Strategies use nothing else of the template and never change its recipe.

A penalty that reads the mini-batch being trained (a distillation, :mod:`strategies.lwf`) keeps the session it
was given in ``setup`` and, inside ``penalty()``, calls ``session.training_batch()``: the batch's images on the
device and the image features the template's forward computed from them (the ones the training loss uses, with
their gradient), so the penalty costs no second forward of the student. ``session.encode_images`` encodes any
other images as training does (its precision; under ``ddp: true`` gathered), e.g. a teacher's forward under
:func:`torch.func.functional_call`, and ``session.session_text_features()`` gives the session's class captions.
"""
from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, get_args

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from benchmark.backbones import Backbone
from benchmark.config import ConfigError
from benchmark.distributed import all_reduce_mean, world_size

Batch = Sequence[Any]  # an Avalanche mini-batch: [images [B, 3, H, W], labels [B], (captions,) task labels]


def batch_captions(batch: Batch) -> Sequence[str] | None:
    """The batch's own caption strings [B] (a dataset with per-image captions), or None (class templates)."""
    captions = batch[2] if len(batch) > 2 else None
    return captions if isinstance(captions, (list, tuple)) and isinstance(captions[0], str) else None
OptionsT = TypeVar("OptionsT")  # a strategy's options dataclass


class TrainingSession(Protocol):
    """The session being trained, as a strategy sees it (every training template implements this)."""

    backbone: Backbone
    seed: int  # the run's seed: a strategy's own generators start from it (never from the global ones)

    @property
    def session_index(self) -> int:
        """The session being trained, 1-based."""

    def session_batches(self, ordered: bool = False) -> DataLoader:
        """This session's training data as batches (:data:`Batch`). ``ordered=False``: the training
        loader itself (shuffled, augmented, the training batch size and last-batch rule);
        ``ordered=True``: every sample once in dataset order, the last partial batch kept."""

    def training_loss(self, batch: Batch) -> Tensor:
        """The training loss (scalar, differentiable) of ``batch`` on the current weights, without
        strategy penalties; under ``ddp: true`` the same on every rank."""

    def preserved_rng(self) -> AbstractContextManager[None]:
        """A block after which every random generator of training is as it was before."""

    def encode_images(self, images: Tensor) -> Tensor:
        """Image features [B, D] (not normalised) of ``images`` [B, 3, H, W] as training encodes them: under the
        training precision's autocast, and under ``ddp: true`` this rank's slice encoded and the rest gathered."""

    def training_batch(self) -> tuple[Tensor, Tensor]:
        """Inside ``penalty()``: the mini-batch being trained, its images [B, 3, H, W] on the device and their image
        features [B, D] from the template's forward (fp32, not normalised, carrying the gradient)."""

    def session_text_features(self) -> Tensor:
        """Normalised text features [C_s, D] of this session's classes (sorted by label), each in the first
        template: the class texts a distillation's logits range over."""

    vlm: Any  # the run's loaded VLM (benchmark.vlm.base.LoadedVLM) under the VLM template; None under the CLIP one


class StrategyPlugin(SupervisedPlugin, Generic[OptionsT]):
    """A continual-learning method: a plugin on a training template (see the module docstring).

    Subclasses implement :meth:`setup` and, when they merge or consolidate, :meth:`finish`; a
    regulariser returns its term from :meth:`penalty`. ``options`` is the strategy's validated
    options dataclass (or None).

    State that outlives a session (and so must survive a resume) goes through
    :meth:`state_dict` / :meth:`load_state_dict`. ``supports_ddp`` declares that the strategy
    is correct under ``ddp: true``: every statistic it builds from data is the same on every
    rank (gradients are averaged by the template, :func:`session_gradients` averages its
    batch gradients; anything else must go through :func:`benchmark.distributed.all_reduce_mean`).
    """

    trains: ClassVar[bool] = True  # False: the runner never calls training (e.g. zero-shot)
    needs_blocks: ClassVar[bool] = False  # True: reads Backbone.blocks(); checked when the plugin is built
    supports_ddp: ClassVar[bool] = False  # True: safe under data-parallel training (see above)
    objective: ClassVar[Literal["clip", "vlm"]] = "clip"  # the loss it trains with: the CLIP template's, or the
    # VLM template's (LLaVA's answer loss, benchmark.vlm_template; the run needs vqa.model)
    updates: ClassVar[frozenset[str]] = frozenset({"encoder"})  # what it trains: the vision "encoder" and/or the
    # "vlm"'s own modules (projector, language model, head; in the process's loaded VLM, which the run's VQA scores)
    vlm_factors: ClassVar[tuple[str, ...] | None] = None  # a VLM update that is one peft LoRA adapter: the keys of
    # state_dict() that hold its factors, outermost first (fscl export --format vlm); None: it has none

    def __init__(self, backbone: Backbone, options: OptionsT | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.options: OptionsT = options
        if self.needs_blocks and not backbone.blocks():
            raise ConfigError(
                f"strategy {type(self).__name__} reaches the encoder through its transformer blocks, but backbone "
                f"'{backbone.spec}' exposes none; allowed: a backbone with block views (openclip ViTs, hf: CLIP)")

    @classmethod
    def check_vlm(cls, family: Any, options: OptionsT | None) -> None:
        """Refuse (:class:`~benchmark.config.ConfigError`) options that the run's VLM (its
        :class:`~benchmark.vlm.base.VLMFamily`; its config only, no weights) cannot take; called by the grid check
        for every strategy with ``vqa.model`` set. Default: nothing to check."""

    def setup(self, session: TrainingSession) -> None:
        """Before a session trains: choose or add the trainable parameters (``requires_grad``;
        adapters go into ``backbone.adapters``). Everything is frozen when this is called."""

    def finish(self, session: TrainingSession) -> None:
        """After a session trained: merge updates into the weights or consolidate (default: nothing).
        The template freezes the encoder afterwards."""

    def merge_into_vlm(self, model: nn.Module) -> bool:
        """Add the VLM update that :meth:`load_state_dict` restored to the weights of ``model`` (a fresh copy of the
        run's VLM's transformers model) and return True, for ``fscl export --format vlm --merge`` of an update that
        is no peft LoRA adapter (:attr:`vlm_factors`). Default: False, the strategy keeps no such update."""
        return False

    def learning_rates(self) -> dict[nn.Parameter, float]:
        """Trainable parameters at a learning rate of their own (e.g. the projector's LoRA at the released
        ``--mm_projector_lr``), which the schedule scales as it scales ``train.lr`` (the VLM template's optimizer).
        Default: none."""
        return {}

    def release(self) -> None:
        """After the run, finished or not: take out of shared objects what the strategy put there (a VLM-side
        strategy's adapters in the process's loaded VLM), so that the next run of the process finds them as
        loaded. Default: nothing."""

    def penalty(self) -> Tensor | None:
        """A term added to every training loss (scalar, differentiable), or None."""
        return None

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters now: ``trainable`` (what is really updated, masks counted) and
        ``trainable_with_biases`` (plus dense biases); optionally ``trainable_released``, the count
        under a reference implementation's own convention when it differs (the cost meter records
        ``trainable`` there otherwise). Default: all ``requires_grad`` entries."""
        n = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        return {"trainable": n, "trainable_with_biases": n}

    @property
    def supports_distributed(self) -> bool:
        """Avalanche's name for :attr:`supports_ddp` (it warns about plugins without it)."""
        return self.supports_ddp

    def state_dict(self) -> dict[str, Any]:
        """Cross-session state, saved in every session checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (at a resume, before the next session)."""


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers afterwards (e.g. BatchNorm statistics an extra forward pass updates)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


Reduce = Literal["mean", "sum", "running", "running_mean", "fisher"]


@contextmanager
def _model_mode(model: nn.Module, training: bool | None) -> Iterator[None]:
    """``model.train(training)`` inside (unless None); every submodule's own mode restored afterwards."""
    saved = [m.training for m in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield
    finally:
        for module, flag in zip(model.modules(), saved):
            module.training = flag


@torch.no_grad()
def _accumulate(totals: list[Tensor], running: list[Tensor], grads: list[Tensor], n: int, reduce: Reduce) -> None:
    """Add one batch's gradients (``n`` samples) to the totals S of :func:`session_gradients`."""
    for i, (total, grad) in enumerate(zip(totals, grads)):
        grad = grad.float()
        if reduce == "mean":
            total.add_(grad, alpha=n)
        elif reduce == "sum":
            total.add_(grad)
        elif reduce == "running":
            total.add_(running[i].add_(grad))
        elif reduce == "running_mean":
            total.add_(running[i].add_(grad), alpha=n)
        else:
            total.add_(grad.square())


def session_gradients(
    session: TrainingSession,
    params: Sequence[nn.Parameter],
    loss: Callable[[Batch], Tensor] | None = None,
    *,
    reduce: Reduce = "mean",
    batches: Iterable[Batch] | None = None,
    training: bool | None = None,
    min_samples: int | None = None,
    min_batches: int | None = None,
    min_abs: float | None = None,
) -> list[Tensor]:
    """Gradients of ``loss`` (default: the session's training loss) w.r.t. ``params`` over the session's
    data, batch by batch.

    ``batches``: by default the session's training loader (training shuffling, augmentations and
    batch size; the pass draws from the training's random generators, as the released codes'
    scoring passes do), or e.g. ``session.session_batches(ordered=True)``.
    ``training``: the model's mode during the pass (None: as it is). The model is left as it was:
    ``.grad`` fields are not touched; modes, ``requires_grad`` flags and buffers are restored. A
    parameter outside the loss's graph has gradient zero.

    With any of ``min_samples``, ``min_batches``, ``min_abs`` given, the pass stops after the first
    batch at which all the given ones hold: at least ``min_samples`` samples and ``min_batches``
    batches so far, every entry of every accumulated total S below (before any division) at
    |S| >= ``min_abs``. It never goes past one pass.

    Under ``ddp: true`` each batch's gradient is averaged over the ranks (each encodes its slice of
    the batch) before it is accumulated, so every rank holds the single-process totals, takes the
    same stop decision and returns the same result (every rank iterates the same batches).

    Returns one fp32 tensor per parameter, shaped like it; with g_b = ∇L_b of batch b (n_b samples),
    b = 1..K, N = Σ_b n_b:
    ``"mean"``: S / N with S = Σ_b n_b g_b (signed, sample-weighted: LoRSU's importance);
    ``"sum"``: S = Σ_b g_b;
    ``"running"``: S = Σ_b Σ_{j<=b} g_j = Σ_j (K - j + 1) g_j, what adding up ``.grad`` after every
    backward without zeroing it gives (SPU's code);
    ``"running_mean"``: (1/N) Σ_b n_b Σ_{j<=b} g_j, the mean of ``.grad`` never zeroed (LoRSU-Ppl's code);
    ``"fisher"``: S / K with S = Σ_b g_b² (Avalanche EWC's Fisher).
    """
    if reduce not in get_args(Reduce):
        raise ValueError(f"reduce must be one of {get_args(Reduce)}, not {reduce!r}")
    loss = loss or session.training_loss
    flags = [p.requires_grad for p in params]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    running = [torch.zeros_like(t) for t in totals] if reduce.startswith("running") else []
    samples = count = 0
    stops_early = min_samples is not None or min_batches is not None or min_abs is not None
    try:
        with preserved_buffers(session.backbone), _model_mode(session.backbone, training):
            for p in params:
                p.requires_grad_(True)
            for batch in session.session_batches() if batches is None else batches:
                grads = [torch.zeros_like(p) if g is None else g
                         for p, g in zip(params, torch.autograd.grad(loss(batch), params, allow_unused=True))]
                all_reduce_mean(grads)
                n = len(batch[0])
                _accumulate(totals, running, grads, n, reduce)
                samples, count = samples + n, count + 1
                if stops_early and samples >= (min_samples or 0) and count >= (min_batches or 0) and (
                        min_abs is None or all(bool(t.abs().min() >= min_abs) for t in totals)):
                    break
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if not count:
        raise RuntimeError("the session has no training data to score parameters with")
    norm = {"mean": samples, "running_mean": samples, "fisher": count}.get(reduce, 1)
    return [t.div_(norm) for t in totals]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def count_cpu_attention() -> None:
    """Give torch's FLOP counter the CPU attention kernel's formulas (torch's ``sdpa_flop`` and
    ``sdpa_backward_flop``, which it registers for the CUDA kernels only), so that
    ``scaled_dot_product_attention`` counts alike on every device; without them a CPU count leaves out every
    attention product. Idempotent; a torch that counts the kernel already keeps its own formula."""
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop)):
        flop_counter.flop_registry.setdefault(op, formula)


count_cpu_attention()


class CostMeter(SupervisedPlugin):
    """Measures what a session of a strategy costs, for the run record.

    At the first training iteration of each session (the strategy's adapters are in place
    then) it reads the strategy's trainable-parameter counts and counts the FLOPs of one
    forward + backward pass (``torch.utils.flop_counter``) of the training loss on that
    mini-batch: an extra pass whose gradients are discarded, with the random generators and the
    buffers restored, so training is unchanged; the template's :meth:`flop_groups` (e.g. the frozen
    language model of the VLM loss) are also reported apart, as ``<part>_flops_per_sample``. A later
    session whose trainable parameters (names and shapes) and batch shape are those of an earlier
    one reuses that count (the same graph, so the same FLOPs) instead of a pass. After the first
    optimizer step it reads the optimizer-state size; the template's setup time (importance,
    masks) comes with them.

    Two counts per sample, in FLOPs (``FlopCounterMode``'s: 2 per multiply-add):

    * ``flops_per_sample`` (ours): what a training step really computes. The CLIP loss's captions are
      encoded once by the frozen text tower and cached, so it holds no text-tower FLOPs;
    * ``paper_flops_per_sample`` (the paper's): everything the loss passes through. For the CLIP loss
      that adds ``text_flops_per_sample``, the text tower's forward on the batch's captions (counted
      once per caption batch shape, :func:`text_forward_flops`); for the VLM loss (tower, projector,
      language model) it equals ``flops_per_sample``.

    And per session ``train_flops`` / ``paper_train_flops``: those per-sample counts times the samples
    the session's steps processed (every step's batch over all epochs, a dropped partial batch not
    being one; under ``ddp: true`` the global batch). The strategies' set-up passes (importance scores)
    are not in them.
    """

    supports_distributed = True  # under ddp: true it counts one rank's share and scales it

    def __init__(self, strategy: StrategyPlugin) -> None:
        super().__init__()
        self.strategy = strategy
        self._costs: dict[str, Any] = {}
        self._flops: dict[tuple, dict[str, int]] = {}  # (trainables, batch shape) -> the FLOP counts of a pass
        self._text_flops: dict[tuple, int] = {}  # caption token shape -> FLOPs of the text tower's forward
        self._samples = 0  # samples this session's steps processed

    def before_training_exp(self, template, **kwargs) -> None:
        self._costs = {"setup_seconds": round(template.setup_seconds, 4)}
        self._samples = 0

    def before_training_iteration(self, template, **kwargs) -> None:
        if "flops_per_sample" in self._costs:
            return
        self._costs.update(self.trainable_counts())
        batch = template.mbatch
        models = [template.model, *([template.vlm] if template.vlm is not None else [])]
        key = (tuple((name, tuple(p.shape)) for model in models for name, p in model.named_parameters()
                     if p.requires_grad), tuple(batch[0].shape))  # a VLM-side strategy's trainables included
        if key not in self._flops:
            self._flops[key] = self.count_flops(template, batch)
        self._costs.update(self._flops[key])
        paper = self._costs["flops_per_sample"]
        if self.strategy.objective == "clip":  # the paper's count adds the text tower our caption cache skips
            self._costs["text_flops_per_sample"] = self.text_flops(template, batch) // len(batch[0])
            paper += self._costs["text_flops_per_sample"]
        self._costs["paper_flops_per_sample"] = paper

    def text_flops(self, template, batch: Batch) -> int:
        """FLOPs of the text tower's forward on ``batch``'s captions (the whole batch; the CLIP loss's own caption
        strings, else each class name in the first template: the tokens are padded to the context length, so
        the count does not depend on which template a sample drew), counted once per token shape."""
        own = batch_captions(batch)
        captions = list(own) if own is not None else [template.captions(int(y))[0] for y in batch[1]]
        tokens = template.backbone.tokenize(captions)
        key = tuple(tokens.shape)
        if key not in self._text_flops:
            self._text_flops[key] = text_forward_flops(template.backbone, tokens)
        return self._text_flops[key]

    def count_flops(self, template, batch: Batch) -> dict[str, int]:
        """``flops_per_sample`` (and ``<part>_flops_per_sample``) of one forward + backward of the training
        loss on ``batch``, counted by ``FlopCounterMode`` (an extra pass leaving training as it was)."""
        params = [p for group in template.optimizer.param_groups for p in group["params"]]
        with template.preserved_rng():  # fill the frozen text side's caches outside the count (else the first
            template.training_loss(batch)  # session, and the first one after a resume, would count caption encoding)
        with template.preserved_rng(), preserved_buffers(template.backbone), FlopCounterMode(display=False) as counter:
            torch.autograd.grad(template.training_loss(batch), params, allow_unused=True)
        # under ddp: true this rank encoded 1/W of the batch
        found = {"flops_per_sample": counter.get_total_flops() * world_size() // len(batch[0])}
        counts = counter.get_flop_counts()
        for part, modules in template.flop_groups().items():  # e.g. the frozen language model of the VLM loss
            flops = sum(sum(counts[m].values()) for m in modules if m in counts)
            found[f"{part}_flops_per_sample"] = flops * world_size() // len(batch[0])
        return found

    def after_training_iteration(self, template, **kwargs) -> None:
        self._samples += len(template.mbatch[0])  # the global batch (under ddp: true every rank loads it whole)
        if "optimizer_state_bytes" not in self._costs:
            self._costs["optimizer_state_bytes"] = optimizer_state_bytes(template.optimizer)

    def trainable_counts(self) -> dict[str, int]:
        """The strategy's counts, ``trainable_released`` defaulting to ``trainable``."""
        counts = self.strategy.trainable_counts()
        return {"trainable_released": counts["trainable"], **counts}

    def session_costs(self) -> dict[str, Any]:
        """Costs of the last session (trainable counts only, when it did not train), with its training FLOPs."""
        if not self._costs:
            return {**self.trainable_counts(), "setup_seconds": 0.0}
        totals = {f"{kind}train_flops": self._costs[f"{kind}flops_per_sample"] * self._samples
                  for kind in ("", "paper_") if f"{kind}flops_per_sample" in self._costs}
        return {**self._costs, **totals}


@torch.no_grad()
def text_forward_flops(backbone: Backbone, tokens: Tensor) -> int:
    """FLOPs (``FlopCounterMode``) of ``backbone``'s text tower's forward on token ids ``tokens`` [B, L]."""
    with FlopCounterMode(display=False) as counter:
        backbone.encode_text(tokens.to(backbone.logit_scale.device))
    return counter.get_total_flops()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (e.g. Adam's two moments and step counters)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, Tensor))
