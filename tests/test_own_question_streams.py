"""VSR, Hateful Memes, MMVP and VisOnlyQA on tiny copies of their real layouts (tests/own_question_layouts.py):
the released sessions and row counts, the released wording of every prompt, text and pair, and every bad input
named, by the loader and by ``fscl data check``."""
from __future__ import annotations

import json
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from own_question_layouts import (
    HM_ROWS_PER_PART,
    MMVP_ROWS,
    TEST_ROWS,
    VISONLYQA_CATEGORIES,
    VSR_SESSIONS,
    mmvp_options,
    write_hm,
    write_mmvp,
    write_own_question_layouts,
    write_visonlyqa,
    write_vsr,
)

from benchmark.registry import STREAMS
from streams.base import StreamDataError
from streams.check import check_stream
from streams.hm import HatefulMemes
from streams.mmvp import MMVP
from streams.options import HMOptions, MMVPOptions
from streams.visonlyqa import VisOnlyQA
from streams.vsr import VSR

SUFFIX = "Answer with the option's letter from the given choices directly."
WRAP = "Based on the image, respond to this question with a short answer: "


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A data root holding all four layouts (read-only in tests)."""
    path = tmp_path_factory.mktemp("own")
    write_own_question_layouts(path)
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- sessions and row counts
def test_released_session_groups():
    assert [[VSR.spec.class_names[c] for c in g] for g in VSR.spec.session_classes(5)] == [
        ["oven", "dining table", "spoon", "boat", "cake", "donut", "sandwich"],
        ["fire hydrant", "elephant", "airplane", "truck", "apple", "hot dog", "sheep"],
        ["kite", "baseball glove", "cow", "tie", "scissors", "toaster", "tv"],
        ["bicycle", "banana", "couch", "teddy bear", "bus", "umbrella", "bird"],
        ["potted plant", "bowl", "broccoli", "bottle", "knife", "orange", "person", "pizza"]]
    assert [[VisOnlyQA.spec.class_names[c] for c in g] for g in VisOnlyQA.spec.session_classes(5)] == [
        ["syntheticgeometry__triangle"], ["syntheticgeometry__quadrilateral"], ["syntheticgeometry__length"],
        ["syntheticgeometry__angle"], ["syntheticgeometry__area", "3d__size", "3d__angle"]]
    for stream in (VSR, HatefulMemes, MMVP, VisOnlyQA):
        assert stream.spec.own_questions and stream.spec.templates == ("{}",)
        with pytest.raises(ValueError, match="sessions: 5"):
            stream.spec.session_classes(3)
    assert HatefulMemes.spec.vqa_positive == "yes"
    assert [STREAMS.get(n).obj for n in ("vsr", "hm", "mmvp", "visonlyqa")] == [VSR, HatefulMemes, MMVP, VisOnlyQA]


def test_vsr_sessions_shuffle_and_cut(tmp_path):
    """Each session: its objects' rows in file order, shuffled as random.seed(seed); random.shuffle, cut to
    100/300/600; a row of an object in no session is never drawn."""
    write_vsr(tmp_path, per_session=610)
    stream = VSR(tmp_path)
    objs = [r["obj"] for r in rows(tmp_path / "vsr" / "train.jsonl")]
    for shots, cut in ((5, 100), (20, 300), (50, 600)):
        sessions = stream.sessions(5, shots, 3)
        for session, names in zip(sessions, VSR_SESSIONS):
            expected = [i for i, o in enumerate(objs) if o in names]
            random.seed(3)
            random.shuffle(expected)
            assert session.ids == [f"train/{i}" for i in expected[:cut]]
            assert len(session.ids) == cut and session.short_classes == []
            assert session.classes == [VSR.spec.class_names.index(n) for n in names]
    assert not {"train/3", "train/4"} & {i for s in stream.sessions(5, 50, 3) for i in s.ids}  # the zebra rows
    assert stream.sessions(5, 5, 3)[0].ids != stream.sessions(5, 5, 4)[0].ids


def test_hm_sessions_from_the_file_and_seeded(tmp_path):
    write_hm(tmp_path, per_part=305)
    with_file = HatefulMemes(tmp_path)
    parts = pickle.loads((tmp_path / "hateful_memes" / "data_per_session.pkl").read_bytes())
    for shots, cut in ((5, 100), (20, 300), (50, 600)):
        sessions = with_file.sessions(5, shots, 0)
        assert [s.ids for s in sessions] == [[f"train/{i}" for i in part[:cut]] for part in parts]
    assert with_file.sessions(5, 5, 7)[0].ids == with_file.sessions(5, 5, 0)[0].ids  # the seed plays no part
    assert with_file.data_record()["sessions"]["session_file"].endswith("data_per_session.pkl")

    seeded = HatefulMemes(tmp_path, HMOptions(session_file=None))
    labels = [r["label"] for r in rows(tmp_path / "hateful_memes" / "train.jsonl")]
    split = seeded.parts
    assert sorted(i for p in split for i in p) == list(range(len(labels)))  # a partition of train.jsonl
    rates = [np.mean([labels[i] for i in p]) for p in split]
    assert max(rates) - min(rates) < 0.01  # stratified by label
    assert [len(s.ids) for s in seeded.sessions(5, 20, 0)] == [300] * 5
    assert split == HatefulMemes(tmp_path, HMOptions(session_file=None)).parts  # fixed by the session seed
    assert split != HatefulMemes(tmp_path, HMOptions(session_file=None, session_seed=1)).parts
    assert "deviation" in seeded.data_record()["sessions"]["rule"]


def test_mmvp_split_pairs_and_sessions(root):
    stream = MMVP(root)
    train, test = stream.dataset("train"), stream.dataset("test")
    train_rows = [i for s in range(0, MMVP_ROWS, 4) for i in (s, s + 1)]
    test_rows = [i for s in range(2, MMVP_ROWS, 4) for i in (s, s + 1)]
    assert train.ids == [f"MMVP Images/{i + 1}.jpg" for i in train_rows]
    assert test.ids == [f"MMVP Images/{i + 1}.jpg" for i in test_rows]
    assert [q.group for q in test.questions] == [str(i // 2) for i in test_rows]
    for shots in (5, 50):  # the shots play no part
        assert [s.ids for s in stream.sessions(5, shots, 0)] == [train.ids[30 * k:30 * k + 30] for k in range(5)]
    assert stream.session_test(test, stream.sessions(5, 5, 0)[2]) is test  # the whole test split every session


def test_visonlyqa_sessions_are_the_released_draws(root):
    """Per session one RandomState(seed), its permutation per category == np.random.seed(seed); permutation;
    the first min(shots, n) kept when single-answer."""
    stream = VisOnlyQA(root)
    n = 10
    single = [i for i in range(n) if i % 3 != 2]
    for seed in (0, 5):
        np.random.seed(seed)
        legacy = [np.random.permutation(n) for _ in range(3)]
        for shots in (4, 50):
            sessions = stream.sessions(5, shots, seed)
            for session, categories in zip(sessions, ([c] for c in VISONLYQA_CATEGORIES[:4])):
                assert session.ids == [f"VisOnlyQA_Train/{categories[0]}/{r}" for r in legacy[0][:shots] if r in single]
            assert sessions[4].ids == [f"VisOnlyQA_Train/{c}/{r}" for c, perm in zip(VISONLYQA_CATEGORIES[4:], legacy)
                                       for r in perm[:shots] if r in single]
    assert len(stream.dataset("test")) == 3 * 4  # the single-answer rows of the three eval splits


def test_visonlyqa_save_to_disk_layout_reads_the_same(root, tmp_path):
    write_visonlyqa(tmp_path, arrow=True)
    hub, disk = VisOnlyQA(root), VisOnlyQA(tmp_path)
    for split in ("train", "test"):
        a, b = hub.dataset(split), disk.dataset(split)
        assert a.ids == b.ids and a.questions == b.questions
        assert np.array_equal(np.asarray(a.load(a.items[-1])), np.asarray(b.load(b.items[-1])))


# --------------------------------------------------------------------------- the released wording
def test_released_prompts_texts_and_pairs(root):
    vsr = VSR(root).dataset("test").questions[0]
    caption = rows(root / "vsr" / "test.jsonl")[0]["caption"]
    assert vsr.prompt == f"Based on the image, is this statement true or false? {caption}"
    assert vsr.answers == ("false", "true") and vsr.answer == 1
    assert vsr.texts == (f"Based on the image, the statement '{caption}' is false",
                         f"Based on the image, the statement '{caption}' is true")
    assert vsr.pair == (f"{WRAP}Based on the image, is this statement true or false? {caption}", "true")

    hm = HatefulMemes(root).dataset("train").questions[0]
    assert hm.prompt == "This is an image writting 'meme text 0'. Is this image hateful? Answer yes or no. Answer:"
    assert hm.answers == ("no", "yes") and hm.answer == 1 and hm.text == "This is a hateful image writting 'meme text 0'"
    assert hm.texts[0] == "This is an image writting 'meme text 0'"
    assert hm.pair == (f"{WRAP}This is an image writting 'meme text 0'. Is this image hateful? (Answer yes or no)",
                       "yes")

    mmvp = MMVP(root).dataset("test").questions[1]  # row 4: Index 4, answer (b)
    question = "Is the door open or closed, pair 1?"
    assert mmvp.prompt == f"{question}\n{mmvp_options(3)}\n{SUFFIX}"
    assert mmvp.answers == ("(a)", "(b)") and mmvp.answer == 1 and mmvp.group == "1"
    assert mmvp.texts == (f"{question} Open 3", f"{question} Closed 3")
    assert mmvp.pair == (f"{WRAP}{question}\n{mmvp_options(3)}\n{SUFFIX}", "(b)")

    data = VisOnlyQA(root).dataset("test")
    vis = data.questions[1]  # Eval_Real chemistry__shape_single row 1: answer option 1
    assert data.ids[1] == "VisOnlyQA_Eval_Real/chemistry__shape_single/1"
    assert vis.prompt == f"What is the length in chemistry__shape_single 1?\nA. 10 cm\nB. 11 cm\nC. 12 cm\n{SUFFIX}"
    assert vis.answers == ("A", "B", "C") and vis.answer == 1
    prompt = "Look at the figure chemistry__shape_single 1. Answer with one option. "
    assert vis.texts == tuple(f"{prompt}\nThe answer is {o}" for o in ("10 cm", "11 cm", "12 cm"))
    assert vis.pair == (prompt.strip(), "11 cm")  # no short-answer wrapper


def test_split_labels_captions_and_whole_test(root):
    for name in ("vsr", "hm", "mmvp", "visonlyqa"):
        stream = STREAMS.get(name).obj(root)
        for split in ("train", "test"):
            data = stream.dataset(split)
            assert data.targets == list(range(len(data))) and len(set(data.ids)) == len(data)
            assert data.captions == [q.text for q in data.questions]
            image, label, caption = data[len(data) - 1]
            assert image.size == (8, 8) and label == len(data) - 1 and caption == data.questions[-1].text
        with pytest.raises(StreamDataError, match="no validation view"):
            stream.validation(2)
    assert len(VSR(root).dataset("test")) == len(HatefulMemes(root).dataset("test")) == TEST_ROWS


def test_mmvp_corrected_labels(tmp_path):
    """corrected_labels swaps the answers of Index 99/100 and 279/280 (MMVP issues 14, 30) and nothing else."""
    write_mmvp(tmp_path, folder="mmvp", images="MMVP-Images")  # the other accepted names
    released = MMVP(tmp_path)
    fixed = MMVP(tmp_path, MMVPOptions(corrected_labels=True))
    changed = {}
    for split in ("train", "test"):
        a, b = released.dataset(split), fixed.dataset(split)
        changed.update({i: (qa.answer, qb.answer) for i, qa, qb in zip(a.ids, a.questions, b.questions) if qa != qb})
    assert changed == {"MMVP-Images/99.jpg": (0, 1), "MMVP-Images/100.jpg": (1, 0),
                       "MMVP-Images/279.jpg": (0, 1), "MMVP-Images/280.jpg": (1, 0)}
    assert fixed.data_record()["labels"]["corrected"]["280"] == {"released": "(b)", "corrected": "(a)"}
    assert "labels" not in released.data_record()


def test_skip_bad_images_leaves_a_drawn_row_out(tmp_path):
    write_mmvp(tmp_path)
    (tmp_path / "MMVP" / "MMVP Images" / "1.jpg").write_bytes(b"not an image")
    with pytest.raises(StreamDataError, match="1.jpg"):
        MMVP(tmp_path).dataset("train")[0]
    stream = MMVP(tmp_path, skip_bad_images=True)
    first = stream.sessions(5, 5, 0)[0]
    assert len(first.ids) == 29 and first.unreadable == ["MMVP Images/1.jpg"]
    assert stream.data_record(stream.sessions(5, 5, 0))["skipped_images"]["ids"] == ["MMVP Images/1.jpg"]


# --------------------------------------------------------------------------- bad input, named
def _break_vsr(base: Path) -> str:
    lines = (base / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[4]) | {"image": "missing.jpg"}
    (base / "train.jsonl").write_text("\n".join([*lines[:4], json.dumps(row), *lines[5:]]) + "\n")
    return r"train.jsonl row 5: its image .*missing.jpg does not exist"


def _bad_vsr_label(base: Path) -> str:
    lines = (base / "test.jsonl").read_text().splitlines()
    (base / "test.jsonl").write_text("\n".join([json.dumps(json.loads(lines[0]) | {"label": 2}), *lines[1:]]))
    return r"test.jsonl row 1: label 2 is not one of its options 0, 1"


def _bad_hm_session_file(base: Path) -> str:
    (base / "data_per_session.pkl").write_bytes(pickle.dumps([[0, 1], [2], [3], [4], [5, 10_000]]))
    return r"data_per_session.pkl: session 5 holds \[10000\], not row indices 0..59"


def _hm_code_in_session_file(base: Path) -> str:
    (base / "data_per_session.pkl").write_bytes(pickle.dumps([Path("x")] * 5))
    return r"cannot read the session file .*pathlib"


def _bad_mmvp_answer(base: Path) -> str:
    lines = (base / "Questions.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",(c)"
    (base / "Questions.csv").write_text("\n".join(lines) + "\n")
    return r"Questions.csv row 3: Correct Answer '\(c\)' is not one of its options \['\(a\)', '\(b\)'\]"


def _missing_mmvp_image(base: Path) -> str:
    (base / "MMVP Images" / "7.jpg").unlink()
    return r"Questions.csv row 7: its image .*7.jpg does not exist"


def _bad_visonlyqa_answer(base: Path) -> str:
    path = base / "VisOnlyQA_Eval_Synthetic" / "data" / "syntheticgeometry__triangle-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    table[1]["answer"] = "99 cm"
    pq.write_table(pa.Table.from_pylist(table), path)
    return r"syntheticgeometry__triangle-00000-of-00001.parquet row 2: answer '99 cm' is not one of its response_options"


def _visonlyqa_no_single_answer(base: Path) -> str:
    path = base / "VisOnlyQA_Train" / "data" / "3d__size-00000-of-00001.parquet"
    table = pq.read_table(path).to_pylist()
    pq.write_table(pa.Table.from_pylist([r | {"question_type": "multiple_answers"} for r in table]), path)
    return r"the training category 3d__size has no single_answer rows"


def _missing_visonlyqa_category(base: Path) -> str:
    (base / "VisOnlyQA_Train" / "data" / "3d__angle-00000-of-00001.parquet").unlink()
    return r"no files of the training category 3d__angle"


def _missing_hm_file(base: Path) -> str:
    (base / "test_unseen.jsonl").unlink()
    return r"missing file .*test_unseen.jsonl"


BAD = {"vsr": (write_vsr, "vsr", [_break_vsr, _bad_vsr_label]),
       "hm": (write_hm, "hateful_memes", [_bad_hm_session_file, _hm_code_in_session_file, _missing_hm_file]),
       "mmvp": (write_mmvp, "MMVP", [_bad_mmvp_answer, _missing_mmvp_image]),
       "visonlyqa": (write_visonlyqa, "VisOnlyQA",
                     [_bad_visonlyqa_answer, _visonlyqa_no_single_answer, _missing_visonlyqa_category])}
CASES = [(name, breaker) for name, (_, _, breakers) in BAD.items() for breaker in breakers]


@pytest.mark.parametrize(("name", "breaker"), CASES, ids=[b.__name__ for _, b in CASES])
def test_bad_input_is_named_by_the_loader_and_data_check(tmp_path, name, breaker):
    write, folder, _ = BAD[name]
    write(tmp_path)
    pattern = breaker(tmp_path / folder)
    stream = STREAMS.get(name).obj(tmp_path)
    with pytest.raises(StreamDataError, match=pattern):
        stream.dataset("train")
        stream.dataset("test")
        stream.sessions(5, 5, 0)
    report = check_stream(name, tmp_path)
    assert not report.ok and any(re.search(pattern, p) for p in report.problems), report.text()


def test_data_check_cli_reports_rows_and_sessions(root):
    result = subprocess.run([sys.executable, "-m", "benchmark", "data", "check", "hm", "--root",
                             str(root / "hateful_memes"), "--no-progress", "--shots", "20"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"rows (one question each): train {5 * HM_ROWS_PER_PART}, test {TEST_ROWS}" in result.stdout
    assert "session 5 (part 5): 12 training rows (shots 20, seed 0)" in result.stdout
    assert "OK: hm is usable" in result.stdout
