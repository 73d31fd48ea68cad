"""The base class of every strategy (an Avalanche plugin on :class:`benchmark.template.CLIPTemplate`),
the session-data gradient pass that importance-based strategies share, and the cost meter."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmark.backbones import Backbone
from benchmark.config import ConfigError

if TYPE_CHECKING:
    from benchmark.template import CLIPTemplate

# objective(image_features [B, D] (not normalised), text_features [B, D] (normalised), logit_scale) -> scalar
Objective = Callable[[Tensor, Tensor, Tensor], Tensor]


class StrategyPlugin(SupervisedPlugin):
    """A continual-learning method as a plugin on the CLIP template.

    Subclasses choose (or add) trainable parameters in ``before_training_exp``, may change
    gradients in ``after_backward`` and merge or consolidate in ``after_training_exp``.
    ``options`` is the strategy's validated options dataclass (or None).
    """

    trains: ClassVar[bool] = True  # False: the runner never calls training (e.g. zero-shot)
    needs_blocks: ClassVar[bool] = False  # True: reads Backbone.blocks(); checked when the plugin is built

    def __init__(self, backbone: Backbone, options: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options
        self.setup_seconds = 0.0  # time spent choosing trainables (importance, masks) in the last session
        if self.needs_blocks and not backbone.blocks():
            raise ConfigError(
                f"strategy {type(self).__name__} reaches the encoder through its transformer blocks, but backbone "
                f"'{backbone.spec}' exposes none; allowed: a backbone with block views (openclip ViTs, hf: CLIP)")

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters now: ``trainable`` (what is really updated, masks counted) and
        ``trainable_with_biases`` (plus dense biases). Default: all ``requires_grad`` entries."""
        n = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        return {"trainable": n, "trainable_with_biases": n}


@torch.no_grad()
def _accumulate(total: Tensor, grad: Tensor | None, weight: float, squared: bool) -> None:
    if grad is not None:
        total.add_(grad.float().square() if squared else grad.float(), alpha=weight)


def session_gradients(
    template: CLIPTemplate,
    params: Sequence[nn.Parameter],
    objective: Objective,
    *,
    reduce: Literal["mean", "fisher"] = "mean",
    max_samples: int | None = None,
    max_batches: int | None = None,
) -> list[Tensor]:
    """Gradients of ``objective`` w.r.t. ``params`` over the current session's training batches.

    Uses the template's training dataloader, so the batches have the training augmentations,
    batch size and captions. ``.grad`` fields are not touched and ``requires_grad`` flags are
    restored afterwards. Stops at the end of one pass, after the batch that reaches
    ``max_samples`` samples, or after ``max_batches`` batches, whichever comes first.

    Returns one fp32 tensor per parameter, shaped like it:
    ``reduce="mean"``: the signed sample-weighted mean gradient (1/N) Σ_b n_b ∇L_b (LoRSU's importance);
    ``reduce="fisher"``: the mean squared batch gradient (1/#batches) Σ_b (∇L_b)² (Avalanche EWC's Fisher).
    """
    flags = [p.requires_grad for p in params]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    samples = batches = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in template.dataloader:
            template.mbatch = batch
            template._unpack_minibatch()
            with template._autocast():
                features = template.backbone.encode_image(template.mb_x)
            loss = objective(features.float(), template.caption_features(), template.backbone.logit_scale)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            n = len(template.mb_x)
            for total, grad in zip(totals, grads):
                _accumulate(total, grad, n if reduce == "mean" else 1.0, squared=reduce == "fisher")
            samples, batches = samples + n, batches + 1
            if (max_samples is not None and samples >= max_samples) or (max_batches is not None and batches >= max_batches):
                break
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if not batches:
        raise RuntimeError("the session has no training data to score parameters with")
    norm = samples if reduce == "mean" else batches
    return [t.div_(norm) for t in totals]


class CostMeter(SupervisedPlugin):
    """Measures what a session of a strategy costs, for the run record.

    At the first training iteration of each session (the strategy's adapters are in place
    then) it reads the strategy's trainable-parameter counts and counts the FLOPs of one
    forward + backward pass (``torch.utils.flop_counter``) on that mini-batch: an extra pass
    whose gradients are discarded, with the caption generator restored, so training is
    unchanged. After the first optimizer step it reads the optimizer-state size.
    """

    def __init__(self, strategy: StrategyPlugin) -> None:
        super().__init__()
        self.strategy = strategy
        self._costs: dict[str, Any] = {}

    def before_training_exp(self, strategy: CLIPTemplate, **kwargs) -> None:
        self._costs = {}

    def before_training_iteration(self, strategy: CLIPTemplate, **kwargs) -> None:
        if "flops_per_sample" in self._costs:
            return
        self._costs.update(self.strategy.trainable_counts())
        params = [p for group in strategy.optimizer.param_groups for p in group["params"]]
        captions = strategy.caption_rng.get_state()
        with FlopCounterMode(display=False) as counter:
            strategy.mb_output = strategy.forward()
            torch.autograd.grad(strategy.criterion(), params, allow_unused=True)
        strategy.caption_rng.set_state(captions)
        self._costs["flops_per_sample"] = counter.get_total_flops() // len(strategy.mb_x)

    def after_training_iteration(self, strategy: CLIPTemplate, **kwargs) -> None:
        if "optimizer_state_bytes" not in self._costs:
            self._costs["optimizer_state_bytes"] = optimizer_state_bytes(strategy.optimizer)

    def session_costs(self) -> dict[str, Any]:
        """Costs of the last session (trainable counts only, when it did not train)."""
        counts = self._costs or self.strategy.trainable_counts()
        return {**counts, "setup_seconds": round(self.strategy.setup_seconds, 4)}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (e.g. Adam's two moments and step counters)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, Tensor))
