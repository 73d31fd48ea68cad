"""The field's continual-learning baselines as plugins: ``lwf``, ``wise-ft``, ``zscl`` and ``replay``.

Checks their losses against their teachers (zero while the student is the teacher), the WiSE-FT endpoints bit
for bit, the replay buffer's seeding, bound and balance, what each strategy changes, the reference data of ZSCL,
bad options refused by the grid check, and every one of them end to end with a resume.
"""
from __future__ import annotations

import json

import fscl_test_strategies
import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from PIL import Image
from test_strategies import changed, names_of, session_template, snapshot

from benchmark.backbones import load_backbone
from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from strategies.distill import FrozenEncoder, distillation
from strategies.full_ft import FullFineTuning
from strategies.lwf import LwF
from strategies.options import ReplayOptions, WiSEFTOptions, ZSCLOptions
from strategies.replay import Replay
from strategies.wise_ft import WiSEFT, interpolate
from strategies.zscl import ZSCL, ReferenceData

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

MINI = ZSCLOptions(reference="mini", reference_batch=8)


def penalties(plugin_type):
    """``plugin_type`` recording the value of its penalty at every training step, per session."""

    class Recording(plugin_type):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.terms: dict[int, list[float]] = {}

        def penalty(self):
            term = super().penalty()
            self.terms.setdefault(self.session.session_index, []).append(float(term.detach()))
            return term

    return Recording


def trained(plugin, sessions: int = 1, **train):
    """The template trained ``sessions`` sessions with ``plugin`` (fscl-tiny, two 2-shot digits sessions)."""
    torch.manual_seed(0)  # the loader's shuffling: runs to compare bit for bit draw alike
    template, stream = session_template(plugin.backbone, plugin, **train)
    for exp in list(stream)[:sessions]:
        template.train(exp)
    return template


# --------------------------------------------------------------------------- distillation
def test_distillation_is_zscl_s_cross_entropy_less_the_teacher_s_entropy():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    target = torch.softmax(teacher / 2, dim=1)
    zscl = torch.nn.functional.cross_entropy(student / 2, target) * 4  # ZSCL's helpers.distillation, T = 2
    entropy = -(target * target.log()).sum(1).mean() * 4
    torch.testing.assert_close(distillation(teacher, student, 2.0), zscl - entropy)
    assert float(distillation(teacher, teacher.clone(), 2.0)) == 0.0


def test_lwf_penalty_is_zero_while_the_student_is_its_teacher():
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = penalties(LwF)(backbone)
    trained(plugin, sessions=2, epochs=3)
    for session in (1, 2):  # the teacher: the encoder as each session started
        first, *later = plugin.terms[session]
        assert first == 0.0 and all(t > 0 for t in later), (session, plugin.terms)


def test_zscl_penalty_is_zero_at_the_start_and_its_teacher_the_pretrained_encoder():
    backbone = load_backbone("openclip:fscl-tiny")
    pretrained = {k: v.clone() for k, v in backbone.visual.state_dict().items()}
    plugin = penalties(ZSCL)(backbone, ZSCLOptions(reference="mini", reference_batch=8, avg_freq=None))
    trained(plugin, sessions=2, epochs=3)
    first, *later = plugin.terms[1]
    assert first == 0.0 and all(t > 0 for t in later)
    assert plugin.terms[2][0] > 0  # session 2 starts away from the pretrained teacher
    assert all(torch.equal(plugin.pretrained.state[k], v) for k, v in pretrained.items())


def test_frozen_encoder_runs_its_copy_and_leaves_the_weights_alone():
    backbone = load_backbone("openclip:fscl-tiny")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    copy = FrozenEncoder(backbone)
    before = backbone.encode_image(images)
    with torch.no_grad():
        for p in backbone.visual.parameters():
            p.mul_(0.5)
    assert torch.equal(copy.encode(backbone.encode_image, images), before)
    halved = backbone.encode_image(images)
    assert not torch.equal(halved, before)
    assert torch.equal(copy.encode(backbone.encode_image, images), before) and torch.equal(
        backbone.encode_image(images), halved)  # swapped back: open_clip's visual == model.visual


# --------------------------------------------------------------------------- WiSE-FT
def test_wise_ft_alpha_0_and_1_give_the_endpoints_bit_for_bit_and_half_the_mean():
    pretrained = load_backbone("openclip:fscl-tiny").visual.state_dict()
    finetuned = load_backbone("openclip:fscl-tiny")
    trained(FullFineTuning(finetuned), epochs=2)
    tuned = finetuned.visual.state_dict()
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)
    for alpha in (0.0, 1.0, 0.5):
        backbone = load_backbone("openclip:fscl-tiny")
        trained(WiSEFT(backbone, WiSEFTOptions(alpha=alpha)), epochs=2)
        for name, p in backbone.visual.named_parameters():
            if alpha == 0.5:
                torch.testing.assert_close(p, (tuned[name] + pretrained[name]) / 2, rtol=0, atol=1e-6)
            else:
                assert torch.equal(p, (pretrained if alpha == 0 else tuned)[name]), (alpha, name)

    signed = torch.tensor([-0.0, 1.0]), torch.tensor([2.0, -0.0])
    for alpha, expected in ((1.0, signed[0]), (0.0, signed[1])):  # signed zeros too
        value = signed[0].clone()
        interpolate([value], [signed[1]], alpha)
        assert value.numpy().tobytes() == expected.numpy().tobytes()


def test_wise_ft_previous_anchor_is_the_encoder_at_the_session_start():
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = WiSEFT(backbone, WiSEFTOptions(alpha=0.0, anchor="previous"))
    template, stream = session_template(backbone, FullFineTuning(backbone))
    template.train(stream[0])
    after_one = {k: v.clone() for k, v in backbone.visual.state_dict().items()}
    template, stream = session_template(backbone, plugin)
    template.train(stream[1])
    assert all(torch.equal(v, after_one[k]) for k, v in backbone.visual.state_dict().items())


# --------------------------------------------------------------------------- replay
def replay_buffer(seed: int, sizes=(10, 12, 9), buffer_size: int = 7) -> Replay:
    plugin = Replay(load_backbone("openclip:fscl-tiny"), ReplayOptions(buffer_size=buffer_size))
    plugin.seed = seed  # the run's seed, which setup reads from the session
    torch.manual_seed(12345)  # training draws: never the buffer's
    for size in sizes:
        plugin.update(size)
    return plugin


def test_replay_buffer_is_seeded_bounded_and_balanced_over_sessions():
    plugin = replay_buffer(0)
    ids = plugin.buffer_ids()
    assert [len(g) for g in ids] == [3, 2, 2]  # ExperienceBalancedBuffer: 7 over 3 sessions, the remainder first
    assert all(len(set(g)) == len(g) and all(0 <= i < n for i in g) for g, n in zip(ids, (10, 12, 9)))
    assert replay_buffer(0).buffer_ids() == ids
    assert replay_buffer(1).buffer_ids() != ids
    assert [len(g) for g in replay_buffer(0, buffer_size=1).buffer_ids()] == [1, 0, 0]
    state = torch.random.get_rng_state()
    plugin.update(5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator untouched
    assert sum(len(g) for g in plugin.buffer_ids()) == 7

    again = Replay(load_backbone("openclip:fscl-tiny"), ReplayOptions(buffer_size=7))
    again.load_state_dict(plugin.state_dict())
    assert again.buffer_ids() == plugin.buffer_ids() and again.sizes == plugin.sizes
    with pytest.raises(RuntimeError, match="replay: the buffer rebuilt"):
        again.load_state_dict({**plugin.state_dict(), "ids": [[0], [], [], []]})


class Batches(SupervisedPlugin):
    """Records the size of the training set and the labels of every batch trained."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.labels: list[set[int]] = []

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.sizes.append(len(strategy.adapted_dataset))
        self.labels.append(set())

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.labels[-1].update(strategy.mbatch[1].tolist())


def test_replayed_samples_train_with_the_session_s_own():
    backbone = load_backbone("openclip:fscl-tiny")
    torch.manual_seed(0)
    plugin, seen = Replay(backbone, ReplayOptions(buffer_size=4)), Batches()
    template, stream = session_template(backbone, plugin, seen, epochs=1)
    template.train(stream[0])
    (kept,) = plugin.buffer_ids()
    template.train(stream[1])
    assert seen.sizes == [10, 14]  # session 2: its 10 shots + the buffer's 4 of session 1
    first = {int(y) for y in stream[0].dataset.targets}
    assert seen.labels[1] - first  # session 2's own classes
    assert seen.labels[1] & first == {int(stream[0].dataset.targets[i]) for i in kept}  # the buffer's, trained


# --------------------------------------------------------------------------- what each strategy changes
@pytest.mark.parametrize("make", [LwF, WiSEFT, lambda b: ZSCL(b, MINI), lambda b: Replay(b, ReplayOptions(4))],
                         ids=["lwf", "wise-ft", "zscl", "replay"])
def test_each_strategy_changes_the_vision_encoder_only(make):
    backbone = load_backbone("openclip:fscl-tiny")
    before = snapshot(backbone)
    trained(make(backbone), sessions=2, epochs=1)
    assert changed(before, backbone) == names_of(backbone, backbone.visual.parameters())  # text, logit scale kept
    assert not any(p.requires_grad for p in backbone.parameters())


def test_zscl_weight_ensemble_is_the_running_mean_of_zscl_s_steps():
    """avg_freq 2 over 3 steps: the mean of the start weights and those after steps 1 and 3."""
    backbone = load_backbone("openclip:fscl-tiny")
    start = [p.detach().clone() for p in backbone.visual.parameters()]

    class Steps(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.weights: list[list[torch.Tensor]] = []

        def after_training_iteration(self, strategy, **kwargs) -> None:
            self.weights.append([p.detach().clone() for p in backbone.visual.parameters()])

    steps = Steps()
    plugin = ZSCL(backbone, ZSCLOptions(reference="mini", reference_batch=8, avg_freq=2, l2=0.0))
    template, stream = session_template(backbone, steps, plugin, epochs=3)  # Steps first: the weights of the step
    template.train(stream[0])
    assert len(steps.weights) == 3
    for i, p in enumerate(backbone.visual.parameters()):
        expected = ((start[i] + steps.weights[0][i]) / 2 * 2 + steps.weights[2][i]) / 3
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(p, w) for p, w in zip(backbone.visual.parameters(), steps.weights[2]))


def test_zscl_reference_files_are_read_recursively_and_drawn_by_seed(tmp_path):
    folder = tmp_path / "reference"
    rng = np.random.default_rng(0)
    for path in ("b/2.png", "a/1.jpg", "a/deeper/3.PNG", ".hidden/4.png"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / path)
    (folder / "notes.txt").write_text("not an image")
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a cat\n\na red square\n")
    backbone = load_backbone("openclip:fscl-tiny")
    options = ZSCLOptions(reference_images=str(folder), reference_captions=str(captions), reference_batch=2)
    data = ReferenceData.of(options, backbone.preprocess(False))
    assert len(data.images) == 3 and data.captions == ["a photo of a cat", "a red square"]
    draw = data.draw(2, torch.Generator().manual_seed(0))
    assert draw.shape == (2, 3, 32, 32) and torch.equal(draw, data.draw(2, torch.Generator().manual_seed(0)))
    assert data.draw(5, torch.Generator().manual_seed(0)).shape[0] == 3  # at most all of them
    plugin = penalties(ZSCL)(backbone, options)
    trained(plugin, epochs=2)
    assert plugin.terms[1][0] == 0.0 and plugin.terms[1][1] > 0

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="zscl.reference_images: no image files"):
        ZSCL(backbone, ZSCLOptions(reference_images=str(empty), reference_captions=str(captions)))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, message", [
    (["strategy=wise-ft", "wise-ft.alpha=1.5"], r"wise-ft\.alpha: invalid value 1\.5; allowed: a float in \[0, 1\]"),
    (["strategy=replay", "replay.buffer_size=0"], r"replay\.buffer_size: invalid value 0; allowed: an integer >= 1"),
    (["strategy=zscl"], r"zscl\.reference_images: invalid value None; allowed: a folder of reference images, "
                        r"or zscl\.reference=mini"),
    (["strategy=zscl", "zscl.reference_images=/nowhere"], r"zscl\.reference_images: invalid value '/nowhere'"),
    (["strategy=zscl", "zscl.reference=mini", "zscl.reference_captions=c.txt"], r"zscl\.reference: invalid value"),
    (["strategy=lwf", "lwf.temperature=0"], r"lwf\.temperature: invalid value 0"),
])
def test_bad_options_are_refused_naming_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quick", overrides)


def test_a_zscl_run_without_reference_data_is_refused_before_any_run(tmp_path, capsys):
    assert main(["run", "quick", f"out={tmp_path}", "--no-progress", "seed=0", "strategy=zscl"]) == 2
    assert "zscl.reference_images: invalid value None" in capsys.readouterr().err
    assert not list(tmp_path.rglob("manifest.json"))


# --------------------------------------------------------------------------- end to end, with a resume
NEW = ["lwf", "wise-ft", "zscl", "replay", "moe-adapters"]
STREAMS = {  # the paper's protocol (class groups of one dataset), and MTIL's (a sequence of three datasets)
    "digits": ["digits.test_fraction=0.05"],
    "sequence": ["sequence.datasets=[digits,mini-colours,mini-shapes]",
                 "sequence.dataset_options={digits: {test_fraction: 0.05}, mini-colours: {train_per_class: 4, "
                 "test_per_class: 2}, mini-shapes: {train_per_class: 4, test_per_class: 2}}"],
}


@pytest.mark.parametrize("stream", list(STREAMS))
def test_every_new_strategy_runs_three_sessions_and_resumes_to_the_same_numbers(tmp_path, stream):
    args = ["run", "quick", "--no-progress", "seed=0", "sessions=3", "shots=2", "train.epochs=2", f"stream={stream}",
            *STREAMS[stream], f"strategy=[{','.join(NEW)}]", "zscl.reference=mini",
            "zscl.reference_batch=8", "zscl.avg_freq=1", "replay.buffer_size=6", "keep_checkpoints=all",
            "moe-adapters.adapter_width=8", "moe-adapters.autoencoder_steps=20"]
    assert main([*args, f"out={tmp_path / 'reference'}"]) == 0
    run_folder = f"quick/{stream}/openclip-fscl-tiny/{{}}/2-s0"
    for strategy in NEW:  # what a process stopped during session 3 leaves
        reference, run = (tmp_path / out / run_folder.format(strategy) for out in ("reference", "resumed"))
        fscl_test_strategies.interrupted_copy(reference, run, 3)
    assert main([*args, f"out={tmp_path / 'resumed'}"]) == 0
    for strategy in NEW:
        reference, run = (tmp_path / out / run_folder.format(strategy) for out in ("reference", "resumed"))
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished" and [r["after_session"] for r in manifest["resumed"]] == [2]
        assert (run / "matrix.csv").read_text() == (reference / "matrix.csv").read_text(), strategy
        again, three = (fscl_test_strategies.saved_session(r, 3) for r in (run, reference))
        assert fscl_test_strategies.same(again["encoder"], three["encoder"]), strategy
        assert fscl_test_strategies.same(again["strategy"], three["strategy"]), strategy
        one = fscl_test_strategies.saved_session(reference, 1)
        trained = "strategy" if strategy == "moe-adapters" else "encoder"  # its experts learn, the encoder stays
        assert not fscl_test_strategies.same(one[trained], three[trained]), strategy
    ids = fscl_test_strategies.saved_session(tmp_path / "reference" / run_folder.format("replay"), 3)["strategy"]["ids"]
    assert [len(g) for g in ids] == [2, 2, 2]
