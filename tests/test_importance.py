"""Gradient passes over a session's data, as the reference codes run them.

``session_gradients``: its sums against sums by hand, its stop rules (samples, batches, every
accumulated entry away from zero); SPU (its code's trainables, number of scored batches, running
sums); LoRSU's released stop rule; EWC's Fisher (Avalanche's unshuffled eval-mode pass, leaving
the training's random draws alone) and its penalty. Real tiny models of two families.
"""
from __future__ import annotations

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch import Tensor

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_tiny_clip
from benchmark.config import TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.plugins import session_gradients
from benchmark.template import CLIPTemplate, clip_loss
from strategies.ewc import EWC, Anchor, EWCOptions
from strategies.full_ft import FullFineTuning
from strategies.lorsu import LoRSU, LoRSUOptions
from strategies.spu import SPU, SPUOptions, output_norm, scored_batches
from streams.digits import Digits

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

W, HIDDEN = 64, 256  # both tiny models: width, MLP width


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("hf-tiny"), width=W, layers=2, heads=4, embed_dim=32)


@pytest.fixture(params=["openclip", "hf"])
def spec(request, hf_folder) -> str:
    return "openclip:fscl-tiny" if request.param == "openclip" else f"hf:{hf_folder}"


def make_template(backbone, *plugins, batch_size: int = 4, epochs: int = 1, augment: bool = False,
                  all_templates: bool = False):
    """A CLIP template on two 2-shot digits sessions (10 images each); deterministic images and captions
    unless ``augment`` (open_clip's random crops) or ``all_templates`` (a random template per caption)."""
    stream = Digits("unused")
    scenario = stream.benchmark(stream.sessions(2, 2, shot_seed=0), backbone.preprocess(augment),
                                backbone.preprocess(False))
    template = CLIPTemplate(
        backbone=backbone, class_names=stream.spec.class_names,
        templates=stream.spec.templates if all_templates else stream.spec.templates[:1],
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, min_lr=1e-4),
        zeroshot=ZeroShotEvaluator(backbone), seed=0, device=torch.device("cpu"), plugins=list(plugins),
        evaluator=EvaluationPlugin(loggers=[]),
    )
    return template, scenario.train_stream


def random_batches(sizes: tuple[int, ...], seed: int = 0) -> list[list[Tensor]]:
    """Batches [images [n, 3, 32, 32], labels [n], task labels [n]] as the template's loaders yield them."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, 3, 32, 32, generator=gen), torch.randint(5, (n,), generator=gen), torch.zeros(n, dtype=torch.long)]
            for n in sizes]


def batch_gradients(template, params, objective, batches) -> list[list[Tensor]]:
    """By hand: the gradient of ``objective`` on each batch (one-template captions), per parameter."""
    backbone = template.backbone
    for p in params:
        p.requires_grad_(True)
    grads = []
    for images, labels, *_ in batches:
        text = template.class_text_features()[labels, 0]
        loss = objective(backbone.encode_image(images).float(), text, backbone.logit_scale)
        grads.append(torch.autograd.grad(loss, params))
    for p in params:
        p.requires_grad_(False)
    return grads


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def snapshot(backbone) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in backbone.named_parameters()}


def changed(before: dict[str, Tensor], backbone) -> set[str]:
    return {name for name, p in backbone.named_parameters() if not torch.equal(p, before[name])}


def names_of(backbone, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in backbone.named_parameters() if id(p) in ids}


def projection(backbone) -> torch.nn.Parameter:
    return getattr(*backbone.image_projection())


def kill_fc1_unit(block, unit: int = 0) -> None:
    """Make fc1 output ``unit`` of ``block`` dead (pre-activation -1e4): the activation's derivative there,
    hence that row of the fc1 weight gradient and that fc1 bias gradient, is exactly zero on every batch."""
    with torch.no_grad():
        block.fc1.weight[unit].zero_()
        block.fc1.bias[unit] = -1e4


class CountingObjective:
    """``clip_loss`` that counts its calls (one per scored batch); on the first ``blind`` calls it ignores
    feature 0, so the image projection's gradient has an exactly zero column (row, for HF) there."""

    def __init__(self, blind: int = 0) -> None:
        self.calls, self.blind = 0, blind

    def __call__(self, image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        self.calls += 1
        if self.calls <= self.blind:
            image = torch.cat([image[:, :1].detach(), image[:, 1:]], dim=1)
        return clip_loss(image, text, logit_scale)


class RecordedLoader:
    """A session's loader, keeping every batch it yields in ``batches``."""

    def __init__(self, loader, batches: list) -> None:
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(batch)
            yield batch


class RecordingSession:
    """A training session (the template, through the session contract) whose batches are recorded as read."""

    def __init__(self, session) -> None:
        self.session, self.batches, self.loader = session, [], None

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def session_batches(self, ordered: bool = False) -> RecordedLoader:
        self.loader = self.session.session_batches(ordered)
        return RecordedLoader(self.loader, self.batches)


class RecordingSPU(SPU):
    """SPU that keeps its scores, the session it scored on and how many batches scoring read."""

    def score(self, session, blocks):
        self.recorded = RecordingSession(session)
        self.scores = super().score(self.recorded, blocks)
        self.scored = len(self.recorded.batches)
        return self.scores


class RecordingLoRSU(LoRSU):
    def score(self, session, blocks):
        self.recorded = RecordingSession(session)
        scores = super().score(self.recorded, blocks)
        self.scored = len(self.recorded.batches)
        return scores


def as_loss(template, objective):
    """``objective(image features, caption features, logit scale)`` as a loss of one batch."""
    return lambda batch: objective(*template.batch_features(batch), template.backbone.logit_scale)


# --------------------------------------------------------------------------- session_gradients
def test_session_gradient_reductions_equal_sums_by_hand(spec):
    backbone = load_backbone(spec)
    template, _ = make_template(backbone)
    params = [backbone.blocks()[0].fc1.weight, projection(backbone)]
    batches = random_batches((4, 4, 2))
    g = batch_gradients(template, params, clip_loss, batches)
    expected = {
        "mean": [(4 * g[0][i] + 4 * g[1][i] + 2 * g[2][i]) / 10 for i in range(2)],
        "sum": [g[0][i] + g[1][i] + g[2][i] for i in range(2)],
        "running": [3 * g[0][i] + 2 * g[1][i] + g[2][i] for i in range(2)],  # Σ_b Σ_{j≤b} g_j
        "fisher": [(g[0][i].square() + g[1][i].square() + g[2][i].square()) / 3 for i in range(2)],
    }
    backbone.eval()
    for reduce, reference in expected.items():
        result = session_gradients(template, params, as_loss(template, clip_loss), reduce=reduce, batches=batches, training=True)
        for actual, wanted in zip(result, reference):
            close(actual, wanted)
    # left as it was: flags, modes, the template's mini-batch
    assert not any(p.requires_grad for p in backbone.parameters()) and all(p.grad is None for p in params)
    assert not any(m.training for m in backbone.modules()) and template.mbatch is None


@pytest.mark.parametrize(("min_samples", "min_batches", "expected"),
                         [(0, 0, 1), (4, 0, 1), (5, 0, 2), (8, 0, 2), (9, 0, 3), (1000, 0, 3), (1, 2, 2), (1, 5, 3)])
def test_session_gradients_stop_at_samples_and_batches_within_one_pass(min_samples, min_batches, expected):
    backbone = load_backbone("openclip:fscl-tiny")
    template, _ = make_template(backbone)
    objective = CountingObjective()
    session_gradients(template, [projection(backbone)], as_loss(template, objective), batches=random_batches((4, 4, 2)),
                      min_samples=min_samples, min_batches=min_batches)
    assert objective.calls == expected


@pytest.mark.parametrize(("blind", "min_abs", "expected"),
                         [(0, 1e-10, 1),  # no zero entry: the sample count decides
                          (1, 1e-10, 2),  # batch 1 leaves a column at exactly zero: go on until it is not
                          (3, 1e-10, 3),  # zero on every batch: to the end of the pass, not beyond
                          (3, None, 1)])  # the count alone
def test_nonzero_rule_scores_until_every_accumulated_entry_is_away_from_zero(spec, blind, min_abs, expected):
    backbone = load_backbone(spec)
    template, _ = make_template(backbone)
    objective = CountingObjective(blind)
    (score,) = session_gradients(template, [projection(backbone)], as_loss(template, objective),
                                 batches=random_batches((4, 4, 2)), min_samples=1, min_abs=min_abs)
    assert objective.calls == expected
    assert (score == 0).any() == (blind >= expected)


def test_nonzero_rule_checks_the_weighted_sums_before_the_division():
    """The released check is on Σ_b n_b ∇L_b: a threshold half its smallest entry after batch 1 (of 4
    samples) stops there, though the mean (a quarter of it) is below the threshold."""
    backbone = load_backbone("openclip:fscl-tiny")
    template, _ = make_template(backbone)
    batches = random_batches((4, 4, 2))
    params = [projection(backbone)]
    ((first,),) = batch_gradients(template, params, clip_loss, batches[:1])
    objective = CountingObjective()
    session_gradients(template, params, as_loss(template, objective), batches=batches, min_samples=1,
                      min_abs=0.5 * float((4 * first).abs().min()))
    assert objective.calls == 1


# --------------------------------------------------------------------------- SPU
@pytest.mark.parametrize("train_biases", ["fc1", "all"])
def test_spu_trains_masked_fc1_entries_fc1_biases_and_the_projection_only(spec, train_biases):
    backbone = load_backbone(spec)
    plugin = SPU(backbone, SPUOptions(train_biases=train_biases))
    template, stream = make_template(backbone, plugin)
    before = snapshot(backbone)
    template.train(stream[0], eval_streams=[])
    assert not any(p.requires_grad for p in backbone.parameters()) and len(backbone.adapters) == 0
    blocks = backbone.blocks()
    biases = [b.fc1.bias for b in blocks] if train_biases == "fc1" else backbone.bias_parameters()
    spu_code = names_of(backbone, [p for b in blocks for p in (b.fc1.weight, b.fc1.bias)] + [projection(backbone)])
    # (every other bias has a gradient too, but the key bias's is only rounding noise: not asserted to move)
    assert spu_code <= changed(before, backbone) <= spu_code | names_of(backbone, biases)
    names = {id(p): n for n, p in backbone.named_parameters()}
    for block, index in zip(blocks, plugin.fc1_index):
        old, new = before[names[id(block.fc1.weight)]].flatten(), block.fc1.weight.detach().flatten()
        outside = torch.ones_like(old, dtype=torch.bool).index_fill_(0, index, False)
        assert len(index) == int(0.1 * HIDDEN * W) and torch.equal(new[outside], old[outside])
        assert (new[index] != old[index]).float().mean() > 0.5
    counts = plugin.trainable_counts()
    masked = 2 * int(0.1 * HIDDEN * W) + projection(backbone).numel()
    assert counts == {"trainable": masked, "trainable_with_biases": masked + sum(p.numel() for p in biases)}
    assert sum(p.numel() for g in template.optimizer.param_groups for p in g["params"]) == counts["trainable_with_biases"]


def _spu_loop(total: int, fraction: float) -> int:
    """SPU's compute_score loop with its stop flag up: batches read before it breaks."""
    for num_batch in range(total):
        if num_batch > total * fraction:
            return num_batch + 1
    return total


def test_spu_scored_batch_counts():
    assert [scored_batches(t, 0.25, "released") for t in (1, 4, 5, 8)] == [1, 3, 3, 4]
    assert [scored_batches(t, 0.25, "ceil") for t in (1, 4, 5, 8)] == [1, 1, 2, 2]
    for fraction in (0.1, 0.25, 0.3, 0.5, 1.0):
        assert [scored_batches(t, fraction, "released") for t in range(1, 41)] == [
            _spu_loop(t, fraction) for t in range(1, 41)]


@pytest.mark.parametrize("batch_size", [10, 3, 2])
def test_spu_scores_are_running_sums_over_the_released_number_of_batches(spec, batch_size):
    backbone = load_backbone(spec)
    plugin = RecordingSPU(backbone, SPUOptions())
    template, stream = make_template(backbone, plugin, batch_size=batch_size)
    modes = []
    backbone.visual.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    template.train(stream[0], eval_streams=[])

    total = len(plugin.recorded.loader)
    assert plugin.scored == scored_batches(total, 0.25, "released") and all(modes[: plugin.scored])
    reference = load_backbone(spec)  # the same initial weights
    weights = [b.fc1.weight for b in reference.blocks()]
    grads = batch_gradients(make_template(reference)[0], weights, output_norm,
                            plugin.recorded.batches[: plugin.scored])
    running = [torch.zeros_like(w) for w in weights]
    expected = [torch.zeros_like(w) for w in weights]
    for batch in grads:
        for r, e, g in zip(running, expected, batch):
            e += r.add_(g)
    for actual, wanted in zip(plugin.scores, expected):
        close(actual, wanted)


@pytest.mark.parametrize(("stop", "expected"), [("released", 5), ("ceil", 2)])
def test_spu_scores_the_whole_pass_while_a_trained_entry_scores_zero(stop, expected):
    backbone = load_backbone("openclip:fscl-tiny")
    kill_fc1_unit(backbone.blocks()[0])
    plugin = RecordingSPU(backbone, SPUOptions(importance_stop=stop))
    template, stream = make_template(backbone, plugin, batch_size=2)
    template.train(stream[0], eval_streams=[])
    assert len(plugin.recorded.loader) == 5 and plugin.scored == expected  # released without the dead unit: 3


# --------------------------------------------------------------------------- LoRSU
@pytest.mark.parametrize(("min_abs", "dead", "expected"), [(1e-10, False, 1), (1e-10, True, 5), (0.0, True, 1)])
def test_lorsu_scores_in_eval_mode_until_enough_samples_and_no_zero_entry(min_abs, dead, expected):
    backbone = load_backbone("openclip:fscl-tiny")
    if dead:
        kill_fc1_unit(backbone.blocks()[1])
    plugin = RecordingLoRSU(backbone, LoRSUOptions(rank=4, alpha=8.0, importance_samples=1,
                                                   importance_min_abs=min_abs))
    template, stream = make_template(backbone, plugin, batch_size=2)
    modes = []
    backbone.visual.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    template.train(stream[0], eval_streams=[])
    assert len(plugin.recorded.loader) == 5 and plugin.scored == expected
    assert modes[:expected] == [False] * expected and all(modes[expected:])  # scored in eval mode, as released


# --------------------------------------------------------------------------- EWC
def test_ewc_fisher_is_avalanches_pass_in_dataset_order_and_eval_mode(spec):
    backbone = load_backbone(spec)
    ewc = EWC(backbone, EWCOptions())
    template, stream = make_template(backbone, ewc, batch_size=4)
    passes = []  # (training mode, batch size) of every forward through the vision encoder
    backbone.visual.register_forward_pre_hook(lambda module, args: passes.append((module.training, len(args[0]))))
    template.train(stream[0], eval_streams=[])

    fisher_pass = [(False, 4), (False, 4), (False, 2)]  # Avalanche: no shuffling, last partial batch kept
    assert passes[-3:] == fisher_pass and all(training for training, _ in passes[:-3])
    dataset = stream[0].dataset
    batches = [[torch.stack([dataset[i][0] for i in idx]), torch.tensor([dataset[i][1] for i in idx])]
               for idx in (range(0, 4), range(4, 8), range(8, 10))]
    params = list(backbone.visual.parameters())
    backbone.eval()
    grads = batch_gradients(template, params, clip_loss, batches)
    for i, actual in enumerate(ewc.anchor.fisher):  # session 1: the anchor's Fisher is that session's
        close(actual, sum(g[i].square() for g in grads) / 3)


def test_ewc_fisher_pass_leaves_the_training_draws_unchanged():
    """EWC with λ = 0 trains exactly as full fine-tuning, random crops and captions included: its
    Fisher pass after session 1 draws augmentations and captions, then restores the generators."""
    weights = []
    for make_plugin in (lambda b: EWC(b, EWCOptions(ewc_lambda=0.0)), FullFineTuning):
        torch.manual_seed(0)
        backbone = load_backbone("openclip:fscl-tiny")
        template, stream = make_template(backbone, make_plugin(backbone), augment=True, all_templates=True)
        for experience in stream:
            template.train(experience, eval_streams=[])
        weights.append(snapshot(backbone))
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_ewc_anchor_equals_the_sum_over_sessions():
    gen = torch.Generator().manual_seed(5)
    sessions = [([torch.rand(6, generator=gen), torch.rand(2, 3, generator=gen)],
                 [torch.randn(6, generator=gen), torch.randn(2, 3, generator=gen)]) for _ in range(3)]
    anchor = Anchor()
    theta = [torch.randn(6, generator=gen), torch.randn(2, 3, generator=gen)]
    for s, (fisher, params) in enumerate(sessions, start=1):
        anchor.add(fisher, params)
        naive = sum((f * (t - p).square()).sum() for fs, ps in sessions[:s] for f, p, t in zip(fs, ps, theta))
        torch.testing.assert_close(anchor.penalty(theta), naive, rtol=1e-5, atol=1e-6)


class PenaltyLog(SupervisedPlugin):
    def __init__(self, ewc: EWC) -> None:
        super().__init__()
        self.ewc, self.penalties = ewc, []

    def after_backward(self, strategy, **kwargs) -> None:
        self.penalties.append((strategy.clock.train_exp_counter, float(self.ewc.last_penalty)))


def test_ewc_penalty_is_zero_in_session_one_and_pulls_toward_the_previous_weights():
    distances, logs = {}, {}
    for ewc_lambda in (0.0, 1e7):
        torch.manual_seed(0)
        backbone = load_backbone("openclip:fscl-tiny")
        ewc = EWC(backbone, EWCOptions(ewc_lambda=ewc_lambda))
        logs[ewc_lambda] = PenaltyLog(ewc)
        template, stream = make_template(backbone, ewc, logs[ewc_lambda], batch_size=4, epochs=3)
        template.train(stream[0], eval_streams=[])
        after_first = torch.cat([p.detach().flatten() for p in backbone.visual.parameters()])
        template.train(stream[1], eval_streams=[])
        now = torch.cat([p.detach().flatten() for p in backbone.visual.parameters()])
        distances[ewc_lambda] = (now - after_first).norm()
    session_one = [p for s, p in logs[1e7].penalties if s == 0]
    assert len(session_one) >= 3 and set(session_one) == {0.0}
    session_two = [p for s, p in logs[1e7].penalties if s == 1]
    assert session_two[0] == pytest.approx(0.0, abs=1e-12) and max(session_two) > 0  # starts at the anchor
    assert distances[1e7] < 0.5 * distances[0.0]
