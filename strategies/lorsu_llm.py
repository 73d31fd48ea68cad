"""``lorsu-llm``: LoRSU on the last ``last_layers`` decoder layers of the VLM's language model, trained with the VLM's
answer loss: the released ``lorsu_llm`` as its code meant it (the ``lora_lorsu`` branch of ``build_spu_attn_mask``,
``mask_model_gradients``; as released the method builds the vision tower's mask instead, ``docs/fidelity.md``).

Per session, on the VLM as the previous sessions left it:

1. importance I of the q, k, v and ``mlp.up_proj`` weights of those layers: the signed mean gradient of the answer
   loss over the session's training batches (LoRSU's pass, :func:`strategies.lorsu.importance`);
2. per layer the ``top_k_heads`` heads of largest ‖I_q,h‖² + ‖I_k,h‖² + ‖I_v,h‖² (:mod:`strategies.lorsu.masks`),
   and a rank-``rank`` update (α/r)·U·D of each of q, k and v on those heads' rows
   (:class:`~strategies.lorsu.update.RowsLowRank`: the released ``MaskedLoRALinear``, D Kaiming, U zero);
3. per layer the ⌊sparsity·numel⌋ entries of largest |I| of ``up_proj`` train
   (:class:`~strategies.lorsu.update.SparseDelta`; the released code trains the whole weight with its gradient
   masked to them);
4. train (the VLM template's AdamW and schedule); 5. freeze the session's updates.

The released code merges the updates into the weights after each session. Here they stay out of the base weights
(the process's loaded VLM, which the next run must find as loaded): each is an additive parametrization of its
weight, frozen after its session, so the next session scores and trains the updated weights (the gradient that
reaches a base weight through additive updates is the updated weight's) and :meth:`LoRSULLM.release` takes them all
out. A checkpoint carries every session's updates.

The heads are scored by their own q, k and v rows, so the language model must have as many key/value heads as
query heads (LLaVA-1.5's Vicuna: 32 and 32); grouped-query attention is refused by the grid check.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.utils import parametrize

from benchmark.config import ConfigError, check
from benchmark.plugins import StrategyPlugin
from strategies.llm import PROJECTOR_LORA, VLMAdapter, attention_shape, check_last_layers, linear_names
from strategies.lorsu import BlockSelection, importance, masks, qkv_update_size
from strategies.lorsu.update import RowsLowRank, SparseDelta, attach
from strategies.options import LoRSULLMOptions


def projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """The q, k, v and up projections of a decoder layer (the transformers names of Llama-style layers)."""
    try:
        return layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj
    except AttributeError:
        raise ConfigError(f"lorsu-llm updates self_attn.q_proj/k_proj/v_proj and mlp.up_proj of the language model's "
                          f"layers, which its {type(layer).__name__} does not have; allowed: a VLM whose language "
                          f"model has Llama-style layers (LLaVA)") from None


def base_weight(module: nn.Module) -> nn.Parameter:
    """``module``'s own weight parameter, under its parametrizations if it has some."""
    return module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight


class LoRSULLM(StrategyPlugin[LoRSULLMOptions]):
    """LoRSU on the last last_layers language-model layers of the VLM (needs vqa.model): top heads' q/k/v, sparse up_proj.

    Strategy contract of the VLM side (:mod:`strategies.llm`); the method: the module docstring.
    """

    objective = "vlm"
    updates: ClassVar[frozenset[str]] = frozenset({"vlm"})
    default_options: ClassVar[type] = LoRSULLMOptions

    def __init__(self, backbone, options: LoRSULLMOptions | None = None) -> None:
        super().__init__(backbone, options or LoRSULLMOptions())
        self.sessions: list[dict[str, dict[str, Tensor]]] = []  # per finished session: target name -> its update
        self.selection: list[BlockSelection] = []  # the last session's, per layer (fc1_index: up_proj's entries)
        self.model: nn.Module | None = None  # the VLM model holding the updates (None: none attached)
        self.targets: dict[str, nn.Module] = {}  # the modules parametrized, by name under the model
        self.current: dict[str, nn.Module] = {}  # this session's updates (trainable), by target name
        self.shape = (0, 0)  # (head dim, layer width) of the language model
        self.projector = VLMAdapter(*PROJECTOR_LORA)  # with projector_lr: the released projector LoRA
        self.projector_factors: dict[str, Tensor] = {}  # its factors after the last session (a resume restores them)

    @classmethod
    def check_vlm(cls, family: Any, options: LoRSULLMOptions | None) -> None:
        opts, text = options or LoRSULLMOptions(), family.text_config()
        check_last_layers(family, opts.section, opts.last_layers)
        heads, kv_heads, head_dim = attention_shape(text)
        if kv_heads != heads:
            raise ConfigError(f"vqa.model '{family.spec}': its language model has grouped-query attention ({kv_heads} "
                              f"key/value heads for {heads} heads), and lorsu-llm scores and updates each head's own "
                              f"q, k and v rows; allowed: a VLM with as many key/value heads as heads (LLaVA-1.5)")
        check(opts.top_k_heads <= heads, f"{opts.section}.top_k_heads", opts.top_k_heads,
              f"an integer in [1, {heads}] (the VLM's language model has {heads} heads per layer)")
        rows = opts.top_k_heads * head_dim
        check(opts.rank <= min(rows, text.hidden_size), f"{opts.section}.rank", opts.rank,
              f"an integer in [1, {min(rows, text.hidden_size)}] (the chosen heads' rows of q, k or v: top_k_heads × "
              f"head dim = {rows}, of width {text.hidden_size})")

    # -- the session ----------------------------------------------------------------------
    def layers(self, vlm) -> list[nn.Module]:
        """The language-model layers updated: the last ``last_layers``."""
        layers = list(vlm.llm_layers())
        return layers[len(layers) - self.options.last_layers:]

    def setup(self, session) -> None:
        vlm, opts = session.vlm, self.options
        if self.model is None:  # the first session, or the first after a resume (the saved updates)
            self.restore(vlm.model)
        if opts.projector_lr is not None and self.projector.tuner is None:  # before this session's updates: peft
            self.projector.attach(vlm.model, linear_names(vlm.model, [vlm.projector]),  # freezes all but its own
                                  self.projector_factors)
        self.projector.trainable(True)
        heads, _, head_dim = attention_shape(vlm.family.text_config())
        layers = [projections(layer) for layer in self.layers(vlm)]
        self.shape = (head_dim, layers[0][0].in_features)
        grads = importance(session, [base_weight(m) for layer in layers for m in layer], opts)
        names = {id(m): name for name, m in vlm.model.named_modules()}
        self.selection = []
        for i, (q, k, v, up) in enumerate(layers):
            iq, ik, iv, iup = grads[4 * i:4 * i + 4]
            scores = masks.head_scores(iq, ik, iv, heads)
            chosen = masks.top_heads(scores, opts.top_k_heads)
            index = masks.top_entries(iup, masks.mask_size(iup.numel(), opts.sparsity))
            self.selection.append(BlockSelection(chosen, index, scores))
            rows = masks.head_rows(chosen, head_dim, q.weight.device)
            for proj in (q, k, v):
                self.add(names[id(proj)], proj, RowsLowRank(rows, proj.in_features, opts.rank, opts.alpha))
            self.add(names[id(up)], up, SparseDelta(index.to(up.weight.device)))

    def add(self, name: str, module: nn.Module, update: nn.Module) -> None:
        """Parametrize ``module.weight`` (named ``name`` under the model) with ``update``, this session's."""
        attach(module, "weight", update)
        self.targets[name] = module
        self.current[name] = update

    def learning_rates(self) -> dict[nn.Parameter, float]:
        """The projector's LoRA factors at ``projector_lr``."""
        return {p: self.options.projector_lr for p in self.projector.parameters().values()}

    def finish(self, session) -> None:
        """Freeze this session's updates (they stay in the VLM) and keep a copy for the checkpoint."""
        self.projector.trainable(False)
        self.projector_factors = {name: p.detach().clone() for name, p in self.projector.parameters().items()}
        for update in self.current.values():
            update.requires_grad_(False)
        self.sessions.append({name: {key: t.detach().clone() for key, t in update.state_dict().items()}
                              for name, update in self.current.items()})
        self.current = {}

    def restore(self, model: nn.Module) -> None:
        """Put the finished sessions' updates (frozen, in session order) on ``model``; draws nothing."""
        self.model = model
        opts = self.options
        for session in self.sessions:
            for name, state in session.items():
                module = model.get_submodule(name)
                update = (SparseDelta(state["index"], state["values"]) if "index" in state else
                          RowsLowRank(state["rows"], module.in_features, opts.rank, opts.alpha,
                                      (state["up"], state["down"])))
                attach(module, "weight", update.requires_grad_(False))
                self.targets[name] = module

    def merge_into_vlm(self, model: nn.Module) -> bool:
        """Every finished session's update added to ``model``'s weights (``fscl export --format vlm --merge``)."""
        self.restore(model)
        for module in self.targets.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.model, self.targets, self.current = None, {}, {}
        if self.projector_factors:  # the projector's LoRA, merged by peft
            names = sorted({name.split(".lora_", 1)[0] for name in self.projector_factors})
            self.projector.attach(model, names, self.projector_factors)
            self.projector.tuner.merge_and_unload()
            self.projector.tuner = self.projector.model = None
        return True

    def release(self) -> None:
        """Take every update out: each weight is its own parameter again, never written."""
        self.projector.detach()
        for module in self.targets.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self.model, self.targets, self.current = None, {}, {}

    def state_dict(self) -> dict[str, Any]:
        """``sessions``: per finished session, each parametrized module's name and its update's tensors."""
        return {"sessions": self.sessions, "projector": self.projector_factors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sessions = list(state.get("sessions", []))
        self.projector_factors = dict(state.get("projector", {}))

    # -- costs ---------------------------------------------------------------------------------
    def trainable_counts(self) -> dict[str, int]:
        """Per layer the up_proj entries + 3 × the q/k/v update (:func:`~strategies.lorsu.qkv_update_size`):
        ``trainable`` the free parameters, ``trainable_released`` the released count (3·min(R·W, 2·r·W) + mask);
        with ``projector_lr`` the projector's LoRA factors too."""
        (head_dim, width), rank = self.shape, self.options.rank
        free = released = 0
        for sel in self.selection:
            rows = len(sel.heads) * head_dim
            free += 3 * qkv_update_size(rows, width, rank, "free") + len(sel.fc1_index)
            released += 3 * qkv_update_size(rows, width, rank, "released", 3) + len(sel.fc1_index)
        projector = sum(p.numel() for p in self.projector.parameters().values() if p.requires_grad)
        return {"trainable": free + projector, "trainable_with_biases": free + projector,
                "trainable_released": released + projector}
