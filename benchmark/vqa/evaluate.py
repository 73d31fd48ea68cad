"""VQA as an evaluation of a run: the question sets of the run's own test images, the LLaVA (loaded once
per process) and the scores of the run's current encoder in its vision tower.

Nothing here draws from the global RNGs (the LLaVA and the ``hard`` mode's backbone load under
``torch.random.fork_rng``), so a run scores the same top-1 numbers with VQA on or off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmark.vqa.llava import Llava
from benchmark.vqa.questions import MultipleChoiceSet

_LLAVAS: dict[tuple[str, str], Llava] = {}  # (vqa.model, device) -> the loaded model, one per process


def cached_llava(spec: str, device: torch.device) -> Llava:
    """``load_llava(spec, device)``, loaded once per process (the RNGs untouched)."""
    from benchmark.vqa.llava import load_llava

    key = (spec, str(device))
    if key not in _LLAVAS:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _LLAVAS[key] = load_llava(spec, device)
    return _LLAVAS[key]


@dataclass(frozen=True)
class VQASet:
    """One dataset's questions with their images (``LabelledImages`` in the same order, no transform) and the
    indices asked after the sessions between the ends (``subset``; None: all)."""

    name: str
    questions: MultipleChoiceSet
    images: Any
    subset: list[int] | None = None

    def record(self, mode: str, seed: int) -> dict[str, Any]:
        """What the manifest keeps about the set (``vqa_sets``)."""
        entry = {"sha256": self.questions.sha256, "mode": mode, "seed": seed, "items": len(self.questions.items)}
        return entry if self.subset is None else {**entry, "subset": len(self.subset)}


def build_sets(tests: dict[str, tuple[Any, Any]], mode: str, seed: int, backbone: str) -> list[VQASet]:
    """The question set (named ``name``) of each ``name -> (stream, test images)``; ``hard`` ranks
    distractors with the pretrained ``backbone``."""
    from benchmark.vqa.build import build_question_set

    sets = []
    with torch.random.fork_rng(devices=[]):  # hard mode loads the backbone: its init must not move the run's RNG
        for name, (stream, test) in tests.items():
            questions = build_question_set(stream, mode, seed, backbone if mode == "hard" else None, test=test)
            sets.append(VQASet(name, questions, test.with_transform(None)))
    return sets


def score_set(llava: Llava, qset: VQASet, batch_size: int, full: bool = True) -> dict[str, Any]:
    """``vqa_acc``, ``vqa_acc_strict``, ``vqa_letter_mass`` (:func:`summarise`) of the set (its subset unless
    ``full``) under the LLaVA's current tower, with ``correct``/``strict_correct``/``total`` counts."""
    from benchmark.vqa.prompt import conversation
    from benchmark.vqa.scorer import letter_scores, summarise

    indices = range(len(qset.questions.items)) if full or qset.subset is None else qset.subset
    items = [qset.questions.items[i] for i in indices]
    images = [qset.images[i][0] for i in indices]
    scores = []
    for start in range(0, len(items), batch_size):
        batch = [(image, conversation(qset.questions.prompt(item), llava.processor.image_token), len(item.choices))
                 for image, item in zip(images[start:start + batch_size], items[start:start + batch_size])]
        scores += letter_scores(llava.model, llava.processor, batch)
    answers = [item.answer for item in items]
    return {**summarise(scores, answers), "total": len(items),
            "correct": sum(s.choice == a for s, a in zip(scores, answers)),
            "strict_correct": sum(s.top_letter == a for s, a in zip(scores, answers))}
