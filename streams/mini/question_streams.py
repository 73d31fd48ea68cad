"""The mini world's streams that bring their own questions: ``mini-spatial`` (VSR-like true/false), ``mini-pairs``
(MMVP-like image pairs, pair accuracy) and ``mini-yesno`` (Hateful-Memes-like yes/no, AUROC).

Rows come from :mod:`streams.mini.questions` (scenes of the pairs held out from pretraining), rendered once per
process from (options.seed, the stream's data-file version, split) and kept as a uint8 array. A split has
``train_per_class`` / ``test_per_class`` rows per group (the five ``class_names`` "parts"; ``mini-pairs``: rounded
up to whole pairs), row ``i`` in group ``i mod 5`` (its pair's index for ``mini-pairs``). Unlike the real sets they
have a validation view (:meth:`MiniQuestionStream.validation`): rows rendered apart from the training and test
rows, so ``fscl tune`` takes them as controls or as its target.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from benchmark.vqa.questions import OwnQuestion
from streams.base import Split
from streams.mini.datasets import mini_spec, read_only
from streams.mini.questions import ROWS_PER_UNIT, question_row, row_group, split_rows
from streams.mini.render import render_scene
from streams.mini.world import rng_for, world
from streams.options import MiniOptions
from streams.own_questions import OwnQuestionStream, Row
from streams.sampling import Session

SESSION_RULE = ("per group of the session: its rows (mini-pairs: its pairs, kept whole) shuffled with the seed, "
                "taken while each answer has fewer than `shots` rows: `shots` rows of each answer per group")


@lru_cache(maxsize=32)
def rendered_questions(kind: str, split: str, rows: int, seed: int, version: int
                       ) -> tuple[np.ndarray, tuple[OwnQuestion, ...]]:
    """Rows ``0 .. rows - 1`` of ``kind``'s ``split``: (uint8 [rows, S, S, 3] read-only, their questions)."""
    drawn = [question_row(kind, split, seed, i, version=version) for i in range(rows)]
    return read_only([render_scene(world(), scene) for scene, _ in drawn]), tuple(q for _, q in drawn)


class MiniQuestionStream(OwnQuestionStream):
    """A procedural mini stream of one question kind (see the module docstring); ``validation``: (rows per group,
    seed) of the validation view, whose test split is then the validation rows."""

    kind: ClassVar[str]

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False,
                 validation: tuple[int, int] | None = None) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        self.held = validation

    def split_key(self, split: Split) -> tuple[str, int]:
        """(the generator's split key, rows per group) of ``split`` (the validation rows for a validation view's
        test split)."""
        opts = self.options or MiniOptions()
        if split == "test" and self.held is not None:
            return f"validation-{self.held[1]}", self.held[0]
        return split, opts.train_per_class if split == "train" else opts.test_per_class

    def rows(self, split: Split) -> list[Row]:
        seed, (key, per_group) = (self.options or MiniOptions()).seed, self.split_key(split)
        rows = split_rows(self.kind, per_group, len(self.spec.class_names))
        images, questions = rendered_questions(self.kind, key, rows, seed, self.spec.version)
        return [Row(images[i], f"{self.spec.name}/{key}/{seed}/{i}", q) for i, q in enumerate(questions)]

    def load_item(self, item: np.ndarray) -> Image.Image:
        return Image.fromarray(item)

    def session_rows(self, session: int, groups: Sequence[int], shots: int, seed: int) -> list[int]:
        """Per group (in the session's order) :data:`SESSION_RULE`; the shuffle is seeded by (stream name,
        ``sessions``, ``seed``, group)."""
        questions = self.listed("train").questions or []
        per_unit, n_groups = ROWS_PER_UNIT[self.kind], len(self.spec.class_names)
        chosen: list[int] = []
        for group in groups:
            units = [range(u, u + per_unit) for u in range(0, len(questions), per_unit)
                     if row_group(self.kind, u, n_groups) == group]
            taken: Counter[int] = Counter()
            for k in rng_for(self.spec.name, "sessions", seed, group).permutation(len(units)):
                answers = [questions[i].answer for i in units[k]]
                if all(taken[a] < shots for a in answers):
                    chosen += units[k]
                    taken.update(answers)
        return chosen

    def session_source(self) -> dict:
        return {"rule": SESSION_RULE}

    def validation(self, per_class: int, seed: int = 0) -> MiniQuestionStream:
        """The validation view: the same training rows, and ``per_class`` rows per group rendered apart from the
        training and test rows (split key ``validation-<seed>``) as its test split."""
        return type(self)(self.root or "", self.options, skip_bad_images=self.skip_bad_images,
                          validation=(per_class, seed))

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """The base record; for a validation view also its validation rows (``validation``)."""
        record = super().data_record(sessions)
        if self.held is not None:
            held = self.listed("test")
            record["validation"] = {"per_class": self.held[0], "seed": self.held[1], "size": len(held),
                                    "rendered": "apart from the training and test rows", "ids": held.ids}
        return record


class MiniSpatial(MiniQuestionStream):
    """Mini world, VSR-like: true/false statements about two held-out shapes' spatial relation."""

    spec = mini_spec("mini-spatial")
    kind = "spatial"


class MiniPairs(MiniQuestionStream):
    """Mini world, MMVP-like: image pairs that differ in one attribute, (a)/(b) options, pair accuracy."""

    spec = mini_spec("mini-pairs")
    kind = "pairs"


class MiniYesNo(MiniQuestionStream):
    """Mini world, Hateful-Memes-like: yes/no questions about a held-out shape (AUROC of 'yes')."""

    spec = mini_spec("mini-yesno")
    kind = "yesno"
