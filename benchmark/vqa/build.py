"""A stream's multiple-choice question set: its test images, its question, and for ``hard``
distractors the class similarities of a pretrained backbone's frozen text embeddings.

The stream is the object the registry builds (``STREAMS.get(name).obj(root, options)``); its
spec's ``vqa_question`` is the question. The default file is ``<root>/vqa/<stream>-<mode>-s<seed>.json``
(``hard``: ``<stream>-hard-<backbone slug>-s<seed>.json``), beside the data it was made from.
Runs build their sets on first use and keep them in the cache folder (:func:`cached_question_set`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.records import slug
from benchmark.vqa.questions import (
    GENERATOR_VERSION,
    LabelQuestions,
    MultipleChoiceSet,
    QuestionSetError,
    own_question_set,
)

log = logging.getLogger(__name__)

def default_path(root: str | Path, stream: str, mode: str, seed: int, backbone: str | None = None) -> Path:
    """Where ``fscl vqa build`` writes a set without ``--out``."""
    tag = f"hard-{slug(backbone or '')}" if mode == "hard" else mode
    return Path(root) / "vqa" / f"{stream}-{tag}-s{seed}.json"


def class_similarity(backbone: str, class_names: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
    """Cosine similarities [C, C] of the classes' text embeddings [C, D] under the pretrained
    ``backbone`` (prompt-ensembled over ``templates`` as in zero-shot evaluation); the text side
    is never trained, so they are the same for every strategy and session."""
    from benchmark.backbones import load_backbone
    from benchmark.evaluation import ZeroShotEvaluator

    embeddings = ZeroShotEvaluator(load_backbone(backbone)).class_embeddings("vqa", class_names, templates)
    return (embeddings @ embeddings.T).cpu().numpy()


def build_question_set(stream: Any, mode: str = "random", seed: int = 0,
                       backbone: str | None = None, test: Any = None) -> MultipleChoiceSet:
    """The question set of ``stream``'s test split (one item per test image, in its order).

    ``hard`` needs ``backbone`` (a load string: whose text embeddings rank the classes);
    ``random`` takes none. ``test``: the images to ask about (``LabelledImages`` of the stream,
    e.g. a run's control subset); default the whole test split. A stream with its own questions gives its own
    (mode and seed do not apply).
    """
    spec = stream.spec
    if spec.own_questions:  # the stream's own questions (no distractors to draw)
        test = stream.dataset("test") if test is None else test
        return own_question_set(spec.name, test.ids, test.questions, spec.vqa_parse, spec.vqa_positive,
                                {"own": spec.name, "version": spec.version})
    if spec.vqa_question is None:
        raise QuestionSetError(f"stream '{spec.name}' has no question: add 'vqa_question: ...' to its data file")
    if (mode == "hard") != (backbone is not None):
        raise QuestionSetError(f"mode '{mode}' with backbone {backbone!r}: mode 'hard' needs a backbone "
                               "(--backbone), mode 'random' takes none")
    LabelQuestions(spec.name, spec.class_names, spec.vqa_question)  # refuses < 2 classes before any model loads
    similarity = class_similarity(backbone, spec.class_names, spec.templates) if mode == "hard" else None
    generator = LabelQuestions(spec.name, spec.class_names, spec.vqa_question, mode, seed, similarity, backbone)
    test = stream.dataset("test") if test is None else test
    return generator.build(test.ids, test.targets, spec.vqa_parse)  # the stream's answer rule (its data file)


def check_asks(questions: MultipleChoiceSet, test: Any, class_names: tuple[str, ...]) -> None:
    """Raise :class:`QuestionSetError` unless ``questions`` asks about exactly ``test``'s images, in its order,
    each with its own class (by name) as the right option."""
    ids = [item.id for item in questions.items]
    if ids != list(test.ids):
        extra, missing = sorted(set(ids) - set(test.ids)), sorted(set(test.ids) - set(ids))
        raise QuestionSetError(f"question set '{questions.name}' asks about other images than the {len(test.ids)} "
                               f"test images it is asked on ({len(ids)} items; not in the test split: {extra[:3]}, "
                               f"missing: {missing[:3]}, or another order)")
    wrong = [item.id for item, label in zip(questions.items, test.targets)
             if item.choices[item.answer] != class_names[int(label)]]
    if wrong:
        raise QuestionSetError(f"question set '{questions.name}': the right option of {len(wrong)} item(s) is not "
                               f"the image's class (e.g. {wrong[:3]})")


def cached_question_set(name: str, stream: Any, test: Any, mode: str, seed: int, backbone: str | None,
                        cache: str | Path) -> MultipleChoiceSet:
    """:func:`build_question_set` of ``stream``'s images ``test``, frozen in the cache folder and read back next time.

    The file is ``<cache>/vqa/<name>-<key>-<mode>[-<backbone>]-s<seed>.json`` (:func:`default_path`; ``name``: the
    stream's registered name), ``key``
    hashing what decides its content (the images and their labels, the classes, the question, the generator's
    version, mode, seed, ``hard``'s backbone). A cached file is used only when its content hash, its images
    and its answers check (:meth:`MultipleChoiceSet.load`, :func:`check_asks`); otherwise it is built again
    and replaced, with a warning (as is a cache folder that cannot be written: the set is then used unsaved).
    A stream's own questions are read from its files each time and frozen as ``<name>-own-<sha256>.json``.
    """
    spec = stream.spec
    if spec.own_questions:
        questions = build_question_set(stream, test=test)
        path = Path(cache) / "vqa" / f"{name}-own-{questions.sha256[:16]}.json"
        if not path.is_file():
            _save(questions, path)
        return questions
    key = hashlib.sha256(json.dumps(
        [spec.name, list(test.ids), [int(t) for t in test.targets], list(spec.class_names), spec.vqa_question,
         GENERATOR_VERSION, mode, seed, backbone], separators=(",", ":")).encode()).hexdigest()[:16]
    path = default_path(cache, f"{name}-{key}", mode, seed, backbone)
    if path.is_file():
        try:
            questions = MultipleChoiceSet.load(path)
            check_asks(questions, test, spec.class_names)
            return questions
        except QuestionSetError as err:
            log.warning("rebuilding the cached question set %s: %s", path, err)
    questions = build_question_set(stream, mode, seed, backbone, test=test)
    check_asks(questions, test, spec.class_names)
    _save(questions, path)
    return questions


def _save(questions: MultipleChoiceSet, path: Path) -> None:
    """Freeze ``questions`` in the cache folder; a folder that cannot be written only warns (the run goes on with
    the set it built)."""
    try:
        questions.save(path)
    except OSError as err:  # e.g. a read-only home
        log.warning("cannot cache the question set in %s (%s); set FSCL_CACHE to a writable folder", path, err)
