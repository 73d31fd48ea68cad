"""Multiple-choice VQA question sets: the interface, sets generated from class labels, frozen files.

A :class:`QuestionSet` is what a VQA evaluation needs of a set: its :attr:`~QuestionSet.items`,
the user prompt of an item (the text after the image) and the parse of a model's answer into an
option index, with the released LoRSU code's rules. The label-generated sets
(:class:`LabelQuestions`) are :class:`MultipleChoiceSet` s with lettered options; the sets of the streams that
bring their own questions (VSR, Hateful Memes, MMVP, VisOnlyQA: :class:`OwnQuestion` per image) are
:class:`MultipleChoiceSet` s whose items carry their whole prompt and their own answer strings
(:func:`own_question_set`), judged by each set's released rule.

A set is frozen as a versioned JSON file (:meth:`MultipleChoiceSet.save`) whose SHA-256 covers
its content, so every run and session sees the same questions; :meth:`MultipleChoiceSet.load`
refuses a file whose format version or hash does not match. :func:`import_authors_pickle` reads
the authors' own question files. Nothing here imports a model: the ``hard`` distractors take
a class similarity matrix computed by the caller.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from benchmark.errors import FsclError
from benchmark.records import atomic_write

LETTERS = "ABCDE"  # option letters, as in the released code: at most five options
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
FORMAT = "fscl-vqa-questions"
FORMAT_VERSION = 1  # of the JSON layout; a file of another version is refused
GENERATOR = "label-choices"
GENERATOR_VERSION = 1  # of LabelQuestions' drawing rule; recorded in every file it makes
MODES = ("random", "hard")


class QuestionSetError(FsclError, ValueError):
    """A question set, file or generator setting cannot be used; the message names the value and
    what is allowed."""


@dataclass(frozen=True)
class QuestionItem:
    """One question about one image: ``id`` is the image's sample id in its stream; ``answer``
    indexes ``choices``. In a set with its own prompts (``prompts: own``) ``question`` is the whole user
    text and ``choices`` are the answers that name each option; ``group`` names the item's question pair
    (MMVP), None elsewhere."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    group: str | None = None

    @property
    def letter(self) -> str:
        """The right option's letter."""
        return LETTERS[self.answer]


@dataclass(frozen=True)
class OwnQuestion:
    """What a stream that brings its own questions (VSR, Hateful Memes, MMVP, VisOnlyQA) asks about one image,
    with everything training and evaluation read of it, as the released code words it.

    ``prompt``: the user's text after the image in evaluation, whole (e.g. ``Based on the image, is this
    statement true or false? {caption}``); ``answers``: the answer that names each option (``false``/``true``,
    ``no``/``yes``, ``(a)``/``(b)``, ``A``…); ``answer``: the right option; ``texts``: the CLIP text of each
    option (zero-shot evaluation chooses among them; CLIP-loss training pairs the image with the right one's);
    ``pair``: the VLM-loss training pair (user text, answer); ``group``: the id of its question pair (MMVP's
    pair accuracy), else None.
    """

    prompt: str
    answers: tuple[str, ...]
    answer: int
    texts: tuple[str, ...]
    pair: tuple[str, str]
    group: str | None = None

    def __post_init__(self) -> None:
        if not 2 <= len(self.answers) <= len(LETTERS) or len(self.texts) != len(self.answers) \
                or not 0 <= self.answer < len(self.answers):
            raise QuestionSetError(f"a question needs 2 to {len(LETTERS)} options, one CLIP text per option and "
                                   f"its answer among them; got answers {self.answers}, {len(self.texts)} texts, "
                                   f"answer {self.answer}")

    @property
    def text(self) -> str:
        """The right option's CLIP text (the CLIP-loss training caption)."""
        return self.texts[self.answer]


def own_question_set(name: str, ids: Sequence[str], questions: Sequence[OwnQuestion], parse_rule: str,
                     positive: str | None = None, source: Mapping[str, Any] | None = None) -> MultipleChoiceSet:
    """The question set (``prompts: own``) of a stream's own ``questions`` about the images ``ids``, in order."""
    if len(ids) != len(questions) or len(set(ids)) != len(ids):
        raise QuestionSetError(f"{name}: need one question per image and distinct image ids ({len(ids)} ids, "
                               f"{len(set(ids))} distinct, {len(questions)} questions)")
    items = tuple(QuestionItem(i, q.prompt, q.answers, q.answer, q.group) for i, q in zip(ids, questions))
    return MultipleChoiceSet(name, items, parse_rule, dict(source or {}), "own", positive)


def parse_letter(answer: str) -> int | None:
    """The released rule of TSI, DALL·E, Aircraft, EuroSAT and CounterAnimal: the stripped answer
    is exactly one of the letters A–E (its index), else None (counted wrong)."""
    answer = answer.strip()
    return LETTERS.index(answer) if len(answer) == 1 and answer in LETTERS else None


_GTSRB_LETTER_FORMS = {*LETTERS.lower(), *(f"{c}." for c in LETTERS.lower()), *(f"{c}." for c in LETTERS)}


def parse_gtsrb(answer: str) -> int | None:
    """The released GTSRB rule: the stripped answer as :func:`parse_letter`, where "b", "b." and
    "B." also count as "B"; otherwise the first letter, in the order A–E, whose "K." occurs
    anywhere in the answer; else None."""
    answer = answer.strip()
    if answer in _GTSRB_LETTER_FORMS:
        answer = answer[0].upper()
    index = parse_letter(answer)
    if index is not None:
        return index
    return next((i for i, letter in enumerate(LETTERS) if f"{letter}." in answer), None)


def parse_upper_letter(answer: str) -> int | None:
    """The released VisOnlyQA rule: the stripped, upper-cased answer is exactly one of the letters A–E."""
    return parse_letter(answer.upper())


def parse_hm(answer: str) -> int | None:
    """The released Hateful Memes rule: lower-cased, stripped and without periods, the answer is exactly
    ``no`` (0) or ``yes`` (1); anything else names no option."""
    return {"no": 0, "yes": 1}.get(answer.lower().strip().replace(".", ""))


def parse_mmvp(answer: str) -> int | None:
    """The released MMVP rule (options ``(a)``, ``(b)``): an answer holding "Yes"/"yes" reads as (a), else one
    holding "No"/"no" as (b) (so "(a) Snow" reads as (b): the released quirk), else one holding "(a)" or "(b)"
    as that option; a shorter answer than 3 characters ``x`` reads as ``(x)``. The released code then counts
    it right when the right option's string occurs in it; here the option it names (0: a, 1: b, ...)."""
    if "Yes" in answer or "yes" in answer:
        return 0
    if "No" in answer or "no" in answer:
        return 1
    for i, option in enumerate(("(a)", "(b)")):
        if option in answer:
            return i
    if len(answer) < 3:
        letter = answer.lower()
        return "abcde".index(letter) if len(letter) == 1 and letter in "abcde" else None
    return None


def judge_vsr(answer: str, item: QuestionItem) -> tuple[bool, bool]:
    """The released VSR rule: right when the right option's word (``true``/``false``) occurs in the lower-cased
    answer, so "true or false" is right whatever the label; ``parsed`` when some option's word occurs."""
    answer = answer.strip().lower()
    return item.choices[item.answer] in answer, any(choice in answer for choice in item.choices)


PARSE_RULES: dict[str, Callable[[str], int | None]] = {
    "letter": parse_letter, "gtsrb": parse_gtsrb, "upper-letter": parse_upper_letter, "hm": parse_hm,
    "mmvp": parse_mmvp}
# rules that judge an answer against its item rather than naming one option
JUDGE_RULES: dict[str, Callable[[str, QuestionItem], tuple[bool, bool]]] = {"vsr": judge_vsr}
RULES = (*PARSE_RULES, *JUDGE_RULES)
PROMPTS = ("letters", "own")


class QuestionSet(ABC):
    """A VQA question set: items, the prompt of an item, the answers that name its options, and the judgement
    of a generated answer by the set's released rule."""

    name: str
    items: tuple[QuestionItem, ...]

    @abstractmethod
    def prompt(self, item: QuestionItem) -> str:
        """The user's text after the image: the question, the options and the answer instruction."""

    @abstractmethod
    def judge(self, answer: str, item: QuestionItem) -> tuple[bool, bool]:
        """(right, parsed) of a generated ``answer`` to ``item``: whether the set's rule counts it right, and
        whether it names one of the item's options at all."""

    def answers(self, item: QuestionItem) -> tuple[str, ...]:
        """The answer that names each option of ``item`` (the option scoring compares their tokens): its letters."""
        return tuple(LETTERS[:len(item.choices)])


def _content_sha256(body: Mapping[str, Any]) -> str:
    """SHA-256 of a file's content (every key but ``sha256``), independent of the file's layout."""
    content = {k: v for k, v in body.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False,
                                     separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class MultipleChoiceSet(QuestionSet):
    """Multiple-choice questions (2 to 5 options) with a released parse rule.

    ``prompts``: ``letters`` (the prompt is the question, the lettered options and the letter instruction; the
    answers are the letters) or ``own`` (each item's ``question`` is its whole prompt and its ``choices`` the
    answers that name its options, e.g. ``true``/``false``). ``positive``: the answer whose probability ranks
    the items for the AUROC (Hateful Memes: ``yes``); None: no AUROC. ``source`` says where the items come
    from (the generator and its settings, an imported file, a stream's own files); it is written into the
    frozen file.
    """

    name: str
    items: tuple[QuestionItem, ...]
    parse_rule: str = "letter"
    source: Mapping[str, Any] = field(default_factory=dict)
    prompts: str = "letters"
    positive: str | None = None

    def __post_init__(self) -> None:
        if self.parse_rule not in RULES:
            raise QuestionSetError(f"{self.name}: parse rule '{self.parse_rule}' is unknown; "
                                   f"allowed: {', '.join(RULES)}")
        if self.prompts not in PROMPTS:
            raise QuestionSetError(f"{self.name}: prompts '{self.prompts}'; allowed: {', '.join(PROMPTS)}")
        for item in self.items:
            if not 2 <= len(item.choices) <= len(LETTERS) or not 0 <= item.answer < len(item.choices):
                raise QuestionSetError(f"{self.name}: item {item.id!r} has {len(item.choices)} options and answer "
                                       f"{item.answer}; allowed: 2 to {len(LETTERS)} options, an answer among them")

    def prompt(self, item: QuestionItem) -> str:
        """``{question}\\nA. {c0}\\nB. {c1}...\\n{MC_SUFFIX}``, the released code's text (``prompts: own``:
        the item's question, whole)."""
        if self.prompts == "own":
            return item.question
        options = [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices)]
        return "\n".join([item.question, *options, MC_SUFFIX])

    def judge(self, answer: str, item: QuestionItem) -> tuple[bool, bool]:
        """By a judging rule (:data:`JUDGE_RULES`), or: the option the parse rule (:data:`PARSE_RULES`) reads is
        the right one (an index beyond the item's options, as the released code may read, is wrong)."""
        if self.parse_rule in JUDGE_RULES:
            return JUDGE_RULES[self.parse_rule](answer, item)
        choice = PARSE_RULES[self.parse_rule](answer)
        return choice == item.answer, choice is not None and choice < len(item.choices)

    def answers(self, item: QuestionItem) -> tuple[str, ...]:
        """Its letters (``prompts: letters``), or the item's own answers (``prompts: own``)."""
        return item.choices if self.prompts == "own" else super().answers(item)

    def letter_counts(self) -> dict[str, int]:
        """How many right answers sit at each letter (the position balance)."""
        width = max((len(item.choices) for item in self.items), default=0)
        counts = dict.fromkeys(LETTERS[:width], 0)
        for item in self.items:
            counts[item.letter] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        """The frozen file's content, ``sha256`` (of everything else) last."""
        body: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "set": self.name, "parse": self.parse_rule,
            **({"prompts": self.prompts} if self.prompts != "letters" else {}),
            **({"positive": self.positive} if self.positive is not None else {}),
            "source": dict(self.source), "letters": self.letter_counts(),
            "items": [{"id": i.id, "question": i.question, "choices": list(i.choices), "answer": i.answer,
                       **({"group": i.group} if i.group is not None else {})} for i in self.items],
        }
        return {**body, "sha256": _content_sha256(body)}

    @property
    def sha256(self) -> str:
        """The hash a run records: that of the frozen file's content."""
        return self.to_json()["sha256"]

    def save(self, path: str | Path) -> str:
        """Write the frozen file (atomically); returns its hash."""
        body = self.to_json()
        atomic_write(Path(path), json.dumps(body, indent=1, ensure_ascii=False) + "\n")
        return body["sha256"]

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> MultipleChoiceSet:
        """Read a frozen file. Refused, naming both values: another format version, a recorded
        hash that its content does not have (edited or damaged), or a hash other than
        ``expected_sha256`` (e.g. the one a run's manifest recorded)."""
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise QuestionSetError(f"cannot read question file {path}: {err}") from err
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise QuestionSetError(f"{path} is not a question file (its 'format' must be '{FORMAT}')")
        if body.get("version") != FORMAT_VERSION:
            raise QuestionSetError(f"{path}: question file version {body.get('version')!r}; this fscl-bench "
                                   f"reads version {FORMAT_VERSION} (build the file again)")
        actual = _content_sha256(body)
        if body.get("sha256") != actual:
            raise QuestionSetError(f"{path}: recorded sha256 {body.get('sha256')} but its content hashes to "
                                   f"{actual}: the file was changed after it was written (build it again)")
        if expected_sha256 is not None and expected_sha256 != actual:
            raise QuestionSetError(f"{path}: sha256 {actual}, expected {expected_sha256}: not the question set "
                                   f"that was recorded")
        items = tuple(QuestionItem(i["id"], i["question"], tuple(i["choices"]), int(i["answer"]), i.get("group"))
                      for i in body["items"])
        return cls(body["set"], items, body["parse"], body["source"], body.get("prompts", "letters"),
                   body.get("positive"))


@dataclass(frozen=True)
class LabelQuestions:
    """Generator of one multiple-choice question per labelled image, from the class names.

    Each item has K = min(5, C) options: the image's class at a position drawn uniformly and
    K − 1 distractor classes, drawn without replacement from the other classes (``random``) or
    from the 2(K − 1) classes most similar to the right one by ``similarity`` (``hard``; ties
    by class index). ``similarity`` is a [C, C] matrix (e.g. cosine similarities of the frozen
    pretrained text embeddings of the class prompts; ``similarity_from`` names its source for
    the record). Every item draws from its own generator, seeded by
    ``sha256(f"{name}|{item_id}|{seed}")``: an item's options depend on nothing else (not on the
    other items, their order or the process).
    """

    name: str
    class_names: tuple[str, ...]
    question: str
    mode: str = "random"
    seed: int = 0
    similarity: np.ndarray | None = field(default=None, compare=False, repr=False)
    similarity_from: str | None = None

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if n < 2:
            raise QuestionSetError(f"{self.name}: {n} class(es); a multiple-choice set needs at least 2")
        repeated = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
        if repeated:
            raise QuestionSetError(f"{self.name}: class names {repeated[:5]} repeat; options must be distinct")
        if self.mode not in MODES:
            raise QuestionSetError(f"{self.name}: distractor mode '{self.mode}'; allowed: {', '.join(MODES)}")
        if self.mode == "hard" and (self.similarity is None or np.shape(self.similarity) != (n, n)):
            shape = None if self.similarity is None else np.shape(self.similarity)
            raise QuestionSetError(f"{self.name}: mode 'hard' needs a [{n}, {n}] class similarity matrix, got {shape}")
        if self.mode == "random" and self.similarity is not None:
            raise QuestionSetError(f"{self.name}: a similarity matrix is only used by mode 'hard', not 'random'")

    @property
    def n_options(self) -> int:
        """K = min(5, C)."""
        return min(len(LETTERS), len(self.class_names))

    def pool(self, label: int) -> list[int]:
        """The classes the distractors of a class-``label`` image are drawn from."""
        others = [c for c in range(len(self.class_names)) if c != label]
        if self.mode == "random":
            return others
        nearest = sorted(others, key=lambda c: (-float(self.similarity[label, c]), c))
        return nearest[: 2 * (self.n_options - 1)]

    def item(self, item_id: str, label: int) -> QuestionItem:
        """The question of image ``item_id`` of class ``label``."""
        digest = hashlib.sha256(f"{self.name}|{item_id}|{self.seed}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
        position = int(rng.integers(self.n_options))
        classes = [int(c) for c in rng.choice(self.pool(label), size=self.n_options - 1, replace=False)]
        classes.insert(position, label)
        return QuestionItem(item_id, self.question, tuple(self.class_names[c] for c in classes), position)

    def build(self, ids: Sequence[str], labels: Sequence[int], parse_rule: str = "letter") -> MultipleChoiceSet:
        """The set of images ``ids`` (a stream's test split) with class ``labels``, in that order."""
        if len(ids) != len(labels) or len(set(ids)) != len(ids):
            raise QuestionSetError(f"{self.name}: need one label per image and distinct image ids "
                                   f"({len(ids)} ids, {len(set(ids))} distinct, {len(labels)} labels)")
        bad = sorted({int(t) for t in labels if not 0 <= int(t) < len(self.class_names)})
        if bad:
            raise QuestionSetError(f"{self.name}: labels {bad[:5]} outside 0..{len(self.class_names) - 1}")
        source = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "mode": self.mode,
                  "seed": self.seed, "options": self.n_options, "question": self.question,
                  **({"similarity_from": self.similarity_from} if self.mode == "hard" else {})}
        return MultipleChoiceSet(self.name, tuple(self.item(i, int(t)) for i, t in zip(ids, labels)),
                                 parse_rule, source)


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, strings, numbers, numpy scalars): no code runs."""

    ALLOWED = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"holds a {module}.{name} object; a question file holds plain data only")


def _aliases(sample_id: str) -> list[str]:
    """The names the authors' files may give an image: its id, its file name, and
    '<folder>-<file name>' for every folder on its path."""
    path = PurePosixPath(sample_id)
    return [sample_id, path.name, *(f"{folder}-{path.name}" for folder in path.parent.parts)]


def import_authors_pickle(path: str | Path, name: str, ids: Sequence[str], *, question: str | None = None,
                          parse_rule: str = "letter") -> MultipleChoiceSet:
    """A set from the authors' released question file (``gtsrb_vqa.pkl``, ``dalle_vqa.pkl``, ...):
    ``{image key: {'question': str, 'choices': [str, ...], 'answer': index}}``.

    A key names an image by its file name, an '@'-joined path ending in it
    (``gtsrb@GTSRB@Final_Test@Images@00000.ppm``) or '<class folder>-<file name>'
    (CounterAnimal); it is matched to the sample ``ids`` of the stream's test split (paths
    relative to the stream's folder) by the whole key, else by its last part. ``question``
    replaces the file's questions (the released code does so for GTSRB, Aircraft, EuroSAT and
    CounterAnimal). Items follow the order of ``ids``; images without an entry get no item.
    Entries that match no image (or several), or are malformed, are refused by key.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            entries = _PlainUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise QuestionSetError(f"cannot read the question file {path}: {err}") from err
    if not isinstance(entries, dict):
        raise QuestionSetError(f"{path}: holds a {type(entries).__name__}; expected a dict keyed by image")
    owners: dict[str, set[str]] = {}
    for sample_id in ids:
        for alias in _aliases(sample_id):
            owners.setdefault(alias, set()).add(sample_id)
    matched: dict[str, QuestionItem] = {}
    unmatched, ambiguous = [], []
    for key, entry in entries.items():
        found = owners.get(str(key)) or owners.get(re.split(r"[/@]", str(key))[-1], set())
        if len(found) != 1:
            (ambiguous if found else unmatched).append(str(key))
            continue
        try:
            choices = tuple(str(c) for c in entry["choices"])
            item = QuestionItem(next(iter(found)), question or str(entry["question"]), choices, int(entry["answer"]))
        except (KeyError, TypeError, ValueError) as err:
            raise QuestionSetError(f"{path}: entry {key!r} is not {{'question', 'choices', 'answer'}}: {err}") from err
        matched[item.id] = item
    for label, keys in (("match no test image of", unmatched), ("match several test images of", ambiguous)):
        if keys:
            raise QuestionSetError(f"{path}: {len(keys)} entries {label} '{name}' (e.g. {', '.join(keys[:5])}); "
                                   f"a key is an image's file name, an '@'-joined path or '<folder>-<file name>'")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = {"imported": "authors-pickle", "file": path.name, "file_sha256": digest, "question": question}
    return MultipleChoiceSet(name, tuple(matched[i] for i in ids if i in matched), parse_rule, source)
