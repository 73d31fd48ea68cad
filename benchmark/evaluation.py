"""Zero-shot evaluation: cached class text embeddings, accuracy, and its Avalanche wiring.

The text side is frozen, so each dataset's class embeddings (prompt-ensembled: the mean of
the normalised embeddings over the dataset's templates, normalised again) are computed once
and reused for every evaluation of every session.

Images reach the encoder as uint8 batches normalised on the device (:mod:`benchmark.image_cache`):
decoded, resized and cropped once into the evaluation cache (``eval_cache: disk``; ``device`` also
holds them on the GPU when they fit), or at every evaluation by loader workers (``off``). The encoder
runs in the run's precision (bf16 autocast on a GPU, fp32 on the CPU), on channels-last input on a GPU.
Evaluation never draws from the global RNG, so it can be skipped or shared without changing training.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from benchmark.backbones import Backbone
from benchmark.distributed import all_reduce_sum, world_size
from benchmark.image_cache import (
    SplitTransform,
    UInt8Images,
    cached_images,
    images_key,
    is_labelled_images,
    labels_of,
    loader_workers,
    split_eval_transform,
)

EvalCache = Literal["disk", "device", "off"]
DEVICE_SHARE = 0.5  # eval_cache: device holds a set on the GPU while it takes at most this share of the free memory


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: fp32, no autocast)."""
    if device.type == "cpu" and precision == "auto" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


@dataclass(frozen=True)
class EvalSet:
    """One evaluated dataset: ``key`` names it in records (e.g. ``digits@s1``, ``cifar10``);
    its images are classified zero-shot among ``class_names`` with ``templates``.

    A set of own questions (:func:`own_question_eval_set`) has ``block`` K > 0: ``class_names`` are its items'
    option texts, K per item (``valid``: False where an item with fewer options is padded), and an image
    labelled ``i·K + a`` (item i, right option a) chooses among its own item's K texts only
    (:meth:`restrict`)."""

    key: str
    classes_from: str  # the dataset whose class names these are (the cache key)
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    dataset: Dataset  # yields (image tensor [3, H, W], label); labelled images (streams) can be cached
    block: int = 0
    valid: tuple[bool, ...] | None = None

    def restrict(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits`` [B, C] with −inf outside each image's own item's options (a set of own questions; other
        sets: unchanged). The label only names the item (``label // K``), never which option is right."""
        if not self.block:
            return logits
        start = (labels.to(logits.device) // self.block * self.block)[:, None]  # [B, 1]
        columns = torch.arange(logits.shape[1], device=logits.device)[None]  # [1, C]
        inside = (columns >= start) & (columns < start + self.block)
        inside &= torch.tensor(self.valid, device=logits.device)[None]
        return logits.masked_fill(~inside, float("-inf"))


def own_question_eval_set(key: str, images: Any) -> EvalSet:
    """The zero-shot set of images with their own questions (``images.questions``,
    :class:`~benchmark.vqa.questions.OwnQuestion`): each image is a choice among its question's options' CLIP
    texts (the suite's zero-shot reading of such sets, e.g. VSR's true/false statements); relabelled
    ``i·K + answer`` with K the most options of any item (see :class:`EvalSet`)."""
    block = max(len(q.texts) for q in images.questions)
    texts: list[str] = []
    valid: list[bool] = []
    for q in images.questions:
        pad = block - len(q.texts)
        texts += [*q.texts, *[""] * pad]
        valid += [True] * len(q.texts) + [False] * pad
    labels = [i * block + q.answer for i, q in enumerate(images.questions)]
    return EvalSet(key, key, tuple(texts), ("{}",), images.with_targets(labels), block, tuple(valid))


def eval_split(dataset: Dataset) -> SplitTransform | None:
    """The split evaluation transform of ``dataset`` when its images can be cached (labelled images whose
    transform splits: :func:`~benchmark.image_cache.split_eval_transform`), else None."""
    return split_eval_transform(dataset.transform) if is_labelled_images(dataset) else None


class EvalBatches:
    """The batches of one evaluation: ``(images [B, 3, H, W] float32 on the device, normalised, labels [B],
    task labels [B] (zeros))``, from a loader or a held uint8 tensor; uint8 images are normalised on the device."""

    def __init__(self, source: Iterable, n_batches: int, split: SplitTransform | None, device: torch.device) -> None:
        self.source, self.n_batches, self.split, self.device = source, n_batches, split, device

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for images, labels, *_ in self.source:
            images = images.to(self.device, non_blocking=True)
            if self.split is not None:
                images = self.split.normalise(images)
            if self.device.type == "cuda":  # the patch embedding's convolution runs faster on NHWC input
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.as_tensor(labels)
            yield images, labels, torch.zeros_like(labels)


def _slices(images: Tensor, labels: Tensor, batch_size: int, pin: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive batches of a held tensor; ``pin``: copied into pinned memory by a thread, one batch ahead
    (the next batch's copy overlaps the current forward pass)."""
    starts = range(0, len(images), batch_size)
    if not pin:
        for s in starts:
            yield images[s:s + batch_size], labels[s:s + batch_size]
        return
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def fill() -> None:
        try:
            for s in starts:
                item = (images[s:s + batch_size].pin_memory(), labels[s:s + batch_size])
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer
            ready.put(err)
        ready.put(None)

    thread = threading.Thread(target=fill, name="eval-pin", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class ZeroShotEvaluator:
    """Zero-shot top-1 classification with a backbone's current image encoder.

    ``dtype``: the autocast dtype of the encoder (None: fp32); ``num_workers``: loader workers (an
    integer or ``auto``, see :func:`benchmark.image_cache.loader_workers`); ``cache``: the evaluation
    cache (``off``: images decoded at every evaluation); ``progress``: a bar while a cache file is built.
    """

    def __init__(self, backbone: Backbone, batch_size: int = 64, *, dtype: torch.dtype | None = None,
                 num_workers: int | str = 0, cache: EvalCache = "off", progress: bool = False) -> None:
        self.backbone = backbone
        self.batch_size = batch_size
        self.dtype, self.num_workers, self.cache, self.progress = dtype, num_workers, cache, progress
        self._class_embeddings: dict[str, Tensor] = {}
        self._held: dict[str, Tensor] = {}  # image key -> uint8 images [N, 3, H, W] (memory-mapped, or on the GPU)
        self._keys: dict[int, tuple[Dataset, str]] = {}  # id(dataset) -> (dataset, its images' cache key)
        self.sets: list[EvalSet] = []

    @property
    def device(self) -> torch.device:
        return self.backbone.logit_scale.device

    def class_embeddings(self, key: str, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Normalised prompt-ensembled class embeddings [C, D], computed once per ``key``."""
        if key not in self._class_embeddings:
            texts = [t.format(name) for name in class_names for t in templates]
            feats = self.backbone.text_features(texts).view(len(class_names), len(templates), -1)
            self._class_embeddings[key] = torch.nn.functional.normalize(feats.mean(1), dim=-1)
        return self._class_embeddings[key]

    def logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        """Cosine similarities [B, C] (fp32) of images [B, 3, H, W] to class embeddings [C, D]; the encoder
        runs under the evaluator's autocast dtype."""
        autocast = nullcontext() if self.dtype is None else torch.autocast(images.device.type, dtype=self.dtype)
        with autocast:
            feats = self.backbone.encode_image(images)
        return torch.nn.functional.normalize(feats.float(), dim=-1) @ class_embeddings.T

    # -- the images of an evaluation ------------------------------------------------
    def batches(self, dataset: Dataset, indices: Sequence[int] | None = None, name: str = "") -> EvalBatches:
        """The evaluation batches of ``dataset`` (of its items ``indices`` only, when given), in order.

        Labelled images whose transform splits (:func:`~benchmark.image_cache.split_eval_transform`)
        come as uint8 from the cache (or, ``cache: off``, from loader workers) and are normalised on the
        device; any other dataset is loaded as it is.
        """
        split = eval_split(dataset)
        n = len(dataset) if indices is None else len(indices)
        n_batches = -(-n // self.batch_size)
        if split is not None and self.cache != "off":
            images, labels = self._held_images(dataset, split, name), labels_of(dataset)
            if indices is not None:
                chosen = torch.as_tensor(list(indices), dtype=torch.int64)
                images, labels = images[chosen.to(images.device)], labels[chosen]
            pin = self.device.type == "cuda" and images.device.type == "cpu"
            return EvalBatches(_slices(images, labels, self.batch_size, pin), n_batches, split, self.device)
        data: Dataset = dataset if split is None else UInt8Images(dataset, split)
        if indices is not None:
            data = Subset(data, list(indices))
        loader = DataLoader(data, batch_size=self.batch_size, num_workers=loader_workers(self.num_workers, n_batches),
                            pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                            collate_fn=getattr(dataset, "collate_fn", None))
        return EvalBatches(loader, n_batches, split, self.device)

    def _held_images(self, dataset: Any, split: SplitTransform, name: str) -> Tensor:
        """The cached uint8 images of ``dataset``: memory-mapped, or on the GPU (``cache: device``, when they
        take at most :data:`DEVICE_SHARE` of its free memory); kept for the evaluator's later evaluations."""
        key = self._images_key(dataset, split)
        if key not in self._held:
            images, _ = cached_images(dataset, split, key=key, batch_size=self.batch_size, progress=self.progress,
                                      desc=name, num_workers=loader_workers(self.num_workers,
                                                                            -(-len(dataset) // self.batch_size)))
            if self.cache == "device" and self.device.type == "cuda" and \
                    images.numel() <= DEVICE_SHARE * torch.cuda.mem_get_info(self.device)[0]:
                images = images.to(self.device)
            self._held[key] = images
        return self._held[key]

    def _images_key(self, dataset: Any, split: SplitTransform) -> str:
        """:func:`~benchmark.image_cache.images_key` of ``dataset``, computed once per dataset object."""
        known = self._keys.get(id(dataset))
        if known is None or known[0] is not dataset:
            known = self._keys[id(dataset)] = (dataset, images_key(dataset, split))
        return known[1]

    def held_bytes(self) -> int:
        """Bytes of evaluation images this evaluator holds on the GPU (``cache: device``)."""
        return sum(t.numel() for t in self._held.values() if t.device.type == "cuda")

    @torch.no_grad()
    def predict(self, dataset: Dataset, class_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted labels [N], true labels [N]) over a dataset of (image, label) pairs."""
        was_training = self.backbone.training
        self.backbone.eval()
        preds, labels = [], []
        for images, y, _ in self.batches(dataset):
            preds.append(self.logits(images, class_embeddings.to(images.device)).argmax(1).cpu())
            labels.append(y)
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
        """The Avalanche stream of the added sets, one experience per set, in order (the template loads an
        experience's images through :meth:`set_batches`)."""
        return benchmark_from_datasets(
            eval=[as_classification_dataset(s.dataset) for s in self.sets]
        ).streams["eval"]

    def set_batches(self, experience_index: int, indices: Sequence[int] | None = None) -> EvalBatches:
        s = self.sets[experience_index]
        return self.batches(s.dataset, indices, s.key)

    def embeddings_for(self, experience_index: int) -> Tensor:
        s = self.sets[experience_index]
        return self.class_embeddings(s.classes_from, s.class_names, s.templates)

    def indistinct_items(self) -> dict[str, int]:
        """Per added set of own questions, how many of its items have two options whose texts the text encoder
        cannot tell apart (cosine ≥ 1 − 1e-6, e.g. long prompts cut at its context length before the option):
        zero-shot then picks the first of them. Sets with none are left out."""
        out = {}
        for index, s in enumerate(self.sets):
            if not s.block:
                continue
            bank = self.embeddings_for(index).float()  # [N·K, D]
            embeddings = bank.view(-1, s.block, bank.shape[-1])  # [N, K, D]
            valid = torch.tensor(s.valid, device=embeddings.device).view(-1, s.block)
            similar = embeddings @ embeddings.transpose(1, 2) >= 1 - 1e-6  # [N, K, K]
            similar &= valid[:, :, None] & valid[:, None, :]
            similar &= ~torch.eye(s.block, dtype=torch.bool, device=embeddings.device)
            count = int(similar.flatten(1).any(1).sum())
            if count:
                out[s.key] = count
        return out

    # -- the pretrained model's row, shared ---------------------------------------------
    def image_keys(self) -> dict[str, str | None]:
        """Per added set, the cache key of its uint8 images (:func:`~benchmark.image_cache.images_key`), or
        None for a set that is not labelled images or whose transform does not split."""
        keys: dict[str, str | None] = {}
        for s in self.sets:
            split = eval_split(s.dataset)
            keys[s.key] = None if split is None else self._images_key(s.dataset, split)
        return keys

    def row_keys(self, context: dict[str, Any], model: str | None = None) -> dict[str, str | None]:
        """Per added set, the SHA-256 of what its zero-shot counts depend on before any training: the
        backbone's identity and weights (:func:`model_fingerprint`), the set's classes, templates and images
        (their cache key, which covers the transform's geometric part; a set of own questions: also its labels,
        which hold the right options), its normalisation, and the
        evaluation's batch size, precision and ``context`` (device, library versions); None for a set whose
        images have no cache key. ``model``: the backbone's fingerprint, when known already."""
        model = model or model_fingerprint(self.backbone)
        keys: dict[str, str | None] = {}
        for s, (name, images) in zip(self.sets, self.image_keys().items()):
            if images is None:
                keys[name] = None
                continue
            split = eval_split(s.dataset)
            described = {"model": model, "classes": s.class_names, "templates": s.templates, "images": images,
                         "normalise": [split.mean, split.std], "batch_size": self.batch_size,
                         "dtype": str(self.dtype), "world_size": world_size(), **context}
            if s.block:  # own questions: the labels hold the right options (e.g. MMVP's corrected labels)
                described["choices"] = [s.block, list(s.valid), [int(t) for t in labels_of(s.dataset)]]
            keys[name] = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
        return keys


def model_fingerprint(backbone: Backbone) -> str:
    """SHA-256 of a backbone's load string, class and every tensor of its state (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(f"{backbone.spec}|{type(backbone).__qualname__}".encode())
    for name, tensor in backbone.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


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
