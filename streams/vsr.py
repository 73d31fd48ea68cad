"""``vsr``: Visual Spatial Reasoning (the hub's ``cambridgeltl/vsr_zeroshot`` files), true/false statements."""
from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cached_property

from streams import own_questions as own
from streams.base import DATA_DIR, Split, StreamSpec
from streams.own_questions import OwnQuestionStream, Row

LAYOUT = """\
<data_root>/vsr/                 (the hub repository cambridgeltl/vsr_zeroshot, plus the COCO images)
  train.jsonl                    one row a line: image, caption, label (0/1), obj, ...
  test.jsonl
  images/<image>                 the file each row's 'image' names"""
ANSWERS = ("false", "true")  # label 0, 1


def vsr_question(caption: str, label: int) -> dict:
    """The released VSR wording of one row (eval prompt, CLIP texts, VLM-loss pair)."""
    prompt = f"Based on the image, is this statement true or false? {caption}"
    return dict(prompt=prompt, answers=ANSWERS, answer=label,
                texts=tuple(f"Based on the image, the statement '{caption}' is {a}" for a in ANSWERS),
                pair=own.short_answer_pair(prompt, ANSWERS[label]))


class VSR(OwnQuestionStream):
    """Visual Spatial Reasoning (cambridgeltl/vsr_zeroshot), true/false; released object sessions, 100/300/600 rows."""

    spec = StreamSpec.from_file(DATA_DIR / "vsr.yaml")
    folder = "vsr"
    layout = LAYOUT

    def rows(self, split: Split) -> list[Row]:
        path = self.root / f"{split}.jsonl"
        out = []
        for i, row in enumerate(own.read_jsonl(path, "vsr")):
            where = f"vsr: {path} row {i + 1}"
            label = own.binary_label(row, "label", where)
            if split == "train":
                own.field(row, "obj", where)
            image = self.image_path(self.root / "images" / str(own.field(row, "image", where)), where)
            caption = str(own.field(row, "caption", where))
            out.append(Row(image, f"{split}/{i}", own.question(where, **vsr_question(caption, label))))
        return out

    @cached_property
    def objects(self) -> list[str]:
        """The ``obj`` of every training row, in file order."""
        return [str(row["obj"]) for row in own.read_jsonl(self.root / "train.jsonl", "vsr")]

    def session_rows(self, session: int, groups: Sequence[int], shots: int, seed: int) -> list[int]:
        """The rows whose object is in the session, in file order, shuffled as ``random.seed(seed);
        random.shuffle`` does, cut to :func:`released_cut`."""
        names = {self.spec.class_names[g] for g in groups}
        rows = [i for i, obj in enumerate(self.objects) if obj in names]
        random.Random(seed).shuffle(rows)
        return rows[:own.released_cut(shots)]

    def session_source(self) -> dict:
        return {"rule": "released: rows of the session's objects, shuffled with the seed, cut to 100/300/600"}
