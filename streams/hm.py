"""``hm``: Hateful Memes (``train.jsonl``, ``test_unseen.jsonl``), is a meme hateful; sessions from the released
session file, else a seeded label-stratified five-way split."""
from __future__ import annotations

import hashlib
import pickle
import zlib
from collections.abc import Sequence
from functools import cached_property
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.vqa.questions import _PlainUnpickler
from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.options import HM_SESSION_FILE as SESSION_FILE
from streams.options import HMOptions
from streams.own_questions import (
    OwnQuestionStream,
    Row,
    binary_label,
    field,
    question,
    read_jsonl,
    released_cut,
    short_answer_pair,
)

FILES: dict[Split, str] = {"train": "train.jsonl", "test": "test_unseen.jsonl"}
LAYOUT = f"""\
<data_root>/hm/                  (or hateful_memes/, the released code's name)
  train.jsonl                    one row a line: img ('img/<id>.png'), text, label (0/1)
  test_unseen.jsonl
  img/<id>.png
  {SESSION_FILE}            optional: the released sessions, five lists of row indices into train.jsonl"""
SESSION_FORMAT = f"a pickled list of 5 lists of row indices (0-based) into train.jsonl ({SESSION_FILE})"
ANSWERS = ("no", "yes")  # label 0, 1


def hm_question(text: str, label: int) -> dict:
    """The released Hateful Memes wording of one row (eval prompt, CLIP texts, VLM-loss pair)."""
    return dict(prompt=f"This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:",
                answers=ANSWERS, answer=label,
                texts=(f"This is an image writting '{text}'", f"This is a hateful image writting '{text}'"),
                pair=short_answer_pair(f"This is an image writting '{text}'. Is this image hateful? (Answer yes or no)",
                                       ANSWERS[label]))


class _SessionUnpickler(_PlainUnpickler):
    """Plain data and numpy arrays of numbers (a session file may hold index arrays): no code runs."""

    ALLOWED = _PlainUnpickler.ALLOWED | {("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
                                         ("numpy._core.multiarray", "_reconstruct")}


class HatefulMemes(OwnQuestionStream):
    """Hateful Memes, yes/no; the released session file, else a seeded stratified split; 100/300/600 rows."""

    spec = StreamSpec.from_file(DATA_DIR / "hm.yaml")
    folder = "hm"
    released_folders = ("hateful_memes",)
    layout = LAYOUT

    def rows(self, split: Split) -> list[Row]:
        path = self.root / FILES[split]
        out = []
        for i, row in enumerate(read_jsonl(path, "hm")):
            where = f"hm: {path} row {i + 1}"
            label = binary_label(row, "label", where)
            image = self.image_path(self.root / str(field(row, "img", where)), where)
            out.append(Row(image, f"{Path(FILES[split]).stem}/{i}",
                           question(where, **hm_question(str(field(row, "text", where)), label))))
        return out

    def session_file(self) -> Path | None:
        """The session file to read, or None for the seeded split (option ``session_file``)."""
        choice = (self.options or HMOptions()).session_file
        if choice is None:
            return None
        path = self.root / (SESSION_FILE if choice == "auto" else Path(choice).expanduser())
        if choice != "auto" and not path.is_file():
            raise StreamDataError(f"hm: session file not found (hm.session_file): {path}")
        return path if path.is_file() else None

    @cached_property
    def parts(self) -> list[list[int]]:
        """The five parts of train.jsonl (row positions, in session order): the session file's, else seeded."""
        n = len(self.listed("train"))
        path = self.session_file()
        return self._seeded_parts() if path is None else self._file_parts(path, n)

    def _file_parts(self, path: Path, n: int) -> list[list[int]]:
        try:
            with open(path, "rb") as f:
                data: Any = _SessionUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
            raise StreamDataError(f"hm: cannot read the session file {path}: {err}\nexpected: {SESSION_FORMAT}") from err
        sessions = len(self.spec.class_names)
        if not isinstance(data, (list, tuple)) or len(data) != sessions:
            raise StreamDataError(f"hm: session file {path}: not a list of {sessions} lists\nexpected: {SESSION_FORMAT}")
        parts = []
        for s, part in enumerate(data, start=1):
            values = list(part) if isinstance(part, (list, tuple, np.ndarray)) else None
            bad = [v for v in values or () if not isinstance(v, (Integral, np.integer)) or not 0 <= int(v) < n]
            if values is None or bad:
                what = f"holds {bad[:5]}" if values is not None else f"is a {type(part).__name__}"
                raise StreamDataError(f"hm: session file {path}: session {s} {what}, not row indices 0..{n - 1} of "
                                      f"train.jsonl\nexpected: {SESSION_FORMAT}")
            parts.append([int(v) for v in values])
        return parts

    def _seeded_parts(self) -> list[list[int]]:
        """A label-stratified five-way split of train.jsonl: each label's rows permuted by a generator seeded from
        (session_seed, CRC-32 of 'hm', label) and dealt round-robin to the parts; each part then shuffled by its
        own generator (session_seed, CRC-32 of 'hm', 2, part), so that its first rows are a seeded draw of it."""
        seed = (self.options or HMOptions()).session_seed
        labels = np.asarray([q.answer for q in self.listed("train").questions])
        salt = zlib.crc32(b"hm")
        parts: list[list[int]] = [[] for _ in self.spec.class_names]
        for label in (0, 1):
            rows = np.flatnonzero(labels == label)
            order = rows[np.random.default_rng(np.random.SeedSequence([seed, salt, label])).permutation(len(rows))]
            for j, row in enumerate(order):
                parts[j % len(parts)].append(int(row))
        for k, part in enumerate(parts):
            rng = np.random.default_rng(np.random.SeedSequence([seed, salt, 2, k]))
            parts[k] = [part[j] for j in rng.permutation(len(part))]
        return parts

    def session_rows(self, session: int, groups: Sequence[int], shots: int, seed: int) -> list[int]:
        """The first :func:`released_cut` rows of the session's part (``seed`` plays no part, as released)."""
        return [row for g in groups for row in self.parts[g]][:released_cut(shots)]

    def session_source(self) -> dict:
        path = self.session_file()
        if path is not None:
            return {"rule": "released: the first 100/300/600 rows of each part of the session file",
                    "session_file": str(path), "session_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return {"rule": "seeded label-stratified five-way split of train.jsonl (no session file; a deviation), "
                        "the first 100/300/600 rows of each part",
                "session_seed": (self.options or HMOptions()).session_seed}
