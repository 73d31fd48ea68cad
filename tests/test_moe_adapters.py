"""``moe-adapters`` (MoE-Adapters4CL) on the tiny open_clip model: the released init leaves the encoder unchanged,
only the strategy's modules train (activate-freeze keeps the most chosen experts), DDAS sends each seen session's
images to its own router and far-out-of-distribution images to the zero-shot encoder, and a resumed grid run ends
with the uninterrupted run's numbers."""
from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image, ImageOps

from benchmark.backbones import load_backbone
from benchmark.config import ConfigError, TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.template import CLIPTemplate
from strategies.moe_adapters import MoEAdapters
from strategies.options import MoEAdaptersOptions
from streams.digits import Digits

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

SMALL = dict(experts=4, top_k=2, adapter_width=8, freeze_per_session=1, autoencoder_code=4, autoencoder_steps=150)


def inverted_red(image):
    """A visually different dataset from the same digits: white-on-black ink, tinted red."""
    red, green, blue = ImageOps.invert(image).split()
    return Image.merge("RGB", (red, green.point(lambda v: v // 4), blue.point(lambda v: v // 4)))


def two_looks(backbone, shots: int = 4):
    """A template and a 2-session stream: digits as they are, then the same classes' other images inverted and
    red; the test images of each look (tensors [N, 3, H, W])."""
    stream = Digits("unused")
    tf = backbone.preprocess(False)
    train, test = stream.listed("train"), stream.dataset("test")
    first, second = [], []
    for c in range(10):
        rows = [i for i, t in enumerate(train.targets) if t == c]
        first += rows[:shots]
        second += rows[shots:2 * shots]
    looks = [tf, lambda image: tf(inverted_red(image))]
    scenario = benchmark_from_datasets(
        train=[as_classification_dataset(train.subset(rows).with_transform(look))
               for rows, look in zip((first, second), looks)],
        test=[as_classification_dataset(test.with_transform(look)) for look in looks])
    template = CLIPTemplate(
        backbone=backbone, class_names=stream.spec.class_names, templates=stream.spec.templates[:1],
        train=TrainConfig(epochs=3, batch_size=8, lr=1e-2, min_lr=1e-3), zeroshot=ZeroShotEvaluator(backbone),
        seed=0, device=backbone.logit_scale.device, plugins=[], evaluator=EvaluationPlugin(loggers=[]))
    tests = [torch.stack([test.with_transform(look)[i][0] for i in range(len(test))]) for look in looks]
    return template, scenario.train_stream, tests


def strategy_on(backbone, **options) -> MoEAdapters:
    torch.manual_seed(0)
    return MoEAdapters(backbone, MoEAdaptersOptions(**{**SMALL, **options}))


def test_bad_options_name_the_key_and_what_is_allowed():
    for bad, key in [(dict(top_k=5), "top_k"), (dict(experts=0), "experts"), (dict(ddas_threshold=0.0), "ddas_threshold"),
                     (dict(adapter_dropout=1.0), "adapter_dropout"), (dict(freeze_per_session=9), "freeze_per_session")]:
        with pytest.raises(ConfigError, match=f"moe-adapters.{key}: invalid value"):
            MoEAdaptersOptions(**{**SMALL, **bad})
    backbone = load_backbone("openclip:fscl-tiny")
    template, _, _ = two_looks(backbone)
    with pytest.raises(ConfigError, match=r"autoencoder_code: invalid value 32; allowed: an integer in \[1, 31\]"):
        strategy_on(backbone, autoencoder_code=32).setup(template)


def test_new_experts_leave_the_encoder_unchanged_and_route_top_k():
    backbone = load_backbone("openclip:fscl-tiny")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = backbone.encode_image(images)
    strategy = strategy_on(backbone)
    template, _, _ = two_looks(backbone)
    strategy.setup(template)
    backbone.train()
    after = backbone.encode_image(images)  # the training route: every image through session 1's router
    assert torch.equal(after, before)
    counts = strategy.moe.counts
    assert counts.sum(dim=1).tolist() == [6 * SMALL["top_k"]] * len(backbone.blocks())
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapters.moe.blocks.") and "autoencoders" not in name
                             for name in trainable)
    strategy.release()
    assert len(backbone.adapters) == 0 and "encode_image" not in vars(backbone)


def test_only_the_strategy_trains_activate_freeze_and_ddas_picks_the_session():
    backbone = load_backbone("openclip:fscl-tiny")
    base = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    strategy = strategy_on(backbone)
    template, stream, tests = two_looks(backbone)
    template.plugins.append(strategy)
    template.strategies.append(strategy)
    snapshots = []
    for experience in stream:
        template.train(experience)
        snapshots.append({k: v.clone() for k, v in strategy.moe.state_dict().items()})
    assert all(torch.equal(p, base[name]) for name, p in backbone.model.named_parameters())  # text, scale, base
    first, second = snapshots
    frozen = first["frozen"]
    for snapshot, before in ((first, torch.zeros_like(frozen)), (second, frozen)):  # + each block's most chosen
        most = torch.nn.functional.one_hot(snapshot["counts"].argmax(dim=1), SMALL["experts"]).bool()
        assert torch.equal(snapshot["frozen"], before | most)
    for b, e in frozen.nonzero().tolist():  # frozen after session 1: unchanged by session 2
        for part in ("down.weight", "down.bias", "up.weight", "up.bias"):
            key = f"blocks.{b}.experts.{e}.{part}"
            assert torch.equal(first[key], second[key]), key
    assert torch.equal(first["blocks.0.gates.0"], second["blocks.0.gates.0"])  # session 1's router left alone
    assert not torch.equal(second["blocks.0.gates.1"], torch.zeros_like(second["blocks.0.gates.1"]))
    assert any(not torch.equal(first[k], second[k]) for k in first if ".experts." in k)

    backbone.eval()
    plain = [type(backbone).encode_image(backbone, images) for images in tests]
    for session, features in enumerate(plain):
        picked = strategy.attribute(features)
        assert (picked == session).float().mean() >= 0.9, (session, picked.tolist())
    noise = torch.zeros(16, 3, 32, 32)  # far out of distribution: random-coloured vertical stripes
    noise[..., ::2] = torch.rand(16, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    assert (strategy.attribute(type(backbone).encode_image(backbone, noise)) == -1).all()
    with torch.no_grad():  # the wrapped encoder: DDAS per image inside encode_image
        assert torch.equal(backbone.encode_image(noise), type(backbone).encode_image(backbone, noise))
        mixed = torch.cat([noise[:3], tests[1][:5]])
        out = backbone.encode_image(mixed)
    assert torch.equal(out[:3], type(backbone).encode_image(backbone, noise[:3]))
    assert not torch.allclose(out[3:], plain[1][:5])
