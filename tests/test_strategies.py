"""Strategies on real tiny models of two families (open_clip fused attention, HF separate q/k/v).

Checks which parameters change and which do not, that masks are respected, that merging
preserves outputs, that the efficient LoRSU equals its dense reference, the selection rules
against brute force, the EWC penalty, bad input, and every strategy end to end via ``fscl run``.
"""
from __future__ import annotations

import json
from itertools import combinations

import open_clip
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch.nn import functional as F
from torch.nn.utils import parametrize

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_tiny_clip
from benchmark.cli import main
from benchmark.config import ConfigError, TrainConfig, load_config
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.plugins import CostMeter
from benchmark.records import slug
from benchmark.template import CLIPTemplate, clip_loss
from strategies.full_ft import FullFineTuning
from strategies.layernorm import LayerNormTuning
from strategies.lorsu import BlockScores, LoRSU, LoRSUOptions, masks, qkv_update_size
from strategies.lorsu.reference import DenseLoRSU
from strategies.lorsu.update import HeadLoRA
from strategies.spu import SPU
from streams.digits import Digits

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

RANK, ALPHA = 4, 8.0  # small rank: the low-rank form is the cheaper one in the count formula
W, HEADS, HEAD_DIM, HIDDEN, LAYERS, EMBED = 64, 4, 16, 256, 2, 32  # both tiny models


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("hf-tiny"), width=W, layers=LAYERS, heads=HEADS, embed_dim=EMBED)


def _spec(family: str, hf_folder) -> str:
    return "openclip:fscl-tiny" if family == "openclip" else f"hf:{hf_folder}"


@pytest.fixture(params=["openclip", "hf"])
def spec(request, hf_folder) -> str:
    return _spec(request.param, hf_folder)


def session_template(backbone, *plugins, epochs: int = 2, batch_size: int = 16, lr: float = 1e-3,
                     all_templates: bool = False, **train):
    """A CLIP template on two 2-shot digits sessions (10 images each), deterministic images and
    (unless ``all_templates``) captions; ``train``: more TrainConfig values."""
    stream = Digits("unused")
    tf = backbone.preprocess(False)
    scenario = stream.benchmark(stream.sessions(2, 2, shot_seed=0), tf, tf)
    template = CLIPTemplate(
        backbone=backbone, class_names=stream.spec.class_names,
        templates=stream.spec.templates if all_templates else stream.spec.templates[:1],
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=lr / 10, **train),
        zeroshot=ZeroShotEvaluator(backbone),
        seed=0, device=backbone.logit_scale.device, plugins=list(plugins), evaluator=EvaluationPlugin(loggers=[]),
    )
    return template, scenario.train_stream


def snapshot(backbone) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in backbone.named_parameters()}


def changed(before: dict[str, torch.Tensor], backbone) -> set[str]:
    now = dict(backbone.named_parameters())
    assert set(now) == set(before), "the parameter set changed (adapters left behind?)"
    return {name for name, p in now.items() if not torch.equal(p, before[name])}


def names_of(backbone, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in backbone.named_parameters() if id(p) in ids}


def assert_plain_and_frozen(backbone) -> None:
    assert len(backbone.adapters) == 0
    assert not any(parametrize.is_parametrized(m) for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())


def random_scores(blocks, seed: int = 0) -> list[BlockScores]:
    gen = torch.Generator().manual_seed(seed)
    return [BlockScores(*(torch.randn(b.width, b.width, generator=gen).to(b.fc1.weight.device) for _ in range(3)),
                        torch.randn(*b.fc1.weight.shape, generator=gen).to(b.fc1.weight.device)) for b in blocks]


# --------------------------------------------------------------------------- selection rules
def test_fc1_mask_is_the_best_mask_of_its_size_by_brute_force():
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for size in (1, 3, 5):
        best = max(combinations(range(12), size), key=lambda keep: grad.flatten()[list(keep)].square().sum())
        assert masks.top_entries(grad, size).tolist() == sorted(best)  # Lemma: max ‖m ⊙ g‖²


def test_head_selection_is_the_best_structured_mask_by_brute_force():
    gen = torch.Generator().manual_seed(2)
    heads, head_dim = 4, 3
    q, k, v = (torch.randn(heads * head_dim, 5, generator=gen) for _ in range(3))

    def kept(chosen):  # ‖m ⊙ g‖² of the mask that keeps the chosen heads' rows in q, k and v
        rows = [h * head_dim + i for h in chosen for i in range(head_dim)]
        return sum(m[rows].square().sum() for m in (q, k, v))

    for top in (1, 2, 3):
        best = max(combinations(range(heads), top), key=kept)
        assert masks.top_heads(masks.head_scores(q, k, v, heads), top) == best  # Corollary


def test_lorsu_select_applies_the_rules_to_every_block(hf_folder):
    backbone = load_backbone(_spec("hf", hf_folder))
    plugin = LoRSU(backbone, LoRSUOptions(top_k_heads=2, sparsity=0.1))
    blocks = backbone.blocks()
    scores = random_scores(blocks)
    for sel, s in zip(plugin.select(blocks, scores), scores):
        def kept(heads, s=s):  # ‖m ⊙ g‖² of the mask keeping these heads' q, k and v rows
            return sum(m.view(HEADS, HEAD_DIM, W)[list(heads)].square().sum() for m in (s.q, s.k, s.v))

        assert sel.heads == max(combinations(range(HEADS), 2), key=kept)
        count = int(0.1 * HIDDEN * W)
        assert sel.fc1_index.tolist() == sorted(s.fc1.abs().flatten().argsort(descending=True)[:count].tolist())


# --------------------------------------------------------------------------- the block view's q/k/v update
def test_qkv_update_on_activations_equals_the_merged_weight_change(spec):
    backbone = load_backbone(spec)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    original = backbone.encode_image(x)
    block = backbone.blocks()[1]
    weights_before = [p.weight.detach().clone() for p in block.qkv]
    update = HeadLoRA(block.qkv_rows((1, 3)), block.width, RANK, ALPHA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for factor in (update.A, update.B):  # not the global RNG: the values must not depend on earlier tests
            factor.copy_(torch.randn(factor.shape, generator=gen))
    handle = block.add_qkv_update(update)
    updated = backbone.encode_image(x)
    assert not torch.allclose(updated, original, atol=1e-3)
    handle.remove()
    torch.testing.assert_close(backbone.encode_image(x), original, rtol=0, atol=1e-6)

    block.merge_qkv_rows(update.rows, update.delta().detach())
    # another fp32 summation order: the error scales with the outputs, not with each element
    torch.testing.assert_close(backbone.encode_image(x), updated, rtol=1e-4, atol=1e-4 * updated.abs().max().item())
    chosen = {h * HEAD_DIM + i for h in (1, 3) for i in range(HEAD_DIM)}
    for proj, before in zip(block.qkv, weights_before):
        now = proj.weight_rows()
        before = before[proj.rows]
        for row in range(W):
            assert torch.equal(now[row], before[row]) != (row in chosen)


# --------------------------------------------------------------------------- LoRSU
@pytest.mark.gpu
def test_lorsu_session_changes_only_masked_entries_and_chosen_heads(spec, device):
    backbone = load_backbone(spec, device)
    plugin = LoRSU(backbone, LoRSUOptions(rank=RANK, alpha=ALPHA))
    template, stream = session_template(backbone, plugin)
    before = snapshot(backbone)
    template.train(stream[0])
    assert_plain_and_frozen(backbone)

    blocks = backbone.blocks()
    qkv_biases = [p.bias for b in blocks for p in b.qkv]
    expected = names_of(backbone, [p.weight for b in blocks for p in b.qkv] + qkv_biases
                        + [b.fc1.weight for b in blocks] + [b.fc1.bias for b in blocks]
                        + [getattr(*backbone.image_projection())])
    assert changed(before, backbone) == expected

    names = {id(p): n for n, p in backbone.named_parameters()}
    for block, sel in zip(blocks, plugin.selection):
        assert len(sel.heads) == 2 and len(sel.fc1_index) == int(0.1 * HIDDEN * W)
        old_fc1, new_fc1 = before[names[id(block.fc1.weight)]].flatten(), block.fc1.weight.detach().flatten()
        outside = torch.ones_like(old_fc1, dtype=torch.bool).index_fill_(0, sel.fc1_index, False)
        assert torch.equal(new_fc1[outside], old_fc1[outside])  # bit-identical outside the mask
        assert (new_fc1[sel.fc1_index] != old_fc1[sel.fc1_index]).float().mean() > 0.5
        for proj in block.qkv:
            old, new = before[names[id(proj.weight)]][proj.rows], proj.weight_rows().detach()
            for h in range(HEADS):
                rows = block.head_rows(h)
                assert torch.equal(old[rows], new[rows]) == (h not in sel.heads)

    # the free-parameter count, by hand: S = ⌊0.1·256·64⌋ per block, R = 3·2·16 rows, projection 64×32
    lora_per_block = min(96 * W, RANK * (96 + W))
    trainable = LAYERS * (1638 + lora_per_block) + RANK * (W + EMBED)
    released = LAYERS * (1638 + min(96 * W, RANK * 4 * W)) + RANK * (W + EMBED)  # the released code's log
    counts = plugin.trainable_counts()
    assert counts == {"trainable": trainable, "trainable_with_biases": trainable + LAYERS * (3 * W + HIDDEN),
                      "trainable_released": released}
    # and the optimizer held exactly that many numbers: state ∝ mask size, not fc1 size
    assert sum(p.numel() for g in template.optimizer.param_groups for p in g["params"]) == counts["trainable_with_biases"]


def test_lorsu_counts_of_vit_l_14_336_are_the_paper_s_and_the_free_ones():
    """ViT-L/14-336 at r = 64, 2 heads, sparsity 0.1: 24 blocks of width 1024 (16 heads of 64, fc1 4096 × 1024),
    projection 1024 × 768, 304.29 M visual parameters. The released log: 16.47 M (5.41 %); free: 12.34 M."""
    fc1, rows, projection = masks.mask_size(4096 * 1024, 0.1), 3 * 2 * 64, 64 * (1024 + 768)
    released = 24 * (fc1 + qkv_update_size(rows, 1024, 64, "released")) + projection
    free = 24 * (fc1 + qkv_update_size(rows, 1024, 64, "free")) + projection
    assert (released, free) == (16_472_464, 12_343_696)
    assert round(100 * released / 304_293_888, 2) == 5.41  # the paper's figure


class RecordingLoRSU(LoRSU):
    """LoRSU that keeps the scores it selected from (to compare with a computation by hand)."""

    def select(self, blocks, scores):
        self.recorded = getattr(self, "recorded", []) + [scores]
        return super().select(blocks, scores)


def test_lorsu_session_two_scores_the_merged_encoder(spec):
    backbone = load_backbone(spec)
    plugin = RecordingLoRSU(backbone, LoRSUOptions(rank=RANK, alpha=ALPHA))
    template, stream = session_template(backbone, plugin)
    template.train(stream[0])
    first = plugin.selection

    # importance by hand on the merged encoder: all 10 images of session 2 form its one batch
    images, labels = zip(*[(x, y) for x, y, *_ in stream[1].dataset])
    text = template.class_text_features()[torch.tensor(labels), 0]
    blocks = backbone.blocks()
    params = list({id(p): p for b in blocks for p in (*[q.weight for q in b.qkv], b.fc1.weight)}.values())
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(clip_loss(backbone.encode_image(torch.stack(images)), text, backbone.logit_scale),
                                params)
    for p in params:
        p.requires_grad_(False)
    grad = {id(p): g for p, g in zip(params, grads)}

    template.train(stream[1])
    for block, scores in zip(blocks, plugin.recorded[1]):
        for name, expected in (("fc1", grad[id(block.fc1.weight)]), *[
                (n, grad[id(p.weight)][p.rows]) for n, p in zip("qkv", block.qkv)]):
            torch.testing.assert_close(getattr(scores, name), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert any(not torch.equal(a.fc1_index, b.fc1_index) for a, b in zip(first, plugin.selection))


def test_lorsu_merge_preserves_outputs(spec):
    backbone = load_backbone(spec)
    plugin = LoRSU(backbone, LoRSUOptions(rank=RANK, alpha=ALPHA))
    blocks = backbone.blocks()
    plugin.install(blocks, plugin.select(blocks, random_scores(blocks)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: every trainable moves
        for p in backbone.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    x = torch.randn(4, 3, 32, 32, generator=gen)
    trained = backbone.encode_image(x)
    plugin.merge()
    backbone.requires_grad_(False)  # as the template does after a strategy's finish
    assert_plain_and_frozen(backbone)
    torch.testing.assert_close(backbone.encode_image(x), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_efficient_lorsu_equals_the_dense_reference_after_adam_steps(spec, device):
    torch.manual_seed(0)
    fast_backbone, dense_backbone = load_backbone(spec, device), load_backbone(spec, device)
    # The q/k/v biases train densely in both forms; they are left out because the key bias has a zero
    # gradient in exact arithmetic (softmax ignores a constant shift), which Adam turns from rounding
    # noise into lr-sized steps of either sign.
    options = LoRSUOptions(rank=8, alpha=16.0, train_attn_bias=False)
    fast, dense = LoRSU(fast_backbone, options), DenseLoRSU(dense_backbone, options)
    start = snapshot(fast_backbone)
    selection = fast.select(fast_backbone.blocks(), random_scores(fast_backbone.blocks()))
    fast.install(fast_backbone.blocks(), selection)
    dense.install(dense_backbone.blocks(), selection)
    dense.copy_factors_from(fast)

    gen = torch.Generator().manual_seed(4)
    images, text = torch.randn(8, 3, 32, 32, generator=gen), F.normalize(torch.randn(8, EMBED, generator=gen), dim=-1)
    images, text = images.to(device), text.to(device)
    runs = []
    for backbone in (fast_backbone, dense_backbone):
        optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = clip_loss(backbone.encode_image(images), text, backbone.logit_scale)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((optimizer, losses))
    (fast_opt, fast_losses), (dense_opt, dense_losses) = runs
    assert fast_losses == pytest.approx(dense_losses, rel=1e-5)
    def state(opt):
        return sum(v.numel() for s in opt.state.values() for v in s.values())

    assert state(fast_opt) < 0.5 * state(dense_opt)

    fast.merge()
    dense.merge()
    dense_params = dict(dense_backbone.named_parameters())
    for name, p in fast_backbone.named_parameters():
        assert (p - dense_params[name]).abs().max() <= 1e-5, name
    assert max((p - start[n]).abs().max() for n, p in fast_backbone.named_parameters()) > 1e-3  # they did move


@pytest.mark.gpu
def test_lorsu_trains_under_bf16_autocast(spec, device):
    backbone = load_backbone(spec, device)
    template, stream = session_template(backbone, LoRSU(backbone, LoRSUOptions(rank=RANK, alpha=ALPHA)),
                                        precision="bf16")
    before = snapshot(backbone)
    template.train(stream[0])
    assert_plain_and_frozen(backbone)
    assert changed(before, backbone) and all(p.dtype == torch.float32 and p.isfinite().all()
                                             for p in backbone.parameters())


def test_cost_meter_leaves_training_unchanged():
    weights, meters = [], []
    for metered in (False, True):
        torch.manual_seed(0)
        backbone = load_backbone("openclip:fscl-tiny")
        plugin = LoRSU(backbone, LoRSUOptions(rank=RANK, alpha=ALPHA))
        meters.append(CostMeter(plugin))
        template, stream = session_template(backbone, plugin, *meters[-1:] if metered else (), batch_size=4,
                                            all_templates=True)  # random captions: the generator is restored
        template.train(stream[0])
        weights.append(snapshot(backbone))
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    costs = meters[1].session_costs()
    assert costs["flops_per_sample"] > 0 and costs["trainable"] == plugin.trainable_counts()["trainable"]


class LRLog(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("scheduler_step", ["step", "epoch"])
def test_lorsu_ablations_and_scheduler_step(scheduler_step):
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = LoRSU(backbone, LoRSUOptions(rank=RANK, alpha=ALPHA, head_selection="random", fc1_mask="none",
                                          proj_lora=False, train_fc1_bias=False))
    lr_log = LRLog()
    template, stream = session_template(backbone, plugin, lr_log, batch_size=4, epochs=3, drop_last=False,
                                        scheduler_step=scheduler_step)  # 3 iterations per epoch
    before = snapshot(backbone)
    template.train(stream[0])
    assert all(len(set(s.heads)) == 2 and s.head_scores is None and s.fc1_index is None for s in plugin.selection)
    blocks = backbone.blocks()
    assert changed(before, backbone) == names_of(backbone, [b.q.weight for b in blocks] + [b.q.bias for b in blocks])
    assert template.train_cfg.scheduler_step == scheduler_step
    epochs = [lr_log.lrs[i:i + 3] for i in (0, 3, 6)]
    if scheduler_step == "epoch":  # one rate per epoch; the released code's first epoch runs at min_lr
        assert all(len(set(e)) == 1 for e in epochs)
        assert epochs[0][0] == template.train_cfg.min_lr and epochs[1][0] > epochs[2][0] > epochs[0][0]
    else:  # a new rate every step once past the warm-up
        assert len(set(lr_log.lrs[1:])) == 8


# --------------------------------------------------------------------------- the baselines
@pytest.mark.gpu
def test_full_ft_and_layernorm_change_exactly_their_parameters(device):
    for plugin_type, expected in ((FullFineTuning, lambda b: b.visual.parameters()),
                                  (LayerNormTuning, lambda b: [p for n in b.norm_layers() for p in n.parameters()])):
        backbone = load_backbone("openclip:fscl-tiny", device)
        template, stream = session_template(backbone, plugin_type(backbone), epochs=1)
        before = snapshot(backbone)
        template.train(stream[0])
        assert changed(before, backbone) == names_of(backbone, expected(backbone)), plugin_type.__name__


# --------------------------------------------------------------------------- bad input
def test_bad_lorsu_values_name_the_key_value_backbone_and_range():
    backbone = load_backbone("openclip:fscl-tiny")
    with pytest.raises(ConfigError, match=r"lorsu\.top_k_heads: invalid value 5.*\[1, 4\].*openclip:fscl-tiny"):
        LoRSU(backbone, LoRSUOptions(top_k_heads=5))
    for override, message in (("lorsu.sparsity=0", r"lorsu\.sparsity: invalid value 0\.0; allowed: a float in \(0, 1\]"),
                              ("lorsu.sparsity=1.5", r"lorsu\.sparsity: invalid value 1\.5"),
                              ("lorsu.rank=0", r"lorsu\.rank: invalid value 0; allowed: an integer >= 1"),
                              ("spu.sparsity=-1", r"spu\.sparsity: invalid value -1")):
        with pytest.raises(ConfigError, match=message):
            load_config("quick", ["strategy=lorsu", override])


def test_block_strategies_on_a_backbone_without_blocks_fail_before_training(tmp_path, capsys):
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fscl-tiny-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fscl-tiny-rn.json")
    backbone = load_backbone("openclip:fscl-tiny-rn")
    for plugin_type in (LoRSU, SPU):
        with pytest.raises(ConfigError, match=r"backbone 'openclip:fscl-tiny-rn' exposes none"):
            plugin_type(backbone)
    assert main(["run", "quick", f"out={tmp_path / 'runs'}", "--no-progress", "seed=0", "strategy=lorsu",
                 "backbone=openclip:fscl-tiny-rn"]) == 2
    assert "exposes none" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("manifest.json"))  # stopped before a run record was started


# --------------------------------------------------------------------------- end to end
ALL = ["zeroshot", "full-ft", "ewc", "layernorm", "lora", "spu", "lorsu"]


def test_every_strategy_runs_end_to_end_and_records_its_costs(tmp_path, hf_folder):
    common = [f"out={tmp_path}", "--no-progress", "seed=0", "train.epochs=1", "shots=2", "digits.test_fraction=0.05"]
    assert main(["run", "quick", *common, f"strategy=[{','.join(ALL)}]"]) == 0
    assert main(["run", "quick", *common, "strategy=lorsu", f"backbone=hf:{hf_folder}", "lorsu.rank=8"]) == 0
    costs = {}
    for summary in tmp_path.glob("quick/digits/*/*/2-s0/summary.json"):
        backbone, strategy = summary.parts[-4:-2]
        assert json.loads((summary.parent / "manifest.json").read_text())["status"] == "finished"
        costs[backbone, strategy] = json.loads(summary.read_text())["costs"]["sessions"]
    assert set(costs) == {("openclip-fscl-tiny", s) for s in ALL} | {(slug(f"hf:{hf_folder}"), "lorsu")}
    tiny = {s: costs["openclip-fscl-tiny", s] for s in ALL}
    assert all(len(sessions) == 2 for sessions in costs.values())
    assert "flops_per_sample" not in tiny["zeroshot"][0] and tiny["zeroshot"][0]["trainable"] == 0
    for s in ALL[1:]:
        session = tiny[s][1]
        assert session["flops_per_sample"] > 0 and session["optimizer_state_bytes"] > 0, s
        assert 0 < session["trainable"] <= session["trainable_with_biases"], s
        assert session["trainable_released"] == session["trainable"] or s == "lorsu", s
        # the paper's count adds the text tower's forward the caption cache skips; 10 samples, 1 epoch, one batch
        assert 0 < session["text_flops_per_sample"] < session["flops_per_sample"], s
        assert session["paper_flops_per_sample"] == session["flops_per_sample"] + session["text_flops_per_sample"], s
        assert session["train_samples"] == 10 and session["train_flops"] == 10 * session["flops_per_sample"], s
        assert session["paper_train_flops"] == 10 * session["paper_flops_per_sample"], s
    assert len({tiny[s][1]["text_flops_per_sample"] for s in ALL[1:]}) == 1  # the same captions' tower
    assert "train_flops" not in tiny["zeroshot"][1]
    assert tiny["lorsu"][1]["setup_seconds"] > 0 and tiny["spu"][1]["setup_seconds"] > 0
    assert tiny["lorsu"][1]["trainable"] < tiny["full-ft"][1]["trainable"]
    assert tiny["lorsu"][1]["optimizer_state_bytes"] < 0.5 * tiny["full-ft"][1]["optimizer_state_bytes"]
    assert tiny["lorsu"][1]["flops_per_sample"] < tiny["full-ft"][1]["flops_per_sample"]
