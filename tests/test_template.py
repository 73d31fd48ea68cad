"""The CLIP template: loss, schedule, and training on per-image captions."""
import math

import numpy as np
import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image

from benchmark.backbones import load_backbone
from benchmark.config import TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.template import CLIPTemplate, clip_loss, cosine_lr
from strategies.full_ft import FullFineTuning
from streams.base import LabelledImages


def test_clip_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(math.log(10.0))
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


def test_training_on_per_image_captions_uses_those_captions():
    backbone = load_backbone("openclip:fscl-tiny")
    data = _caption_dataset().with_transform(backbone.preprocess(False))
    scenario = benchmark_from_datasets(train=[as_classification_dataset(data)])
    template = CLIPTemplate(
        backbone=backbone, class_names=("a", "b"), templates=("{}",), train=TrainConfig(epochs=1, batch_size=8),
        zeroshot=ZeroShotEvaluator(backbone), seed=0, device=torch.device("cpu"),
        plugins=[FullFineTuning(backbone)], evaluator=EvaluationPlugin(),
    )
    before = backbone.visual.proj.detach().clone()
    template.train(scenario.train_stream[0], eval_streams=[])
    assert set(template._caption_cache) == {f"picture number {i}" for i in range(8)}
    assert not torch.equal(before, backbone.visual.proj)
