"""``moe-adapters``: MoE-Adapters4CL (Yu et al., CVPR 2024, ``JiazuoYu/MoE-Adapters4CL``, its MTIL code) on the
vision encoder.

Experts: every vision block gets ``experts`` bottleneck adapters (down W→``adapter_width``, ReLU, dropout, up
back to W, times ``adapter_scale``), parallel to its MLP: the block computes
``x + MLP(ln_2(x)) + Σ_e g_e(x) · expert_e(x)`` with ``x`` the residual stream after attention. Each expert starts
with its down-projection Kaiming-uniform (U(±1/√W)), its up-projection and biases zero, so a new adapter set leaves
the encoder's output unchanged.

Routers: one per session and block, a gate and a noise matrix [W, E], both zero at first. The gate of an image is
noisy top-``top_k`` gating (Shazeer et al. 2017) on its first token (the class token): logits = cls · G, plus,
while training, N(0, 1) · (softplus(cls · N) + 0.01); the softmax of the ``top_k`` largest logits weighs the chosen
experts, the others get 0. A session trains its own router and the experts not frozen.

Activate-freeze: while a session trains, every block counts how often each expert is chosen; after it, the
``freeze_per_session`` most chosen experts of each block are frozen for every later session (still routed to).

DDAS (Distribution Discriminative Auto-Selector): after each session an autoencoder (Linear D→code, ReLU,
Linear code→D, sigmoid) learns to reconstruct its training images' features; at evaluation (no task id) each
image's reconstruction error under every seen session's autoencoder decides its path: above the session's
threshold for every session, it goes through the frozen zero-shot encoder; otherwise through the adapters routed by
the router of the session (among those under their threshold) with the smallest error. The features are the
frozen (pretrained) encoder's embedding f, as sigmoid(√D · f / ‖f‖) (the released code: sigmoid of AlexNet's conv5
features, which this suite cannot download); docs/fidelity.md lists this and the other differences.

All of it runs inside ``backbone.encode_image``, which the strategy wraps: the evaluator needs no task id. The
adapters, routers, autoencoders, thresholds, activation counts and frozen flags live in ``backbone.adapters``
(never merged) and go through :meth:`MoEAdapters.state_dict`; every random number (expert and autoencoder
initialisation, gating noise, autoencoder batches) comes from a CPU generator seeded by one draw of the run's torch
RNG per session, so they are the same on every machine and after a resume.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.config import check
from benchmark.plugins import StrategyPlugin, TrainingSession
from strategies.lora import kaiming_
from strategies.options import MoEAdaptersOptions

NOISE_EPSILON = 1e-2  # the released noise_epsilon: the least gating noise scale
AUTOENCODER_LR, AUTOENCODER_DECAY, AUTOENCODER_BATCH = 3e-3, 1e-4, 64  # the released few-shot chooser's Adam


@torch.no_grad()
def linear_init_(layer: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear``'s default initialisation (weight and bias U(±1/√fan_in)), drawn from ``generator``."""
    kaiming_(layer.weight, generator)
    bound = 1 / math.sqrt(layer.in_features)
    layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=generator))


class Expert(nn.Module):
    """A bottleneck adapter: ``scale · up(dropout(relu(down(x))))``, [..., W] → [..., W]."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.scale, self.dropout = scale, dropout

    @torch.no_grad()
    def initialise(self, generator: torch.Generator) -> None:
        """The released ``lora`` init: down Kaiming-uniform, up and both biases zero (output zero)."""
        kaiming_(self.down.weight, generator)
        for t in (self.down.bias, self.up.weight, self.up.bias):
            t.zero_()

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.up(hidden) * self.scale


class MoEBlock(nn.Module):
    """One block's experts and its routers, one gate and one noise matrix [W, E] per session."""

    def __init__(self, width: int, options: MoEAdaptersOptions) -> None:
        super().__init__()
        self.top_k = options.top_k
        self.experts = nn.ModuleList(Expert(width, options.adapter_width, options.adapter_scale,
                                            options.adapter_dropout) for _ in range(options.experts))
        self.gates, self.noises = nn.ParameterList(), nn.ParameterList()

    def add_router(self) -> None:
        """A new session's router: gate and noise matrices of zeros."""
        like = self.experts[0].down.weight
        for routers in (self.gates, self.noises):
            routers.append(nn.Parameter(like.new_zeros(like.shape[1], len(self.experts))))

    def route(self, cls: Tensor, tasks: Tensor, noise: torch.Generator | None) -> Tensor:
        """Gates [B, E] of first tokens ``cls`` [B, W] under the routers of ``tasks`` [B] (session indices):
        the softmax of the ``top_k`` largest logits, zero elsewhere; ``noise``: the training's noisy logits."""
        gate = torch.stack(list(self.gates))[tasks]  # [B, W, E]
        logits = torch.einsum("bw,bwe->be", cls, gate.to(cls.dtype))
        if noise is not None:
            scale = F.softplus(torch.einsum("bw,bwe->be", cls, torch.stack(list(self.noises))[tasks].to(cls.dtype)))
            draw = torch.randn(logits.shape, generator=noise).to(logits)
            logits = logits + draw * (scale + NOISE_EPSILON)
        top, index = logits.topk(self.top_k, dim=1)
        return torch.zeros_like(logits).scatter(1, index, top.softmax(dim=1))

    def forward(self, x: Tensor, gates: Tensor) -> Tensor:
        """Σ_e gates[b, e] · expert_e(x[b]) [B, L, W] of the residual stream ``x`` [B, L, W]; only the experts
        whose gate is non-zero run on an image."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = gates[:, e].nonzero().squeeze(1)
            if len(rows):
                out = out.index_add(0, rows, (expert(x[rows]) * gates[rows, e, None, None]).to(out.dtype))
        return out


class Autoencoder(nn.Module):
    """DDAS's autoencoder of one session: ``sigmoid(dec(relu(enc(x))))`` on features x [B, D] in (0, 1)."""

    def __init__(self, dim: int, code: int) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(dim, code), nn.Linear(code, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(F.relu(self.encoder(x))))

    def errors(self, x: Tensor) -> Tensor:
        """The reconstruction error (MSE over the D features) of each row of ``x`` [B, D]: [B]."""
        return (self(x) - x).square().mean(dim=1)


class MoEModules(nn.Module):
    """Everything the strategy adds: per block a :class:`MoEBlock`, per session an :class:`Autoencoder` and its
    DDAS threshold; buffers ``counts`` (how often each expert of each block was chosen in the session training
    now, [blocks, E]) and ``frozen`` (activate-freeze flags, [blocks, E])."""

    def __init__(self, width: int, depth: int, dim: int, options: MoEAdaptersOptions) -> None:
        super().__init__()
        self.dim, self.code = dim, options.autoencoder_code
        self.blocks = nn.ModuleList(MoEBlock(width, options) for _ in range(depth))
        self.autoencoders = nn.ModuleList()
        self.register_buffer("thresholds", torch.zeros(0))
        self.register_buffer("counts", torch.zeros(depth, options.experts, dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(depth, options.experts, dtype=torch.bool))

    @property
    def sessions(self) -> int:
        """Routers so far (one per session set up)."""
        return len(self.blocks[0].gates)

    def add_autoencoder(self) -> Autoencoder:
        autoencoder = Autoencoder(self.dim, self.code).to(self.thresholds.device)
        self.autoencoders.append(autoencoder)
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_zeros(1)])
        return autoencoder


def ddas_features(features: Tensor) -> Tensor:
    """The autoencoders' input of embeddings ``features`` [B, D]: sigmoid(√D · f / ‖f‖), fp32 in (0, 1)."""
    features = features.float()
    return torch.sigmoid(F.normalize(features, dim=-1) * math.sqrt(features.shape[-1]))


class MoEAdapters(StrategyPlugin[MoEAdaptersOptions]):
    """MoE-Adapters4CL: routed adapter experts in every vision block, activate-freeze, and DDAS at evaluation."""

    needs_blocks = True

    def __init__(self, backbone, options: MoEAdaptersOptions | None = None) -> None:
        super().__init__(backbone, options or MoEAdaptersOptions())
        transformer = getattr(backbone.visual, "transformer", None)
        self.batch_first = getattr(transformer, "batch_first", True)  # open_clip's resblocks may run [L, B, W]
        self.moe: MoEModules | None = None
        self.task: int | None = None  # the session training now (its router), None between sessions
        self.generator: torch.Generator | None = None  # this session's: noise, autoencoder init and batches
        self._route: Tensor | None = None  # [B] session per image while the adapted encoder runs, else None
        self._inputs: dict[int, Tensor] = {}  # block index -> its residual stream before the MLP
        self._handles: list = []

    # -- the session ----------------------------------------------------------------------
    def setup(self, session: TrainingSession) -> None:
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        if self.moe is None:
            dim = self.backbone.text_features(["a photo."]).shape[1]  # the embedding width D
            check(self.options.autoencoder_code < dim, f"{self.options.section}.autoencoder_code",
                  self.options.autoencoder_code,
                  f"an integer in [1, {dim - 1}] (below backbone '{self.backbone.spec}''s embedding width {dim})")
            self._build(dim)
            for block in self.moe.blocks:
                for expert in block.experts:
                    expert.initialise(self.generator)
        self._attach()
        for block in self.moe.blocks:
            block.add_router()
        self.task = self.moe.sessions - 1
        self.moe.counts.zero_()
        for block, frozen in zip(self.moe.blocks, self.moe.frozen):
            for expert, flag in zip(block.experts, frozen.tolist()):
                expert.requires_grad_(not flag)
            block.gates[self.task].requires_grad_(True)
            block.noises[self.task].requires_grad_(True)

    def finish(self, session: TrainingSession) -> None:
        """Activate-freeze, then this session's autoencoder and threshold."""
        for counts, frozen in zip(self.moe.counts, self.moe.frozen):
            order = torch.sort(counts, descending=True, stable=True).indices  # ties: the lower index
            frozen[order[:self.options.freeze_per_session]] = True
        with session.preserved_rng():
            features = torch.cat([self._plain(batch[0].to(self.moe.thresholds.device))
                                  for batch in session.session_batches(ordered=True)])
        self._train_autoencoder(ddas_features(features))
        self.task = None

    def release(self) -> None:
        """Take the hooks, the ``encode_image`` wrapper and the modules out of the backbone."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        vars(self.backbone).pop("encode_image", None)
        if "moe" in self.backbone.adapters:
            del self.backbone.adapters["moe"]

    def state_dict(self) -> dict[str, Any]:
        """The sizes (embedding width ``dim``, ``sessions`` routers, ``autoencoders``) and every tensor of the
        modules ({} before the first session)."""
        if self.moe is None:
            return {}
        return {"dim": self.moe.dim, "sessions": self.moe.sessions, "autoencoders": len(self.moe.autoencoders),
                "modules": {k: v.detach().clone() for k, v in self.moe.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._build(state["dim"])
        for _ in range(state["sessions"]):
            for block in self.moe.blocks:
                block.add_router()
        for _ in range(state["autoencoders"]):
            self.moe.add_autoencoder()
        self.moe.load_state_dict(state["modules"])
        self.moe.requires_grad_(False)
        self._attach()

    # -- DDAS -------------------------------------------------------------------------------
    @torch.no_grad()
    def attribute(self, features: Tensor) -> Tensor:
        """The session (0-based) whose adapters encode each image of frozen-encoder embeddings ``features``
        [B, D], or -1 for the zero-shot encoder: [B] long."""
        inputs = ddas_features(features)
        errors = torch.stack([autoencoder.errors(inputs) for autoencoder in self.moe.autoencoders])  # [T, B]
        under = errors <= self.moe.thresholds[:, None]
        best = errors.masked_fill(~under, math.inf).argmin(dim=0)
        return torch.where(under.any(dim=0), best, -1)

    def _train_autoencoder(self, inputs: Tensor) -> None:
        """A new autoencoder trained on ``inputs`` [N, D] (Adam, random batches), and its threshold."""
        autoencoder = self.moe.add_autoencoder()
        for layer in (autoencoder.encoder, autoencoder.decoder):
            linear_init_(layer, self.generator)
        autoencoder.requires_grad_(True)
        optimizer = torch.optim.Adam(autoencoder.parameters(), lr=AUTOENCODER_LR, weight_decay=AUTOENCODER_DECAY)
        order = torch.empty(0, dtype=torch.long)
        with torch.enable_grad():
            for _ in range(self.options.autoencoder_steps):
                if len(order) == 0:
                    order = torch.randperm(len(inputs), generator=self.generator)
                picked, order = order[:AUTOENCODER_BATCH], order[AUTOENCODER_BATCH:]
                optimizer.zero_grad()
                autoencoder.errors(inputs[picked.to(inputs.device)]).mean().backward()
                optimizer.step()
        autoencoder.requires_grad_(False)
        threshold = self.options.ddas_threshold
        if threshold is None:
            threshold = self.options.ddas_margin * float(autoencoder.errors(inputs).max())
        self.moe.thresholds[-1] = threshold

    # -- the encoder ------------------------------------------------------------------------
    def _build(self, dim: int) -> None:
        """The modules for embeddings of width ``dim``, in ``backbone.adapters``."""
        blocks = self.backbone.blocks()
        self.moe = MoEModules(blocks[0].width, len(blocks), dim, self.options).to(self.backbone.logit_scale.device)
        self.backbone.adapters["moe"] = self.moe

    def _attach(self) -> None:
        """Hooks on every block (once) and the ``encode_image`` wrapper."""
        if self._handles:
            return
        for view in self.backbone.blocks():
            self._handles.append(view.norms[1].register_forward_pre_hook(self._capture(view.index)))
            self._handles.append(view.module.register_forward_hook(self._add_experts(view.index)))
        self.backbone.encode_image = self._encode

    def _capture(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self._route is not None:
                self._inputs[index] = args[0]
        return hook

    def _add_experts(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._route is None:
                return None
            x = self._inputs.pop(index)
            first = output[0] if isinstance(output, tuple) else output
            if not self.batch_first:
                x = x.transpose(0, 1)
            block = self.moe.blocks[index]
            training = self.task is not None and self.moe.training
            gates = block.route(x[:, 0], self._route, self.generator if training else None)
            if training:
                self.moe.counts[index] += (gates > 0).sum(dim=0)
            added = block(x, gates)
            first = first + (added if self.batch_first else added.transpose(0, 1)).to(first.dtype)
            return (first, *output[1:]) if isinstance(output, tuple) else first
        return hook

    def _plain(self, images: Tensor) -> Tensor:
        """The frozen (zero-shot) encoder's embeddings [B, D] of ``images`` [B, 3, H, W] (no gradient)."""
        with torch.no_grad():
            return type(self.backbone).encode_image(self.backbone, images)

    def _adapted(self, images: Tensor, tasks: Tensor) -> Tensor:
        """Embeddings [B, D] of ``images`` through the experts, each image routed by its session's router."""
        self._route = tasks
        try:
            return type(self.backbone).encode_image(self.backbone, images)
        finally:
            self._route = None
            self._inputs.clear()

    def _encode(self, images: Tensor) -> Tensor:
        """``backbone.encode_image`` while the strategy is on: training routes every image by the session's
        router; otherwise DDAS picks each image's path."""
        if self.task is not None and self.moe.training:
            return self._adapted(images, torch.full((len(images),), self.task, device=images.device))
        plain = self._plain(images)
        if not len(self.moe.autoencoders):
            return plain
        tasks = self.attribute(plain)
        chosen = (tasks >= 0).nonzero().squeeze(1)
        if not len(chosen):
            return plain
        out = plain.clone()
        out[chosen] = self._adapted(images[chosen], tasks[chosen]).to(out.dtype)
        return out
