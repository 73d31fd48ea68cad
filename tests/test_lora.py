"""The ``lora`` baseline (peft) against the released implementation's LoRA, on real tiny models
of two families (open_clip fused attention, HF separate q/k/v).

The released ``LoRAParametrization`` (src/clip_ft/lora_utils.py) adds (α/r)·lora_A·lora_B to
every visual weight [out, in] with lora_A [out, r] Kaiming-uniform (a = √5: U(±1/√r)) and
lora_B [r, in] zero, and keeps that one adapter through all sessions. Checked here: the
factors after ``init``, one Adam step against a hand-computed update, ``keep`` against
``merge`` over two sessions, and a resumed ``keep`` run against an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import math
import re

import fscl_test_strategies
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from PIL import Image
from torch.nn.utils import parametrize

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_tiny_clip
from benchmark.cli import main
from benchmark.config import ConfigError, TrainConfig, from_dict
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.export import encoder_after
from benchmark.template import CLIPTemplate, clip_loss
from strategies.lora import LoRA, LoRAOptions
from streams.digits import Digits

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
W, HEADS, LAYERS, EMBED, HIDDEN = 64, 4, 2, 32, 256  # both tiny models


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("hf-tiny"), width=W, layers=LAYERS, heads=HEADS, embed_dim=EMBED)


@pytest.fixture(params=["openclip", "hf"])
def spec(request, hf_folder) -> str:
    return "openclip:fscl-tiny" if request.param == "openclip" else f"hf:{hf_folder}"


def session_template(backbone, *plugins):
    """A CLIP template on two 2-shot digits sessions (10 images each), one epoch, fixed captions."""
    stream = Digits("unused")
    tf = backbone.preprocess(False)
    scenario = stream.benchmark(stream.sessions(2, 2, shot_seed=0), tf, tf)
    template = CLIPTemplate(
        backbone=backbone, class_names=stream.spec.class_names, templates=stream.spec.templates[:1],
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, min_lr=1e-4), zeroshot=ZeroShotEvaluator(backbone),
        seed=0, device=backbone.logit_scale.device, plugins=list(plugins), evaluator=EvaluationPlugin(loggers=[]),
    )
    return template, scenario.train_stream


def snapshot(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_plain_and_frozen(backbone) -> None:
    assert len(backbone.adapters) == 0
    assert not any(parametrize.is_parametrized(m) for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())


def factor_names(backbone) -> dict[str, tuple[str, str]]:
    """While attached: {plain weight name: (down, up) factor names}, all under ``visual``, with
    ΔW = SCALE · up @ down. peft layers: down = A [r, in], up = B [out, r]; the projection
    (LowRankDelta, ΔP = s·A·B): down = B [r, cols], up = A [rows, r]."""
    names = {}
    for name, module in backbone.visual.named_modules():
        if isinstance(module, LoraLayer):
            weight = "in_proj_weight" if isinstance(module, LoraMultiheadAttention) else "weight"
            names[f"{name.replace('.base_layer', '')}.{weight}"] = (
                f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight")
    module, attr = backbone.image_projection()
    prefix = next(f"{n}." if n else "" for n, m in backbone.visual.named_modules() if m is module)
    names[f"{prefix}{attr}"] = (f"{prefix}parametrizations.{attr}.0.B", f"{prefix}parametrizations.{attr}.0.A")
    return names


def plain_name(name: str) -> str:
    """The name an attached encoder's base parameter has in the plain encoder."""
    return re.sub(r"parametrizations\.(\w+)\.original", r"\1", name.replace(".base_layer", ""))


class StartProbe(SupervisedPlugin):
    """Records the encoder's parameters when a session starts (after the LoRA plugin before it)
    and which of them are the factors of which weight."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[dict[str, torch.Tensor]] = []
        self.factors: dict[str, tuple[str, str]] = {}

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.starts.append(snapshot(strategy.backbone.visual))
        self.factors = factor_names(strategy.backbone)

    def is_factor(self, name: str) -> bool:
        return any(name in pair for pair in self.factors.values())


def expected_trainable(spec: str) -> int:
    """Σ r·(in + out) over the adapted weights of the tiny models (+ the projection [W, EMBED])."""
    per_block = (W + 3 * W) + (W + W) if spec.startswith("openclip") else 4 * (W + W)  # in_proj + out | q, k, v, out
    per_block += 2 * (W + HIDDEN)  # fc1, fc2
    return RANK * (LAYERS * per_block + W + EMBED)


def fixed_batch(backbone, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [size, 3, H, W] and normalised caption features [size, D], each from its own generator."""
    shape = backbone.preprocess(False)(Image.new("RGB", (32, 32))).shape
    images = torch.randn(size, *shape, generator=torch.Generator().manual_seed(11)).to(backbone.logit_scale.device)
    dim = backbone.encode_image(images[:1]).shape[-1]
    text = torch.nn.functional.normalize(torch.randn(size, dim, generator=torch.Generator().manual_seed(12)), dim=-1)
    return images, text.to(images.device)


# --------------------------------------------------------------------------- options
def test_options_name_bad_values():
    with pytest.raises(ConfigError, match="lora.init"):
        from_dict(LoRAOptions, {"init": "xavier"}, prefix="lora")
    with pytest.raises(ConfigError, match="lora.across_sessions"):
        from_dict(LoRAOptions, {"across_sessions": "reset"}, prefix="lora")
    assert (LoRAOptions().init, LoRAOptions().across_sessions) == ("released", "keep")


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("init", ["released", "peft"])
def test_init_puts_the_random_factor_on_its_side_with_its_bound(spec, init):
    backbone = load_backbone(spec)
    images, _ = fixed_batch(backbone)
    with torch.no_grad():
        before = backbone.encode_image(images)
    torch.manual_seed(0)
    plugin = LoRA(backbone, LoRAOptions(rank=RANK, alpha=ALPHA, init=init))
    plugin.setup(None)
    params = plugin.adapter_parameters()
    *layers, projection = ((params[down], params[up]) for down, up in factor_names(backbone).values())
    for down, up in layers:
        random, zero = (up, down) if init == "released" else (down, up)
        bound = 1 / math.sqrt(RANK if init == "released" else down.shape[1])  # 1/√r | 1/√in
        assert not zero.any()
        assert random.abs().max() <= bound and random.abs().max() > 0.8 * bound
    down, up = projection  # the released code's in both modes: the [rows, r] factor, U(±1/√r)
    assert not down.any() and 0.8 / math.sqrt(RANK) < up.abs().max() <= 1 / math.sqrt(RANK)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(images), before)  # unchanged at step 0
    assert plugin.trainable_counts()["trainable"] == expected_trainable(spec)

    drawn = {name: p.clone() for name, p in plugin.adapter_parameters().items()}
    plugin.finish(None)
    backbone.requires_grad_(False)
    torch.manual_seed(0)
    plugin.setup(None)  # same global seed: the same factors
    assert all(torch.equal(p, drawn[name]) for name, p in plugin.adapter_parameters().items())


# --------------------------------------------------------------------------- one Adam step by hand
@pytest.mark.gpu
@pytest.mark.parametrize("init", ["released", "peft"])
def test_one_adam_step_equals_the_hand_computed_update(spec, init, device):
    """ΔW after one Adam step (lr) on a fixed batch, from the dense weight gradient G = ∂L/∂W at W₀.

    ΔW = s·B·A, so ∂L/∂A = s·Bᵀ·G and ∂L/∂B = s·G·Aᵀ; Adam's first step moves a parameter by
    −lr·g/(|g| + eps). released (A₀ = 0): ΔW = s·B₀·A₁; peft (B₀ = 0): ΔW = s·B₁·A₀.
    """
    lr, eps = 1e-2, 1e-8
    backbone = load_backbone(spec, device)
    images, text = fixed_batch(backbone)
    dense = copy.deepcopy(backbone)
    weights0 = snapshot(backbone.visual)

    torch.manual_seed(0)
    plugin = LoRA(backbone, LoRAOptions(rank=RANK, alpha=ALPHA, init=init))
    plugin.setup(None)
    params = plugin.adapter_parameters()
    factors0 = {name: (params[down].detach().clone(), params[up].detach().clone())
                for name, (down, up) in factor_names(backbone).items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr, eps=eps)
    clip_loss(backbone.encode_image(images), text, backbone.logit_scale).backward()
    optimizer.step()
    plugin.finish(None)
    backbone.requires_grad_(False)  # as the template does after a strategy's finish
    assert_plain_and_frozen(backbone)

    names = list(factors0)
    targets = {n: p.requires_grad_(True) for n, p in dense.visual.named_parameters() if n in factors0}
    grads = torch.autograd.grad(clip_loss(dense.encode_image(images), text, dense.logit_scale),
                                [targets[n] for n in names])

    def adam(g):
        return -lr * g / (g.abs() + eps)

    after = dict(backbone.visual.named_parameters())
    for name, g in zip(names, grads):
        down, up = factors0[name]
        if down.any():  # peft init: the up factor B starts at 0 and trains first
            expected = SCALE * adam(SCALE * g @ down.T) @ down
        else:  # released init, and the projection: the down factor starts at 0 and trains first
            expected = SCALE * up @ adam(SCALE * up.T @ g)
        actual = after[name] - weights0[name]
        # Adam's g/(|g| + eps) is sensitive where |g| ≈ eps: a tolerance of 0.1 % of the update
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item(), msg=name)
    unchanged = set(weights0) - set(names)
    assert all(torch.equal(after[n], weights0[n]) for n in unchanged)


# --------------------------------------------------------------------------- one session
@pytest.mark.gpu
def test_lora_changes_weights_only_through_merged_adapters(spec, device):
    backbone = load_backbone(spec, device)
    plugin = LoRA(backbone, LoRAOptions(rank=RANK, alpha=ALPHA))
    template, stream = session_template(backbone, plugin)
    before = snapshot(backbone)
    template.train(stream[0])
    assert_plain_and_frozen(backbone)  # merged: the same parameter names as before, no LoRA factors
    assert plugin.trainable_counts()["trainable"] == 0  # frozen until the next session attaches the adapter
    now = dict(backbone.named_parameters())
    assert set(now) == set(before), "the parameter set changed (adapters left behind?)"
    blocks = backbone.blocks()
    linears = [m.weight for m in backbone.visual.modules() if isinstance(m, torch.nn.Linear)]
    expected = {id(p) for p in [p.weight for b in blocks for p in b.qkv] + linears + [getattr(*backbone.image_projection())]}
    assert {n for n, p in now.items() if not torch.equal(p, before[n])} == {n for n, p in now.items() if id(p) in expected}
    assert len(expected) > 3 * LAYERS
    assert all(isinstance(b.module, torch.nn.Module) for b in backbone.blocks())  # block views work again


# --------------------------------------------------------------------------- across sessions
def test_keep_trains_one_adapter_through_the_sessions(spec):
    backbone = load_backbone(spec)
    pretrained = snapshot(backbone.visual)
    plugin, probe = LoRA(backbone, LoRAOptions(rank=RANK, alpha=ALPHA)), StartProbe()
    template, stream = session_template(backbone, plugin, probe)
    torch.manual_seed(0)
    template.train(stream[0])
    assert_plain_and_frozen(backbone)  # evaluated, checkpointed and exported as a plain encoder
    kept = {name: t.clone() for name, t in plugin.state_dict()["factors"].items()}
    template.train(stream[1])

    first, second = probe.starts
    assert set(kept) == {name for name in second if probe.is_factor(name)}
    assert all(torch.equal(second[n], kept[n]) for n in kept)  # continues where session 1 ended
    assert any(not torch.equal(first[n], kept[n]) for n in kept)
    for name, t in second.items():  # under it, the pretrained weights (its update taken back out)
        if not probe.is_factor(name):
            torch.testing.assert_close(t, pretrained[plain_name(name)], rtol=0, atol=1e-6, msg=name)

    factors = plugin.state_dict()["factors"]  # after session 2: W₀ + the one adapter's update, once
    adapted = probe.factors
    assert_plain_and_frozen(backbone)
    for name, weight in backbone.visual.named_parameters():
        delta = torch.zeros_like(weight)
        if name in adapted:
            down, up = adapted[name]
            delta = SCALE * factors[up] @ factors[down]
        torch.testing.assert_close(weight - pretrained[name], delta, rtol=0, atol=1e-6, msg=name)


def test_merge_merges_and_starts_each_session_from_new_factors(spec):
    backbone = load_backbone(spec)
    plugin = LoRA(backbone, LoRAOptions(rank=RANK, alpha=ALPHA, across_sessions="merge"))
    probe = StartProbe()
    template, stream = session_template(backbone, plugin, probe)
    torch.manual_seed(0)
    template.train(stream[0])
    assert_plain_and_frozen(backbone)
    assert plugin.state_dict() == {"factors": {}}
    merged = snapshot(backbone.visual)
    template.train(stream[1])

    first, second = probe.starts
    for down, up in probe.factors.values():
        assert not second[down].any() and not torch.equal(second[up], first[up])  # a new draw, A = 0
    for name, t in second.items():  # on the encoder session 1 merged
        if not probe.is_factor(name):
            assert torch.equal(t, merged[plain_name(name)]), name


def test_a_resumed_keep_run_ends_with_the_numbers_of_an_uninterrupted_run(tmp_path):
    """A run resumed after session 1 (its checkpoint: the merged encoder + the kept factors)."""
    run = "quick/digits/openclip-fscl-tiny/lora/5-s0"
    args = ["run", "quick", "--no-progress", "seed=0", "sessions=2", "train.epochs=2", "strategy=lora",
            "lora.rank=8", "keep_checkpoints=all"]
    assert main([*args, f"out={tmp_path / 'reference'}"]) == 0
    reference, resumed = tmp_path / "reference" / run, tmp_path / "resumed" / run
    fscl_test_strategies.interrupted_copy(reference, resumed, 2)
    assert main([*args, f"out={tmp_path / 'resumed'}"]) == 0
    assert [r["after_session"] for r in json.loads((resumed / "manifest.json").read_text())["resumed"]] == [1]

    saved, same = fscl_test_strategies.saved_session, fscl_test_strategies.same
    one, two, again = saved(reference, 1), saved(reference, 2), saved(resumed, 2)
    assert same(again["encoder"], two["encoder"]) and same(again["strategy"]["factors"], two["strategy"]["factors"])
    assert (resumed / "matrix.csv").read_text() == (reference / "matrix.csv").read_text()
    factors = one["strategy"]["factors"]
    assert factors and any(not torch.equal(factors[k], two["strategy"]["factors"][k]) for k in factors)

    pretrained = load_backbone("openclip:fscl-tiny").visual.state_dict()
    exported = encoder_after(reference, 1).visual.state_dict()  # what `fscl export` writes
    assert exported.keys() == pretrained.keys()  # a plain encoder holding the update of every adapted weight
    adapted = {f"transformer.resblocks.{i}.{w}" for i in range(LAYERS)
               for w in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    assert {k for k in pretrained if not torch.equal(exported[k], pretrained[k])} == adapted | {"proj"}
