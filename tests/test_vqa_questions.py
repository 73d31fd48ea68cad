"""Multiple-choice VQA question sets: generation, balance, hard distractors, frozen files, the authors'
pickles, the released parse rules, and `fscl vqa build`."""
from __future__ import annotations

import datetime
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.vqa import commands
from benchmark.vqa.build import build_question_set, class_similarity
from benchmark.vqa.questions import (
    FORMAT_VERSION,
    MC_SUFFIX,
    MODES,
    LabelQuestions,
    MultipleChoiceSet,
    QuestionItem,
    QuestionSetError,
    import_authors_pickle,
    parse_gtsrb,
    parse_letter,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = tuple(f"class {i}" for i in range(43))


def _labels(n: int, classes: int) -> tuple[list[str], list[int]]:
    return [f"img/{i:05d}.png" for i in range(n)], [i % classes for i in range(n)]


def test_questions_are_the_same_in_processes_with_other_hash_seeds():
    code = ("from benchmark.vqa.questions import LabelQuestions\n"
            "names = tuple(f'class {i}' for i in range(43))\n"
            "ids = [f'img/{i:05d}.png' for i in range(300)]\n"
            "print(LabelQuestions('gtsrb', names, 'Q?', seed=3).build(ids, [i % 43 for i in range(300)]).sha256)")
    digests = set()
    for hash_seed in ("0", "4242"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=120)
        digests.add(done.stdout.strip())
    ids, labels = _labels(300, 43)
    assert digests == {LabelQuestions("gtsrb", NAMES, "Q?", seed=3).build(ids, labels).sha256}


def test_an_item_depends_only_on_set_image_and_seed():
    generator = LabelQuestions("gtsrb", NAMES, "Q?", seed=1)
    ids, labels = _labels(50, 43)
    forward = generator.build(ids, labels).items
    backward = generator.build(ids[::-1], labels[::-1]).items[::-1]
    assert forward == backward
    assert generator.item("img/00007.png", 7) != LabelQuestions("gtsrb", NAMES, "Q?", seed=2).item("img/00007.png", 7)
    assert generator.item("img/00007.png", 7) != LabelQuestions("aircraft", NAMES, "Q?", seed=1).item("img/00007.png", 7)


@pytest.mark.parametrize("classes", [2, 3, 5, 6, 43])
@pytest.mark.parametrize("mode", MODES)
def test_the_answer_is_among_k_distinct_options(classes, mode):
    names = NAMES[:classes]
    similarity = np.random.default_rng(0).random((classes, classes)) if mode == "hard" else None
    ids, labels = _labels(400, classes)
    questions = LabelQuestions("s", names, "Q?", mode, 0, similarity).build(ids, labels)
    for item, label in zip(questions.items, labels):
        assert len(item.choices) == min(5, classes) == len(set(item.choices))
        assert item.choices[item.answer] == names[label] and item.question == "Q?"


@pytest.mark.parametrize("classes", [3, 43])
def test_answer_positions_are_balanced(classes):
    ids, labels = _labels(5000, classes)
    counts = np.array(list(LabelQuestions("gtsrb", NAMES[:classes], "Q?", seed=0).build(ids, labels)
                           .letter_counts().values()))
    expected = 5000 / len(counts)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30, counts  # df ≤ 4: P(chi2 > 30) < 1e-5; fixed seed, so this never flips


def test_hard_distractors_come_only_from_the_nearest_classes():
    classes = 12
    index = np.arange(classes)
    similarity = -np.abs(index[:, None] - index[None, :]).astype(float)  # nearer index, more similar
    generator = LabelQuestions("s", NAMES[:classes], "Q?", "hard", 0, similarity)
    assert generator.pool(6) == [5, 7, 4, 8, 3, 9, 2, 10]  # 2(K-1) = 8 nearest, ties by index
    assert generator.pool(0) == [1, 2, 3, 4, 5, 6, 7, 8]
    for label in (0, 6):
        seen = set()
        for i in range(300):
            item = generator.item(f"img/{i}", label)
            distractors = {NAMES.index(c) for k, c in enumerate(item.choices) if k != item.answer}
            assert distractors <= set(generator.pool(label))
            seen |= distractors
        assert seen == set(generator.pool(label))


def test_generator_settings_are_checked():
    with pytest.raises(QuestionSetError, match=r"one: 1 class\(es\); a multiple-choice set needs at least 2"):
        LabelQuestions("one", ("cat",), "Q?")
    with pytest.raises(QuestionSetError, match="distractor mode 'nearest'; allowed: random, hard"):
        LabelQuestions("s", NAMES[:3], "Q?", mode="nearest")
    with pytest.raises(QuestionSetError, match=r"mode 'hard' needs a \[3, 3\] class similarity matrix, got None"):
        LabelQuestions("s", NAMES[:3], "Q?", mode="hard")
    with pytest.raises(QuestionSetError, match="only used by mode 'hard'"):
        LabelQuestions("s", NAMES[:3], "Q?", similarity=np.eye(3))
    with pytest.raises(QuestionSetError, match="options must be distinct"):
        LabelQuestions("s", ("cat", "dog", "cat"), "Q?")
    with pytest.raises(QuestionSetError, match="distinct image ids"):
        LabelQuestions("s", NAMES[:3], "Q?").build(["a", "a"], [0, 1])
    with pytest.raises(QuestionSetError, match=r"labels \[3\] outside 0..2"):
        LabelQuestions("s", NAMES[:3], "Q?").build(["a", "b"], [0, 3])
    assert commands.MODES == MODES


def test_a_stream_of_one_class_is_refused_before_any_model_loads():
    class OneClass:
        spec = type("Spec", (), {"name": "one", "class_names": ("cat",), "templates": ("a {}.",),
                                 "vqa_question": "What is it?", "own_questions": False})()

    with pytest.raises(QuestionSetError, match="at least 2"):
        build_question_set(OneClass(), "hard", backbone="openclip:no-such-model")


def test_the_prompt_is_the_released_text():
    questions = MultipleChoiceSet("s", (QuestionItem("x", "What is it?", ("cat", "dog", "cow"), 1),))
    assert questions.prompt(questions.items[0]) == f"What is it?\nA. cat\nB. dog\nC. cow\n{MC_SUFFIX}"
    assert MC_SUFFIX == "Answer with the option's letter from the given choices directly."


def test_the_frozen_file_round_trips_and_refuses_changes(tmp_path):
    ids, labels = _labels(40, 7)
    questions = LabelQuestions("gtsrb", NAMES[:7], "Q?", seed=5).build(ids, labels, parse_rule="gtsrb")
    path = tmp_path / "q.json"
    digest = questions.save(path)
    assert MultipleChoiceSet.load(path, expected_sha256=digest) == questions and questions.sha256 == digest
    body = json.loads(path.read_text())
    assert body["version"] == FORMAT_VERSION and body["sha256"] == digest
    assert body["source"] == {"generator": "label-choices", "generator_version": 1, "mode": "random", "seed": 5,
                              "options": 5, "question": "Q?"}
    assert sum(body["letters"].values()) == 40 and body["parse"] == "gtsrb"

    with pytest.raises(QuestionSetError, match=f"sha256 {digest}, expected {'0' * 64}"):
        MultipleChoiceSet.load(path, expected_sha256="0" * 64)
    edited = {**body, "items": [{**body["items"][0], "answer": (body["items"][0]["answer"] + 1) % 5},
                                *body["items"][1:]]}
    path.write_text(json.dumps(edited))
    with pytest.raises(QuestionSetError, match=f"recorded sha256 {digest} but its content hashes to [0-9a-f]{{64}}"):
        MultipleChoiceSet.load(path)
    path.write_text(json.dumps({**body, "version": 2}))
    with pytest.raises(QuestionSetError, match="question file version 2; this fscl-bench reads version 1"):
        MultipleChoiceSet.load(path)
    path.write_text("{}")
    with pytest.raises(QuestionSetError, match="is not a question file"):
        MultipleChoiceSet.load(path)


IDS = ["GTSRB/Final_Test/Images/00000.ppm", "LAION-final/9 ostrich/counter-1/a.jpg", "images/x.jpg", "images/y.jpg"]


def _pickle(path: Path, entries: dict) -> Path:
    path.write_bytes(pickle.dumps(entries))
    return path


def test_the_authors_pickles_are_imported_by_image(tmp_path):
    entries = {
        "x.jpg": {"question": "What is the person doing?", "choices": ["eating", "walking"], "answer": np.int64(1)},
        "gtsrb@GTSRB@Final_Test@Images@00000.ppm": {"question": "Q0", "choices": ["a", "b", "c"], "answer": 2},
        "9 ostrich-a.jpg": {"question": "Q1", "choices": ["ostrich", "emu", "rhea", "kiwi", "moa"], "answer": 0},
    }
    path = _pickle(tmp_path / "vqa.pkl", entries)
    questions = import_authors_pickle(path, "s", IDS)
    assert [(i.id, i.question, i.choices, i.answer) for i in questions.items] == [
        (IDS[0], "Q0", ("a", "b", "c"), 2),
        (IDS[1], "Q1", ("ostrich", "emu", "rhea", "kiwi", "moa"), 0),
        (IDS[2], "What is the person doing?", ("eating", "walking"), 1),
    ]  # in the order of the ids; images/y.jpg has no entry
    assert questions.source["imported"] == "authors-pickle" and len(questions.source["file_sha256"]) == 64
    fixed = import_authors_pickle(path, "s", IDS, question="What kind of traffic sign is this?")
    assert {i.question for i in fixed.items} == {"What kind of traffic sign is this?"}


def test_pickle_entries_that_match_no_single_image_or_hold_objects_are_refused(tmp_path):
    entry = {"question": "Q", "choices": ["a", "b"], "answer": 0}
    path = _pickle(tmp_path / "a.pkl", {"x.jpg": entry, "missing.jpg": entry, "gone.png": entry})
    with pytest.raises(QuestionSetError, match=r"2 entries match no test image of 's' \(e.g. missing.jpg, gone.png\)"):
        import_authors_pickle(path, "s", IDS)
    path = _pickle(tmp_path / "b.pkl", {"a.jpg": entry})
    with pytest.raises(QuestionSetError, match=r"1 entries match several test images of 's' \(e.g. a.jpg\)"):
        import_authors_pickle(path, "s", [*IDS, "other/a.jpg"])
    path = _pickle(tmp_path / "c.pkl", {"x.jpg": {"question": "Q", "choices": ["a", "b"], "answer": 4}})
    with pytest.raises(QuestionSetError, match="item 'images/x.jpg' has 2 options and answer 4"):
        import_authors_pickle(path, "s", IDS)
    path = _pickle(tmp_path / "d.pkl", {"x.jpg": {"question": "Q"}})
    with pytest.raises(QuestionSetError, match="entry 'x.jpg' is not"):
        import_authors_pickle(path, "s", IDS)
    path = _pickle(tmp_path / "e.pkl", {"x.jpg": datetime.date(2024, 1, 1)})
    with pytest.raises(QuestionSetError, match="holds a datetime.date object; a question file holds plain data"):
        import_authors_pickle(path, "s", IDS)


@pytest.mark.parametrize(("parse", "answer", "index"), [
    (parse_letter, "A", 0), (parse_letter, " E\n", 4), (parse_letter, "a", None), (parse_letter, "B.", None),
    (parse_letter, "The answer is B", None), (parse_letter, "", None), (parse_letter, "F", None),
    (parse_letter, "AB", None),
    (parse_gtsrb, "C", 2), (parse_gtsrb, "a", 0), (parse_gtsrb, " e ", 4), (parse_gtsrb, "b.", 1),
    (parse_gtsrb, "D.", 3), (parse_gtsrb, "A.", 0), (parse_gtsrb, "The answer is B. Stop", 1),
    (parse_gtsrb, "B. or maybe A.", 0),  # the first letter in A–E order whose "K." occurs, as released
    (parse_gtsrb, "Answer: C", None), (parse_gtsrb, "F.", None), (parse_gtsrb, "x", None), (parse_gtsrb, "", None),
], ids=lambda v: getattr(v, "__name__", repr(v)))
def test_the_released_parse_rules(parse, answer, index):
    assert parse(answer) == index


def test_the_paper_streams_carry_the_released_questions():
    from streams.base import DATA_DIR, StreamSpec

    released = {"gtsrb": "What kind of traffic sign is this?", "aircraft": "What is the type of this aircraft?",
                "eurosat": "What does this centered satellite photo show?",
                "counteranimal": "What is the species of this animal?"}
    for name, question in released.items():
        assert StreamSpec.from_file(DATA_DIR / f"{name}.yaml").vqa_question == question
    for name in ("tsi", "dalle"):
        assert StreamSpec.from_file(DATA_DIR / f"{name}.yaml").vqa_question


def test_fscl_vqa_build_writes_a_frozen_set(tmp_path, capsys):
    from benchmark.registry import STREAMS

    assert main(["vqa", "build", "digits", "--root", str(tmp_path), "--mode", "random"]) == 0
    path = tmp_path / "vqa" / "digits-random-s0.json"
    questions = MultipleChoiceSet.load(path)
    out = capsys.readouterr().out
    assert f"digits: {len(questions.items)} questions (random distractors, seed 0) -> {path}" in out
    assert f"sha256: {questions.sha256}" in out and "right answers: A " in out
    test = STREAMS.get("digits").obj(tmp_path).dataset("test")
    assert [i.id for i in questions.items] == test.ids and questions.parse_rule == "letter"
    assert {i.question for i in questions.items} == {"What digit is this?"}

    out_file = tmp_path / "hard.json"
    assert main(["vqa", "build", "digits", "--root", str(tmp_path), "--mode", "hard",
                 "--backbone", "openclip:fscl-tiny", "--out", str(out_file)]) == 0
    hard = MultipleChoiceSet.load(out_file)
    assert hard.source["mode"] == "hard" and hard.source["similarity_from"] == "openclip:fscl-tiny"
    spec = STREAMS.get("digits").obj.spec
    generator = LabelQuestions("digits", spec.class_names, spec.vqa_question, "hard", 0,
                               class_similarity("openclip:fscl-tiny", spec.class_names, spec.templates))
    for item, label in zip(hard.items, test.targets):
        pool = {spec.class_names[c] for c in generator.pool(label)}
        assert {c for k, c in enumerate(item.choices) if k != item.answer} <= pool

    assert main(["vqa", "build", "digits", "--root", str(tmp_path), "--mode", "hard"]) == 2
    assert "mode 'hard' needs a backbone" in capsys.readouterr().err


def test_a_stream_s_answer_rule_is_read_from_its_data_file(tmp_path):
    """``vqa_parse`` in a stream's data file names the rule its built set reads generated answers with (GTSRB's
    released lenient parse); a data file with an unknown rule is refused naming the key and the rules."""
    import dataclasses

    import yaml

    import streams
    from benchmark.registry import STREAMS
    from streams.base import StreamSpec

    gtsrb_file = Path(streams.__file__).parent / "data" / "gtsrb.yaml"
    assert StreamSpec.from_file(gtsrb_file).vqa_parse == "gtsrb"
    stream = STREAMS.get("digits").obj(tmp_path)
    assert stream.spec.vqa_parse == "letter" and build_question_set(stream).parse_rule == "letter"
    stream.spec = dataclasses.replace(stream.spec, vqa_parse="gtsrb")  # the rule follows the spec, not the name
    assert build_question_set(stream).parse_rule == "gtsrb"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(gtsrb_file.read_text()), "vqa_parse": "loose"}))
    with pytest.raises(ValueError, match="vqa_parse: invalid value 'loose'; allowed: letter, gtsrb"):
        StreamSpec.from_file(bad)
