"""``visonlyqa``: VisOnlyQA, as the hub repositories' parquet files (or ``datasets``' ``save_to_disk`` folders).

Training rows are the single-answer rows of ``VisOnlyQA_Train``'s seven categories; the test split is every
single-answer row of every split of ``VisOnlyQA_Eval_Real`` and ``VisOnlyQA_Eval_Synthetic``. A session draws, per
category, the first ``min(shots, n)`` rows of ``np.random.RandomState(seed).permutation(n)`` (one generator per
session, drawn category after category, as the released ``np.random.seed(seed)``) and keeps the single-answer ones.
Images stay in the files until a row is read (a parquet row group, or a memory-mapped Arrow file).
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from benchmark.vqa.questions import LETTERS, MC_SUFFIX
from streams.base import DATA_DIR, Split, StreamDataError, StreamSpec
from streams.files import hidden_part
from streams.own_questions import OwnQuestionStream, Row, question

TRAIN, EVAL = "VisOnlyQA_Train", ("VisOnlyQA_Eval_Real", "VisOnlyQA_Eval_Synthetic")
COLUMNS = ("question", "prompt_no_reasoning", "answer", "response_options", "question_type")
IMAGE_COLUMNS = ("decoded_image", "image")
SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
LAYOUT = f"""\
<data_root>/visonlyqa/           (or VisOnlyQA/, the released code's name)
  {TRAIN}/                the hub repository ryokamoi/{TRAIN}: its parquet files, each named after its split,
    data/syntheticgeometry__triangle-00000-of-00001.parquet    ... one split per training category (7)
  {EVAL[0]}/             ryokamoi/{EVAL[0]}, every split
  {EVAL[1]}/        ryokamoi/{EVAL[1]}, every split
  (or, in each, what datasets' save_to_disk writes: <split>/data-00000-of-00001.arrow ...)
  columns: question, prompt_no_reasoning, answer, response_options, question_type, decoded_image (or image)"""


class TableRow(NamedTuple):
    """One row's image in a parquet or Arrow file: the file, the row's position in it, the image column."""

    path: str
    row: int
    column: str


@lru_cache(maxsize=16)
def arrow_table(path: str) -> Any:
    """The table of an Arrow IPC file (stream or file format, as ``save_to_disk`` writes), memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


def read_table(path: Path, columns: Sequence[str] | None = None) -> Any:
    """The ``columns`` (all: None) of a parquet or Arrow file, or an error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path, columns=list(columns) if columns is not None else None)
        table = arrow_table(str(path))
        return table.select(list(columns)) if columns is not None else table
    except (pa.ArrowException, OSError, KeyError) as err:
        raise StreamDataError(f"visonlyqa: cannot read {path}: {err}") from err


def table_schema(path: Path) -> list[str]:
    """The column names of a parquet or Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names if path.suffix == ".parquet" else arrow_table(str(path)).column_names)
    except (pa.ArrowException, OSError) as err:
        raise StreamDataError(f"visonlyqa: cannot read {path}: {err}") from err


@lru_cache(maxsize=16)
def _row_group_starts(path: str) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return tuple(np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]).tolist())


@lru_cache(maxsize=4)
def _row_group(path: str, group: int, column: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


def load_table_image(item: TableRow) -> Image.Image:
    """Decode the image of one row (a ``{bytes, path}`` struct or raw bytes) to RGB, naming the row when it fails."""
    import pyarrow as pa

    try:
        if item.path.endswith(".parquet"):
            starts = _row_group_starts(item.path)
            group = int(np.searchsorted(starts, item.row, side="right")) - 1
            value = _row_group(item.path, group, item.column)[item.row - starts[group]].as_py()
        else:
            value = arrow_table(item.path).column(item.column)[item.row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, bytes):
            raise ValueError(f"its {item.column} holds no image bytes")
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (pa.ArrowException, OSError, ValueError, IndexError) as err:
        raise StreamDataError(f"visonlyqa: cannot read the image of {item.path} row {item.row + 1}: {err}") from err


def visonlyqa_question(row: dict[str, Any], where: str) -> Any:
    """The released VisOnlyQA wording of one single-answer row: the question with lettered options (eval), one CLIP
    text per option, the VLM-loss pair (``prompt_no_reasoning``, the raw answer; no short-answer wrapper)."""
    options = [str(o) for o in row["response_options"] or ()]
    if row["answer"] not in options:
        raise StreamDataError(f"{where}: answer {row['answer']!r} is not one of its response_options {options}")
    if len(options) > len(LETTERS):
        raise StreamDataError(f"{where}: {len(options)} response_options; at most {len(LETTERS)} can be lettered")
    lines = [row["question"], *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)), MC_SUFFIX]
    return question(where, prompt="\n".join(lines), answers=tuple(LETTERS[:len(options)]),
                    answer=options.index(row["answer"]),
                    texts=tuple(f"{row['prompt_no_reasoning']}\nThe answer is {o}" for o in options),
                    pair=(str(row["prompt_no_reasoning"]).strip(), str(row["answer"])))


class VisOnlyQA(OwnQuestionStream):
    """VisOnlyQA (hub parquet files), lettered options; sessions by training category."""

    spec = StreamSpec.from_file(DATA_DIR / "visonlyqa.yaml")
    folder = "visonlyqa"
    released_folders = ("VisOnlyQA",)
    layout = LAYOUT

    def split_files(self, repository: str) -> dict[str, list[Path]]:
        """Split name -> its files (sorted) in one repository folder: parquet files named ``<split>[-NNNNN-of-NNNNN]``
        anywhere in it, or ``<split>/data-*.arrow`` folders."""
        base = self.root / repository
        if not base.is_dir():
            raise StreamDataError(f"visonlyqa: missing folder {base}\nexpected layout:\n{self.layout}")
        found: dict[str, list[Path]] = {}
        for path in sorted(base.rglob("*")):
            if hidden_part(path, base) or not path.is_file():
                continue
            if path.suffix == ".parquet":
                match = SHARD.match(path.stem)
                found.setdefault(match["split"] if match else path.stem, []).append(path)
            elif path.suffix == ".arrow" and path.name.startswith("data-"):
                found.setdefault(path.parent.name, []).append(path)
        if not found:
            raise StreamDataError(f"visonlyqa: no parquet or data-*.arrow files under {base}\n"
                                  f"expected layout:\n{self.layout}")
        return found

    def split_rows(self, repository: str, split: str, files: list[Path]) -> tuple[int, list[Row]]:
        """(rows in the split, its single-answer rows) of one split's files, ids ``<repository>/<split>/<row>``."""
        out, n = [], 0
        for path in files:
            names = table_schema(path)
            image = next((c for c in IMAGE_COLUMNS if c in names), None)
            missing = [c for c in COLUMNS if c not in names] + ([] if image else [" or ".join(IMAGE_COLUMNS)])
            if missing:
                raise StreamDataError(f"visonlyqa: {path} has no column(s) {', '.join(missing)}")
            table = read_table(path, COLUMNS).to_pylist()
            for i, row in enumerate(table):
                if row["question_type"] == "single_answer":
                    where = f"visonlyqa: {path} row {i + 1}"
                    out.append(Row(TableRow(str(path), i, image), f"{repository}/{split}/{n + i}",
                                   visonlyqa_question(row, where)))
            n += len(table)
        return n, out

    @cached_property
    def train_table(self) -> tuple[list[Row], dict[str, int], dict[str, dict[int, int]]]:
        """The training rows (categories in class order), each category's row count, and per category its
        single-answer rows' positions in the split -> their positions in the listed training rows."""
        files = self.split_files(TRAIN)
        rows: list[Row] = []
        sizes, index = {}, {}
        for category in self.spec.class_names:
            if category not in files:
                raise StreamDataError(f"visonlyqa: no files of the training category {category} under "
                                      f"{self.root / TRAIN} (found: {', '.join(sorted(files))})")
            sizes[category], kept = self.split_rows(TRAIN, category, files[category])
            if not kept:
                raise StreamDataError(f"visonlyqa: the training category {category} has no single_answer rows "
                                      f"({', '.join(map(str, files[category]))})")
            index[category] = {int(r.id.rsplit("/", 1)[1]): len(rows) + j for j, r in enumerate(kept)}
            rows += kept
        return rows, sizes, index

    def rows(self, split: Split) -> list[Row]:
        if split == "train":
            return self.train_table[0]
        return [row for repository in EVAL for name, files in sorted(self.split_files(repository).items())
                for row in self.split_rows(repository, name, files)[1]]

    def session_rows(self, session: int, groups: Sequence[int], shots: int, seed: int) -> list[int]:
        """Per category of the session, the single-answer rows among the first ``min(shots, n)`` of a
        ``RandomState(seed)`` permutation (one generator for the session, as the released ``np.random.seed``)."""
        _, sizes, index = self.train_table
        rng = np.random.RandomState(seed)
        out = []
        for g in groups:
            category = self.spec.class_names[g]
            drawn = rng.permutation(sizes[category])[:min(shots, sizes[category])]
            out += [index[category][int(r)] for r in drawn if int(r) in index[category]]
        return out

    def load_item(self, item: TableRow) -> Image.Image:
        return load_table_image(item)

    def session_source(self) -> dict:
        return {"rule": "released: per category the single-answer rows among the first min(shots, n) of "
                        "np.random.RandomState(seed).permutation(n)"}
