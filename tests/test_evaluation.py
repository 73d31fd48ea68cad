"""Zero-shot evaluation against a brute-force computation."""
import torch
from torch.nn import functional as F

from benchmark.evaluation import ZeroShotEvaluator
from streams.digits import Digits


def _brute_force_accuracy(backbone, dataset, class_names, templates) -> float:
    with torch.no_grad():
        class_vectors = []
        for name in class_names:
            feats = torch.stack([F.normalize(backbone.encode_text(backbone.tokenize([t.format(name)]))[0], dim=0)
                                 for t in templates])
            class_vectors.append(F.normalize(feats.mean(0), dim=0))
        weights = torch.stack(class_vectors)
        correct = 0
        for i in range(len(dataset)):
            image, label = dataset[i]
            feat = F.normalize(backbone.encode_image(image[None])[0], dim=0)
            correct += int((weights @ feat).argmax()) == label
    return correct / len(dataset)


def test_accuracy_matches_brute_force(tiny_backbone):
    stream = Digits("unused")
    data = stream.dataset("test").subset(range(0, 540, 9)).with_transform(tiny_backbone.preprocess(False))
    spec = stream.spec
    evaluator = ZeroShotEvaluator(tiny_backbone, batch_size=7)
    fast = evaluator.accuracy(data, "digits", spec.class_names, spec.templates)
    assert abs(fast - _brute_force_accuracy(tiny_backbone, data, spec.class_names, spec.templates)) < 1e-9


def test_class_embeddings_are_computed_once_per_dataset(tiny_backbone):
    evaluator = ZeroShotEvaluator(tiny_backbone)
    first = evaluator.class_embeddings("d", ["cat", "dog"], ["a {}.", "the {}."])
    assert evaluator.class_embeddings("d", ["cat", "dog"], ["a {}.", "the {}."]) is first
    assert first.shape == (2, 32) and torch.allclose(first.norm(dim=-1), torch.ones(2))
