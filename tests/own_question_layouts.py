"""Tiny copies of the four layouts whose rows bring their own questions (VSR, Hateful Memes, MMVP, VisOnlyQA),
written exactly as the hub repositories and the released code lay them out, with real (tiny, generated) images.

``write_own_question_layouts(root)`` writes all four under one data root with the small row counts below (every
session non-empty); the ``write_*`` builders take larger counts where a test needs them (e.g. the released
100/300/600 cut). Several VSR and HM rows share an image, as VSR's rows do, so that many rows stay cheap.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image
from test_streams_layouts import write_image

STREAMS_DATA = Path(__file__).resolve().parents[1] / "streams" / "data"
VSR_SESSIONS: list[list[str]] = yaml.safe_load((STREAMS_DATA / "vsr.yaml").read_text())["sessions"]
VISONLYQA_CATEGORIES: list[str] = yaml.safe_load((STREAMS_DATA / "visonlyqa.yaml").read_text())["class_names"]
VSR_ROWS_PER_SESSION = 12  # training rows of each session's objects (plus 2 rows of an object in no session)
HM_ROWS_PER_PART = 12  # training rows of each of the five parts of the session file
MMVP_ROWS = 300  # rows of Questions.csv: 150 pairs, the training half 5 sessions of 30
VISONLYQA_ROWS = 10  # rows per training category (every third a multi-answer row)
TEST_ROWS = 6  # test rows of VSR and HM; of each VisOnlyQA eval split
SHARED_IMAGES = 4  # distinct images the VSR and HM rows point to


def write_vsr(root: Path, per_session: int = VSR_ROWS_PER_SESSION, test_rows: int = TEST_ROWS) -> Path:
    """``vsr/{train,test}.jsonl`` (image, caption, label, relation, obj) and ``vsr/images/*.jpg``; a session's rows
    cycle through its objects, labels alternate, two training rows are of 'zebra' (no session's object)."""
    base = root / "vsr"
    images = [write_image(base / "images" / f"{i:012d}.jpg", 500 + i).name for i in range(SHARED_IMAGES)]
    train = [{"image": images[i % len(images)], "caption": f"The {objs[i % len(objs)]} is left of row {s}-{i}.",
              "label": i % 2, "relation": "left of", "subj": "cat", "obj": objs[i % len(objs)]}
             for s, objs in enumerate(VSR_SESSIONS) for i in range(per_session)]
    train[3:3] = [{"image": images[0], "caption": f"The zebra is near {i}.", "label": 1, "relation": "near",
                   "subj": "dog", "obj": "zebra"} for i in range(2)]
    test = [{"image": images[i % len(images)], "caption": f"The cat is under the table {i}.", "label": (i + 1) % 2,
             "relation": "under", "subj": "cat", "obj": "dining table"} for i in range(test_rows)]
    for name, rows in (("train", train), ("test", test)):
        (base / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base


def write_hm(root: Path, per_part: int = HM_ROWS_PER_PART, test_rows: int = TEST_ROWS, folder: str = "hateful_memes",
             session_file: bool = True) -> Path:
    """``<folder>/{train,test_unseen}.jsonl`` (id, img, label, text), ``img/*.png`` and, with ``session_file``,
    ``data_per_session.pkl``: part ``k`` is rows ``k, k + 5, k + 10, ...`` (listed backwards)."""
    base = root / folder
    images = [f"img/{10000 + i}.png" for i in range(SHARED_IMAGES)]
    for i, image in enumerate(images):
        write_image(base / image, 700 + i)
    n = 5 * per_part
    train = [{"id": 10000 + i, "img": images[i % len(images)], "label": int(i % 3 == 0), "text": f"meme text {i}"}
             for i in range(n)]
    test = [{"id": 20000 + i, "img": images[i % len(images)], "label": i % 2, "text": f"test meme {i}"}
            for i in range(test_rows)]
    (base / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (base / "test_unseen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    if session_file:
        parts = [list(range(k, n, 5))[::-1] for k in range(5)]
        (base / "data_per_session.pkl").write_bytes(pickle.dumps(parts))
    return base


def mmvp_options(row: int) -> str:
    """The Options cell of a Questions.csv row: '(a) X (b) Y'."""
    return f"(a) Open {row} (b) Closed {row}"


def write_mmvp(root: Path, rows: int = MMVP_ROWS, folder: str = "MMVP", images: str = "MMVP Images") -> Path:
    """``<folder>/Questions.csv`` (Index 1.., Question, Options, Correct Answer: pairs (a), (b)) and
    ``<folder>/<images>/<Index>.jpg``."""
    base = root / folder
    lines = ["Index,Question,Options,Correct Answer"]
    for i in range(rows):
        lines.append(f'{i + 1},"Is the door open or closed, pair {i // 2}?",{mmvp_options(i)},({"ab"[i % 2]})')
        write_image(base / images / f"{i + 1}.jpg", 900 + i)
    base.mkdir(parents=True, exist_ok=True)
    (base / "Questions.csv").write_text("\n".join(lines) + "\n")
    return base


def png_bytes(seed: int) -> bytes:
    """A tiny PNG's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def visonlyqa_rows(name: str, n: int, seed: int) -> pa.Table:
    """``n`` rows of a VisOnlyQA split: every third row multi-answer, the others single-answer with three options
    (the answer: option ``i % 3``), images as the hub's ``{bytes, path}`` structs."""
    rows = []
    for i in range(n):
        options = [f"{10 * i + k} cm" for k in range(3)]
        single = i % 3 != 2
        rows.append({"image_path": f"images/{name}/{i}.png", "question": f"What is the length in {name} {i}?",
                     "prompt_no_reasoning": f"Look at the figure {name} {i}. Answer with one option. ",
                     "answer": options[i % 3] if single else "a, b", "response_options": options,
                     "question_type": "single_answer" if single else "multiple_answers",
                     "decoded_image": {"bytes": png_bytes(seed + i), "path": f"{i}.png"}})
    return pa.Table.from_pylist(rows)


def write_visonlyqa(root: Path, per_category: int = VISONLYQA_ROWS, test_rows: int = TEST_ROWS,
                    arrow: bool = False) -> Path:
    """``VisOnlyQA/VisOnlyQA_{Train,Eval_Real,Eval_Synthetic}/``: the hub's ``data/<split>-00000-of-00001.parquet``
    files, or with ``arrow`` what ``save_to_disk`` writes (``<split>/data-00000-of-00001.arrow``, Arrow IPC
    stream). Train: the seven categories; Eval_Real: two splits; Eval_Synthetic: one."""
    base = root / "VisOnlyQA"
    repositories = {"VisOnlyQA_Train": {c: per_category for c in VISONLYQA_CATEGORIES},
                    "VisOnlyQA_Eval_Real": {"geometry__triangle": test_rows, "chemistry__shape_single": test_rows},
                    "VisOnlyQA_Eval_Synthetic": {"syntheticgeometry__triangle": test_rows}}
    for r, (repository, splits) in enumerate(repositories.items()):
        for s, (split, n) in enumerate(splits.items()):
            table = visonlyqa_rows(split, n, 10000 * r + 100 * s)
            if arrow:
                path = base / repository / split / "data-00000-of-00001.arrow"
                path.parent.mkdir(parents=True, exist_ok=True)
                with pa.ipc.new_stream(str(path), table.schema) as writer:
                    writer.write_table(table)
            else:
                path = base / repository / "data" / f"{split}-00000-of-00001.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path, row_group_size=4)
    return base


def write_own_question_layouts(root: Path) -> None:
    """All four layouts under ``root`` (the released folder names), with the small row counts above."""
    write_vsr(root)
    write_hm(root)
    write_mmvp(root)
    write_visonlyqa(root)
