"""Zero-shot evaluation: cached class text embeddings, accuracy, and its Avalanche wiring.

The text side is frozen, so each dataset's class embeddings (prompt-ensembled: the mean of
the normalised embeddings over the dataset's templates, normalised again) are computed once
and reused for every evaluation of every session.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmark.backbones import Backbone
from benchmark.distributed import all_reduce_sum


@dataclass(frozen=True)
class EvalSet:
    """One evaluated dataset: ``key`` names it in records (e.g. ``digits@s1``, ``cifar10``);
    its images are classified zero-shot among ``class_names`` with ``templates``."""

    key: str
    classes_from: str  # the dataset whose class names these are (the cache key)
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    dataset: Dataset  # yields (image tensor [3, H, W], label)


class ZeroShotEvaluator:
    """Zero-shot top-1 classification with a backbone's current image encoder."""

    def __init__(self, backbone: Backbone, batch_size: int = 64) -> None:
        self.backbone = backbone
        self.batch_size = batch_size
        self._class_embeddings: dict[str, Tensor] = {}
        self.sets: list[EvalSet] = []

    def class_embeddings(self, key: str, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Normalised prompt-ensembled class embeddings [C, D], computed once per ``key``."""
        if key not in self._class_embeddings:
            texts = [t.format(name) for name in class_names for t in templates]
            feats = self.backbone.text_features(texts).view(len(class_names), len(templates), -1)
            self._class_embeddings[key] = torch.nn.functional.normalize(feats.mean(1), dim=-1)
        return self._class_embeddings[key]

    def logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        """Cosine similarities [B, C] of images [B, 3, H, W] to class embeddings [C, D]."""
        feats = torch.nn.functional.normalize(self.backbone.encode_image(images).float(), dim=-1)
        return feats @ class_embeddings.T

    @torch.no_grad()
    def predict(self, dataset: Dataset, class_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted labels [N], true labels [N]) over a dataset of (image, label) pairs."""
        was_training = self.backbone.training
        self.backbone.eval()
        device = class_embeddings.device
        preds, labels = [], []
        for images, y, *_ in DataLoader(dataset, batch_size=self.batch_size):
            preds.append(self.logits(images.to(device), class_embeddings).argmax(1).cpu())
            labels.append(torch.as_tensor(y))
        self.backbone.train(was_training)
        return torch.cat(preds), torch.cat(labels)

    def accuracy(self, dataset: Dataset, key: str, class_names: Sequence[str], templates: Sequence[str]) -> float:
        """Zero-shot top-1 accuracy in [0, 1] of a labelled dataset."""
        preds, labels = self.predict(dataset, self.class_embeddings(key, class_names, templates))
        return int((preds == labels).sum()) / len(labels) if len(labels) else float("nan")

    # -- Avalanche wiring -----------------------------------------------------------
    def add(self, eval_set: EvalSet) -> None:
        self.sets.append(eval_set)

    def stream(self):
        """The Avalanche stream of the added sets, one experience per set, in order."""
        return benchmark_from_datasets(
            eval=[as_classification_dataset(s.dataset) for s in self.sets]
        ).streams["eval"]

    def embeddings_for(self, experience_index: int) -> Tensor:
        s = self.sets[experience_index]
        return self.class_embeddings(s.classes_from, s.class_names, s.templates)


class ZeroShotAccuracy(PluginMetric[float]):
    """Avalanche metric: zero-shot top-1 accuracy of each evaluated set.

    Emits ``Top1_ZeroShot/<set key>`` after each eval experience and keeps the counts
    ``(correct, total)`` of the last evaluation in :attr:`counts` (summed over the ranks of a
    data-parallel run).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, tuple[int, int]] = {}
        self._correct = self._total = 0

    def reset(self) -> None:
        self._correct = self._total = 0

    def result(self) -> float:
        return self._correct / self._total if self._total else float("nan")

    def before_eval_exp(self, strategy) -> None:
        self.reset()

    def after_eval_iteration(self, strategy) -> None:
        self._correct += int((strategy.mb_output.argmax(1) == strategy.mb_y).sum())
        self._total += len(strategy.mb_y)

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        # under ddp: true each rank saw a disjoint share of the set; the counts add up
        self._correct, self._total = all_reduce_sum([self._correct, self._total])
        key = strategy.zeroshot.sets[strategy.experience.current_experience].key
        self.counts[key] = (self._correct, self._total)
        step = strategy.clock.train_iterations
        return [MetricValue(self, f"Top1_ZeroShot/{key}", self.result(), step)]

    def __str__(self) -> str:
        return "Top1_ZeroShot"
