"""``mmvp``: MMVP (``Questions.csv`` and its images), pairs of CLIP-blind images with two-option questions.

The released split: of the 150 consecutive pairs of rows, rows ``i, i+1`` for ``i`` in ``range(0, n, 4)`` train and
those for ``i`` in ``range(2, n, 4)`` test; session ``s`` is training rows ``30 s .. 30 s + 29``, whatever the shots.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from benchmark.vqa.questions import MC_SUFFIX
from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.options import MMVPOptions
from streams.own_questions import OwnQuestionStream, Row, question, short_answer_pair

IMAGE_FOLDERS = ("MMVP Images", "MMVP-Images")  # the hub's, the released loader's
COLUMNS = ("Index", "Question", "Options", "Correct Answer")
LAYOUT = """\
<data_root>/mmvp/                (or MMVP/, the released code's name)
  Questions.csv                  columns Index, Question, Options ('(a) Open (b) Closed'), Correct Answer ('(a)')
  MMVP Images/<Index>.jpg        (or MMVP-Images/, the released loader's name)"""
SESSION_ROWS = 30  # training rows per session, as released
# the labels MMVP's issues 14 and 30 found swapped (1-based Index -> right answer), as lmms-eval corrects them
CORRECTED = {"99": "(b)", "100": "(a)", "279": "(b)", "280": "(a)"}
OPTION = re.compile(r"\(([a-e])\)")


def parse_options(options: str) -> list[tuple[str, str]]:
    """``'(a) Open (b) Closed'`` -> ``[('(a)', 'Open'), ('(b)', 'Closed')]`` (each option's answer and text)."""
    marks = list(OPTION.finditer(options))
    ends = [m.start() for m in marks[1:]] + [len(options)]
    return [(m.group(0), options[m.end():end].strip()) for m, end in zip(marks, ends)]


def mmvp_question(question_text: str, options: str, answer: int, pair: int) -> dict:
    """The released MMVP wording of one row (prompt, answers, VLM-loss pair) with our CLIP texts (none released:
    ``{Question} {option text}``)."""
    parsed = parse_options(options)
    prompt = f"{question_text}\n{options}\n{MC_SUFFIX}"
    answers = tuple(a for a, _ in parsed)
    return dict(prompt=prompt, answers=answers, answer=answer, texts=tuple(f"{question_text} {t}" for _, t in parsed),
                pair=short_answer_pair(prompt, answers[answer]), group=str(pair))


class MMVP(OwnQuestionStream):
    """MMVP, 150 pairs of two-option questions; the released halves, 30 training rows a session."""

    spec = StreamSpec.from_file(DATA_DIR / "mmvp.yaml")
    folder = "mmvp"
    released_folders = ("MMVP",)
    layout = LAYOUT

    @cached_property
    def table(self) -> list[dict[str, str]]:
        """The rows of Questions.csv, checked for its columns and whole pairs."""
        path = self.root / "Questions.csv"
        if not path.is_file():
            raise StreamDataError(f"mmvp: missing file {path}\nexpected layout:\n{self.layout}")
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise StreamDataError(f"mmvp: {path} has no column(s) {', '.join(missing)} (columns: "
                                      f"{', '.join(reader.fieldnames or [])})")
            table = list(reader)
        if len(table) % 2:
            raise StreamDataError(f"mmvp: {path} has {len(table)} rows; MMVP's rows are pairs (an even count)")
        return table

    @cached_property
    def images(self) -> Path:
        found = [self.root / name for name in IMAGE_FOLDERS if (self.root / name).is_dir()]
        if not found:
            raise StreamDataError(f"mmvp: image folder missing: {self.root / IMAGE_FOLDERS[0]} (or "
                                  f"{self.root / IMAGE_FOLDERS[1]})\nexpected layout:\n{self.layout}")
        return found[0]

    def corrections(self) -> dict[str, tuple[str, str]]:
        """Index -> (released answer, corrected answer) of each label ``corrected_labels`` changes (none when off)."""
        if not (self.options or MMVPOptions()).corrected_labels:
            return {}
        found = {row["Index"].strip(): row["Correct Answer"].strip() for row in self.table}
        return {index: (found[index], right) for index, right in CORRECTED.items()
                if index in found and found[index] != right}

    def rows(self, split: Split) -> list[Row]:
        path, start = self.root / "Questions.csv", {"train": 0, "test": 2}[split]
        fixes = self.corrections()
        out = []
        for i in (j for first in range(start, len(self.table), 4) for j in (first, first + 1)):
            row, where = self.table[i], f"mmvp: {path} row {i + 1}"
            index = row["Index"].strip()
            answers = [a for a, _ in parse_options(row["Options"])]
            right = fixes.get(index, (None, row["Correct Answer"].strip()))[1]
            if right not in answers:
                raise StreamDataError(f"{where}: Correct Answer {right!r} is not one of its options {answers} "
                                      f"(Options {row['Options']!r})")
            image = self.image_path(self.images / f"{index}.jpg", where)
            out.append(Row(image, image.relative_to(self.root).as_posix(),
                           question(where, **mmvp_question(row["Question"], row["Options"], answers.index(right),
                                                           i // 2))))
        return out

    def session_rows(self, session: int, groups: Sequence[int], shots: int, seed: int) -> list[int]:
        """Training rows ``30 s`` to ``30 s + 29`` of the session's part ``s`` (the shots play no part, as released)."""
        n = len(self.listed("train"))
        return [j for g in groups for j in range(SESSION_ROWS * g, min(SESSION_ROWS * (g + 1), n))]

    def session_source(self) -> dict:
        return {"rule": "released: training rows 30 s .. 30 s + 29 (the shots play no part)"}

    def data_record(self, sessions: Sequence[Any] | None = None) -> dict[str, Any]:
        """The base record, plus the labels ``corrected_labels`` changed (``labels``)."""
        record = super().data_record(sessions)
        if (self.options or MMVPOptions()).corrected_labels:
            record["labels"] = {"corrected": {k: {"released": old, "corrected": new}
                                              for k, (old, new) in self.corrections().items()}}
        return record
