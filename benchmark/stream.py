"""What the core reads of a stream: the :class:`Stream` protocol, with its :class:`StreamSpec` (the facts of its
data file), its :class:`Session` draws and its :class:`Images`.

The registered streams (``streams.base.Stream`` and its subclasses, a plugin's own) implement it; the core never
imports them (``tests/test_layering.py``) and reads nothing else of a stream. A stream's facts live in its data
file and reach the core through its spec: the class names and prompt templates (zero-shot evaluation), the VQA
question, the answer a VLM-loss strategy trains (``ppl_answer``) and the rule that reads a generated answer
(``vqa_parse``, e.g. GTSRB's released lenient parse). A stream that brings its own questions (``own_questions``:
VSR, Hateful Memes, MMVP, VisOnlyQA) has a question per image instead (:attr:`Images.questions`); its test
split is one set, asked whole after every session (not per session class group).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

Split = Literal["train", "test"]


class StreamSpec(Protocol):
    """A stream's data file, as the core reads it."""

    name: str
    class_names: tuple[str, ...]  # label -> the class's name (prompts, VQA options)
    templates: tuple[str, ...]  # zero-shot prompt templates, ``{}`` for the class name
    vqa_question: str | None  # the question of its VQA set (None: the stream has none)
    ppl_answer: str  # the answer a ``*-ppl`` strategy trains the VLM to give, ``{}`` for the class name
    vqa_parse: str  # the rule that reads a generated answer (benchmark.vqa.questions.RULES)
    own_questions: bool  # its images bring their own questions (Images.questions); its classes are session groups
    vqa_positive: str | None  # the answer whose probability ranks its items for an AUROC (HM: "yes"), or None

    def captions(self, label: int) -> list[str]:
        """The training captions of class ``label``, as many for every class (its name in each template)."""


class Session(Protocol):
    """One few-shot session of a stream: its classes and the training ids drawn for it."""

    index: int  # 1-based
    classes: list[int]
    ids: list[str]
    short_classes: list[int]  # classes that kept fewer than the asked shots


class Images(Protocol):
    """Labelled images of a split (a torch Dataset of ``(image, label)``), in a stable order of ids."""

    ids: list[str]
    targets: Sequence[int]
    questions: list[Any] | None  # own_questions streams: each image's OwnQuestion (benchmark.vqa.questions)

    def __len__(self) -> int: ...
    def subset(self, indices: Sequence[int]) -> Images: ...
    def with_classes(self, classes: Sequence[int]) -> Images: ...
    def with_transform(self, transform: Callable | None) -> Images: ...
    def with_targets(self, targets: Sequence[int]) -> Images: ...


class SessionTest(NamedTuple):
    """What the target's zero-shot evaluation asks about one session: its test images, labelled among
    ``class_names`` and prompted with ``templates``; ``texts_key`` names those texts (the evaluator's cache key of
    their embeddings). A stream's session classes among its own names; a sequence's session (a whole dataset,
    :mod:`streams.sequence`) that dataset's own images, names and templates."""

    texts_key: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    images: Images


class Stream(Protocol):
    """A registered stream on its data root, as the runner, the VQA sets and the estimates use it."""

    spec: StreamSpec

    def sessions(self, n_sessions: int, shots: int, shot_seed: int) -> list[Session]:
        """The few-shot sessions: ``shots`` per class of each session's classes, drawn with ``shot_seed``."""

    def dataset(self, split: Split) -> Images:
        """The split's images (its readable ones with ``skip_bad_images``)."""

    def listed(self, split: Split) -> Images:
        """Every listed image of the split, readable or not (a seeded subset is drawn from these)."""

    def readable(self, split: Split, data: Images) -> Images:
        """``data`` without its unreadable images (each left out with a warning)."""

    def validation(self, per_class: int, seed: int = 0) -> Stream:
        """The stream seen through its validation view: ``per_class`` held-out training images per class."""

    def session_eval(self, session: Session) -> SessionTest:
        """The test images, class names and templates of ``session``'s zero-shot evaluation."""

    def session_datasets(self, sessions: Sequence[Session]) -> list[str] | None:
        """The dataset each session trains, in session order, for a stream whose sessions are whole datasets
        (a sequence, MTIL's protocol); None for a stream whose sessions are class groups of one dataset."""

    def benchmark(self, sessions: list[Session], train_transform: Callable, eval_transform: Callable) -> Any:
        """The Avalanche benchmark of the sessions (its ``train_stream``: one experience per session)."""

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """What a run's manifest keeps about the stream's data (seeded splits, skipped images, texts)."""
