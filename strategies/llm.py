"""The VLM-side baselines of the LoRSU paper: LoRA on the VLM's language model (``lora-llm``), on its last layers
(``lora-llm-last``) and on the whole VLM (``lora-vlm``), trained with the VLM's answer loss.

They adapt the run's loaded VLM itself (the process's one, :meth:`benchmark.vlm.base.VLMFamily.loaded`): peft LoRA
layers wrap every ``nn.Linear`` of the chosen language-model layers (LLaVA's Llama: q, k, v, o, gate, up and down
projections, the released ``get_llm_target_modules``), and for ``lora-vlm`` also the projector's linears and the
output head (the released ``full_lora`` module set; its vision-tower part is LoRA on the run's encoder, which the
VLM reads through the backbone). Factors: ΔW = (α/r)·B·A, A [r, in] drawn U(±1/√in) from a generator seeded by one
draw of the run's torch RNG, B = 0 (peft's init: the VLM is unchanged at step 0). One adapter trains through all
sessions, never merged, as released: the VQA after a session scores the VLM with it, a checkpoint carries its
factors, and :meth:`LLMLoRA.release` takes the LoRA layers out again at the end of the run (the base weights are
never touched, so the next run of the process finds the VLM exactly as loaded).

The released ``lora_lastlayers`` reads ``train_last_k_layers`` as a start index (16 of 32 layers: the last 16;
other values train 32 − k layers); ``last_layers`` here means the last k layers (``docs/fidelity.md``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from benchmark.config import check
from benchmark.plugins import StrategyPlugin
from strategies.lora import ADAPTER, LoRAPpl, kaiming_
from strategies.options import LLMLastLoRAOptions, LLMLoRAOptions, LoRAVLMOptions

PROJECTOR_LORA = (64, 32.0)  # (rank, alpha) of the projector's LoRA with projector_lr (the released set_lora_to_mm_projector)


def linear_names(root: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Names under ``root`` of every ``nn.Linear`` inside ``modules`` (in ``root``'s order)."""
    inside = {id(m) for module in modules for m in module.modules()}
    return [name for name, m in root.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def attention_shape(text: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a language model's config (``text``: e.g. a ``LlamaConfig``)."""
    heads = text.num_attention_heads
    return (heads, getattr(text, "num_key_value_heads", None) or heads,
            getattr(text, "head_dim", None) or text.hidden_size // heads)


def check_last_layers(family: Any, section: str, last: int) -> None:
    """Refuse ``<section>.last_layers`` outside 1..(the VLM's language-model layers)."""
    depth = family.text_config().num_hidden_layers
    check(1 <= last <= depth, f"{section}.last_layers", last,
          f"an integer in [1, {depth}] (the VLM's language model has {depth} layers)")


class VLMAdapter:
    """One peft LoRA adapter on modules of a loaded VLM's model: attached on first use, its factors initialised or
    restored, detached (base layers back, untouched) by :meth:`detach`."""

    def __init__(self, rank: int, alpha: float, own: dict[str, tuple[int, float]] | None = None) -> None:
        self.rank, self.alpha = rank, alpha
        self.own = own or {}  # target name -> its own (rank, alpha)
        self.tuner: LoraModel | None = None
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module, targets: list[str], factors: dict[str, torch.Tensor] | None = None) -> None:
        """Wrap ``targets`` (names under ``model``) in LoRA layers holding ``factors`` (a resumed run's), or new ones:
        A ~ U(±1/√in) from a generator seeded by one draw of the global torch RNG, B = 0. Building the layers draws
        nothing from the global RNGs, so a run resumed with saved factors draws what the uninterrupted run drew."""
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                            init_lora_weights=False, rank_pattern={n: r for n, (r, _) in self.own.items()},
                            alpha_pattern={n: a for n, (_, a) in self.own.items()})
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.tuner = LoraModel(model, config, ADAPTER)
        self.model = model
        if factors:
            self.load(factors)
            return
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        with torch.no_grad():
            for layer in self.layers():
                kaiming_(layer.lora_A[ADAPTER].weight, generator)
                layer.lora_B[ADAPTER].weight.zero_()

    def layers(self) -> list[LoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)] if self.model is not None else []

    def parameters(self) -> dict[str, nn.Parameter]:
        """The factors by name under the model."""
        return {name: p for name, p in self.model.named_parameters() if "lora_" in name} if self.model else {}

    def trainable(self, flag: bool) -> None:
        for p in self.parameters().values():
            p.requires_grad_(flag)

    @torch.no_grad()
    def load(self, factors: dict[str, torch.Tensor]) -> None:
        params = self.parameters()
        if set(params) != set(factors):
            raise RuntimeError(f"the saved LoRA factors do not fit this VLM's adapter "
                               f"({sorted(set(params) ^ set(factors))[:4]} ...)")
        for name, p in params.items():
            p.copy_(factors[name])

    def detach(self) -> None:
        """Put the base layers back (unmerged: their weights were never changed)."""
        if self.tuner is not None:
            self.tuner.unload()
            self.tuner = self.model = None


class LLMLoRA(StrategyPlugin[LLMLoRAOptions]):
    """LoRA on every linear of every language-model layer of the VLM (needs vqa.model); encoder frozen."""

    objective = "vlm"
    updates: ClassVar[frozenset[str]] = frozenset({"vlm"})
    vlm_factors: ClassVar[tuple[str, ...]] = ("factors",)
    default_options: ClassVar[type] = LLMLoRAOptions

    def __init__(self, backbone, options: LLMLoRAOptions | None = None) -> None:
        super().__init__(backbone, options or self.default_options())
        self.adapter = VLMAdapter(self.options.rank, self.options.alpha)
        self.factors: dict[str, torch.Tensor] = {}  # the adapter after the last session (a resume restores it)

    @classmethod
    def check_vlm(cls, family: Any, options: LLMLoRAOptions | None) -> None:
        text = family.text_config()
        _, kv_heads, head_dim = attention_shape(text)
        width = min(text.hidden_size, text.intermediate_size, kv_heads * head_dim)
        rank = (options or cls.default_options()).rank
        check(rank <= width, f"{cls.section()}.rank", rank,
              f"an integer in [1, {width}] (the smallest dimension of the VLM's language-model projections)")

    @classmethod
    def section(cls) -> str:
        return cls.default_options.section

    def layers(self, vlm) -> list[int]:
        """The language-model layers adapted: all of them."""
        return list(range(len(vlm.llm_layers())))

    def targets(self, vlm) -> list[str]:
        """Names under ``vlm.model`` of the linears adapted: those of :meth:`layers`, and with ``projector_lr`` the
        projector's (rank :data:`PROJECTOR_LORA`)."""
        layers = vlm.llm_layers()
        projector = linear_names(vlm.model, [vlm.projector]) if self.options.projector_lr is not None else []
        self.adapter.own = dict.fromkeys(projector, PROJECTOR_LORA)
        return projector + linear_names(vlm.model, [layers[i] for i in self.layers(vlm)])

    def learning_rates(self) -> dict[nn.Parameter, float]:
        """The projector's factors at ``projector_lr``."""
        own = tuple(f"{name}." for name in self.adapter.own)
        return {p: self.options.projector_lr for name, p in self.adapter.parameters().items() if name.startswith(own)}

    # -- the session ----------------------------------------------------------------------
    def setup(self, session) -> None:
        if self.adapter.tuner is None:  # first session, or the first after a resume (the saved factors)
            self.adapter.attach(session.vlm.model, self.targets(session.vlm), self.factors)
        self.adapter.trainable(True)

    def finish(self, session) -> None:
        self.adapter.trainable(False)
        self.factors = {name: p.detach().clone() for name, p in self.adapter.parameters().items()}

    def release(self) -> None:
        self.adapter.detach()

    def state_dict(self) -> dict[str, Any]:
        """``factors``: the adapter after the last session ({} before the first)."""
        return {"factors": self.factors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factors = dict(state.get("factors", {}))

    def trainable_counts(self) -> dict[str, int]:
        n = sum(p.numel() for p in self.adapter.parameters().values() if p.requires_grad)
        return {"trainable": n, "trainable_with_biases": n}


class LLMLastLoRA(LLMLoRA):
    """LoRA on every linear of the last last_layers language-model layers of the VLM (needs vqa.model)."""

    default_options: ClassVar[type] = LLMLastLoRAOptions

    @classmethod
    def check_vlm(cls, family: Any, options: LLMLastLoRAOptions | None) -> None:
        super().check_vlm(family, options)
        check_last_layers(family, cls.section(), (options or cls.default_options()).last_layers)

    def layers(self, vlm) -> list[int]:
        depth = len(vlm.llm_layers())
        return list(range(depth - self.options.last_layers, depth))


class LoRAVLM(LoRAPpl):
    """LoRA on the whole VLM (needs vqa.model): the encoder, the projector, every language-model layer, the head."""

    updates: ClassVar[frozenset[str]] = frozenset({"encoder", "vlm"})
    vlm_factors: ClassVar[tuple[str, ...]] = ("vlm", "factors")
    default_options: ClassVar[type] = LoRAVLMOptions

    def __init__(self, backbone, options: LoRAVLMOptions | None = None) -> None:
        super().__init__(backbone, options or self.default_options())
        self.llm = LLMLoRA(backbone, LLMLoRAOptions(rank=self.options.rank, alpha=self.options.alpha))

    @classmethod
    def check_vlm(cls, family: Any, options: LoRAVLMOptions | None) -> None:
        opts = options or cls.default_options()
        LLMLoRA.check_vlm(family, LLMLoRAOptions(rank=opts.rank, alpha=opts.alpha))

    def setup(self, session) -> None:
        super().setup(session)
        vlm = session.vlm
        if self.llm.adapter.tuner is None:
            own = [vlm.projector, *(vlm.llm_layers()[i] for i in self.llm.layers(vlm))]
            head = vlm.model.get_output_embeddings()
            self.llm.adapter.attach(vlm.model, linear_names(vlm.model, own) + linear_names(vlm.model, [head]),
                                    self.llm.factors)
        self.llm.adapter.trainable(True)

    def finish(self, session) -> None:
        super().finish(session)
        self.llm.finish(session)

    def release(self) -> None:
        self.llm.release()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vlm": self.llm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.llm.load_state_dict(state.get("vlm", {}))

    def trainable_counts(self) -> dict[str, int]:
        encoder, vlm = super().trainable_counts(), self.llm.trainable_counts()
        return {key: encoder[key] + vlm[key] for key in ("trainable", "trainable_with_biases")}
