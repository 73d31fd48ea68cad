"""The mini world's question kinds (VSR-, MMVP- and HM-like): generators deterministic across processes, answers
balanced, pairs that differ in one attribute, spatial statements true of the rendered image, every word in the
vocabulary texts, the three streams in the registry, their question sets, runs with them as controls and as target
(and through their validation view, as ``fscl tune`` sees them)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from test_mini_model import tiny

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.registry import STREAMS
from benchmark.runs import run_dir
from benchmark.vqa.build import build_question_set
from benchmark.vqa.questions import OwnQuestion, QuestionItem, judge_vsr, parse_hm, parse_mmvp
from streams.mini.pretrain import pretrain
from streams.mini.question_streams import MiniPairs, MiniSpatial, MiniYesNo, rendered_questions
from streams.mini.questions import (
    KINDS,
    PAIR_QUESTIONS,
    question_row,
    row_group,
    split_rows,
    vocabulary_texts,
)
from streams.mini.world import DATA_DIR, world
from streams.mmvp import parse_options
from streams.options import MiniOptions

pytestmark = [pytest.mark.usefixtures("one_thread")]

MINI_CONTEXT = json.loads((DATA_DIR / "mini-vit.json").read_text())["text_cfg"]["context_length"]
NAMES = ("mini-spatial", "mini-pairs", "mini-yesno")
WORD = re.compile(r"\w+|[^\w\s]")
SPATIAL = re.compile(r"The (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)\.")


def digest(rows: int = 24) -> str:
    """SHA-256 of the first ``rows`` rows of every kind's test split: scenes,
    questions and rendered images."""
    h = hashlib.sha256()
    for kind in KINDS:
        for i in range(rows):
            scene, q = question_row(kind, "test", 0, i)
            h.update(repr((scene, q)).encode())
        h.update(rendered_questions.__wrapped__(kind, "train", rows, 0, 1)[0].tobytes())
    return h.hexdigest()


def test_generators_are_deterministic_across_processes():
    """Another process (another hash seed) draws the same rows; another seed or split draws others."""
    env = {**os.environ, "PYTHONHASHSEED": "123",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])}
    out = subprocess.run([sys.executable, "-c", "import test_mini_questions as t; print(t.digest())"], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == digest()
    for kind in KINDS:
        assert question_row(kind, "test", 0, 3) != question_row(kind, "test", 1, 3)
        assert question_row(kind, "test", 0, 3) != question_row(kind, "train", 0, 3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_group", [6, 7])
def test_answers_are_balanced_in_every_split_and_group(kind, per_group):
    n = split_rows(kind, per_group, 5)
    assert n == (8 if kind == "pairs" and per_group == 7 else per_group) * 5
    answers = [question_row(kind, "train", 0, i)[1].answer for i in range(n)]
    limit = 0 if kind == "pairs" or n % 2 == 0 else 1
    assert abs(answers.count(0) - answers.count(1)) <= limit
    for group in range(5):
        counts = Counter(a for i, a in enumerate(answers) if row_group(kind, i, 5) == group)
        assert set(counts) == {0, 1} and abs(counts[0] - counts[1]) <= (0 if kind == "pairs" else 1)


def test_pair_rows_share_a_group_and_differ_in_exactly_one_attribute():
    seen = set()
    for pair in range(30):
        (first,), q0 = question_row("pairs", "test", 0, 2 * pair)
        (second,), q1 = question_row("pairs", "test", 0, 2 * pair + 1)
        assert q0.group == q1.group == str(pair) and q0.prompt == q1.prompt and (q0.answer, q1.answer) == (0, 1)
        differ = [a for a in ("shape", "colour", "glyph") if getattr(first, a) != getattr(second, a)]
        assert len(differ) == 1 and first.__dict__.keys() == second.__dict__.keys()
        assert all(getattr(first, k) == getattr(second, k) for k in first.__dict__ if k not in differ)
        question, options = q0.prompt.split("\n")[:2]
        assert question == PAIR_QUESTIONS[differ[0]]
        assert [t for _, t in parse_options(options)] == [getattr(first, differ[0]), getattr(second, differ[0])]
        assert [parse_mmvp(a) for a in q0.answers] == [0, 1]  # the released rule reads the options it gives
        assert (first.shape, first.colour) in world().held_out  # the first scene always a held-out pair
        seen.add(differ[0])
    assert seen == {"shape", "colour", "glyph"}


def _centre(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(x, y) centroid in pixels of the pixels within 40 of ``rgb``."""
    mask = np.linalg.norm(image.astype(float) - rgb, axis=-1) < 40
    ys, xs = np.nonzero(mask)
    assert len(xs) > 10
    return np.array([xs.mean(), ys.mean()])


def test_spatial_statements_are_true_of_the_rendered_image():
    w = world()
    images, questions = rendered_questions("spatial", "test", 40, 0, 1)
    relations = Counter()
    for image, q in zip(images, questions):
        statement = SPATIAL.search(q.prompt)
        colour_a, _, relation, colour_b, _ = statement.groups()
        (ax, ay), (bx, by) = _centre(image, w.colours[colour_a]), _centre(image, w.colours[colour_b])
        holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
        along, across = (abs(ax - bx), abs(ay - by)) if relation in ("left of", "right of") else (abs(ay - by),
                                                                                                   abs(ax - bx))
        assert holds == bool(q.answer) and along > 2 * across  # the axis is never in doubt
        assert judge_vsr(q.answers[q.answer], _item(q)) == (True, True)
        relations[relation, q.answer] += 1
    assert len(relations) == 8 and set(relations.values()) == {5}


def _item(q: OwnQuestion) -> QuestionItem:
    return QuestionItem("x", q.prompt, q.answers, q.answer)


def test_yesno_answers_what_the_scene_shows():
    for i in range(40):
        (comp,), q = question_row("yesno", "test", 0, i)
        presence = re.match(r"Is there a (\w+) (\w+) in the image\?", q.prompt)
        identity = re.match(r"Is the shape a (\w+)\?", q.prompt)
        truth = (presence[1], presence[2]) == (comp.colour, comp.shape) if presence else identity[1] == comp.shape
        assert truth == bool(q.answer) and q.prompt.endswith(" Answer yes or no. Answer:")
        assert parse_hm(q.pair[1]) == q.answer and q.pair[0].endswith("(Answer yes or no)")


def test_every_word_of_every_row_is_in_the_vocabulary_texts():
    vocabulary = {w for t in vocabulary_texts() for w in WORD.findall(t)}
    words: set[str] = set()
    for kind in KINDS:
        rows = [question_row(kind, split, 0, i)[1] for split in ("train", "test") for i in range(120)]
        for q in rows:
            for text in (q.prompt, *q.answers, *q.texts, *q.pair):
                words |= set(WORD.findall(text))
    assert words <= vocabulary, sorted(words - vocabulary)
    assert {"circle", "cyan", "K", "7", "(", "'", "left", "yes", "true"} <= words  # the rows use them all


def test_every_options_clip_text_fits_the_mini_text_encoder():
    """The mini encoder reads 16 tokens: the options' CLIP texts of every row still differ when cut there."""
    for kind in KINDS:
        for i in range(24):
            q = question_row(kind, "test", 0, i)[1]
            tokens = open_clip.tokenize(list(q.texts), context_length=MINI_CONTEXT)
            assert not torch.equal(tokens[0], tokens[1]), q.texts


def test_the_scenes_use_the_pairs_pretraining_never_saw():
    w = world()
    for kind in KINDS:
        for i in range(30):
            scene, _ = question_row(kind, "test", 2, i)
            if kind != "pairs" or i % 2 == 0:  # a pair's second scene may change the shape to a seen pair
                assert all((c.shape, c.colour) in w.held_out for c in scene)


def test_streams_load_through_the_registry_with_their_question_sets():
    expected = {"mini-spatial": ("vsr", None), "mini-pairs": ("mmvp", None), "mini-yesno": ("hm", "yes")}
    for name, (rule, positive) in expected.items():
        stream = STREAMS.get(name).obj(".", MiniOptions(train_per_class=4, test_per_class=6))
        test = stream.dataset("test")
        assert len(test) == 30 and len(stream.listed("train")) == 20 and test.load(test.items[0]).size == (32, 32)
        questions = build_question_set(stream)
        assert (questions.parse_rule, questions.positive, questions.prompts) == (rule, positive, "own")
        assert [i.id for i in questions.items] == test.ids
        groups = Counter(i.group for i in questions.items)
        assert (set(groups.values()) == {2}) if name == "mini-pairs" else set(groups) == {None}
        sessions = stream.sessions(5, 2, 0)
        for session in sessions:  # two rows of each answer of its group (mini-pairs: two whole pairs)
            answers = Counter(stream.listed("train").questions[stream.listed("train").ids.index(i)].answer
                              for i in session.ids)
            assert answers == {0: 2, 1: 2}
        assert stream.sessions(5, 2, 0) == sessions != stream.sessions(5, 2, 1)
        held = stream.validation(3).dataset("test")
        assert len(held) == split_rows(stream.kind, 3, 5) and not set(held.ids) & {*test.ids, *stream.listed("train").ids}
    for stream in (MiniSpatial, MiniPairs, MiniYesNo):
        with pytest.raises(ValueError, match="sessions: 5"):
            stream(".").sessions(3, 5, 0)


def test_fscl_ls_streams_lists_them(capsys):
    assert main(["ls", "streams"]) == 0
    out = capsys.readouterr().out
    for name, words in zip(NAMES, ("VSR-like", "MMVP-like", "Hateful-Memes-like")):
        assert re.search(rf"^{name} .*{words}", out, re.M)


def test_a_run_refuses_sessions_other_than_five(capsys, tmp_path):
    code = main(["run", "mini", "stream=mini-spatial", "strategy=zeroshot", "seed=0", "sessions=3", "vqa.model=null",
                 "controls=[]", f"out={tmp_path}", "--no-progress"])
    assert code != 0 and "sessions: 3 cannot be made (use sessions: 5)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "mini-tiny"
    pretrain(folder, tiny(), progress=False)
    return folder


SMALL = [f"{name}.{key}=4" for name in NAMES for key in ("train_per_class", "test_per_class")]
SETTINGS = ["seed=0", "strategy=full-ft", "train.epochs=1", "vqa.model=null", *SMALL]


def _top1(run: Path) -> dict[tuple[int, str], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["session"], r["dataset"]): r for r in rows if r["metric"] == "top1"}


def test_a_run_records_the_three_as_controls(tiny_model, tmp_path):
    overrides = [f"out={tmp_path}", f"backbone=mini:{tiny_model}", "stream=mini-signs", "shots=1",
                 "controls=[mini-spatial,mini-pairs,mini-yesno]", "mini-signs.train_per_class=2",
                 "mini-signs.test_per_class=2", *SETTINGS]
    assert main(["run", "mini", "--no-progress", *overrides]) == 0
    (run,) = load_config("mini", overrides).expand()
    top1 = _top1(run_dir(run))
    for session in range(6):
        for name in NAMES:
            assert top1[(session, name)]["total"] == 20 and 0 <= top1[(session, name)]["value"] <= 1
    manifest = json.loads((run_dir(run) / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["chance"] == dict.fromkeys(NAMES, 0.5)
    assert "indistinct" not in manifest["evaluation"]  # every option's CLIP text fits the mini text encoder


def test_one_of_them_trains_as_the_target_through_its_validation_view(tiny_model, tmp_path):
    """mini-pairs as the target (CLIP loss on its right options' texts), the others as controls, as ``fscl tune``
    runs them: validation rows rendered apart, never the test rows."""
    overrides = [f"out={tmp_path}", f"backbone=mini:{tiny_model}", "stream=mini-pairs", "shots=1",
                 "controls=[mini-spatial,mini-yesno]", "validation_per_class=2", "keep_checkpoints=all", *SETTINGS]
    assert main(["run", "mini", "--no-progress", *overrides]) == 0
    (run,) = load_config("mini", overrides).expand()
    path = run_dir(run)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["validation"]) == set(NAMES)
    held = json.loads((path / "validation.json").read_text())
    assert all(len(ids) == 10 and all("/validation-0/" in i for i in ids) for ids in held.values())
    samples = json.loads((path / "samples.json").read_text())
    assert [len(ids) for ids in samples.values()] == [2] * 5  # one whole pair per session
    top1 = _top1(path)
    assert {top1[(5, n)]["total"] for n in NAMES} == {10}
    first, last = (torch.load(path / "checkpoints" / f"session-{s}.pt", weights_only=False)["encoder"] for s in (1, 5))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained
