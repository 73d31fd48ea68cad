"""Streams that bring their own questions (VSR, Hateful Memes, MMVP, VisOnlyQA): the shared loader.

Such a stream lists each split's rows (one image and one :class:`~benchmark.vqa.questions.OwnQuestion` each) from
its files; a split is a :class:`~streams.base.LabelledImages` whose ``targets[i]`` is ``i`` (each row its own
"class"), whose captions are the right options' CLIP texts and whose ``questions`` are the rows' questions. The
stream's classes (its data file's ``class_names``) are the groups its sessions are made of, fixed by the data
file's ``sessions``; the rows of each session are chosen by the stream's released rule (:meth:`session_rows`),
not by :class:`~streams.sampling.FewShotSampler`. Every session's test experience is the whole test split, and
there is no validation view (no held-out tune split of the released protocol). Every bad row is refused when the
split is listed, naming its file and row.
"""
from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from benchmark.vqa.questions import OwnQuestion, QuestionSetError
from streams.base import LabelledImages, Split, Stream, StreamDataError, open_image
from streams.sampling import Session

log = logging.getLogger(__name__)
SHORT_ANSWER = "Based on the image, respond to this question with a short answer: {}"  # the released VLM-loss wrapper


class Row(NamedTuple):
    """One listed row: what to load, its stable id, its question."""

    item: Any
    id: str
    question: OwnQuestion


def released_cut(shots: int) -> int:
    """The released code's rows per session of VSR and Hateful Memes: 100 for shots < 6, 300 for < 21, else 600
    (CL-5, CL-20, CL-50)."""
    return 100 if shots < 6 else 300 if shots < 21 else 600


def short_answer_pair(question: str, answer: str) -> tuple[str, str]:
    """The released VLM-loss pair of VSR, HM and MMVP: the question in the short-answer wrapper (stripped)."""
    return SHORT_ANSWER.format(question).strip(), answer


def read_jsonl(path: Path, stream: str) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, blank lines skipped; a missing file or a bad line is named."""
    if not path.is_file():
        raise StreamDataError(f"{stream}: missing file {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise StreamDataError(f"{stream}: {path} line {number} is not JSON: {err}") from err
        if not isinstance(row, dict):
            raise StreamDataError(f"{stream}: {path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def field(row: dict[str, Any], key: str, where: str) -> Any:
    """``row[key]``, or an error naming the row and the missing field."""
    if key not in row:
        raise StreamDataError(f"{where}: no field {key!r} (fields: {', '.join(map(str, row))})")
    return row[key]


def binary_label(row: dict[str, Any], key: str, where: str) -> int:
    """A 0/1 label field of a row (its right option), or an error naming the row."""
    label = field(row, key, where)
    if isinstance(label, bool) or label not in (0, 1):
        raise StreamDataError(f"{where}: {key} {label!r} is not one of its options 0, 1")
    return int(label)


def question(where: str, **parts: Any) -> OwnQuestion:
    """An :class:`OwnQuestion`, or an error naming the row when its answer is not among its options."""
    try:
        return OwnQuestion(**parts)
    except QuestionSetError as err:
        raise StreamDataError(f"{where}: {err}") from err


class OwnQuestionStream(Stream):
    """A stream whose rows bring their own questions (see the module docstring).

    Subclasses implement :meth:`rows` (a split's rows, every one checked) and :meth:`session_rows` (the released
    choice of each session's training rows), and may override :meth:`load_item` and :meth:`session_source`.
    """

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        self._listed: dict[Split, LabelledImages] = {}

    # -- what a subclass provides ------------------------------------------------------
    @abstractmethod
    def rows(self, split: Split) -> list[Row]:
        """Every row of ``split``, in the released order (refused with the file and row named when bad)."""

    @abstractmethod
    def session_rows(self, session: int, groups: Sequence[int], shots: int, seed: int) -> list[int]:
        """Positions in the listed training split of the rows of ``session`` (0-based) of class groups
        ``groups``, in the released order, for ``shots`` and the released ``seed``."""

    def load_item(self, item: Any) -> Image.Image:
        """Decode one row's image (a path by default) to RGB."""
        return open_image(item)

    def session_source(self) -> dict[str, Any]:
        """Where the sessions' rows come from (kept in the run record)."""
        return {"rule": "released"}

    def image_path(self, image: Path, where: str) -> Path:
        """``image``, or an error naming the row when no file is there."""
        if not image.is_file():
            raise StreamDataError(f"{where}: its image {image} does not exist")
        return image

    # -- shared machinery --------------------------------------------------------------
    def listed(self, split: Split) -> LabelledImages:
        if split not in self._listed:
            rows = self.rows(split)
            if not rows:
                raise StreamDataError(f"{self.spec.name}: no rows in the {split} split\nexpected layout:\n{self.layout}")
            questions = [r.question for r in rows]
            self._listed[split] = LabelledImages([r.item for r in rows], range(len(rows)), [r.id for r in rows],
                                                 self.load_item, captions=[q.text for q in questions],
                                                 questions=questions)
        return self._listed[split]

    def dataset(self, split: Split) -> LabelledImages:
        """The listed split; with ``skip_bad_images`` the test split without its unreadable images (:meth:`usable`)."""
        return self.usable(split)

    def sessions(self, n_sessions: int, shots: int, shot_seed: int) -> list[Session]:
        """The released sessions: each session's rows (:meth:`session_rows`); ``shots`` and ``shot_seed`` are the
        released ``few_shots`` and ``seed``. With ``skip_bad_images`` a chosen row whose image cannot be decoded
        is left out (warned about and recorded; nothing replaces it)."""
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        train = self.listed("train")
        check = self._train_check(train) if self.skip_bad_images else None
        out = []
        for i, groups in enumerate(self.spec.session_classes(n_sessions)):
            chosen = self.session_rows(i, groups, shots, shot_seed)
            if not chosen:
                names = ", ".join(self.spec.class_names[g] for g in groups)
                raise StreamDataError(f"{self.spec.name}: session {i + 1} ({names}) has no training rows")
            bad = [train.ids[j] for j in chosen if check is not None and check(j) is not None]
            if bad:
                log.warning("%s: session %d: leaving out %d training row(s) whose image is unreadable, e.g. %s (%s) "
                            "(skip_bad_images)", self.spec.name, i + 1, len(bad), bad[0], self._unreadable[bad[0]])
                self.skipped["train"] = sorted({*self.skipped.get("train", []), *bad})
            left_out = set(bad)
            ids = [train.ids[j] for j in chosen if train.ids[j] not in left_out]
            out.append(Session(i + 1, list(groups), ids, [], dict.fromkeys(bad), bad))
        return out

    def session_test(self, test: LabelledImages, session: Session) -> LabelledImages:
        """The whole test split: the target set is evaluated whole after every session."""
        return test

    def validation(self, per_class: int, seed: int = 0) -> Stream:
        raise StreamDataError(f"{self.spec.name}: brings its own questions and has no validation view (its "
                              "sessions are the released rows, not a per-class draw); leave it out of a validation "
                              "run (fscl tune)")

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """The base record, plus where the sessions' rows come from (``sessions``)."""
        return {**super().data_record(sessions), "sessions": self.session_source()}
