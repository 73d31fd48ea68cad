"""``lora``: LoRA (peft) on every linear layer and attention in-projection of the vision encoder.

peft's ``MultiheadAttention`` layer covers open_clip's fused in-projection and its
out-projection; separate q/k/v/out linears (HF CLIP) are plain ``Linear`` targets. The image
projection gets the same LoRA through :class:`strategies.lorsu.update.LowRankDelta` (open_clip
keeps it as a bare parameter, which peft cannot target). Everything is merged into the
weights after each session, so the next session starts from a plain encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from benchmark.config import check
from benchmark.plugins import StrategyPlugin
from benchmark.registry import STRATEGIES
from strategies.lorsu.update import LowRankDelta, attach, merge


@dataclass
class LoRAOptions:
    """Options of ``lora``."""

    rank: int = 64
    alpha: float = 64.0  # the update is (alpha / rank) · B · A
    proj_lora: bool = True  # also adapt the final image projection

    def __post_init__(self) -> None:
        check(isinstance(self.rank, int) and self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        check(self.alpha > 0, "lora.alpha", self.alpha, "a float > 0")


def lora_targets(visual: nn.Module, exclude: nn.Module | None) -> list[str]:
    """Names (under ``visual``) of its attention modules and of every other linear layer.

    Linears inside an ``nn.MultiheadAttention`` are left out: peft adapts them with it.
    """
    inside_attention = {id(m) for a in visual.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    names = []
    for name, module in visual.named_modules():
        if isinstance(module, nn.MultiheadAttention) or (
            isinstance(module, nn.Linear) and id(module) not in inside_attention and module is not exclude
        ):
            names.append(name)
    return names


@STRATEGIES.register("lora", options=LoRAOptions)
class LoRA(StrategyPlugin):
    """LoRA on all vision linears and attention in-projections (+ projection), merged after each session."""

    supports_ddp = True  # no statistics of its own; peft's adapters start from the global torch RNG

    def __init__(self, backbone, options: LoRAOptions | None = None) -> None:
        super().__init__(backbone, options or LoRAOptions())
        self._tuner: LoraModel | None = None
        self._projection: tuple[nn.Module, str] | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        opts: LoRAOptions = self.options
        projection = self.backbone.image_projection() if opts.proj_lora else None
        exclude = projection[0] if projection and isinstance(projection[0], nn.Linear) else None
        config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=0.0, bias="none",
                            target_modules=lora_targets(self.backbone.visual, exclude))
        self._tuner = LoraModel(self.backbone.visual, config, "default")
        if projection is not None:
            module, name = projection
            attach(module, name, LowRankDelta(getattr(module, name), opts.rank, opts.alpha))
            self._projection = projection

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._tuner.merge_and_unload()
        self._tuner = None
        if self._projection is not None:
            merge(*self._projection)
            self._projection = None
        self.backbone.requires_grad_(False)
