"""The CLIP template: loss, schedule, and training on per-image captions."""
import math

import numpy as np
import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image
from torchvision import transforms

from benchmark.backbones import load_backbone
from benchmark.backbones.base import RELEASED_JITTER
from benchmark.config import TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.template import CLIPTemplate, clip_loss, cosine_lr
from strategies.full_ft import FullFineTuning
from streams.base import LabelledImages


def test_clip_loss_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    img, txt, scale = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.tensor(math.log(10.0))
    i, t = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    logits = 10.0 * i @ t.T
    log_p_img = logits.log_softmax(1).diagonal()
    log_p_txt = logits.log_softmax(0).diagonal()
    expected = -(log_p_img.mean() + log_p_txt.mean()) / 2
    assert clip_loss(img, txt, scale).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cosine_schedule_warms_up_then_decays_to_min():
    lrs = [cosine_lr(s, 10, 1e-5, 1e-6, 1) for s in range(11)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-5)  # one warm-up step
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[10] == pytest.approx(1e-6)


def _caption_dataset(n: int = 8) -> LabelledImages:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    captions = [f"picture number {i}" for i in range(n)]
    return LabelledImages(arrays, [i % 2 for i in range(n)], [str(i) for i in range(n)],
                          Image.fromarray, captions=captions)


def _template(n: int, *plugins, device: torch.device | str = "cpu", **train) -> tuple[CLIPTemplate, object]:
    """Full fine-tuning of the tiny model on ``n`` captioned images (one session) on ``device``, ``train``:
    TrainConfig values."""
    backbone = load_backbone("openclip:fscl-tiny", device)
    data = _caption_dataset(n).with_transform(backbone.preprocess(False))
    scenario = benchmark_from_datasets(train=[as_classification_dataset(data)])
    template = CLIPTemplate(
        backbone=backbone, class_names=("a", "b"), templates=("{}",), train=TrainConfig(**train),
        zeroshot=ZeroShotEvaluator(backbone), seed=0, device=torch.device(device),
        plugins=[FullFineTuning(backbone), *plugins], evaluator=EvaluationPlugin(loggers=[]),
    )
    return template, scenario.train_stream[0]


class BatchSizes(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.sizes.append(len(strategy.mb_x))


@pytest.mark.gpu
@pytest.mark.parametrize("n, drop_last, sizes", [
    (20, "auto", [16, 16]),  # more than one batch: the last partial batch is dropped (the released loader)
    (20, True, [16, 16]),
    (20, False, [16, 4, 16, 4]),
    (10, "auto", [10, 10]),  # one partial batch only: kept
    (10, False, [10, 10]),
])
def test_drop_last_sets_the_steps_of_a_session(n, drop_last, sizes, device):
    sizes_seen = BatchSizes()
    template, session = _template(n, sizes_seen, epochs=2, batch_size=16, drop_last=drop_last, device=device)
    template.train(session, eval_streams=[])
    assert sizes_seen.sizes == sizes
    assert template._total_steps == len(sizes)  # the schedule spans exactly the steps taken


@pytest.mark.parametrize(("steps", "sizes"), [(3, [16, 4, 16]), (5, [16, 4, 16, 4, 16]), (1, [16])])
def test_train_steps_cut_the_passes_at_the_step_count(steps, sizes):
    """``train.steps``: the loader starts over as often as needed (here 20 samples: batches of 16 and 4), the last
    pass cut at the count, and the schedule spans exactly those steps; ``epochs`` is ignored."""
    sizes_seen = BatchSizes()
    template, session = _template(20, sizes_seen, epochs=9, steps=steps, batch_size=16, drop_last=False)
    template.train(session, eval_streams=[])
    assert sizes_seen.sizes == sizes and template._total_steps == steps
    template.train(session, eval_streams=[])  # the next session counts its own steps
    assert sizes_seen.sizes == sizes * 2


def test_drop_last_true_on_a_session_smaller_than_a_batch_says_so():
    template, session = _template(10, batch_size=16, drop_last=True)
    with pytest.raises(ValueError, match="train.drop_last=true leaves no batch: the session has 10 samples"):
        template.train(session, eval_streams=[])


@pytest.mark.gpu
def test_fp16_trains_through_a_gradient_scaler_and_bf16_without(device):
    template, session = _template(8, epochs=1, batch_size=8, precision="fp16", device=device)
    assert isinstance(template.grad_scaler, torch.amp.GradScaler) and template.grad_scaler.is_enabled()
    before = template.backbone.visual.proj.detach().clone()
    template.train(session, eval_streams=[])
    assert template.grad_scaler.get_scale() > 1  # the loss was scaled (65536 at the start)
    assert template.grad_scaler._growth_tracker.item() == 1  # one step, unskipped: the gradients were finite
    assert not torch.equal(before, template.backbone.visual.proj)
    assert _template(8, precision="bf16", device=device)[0].grad_scaler is None
    assert _template(8, precision="fp32", device=device)[0].grad_scaler is None


def test_released_augmentation_adds_colour_jitter_and_grayscale_after_the_crop(tiny_backbone):
    plain, released = tiny_backbone.preprocess(True, "openclip"), tiny_backbone.preprocess(True, "released")
    assert plain is tiny_backbone.preprocess(True)
    kinds = [type(t) for t in released.transforms]
    at = next(i for i, t in enumerate(released.transforms) if isinstance(t, transforms.ToTensor))
    assert kinds[at - 2:at] == [transforms.RandomApply, transforms.RandomGrayscale]
    assert [type(t) for t in plain.transforms] == kinds[:at - 2] + kinds[at:]
    jitter = released.transforms[at - 2]
    assert jitter.p == 0.8 and released.transforms[at - 1].p == 0.2
    (colour,) = jitter.transforms
    assert (colour.brightness, colour.contrast, colour.saturation) == tuple((1 - v, 1 + v) for v in RELEASED_JITTER[:3])
    assert colour.hue == (-RELEASED_JITTER[3], RELEASED_JITTER[3])
    image = _caption_dataset(1).items[0]
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(released(Image.fromarray(image)))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # the torch RNG decides


@pytest.mark.gpu
def test_training_on_per_image_captions_uses_those_captions(device):
    template, session = _template(8, epochs=1, batch_size=8, device=device)
    backbone = template.backbone
    before = backbone.visual.proj.detach().clone()
    template.train(session, eval_streams=[])
    assert set(template._caption_cache) == {f"picture number {i}" for i in range(8)}
    assert not torch.equal(before, backbone.visual.proj)
