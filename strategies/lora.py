"""``lora``: LoRA (peft) on every linear layer and attention in-projection of the vision encoder.

peft's ``MultiheadAttention`` layer covers open_clip's fused in-projection and its
out-projection; separate q/k/v/out linears (HF CLIP) are plain ``Linear`` targets. The image
projection gets the same LoRA through :class:`strategies.lorsu.update.LowRankDelta` (open_clip
keeps it as a bare parameter, which peft cannot target).

Factors, in peft's names: ΔW = (α/r)·B·A with A [r, in] on the input side and B [out, r] on the
output side. ``init: released`` (the released code's ``LoRAParametrization``) draws B ~ U(±1/√r)
and sets A = 0; ``init: peft`` (peft's default) draws A ~ U(±1/√in) and sets B = 0. Either way
the random factor gets ``nn.Linear``'s default init (Kaiming-uniform, a = √5) and the model is
unchanged at step 0. The projection's factors are the released code's in both modes:
A [rows, r] ~ U(±1/√r), B = 0. Every factor is drawn from a private generator seeded by one
draw of the global torch RNG (which the runner seeds per run and a checkpoint restores).

The updates are merged into the weights after every session, so evaluation, checkpoints and
``fscl export`` see a plain encoder that holds them. ``across_sessions: merge`` starts the next
session from new factors. ``keep`` (the released code: one adapter for the whole stream, never
re-initialised) restores the factors it ended with (:meth:`LoRA.state_dict` carries them through
a resume) and takes their update back out of the weights, so training continues on
W₀ + (α/r)·B·A exactly as if the adapter had never been merged (up to one rounding of W₀ per
session).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from torch import Tensor, nn

from benchmark.config import check
from benchmark.plugins import StrategyPlugin
from strategies.lorsu.update import LowRankDelta, attach, merge
from strategies.options import LoRAOptions, LoRAPplOptions, skip_blocks

ADAPTER = "default"  # peft's adapter name


def lora_targets(visual: nn.Module, exclude: nn.Module | None, skipped: Sequence[nn.Module] = ()) -> list[str]:
    """Names (under ``visual``) of its attention modules and of every other linear layer, none inside the
    ``skipped`` modules (e.g. the last blocks).

    Linears inside an ``nn.MultiheadAttention`` are left out: peft adapts them with it.
    """
    inside_attention = {id(m) for a in visual.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    left_out = {id(m) for block in skipped for m in block.modules()}
    names = []
    for name, module in visual.named_modules():
        if id(module) in left_out:
            continue
        if isinstance(module, nn.MultiheadAttention) or (
            isinstance(module, nn.Linear) and id(module) not in inside_attention and module is not exclude
        ):
            names.append(name)
    return names


@torch.no_grad()
def kaiming_(weight: Tensor, generator: torch.Generator) -> None:
    """Fill ``weight`` [fan_out, fan_in] like ``nn.Linear``'s default (Kaiming-uniform, a = √5),
    i.e. U(±1/√fan_in), drawn on the CPU from ``generator`` (the same numbers on every device)."""
    bound = 1 / math.sqrt(weight.shape[1])
    weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))


@functools.cache
def out_proj_applications() -> int:
    """How many times peft's ``MultiheadAttention`` layer adds its out-projection update.

    2 in peft <= 0.21 (huggingface/peft#3774: ``merge()`` adds it, then ``out_proj.merge()``
    adds it again, in every forward and in ``merge_and_unload``), 1 once fixed. Measured on a
    one-head probe with B·A = 1 and scaling 1; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        layer = LoraModel(nn.Sequential(nn.MultiheadAttention(2, 1)),
                          LoraConfig(r=1, lora_alpha=1, target_modules=["0"]), ADAPTER).model[0]
        out_proj = layer.get_base_layer().out_proj
        nn.init.ones_(out_proj.lora_A[ADAPTER].weight)
        nn.init.ones_(out_proj.lora_B[ADAPTER].weight)
        before = out_proj.get_base_layer().weight.detach().clone()
        layer.merge()
        return round((out_proj.get_base_layer().weight - before).mean().item())


class LoRA(StrategyPlugin[LoRAOptions]):
    """LoRA on all vision linears, attention projections and the image projection; one adapter or one per session."""

    supports_ddp = True  # no statistics of its own; every rank draws the same factors (same global seed)

    def __init__(self, backbone, options: LoRAOptions | None = None) -> None:
        super().__init__(backbone, options or self.default_options())
        skip = skip_blocks(self.options)
        if skip:
            depth = len(backbone.blocks())
            check(skip < depth, f"{self.options.section}.skip_last_blocks", skip,
                  f"an integer in [0, {max(depth - 1, 0)}] (backbone '{backbone.spec}' has {depth} transformer blocks)")
        self._tuner: LoraModel | None = None
        self._projection: tuple[nn.Module, str] | None = None
        self._factors: dict[str, Tensor] = {}  # keep: the adapter between sessions, by parameter name under visual

    default_options: ClassVar[type] = LoRAOptions

    def skipped_blocks(self) -> list[nn.Module]:
        """The modules of the last ``skip_last_blocks`` blocks (no adapter there)."""
        skip = self.options.skip_last_blocks
        return [b.module for b in self.backbone.blocks()[-skip:]] if skip else []

    # -- the session ----------------------------------------------------------------------
    def setup(self, session) -> None:
        self._attach()
        if self._factors:
            self._restore()
        else:
            self._initialise()

    def finish(self, session) -> None:
        if self.options.across_sessions == "keep":
            self._factors = {name: p.detach().clone() for name, p in self.adapter_parameters().items()}
        self._tuner.merge_and_unload()
        self._tuner = None
        if self._projection is not None:
            merge(*self._projection)
            self._projection = None

    def state_dict(self) -> dict[str, Any]:
        """``factors``: the kept adapter ({} with ``merge`` or before the first session)."""
        return {"factors": self._factors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._factors = dict(state.get("factors", {}))

    # -- adapters ---------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The factors by name under ``visual``: its only trainable parameters while attached."""
        return {name: p for name, p in self.backbone.visual.named_parameters() if p.requires_grad}

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.backbone.visual.modules() if isinstance(m, LoraLayer)]

    def _projection_delta(self) -> LowRankDelta | None:
        if self._projection is None:
            return None
        module, name = self._projection
        return module.parametrizations[name][0]

    def _attach(self) -> None:
        """Wrap the targets in peft layers and parametrize the projection (factors not yet set)."""
        opts = self.options
        projection = self.backbone.image_projection() if opts.proj_lora else None
        exclude = projection[0] if projection and isinstance(projection[0], nn.Linear) else None
        config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=0.0, bias="none",
                            target_modules=lora_targets(self.backbone.visual, exclude, self.skipped_blocks()))
        self._tuner = LoraModel(self.backbone.visual, config, ADAPTER)
        for layer in self._lora_layers():
            if isinstance(layer, LoraMultiheadAttention):  # its out-projection update is (α/r)·B·A once
                layer.get_base_layer().out_proj.scaling[ADAPTER] /= out_proj_applications()
        if projection is not None:
            module, name = projection
            attach(module, name, LowRankDelta(getattr(module, name), opts.rank, opts.alpha))
            self._projection = projection

    @torch.no_grad()
    def _initialise(self) -> None:
        """New factors (see the module docstring for ``init``)."""
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        for layer in self._lora_layers():
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # [r, in], [out, r]
            random, zero = (up, down) if self.options.init == "released" else (down, up)
            kaiming_(random, generator)
            zero.zero_()
        delta = self._projection_delta()
        if delta is not None:
            kaiming_(delta.A, generator)  # [rows, r]; LowRankDelta made B [r, cols] zero

    @torch.no_grad()
    def _restore(self) -> None:
        """The kept factors; the weights hold their update merged, so take it back out."""
        params = self.adapter_parameters()
        if set(params) != set(self._factors):
            raise RuntimeError("the kept LoRA factors do not fit this encoder's adapters "
                               f"({sorted(set(params) ^ set(self._factors))[:4]} ...)")
        for name, p in params.items():
            p.copy_(self._factors[name])
        layers = self._lora_layers()
        for layer in layers:  # peft's unmerge is the exact inverse of the merge that put it there
            layer.merged_adapters.append(ADAPTER)
        for layer in layers:
            if layer.merged:  # an attention layer has already unmerged its out-projection
                layer.unmerge()
        delta = self._projection_delta()
        if delta is not None:
            module, name = self._projection
            original = module.parametrizations[name].original
            original -= delta(torch.zeros_like(original))  # the update alone, as merge() added it


class LoRAPpl(LoRA):
    """LoRA-Ppl: LoRA trained with LLaVA's answer loss (needs vqa.model), blocks 0..L-2.

    The VLM template (:mod:`benchmark.vlm_template`) trains it, with the released LoRSU-Ppl code's peft LoRA
    (:class:`strategies.options.LoRAPplOptions`: peft's init, no projection).
    """

    objective = "vlm"
    supports_ddp = False  # the VLM template has no data-parallel path
    default_options = LoRAPplOptions
