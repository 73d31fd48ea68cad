"""Runs on the streams that bring their own questions (VSR, Hateful Memes, MMVP, VisOnlyQA), end to end on CPU:
one as the target and the others as controls, with the CLIP loss and with the VLM loss (a tiny random LLaVA whose
tower takes ``openclip:fscl-tiny``), zero-shot as a choice among each image's own option texts, VQA with the sets'
own prompts and metrics (MMVP pair accuracy, HM AUROC), resume, the report, and the dry run of the full matrix."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
from own_question_layouts import TEST_ROWS, write_own_question_layouts
from test_streams_layouts import PAPER_WRITERS

from benchmark.backbones import load_backbone
from benchmark.cli import main
from benchmark.evaluation import ZeroShotEvaluator, own_question_eval_set
from benchmark.vlm.spec import resolve_vlm
from benchmark.vqa.pairs import AnswerPairs
from benchmark.vqa.questions import OwnQuestion
from streams.base import LabelledImages
from streams.hm import HatefulMemes
from streams.mmvp import MMVP
from streams.vsr import VSR

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

SETTINGS = ("seed=0", "sessions=5", "train.epochs=1", "train.lr=0.001", "train.warmup_steps=0", "--no-progress")
CLIP_RUN = "quick/vsr/openclip-fscl-tiny/full-ft/5-s0"
PPL_RUN = "quick/mmvp/openclip-fscl-tiny/lorsu-ppl/5-s0"
TEST_SIZES = {"vsr": TEST_ROWS, "hm": TEST_ROWS, "mmvp": 150}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_own_question_layouts(root)
    return root


def _clip_args(data: Path, llava: Path, out: Path) -> list[str]:
    return ["run", "quick", "stream=vsr", "controls=[hm,mmvp,visonlyqa]", "strategy=full-ft", f"data_root={data}",
            f"vqa.model=llava:{llava}", f"out={out}", "keep_checkpoints=all", *SETTINGS]


@pytest.fixture(scope="module")
def runs(data, tiny_llava, tmp_path_factory) -> Path:
    """A CLIP-loss run on VSR and a VLM-loss run on MMVP, each with the other three as controls."""
    out = tmp_path_factory.mktemp("runs")
    assert main(_clip_args(data, tiny_llava, out)) == 0
    assert main(["run", "quick", "stream=mmvp", "controls=[vsr,hm,visonlyqa]", "strategy=lorsu-ppl",
                 f"data_root={data}", f"vqa.model=llava:{tiny_llava}", f"out={out}", *SETTINGS]) == 0
    return out


def test_zero_shot_chooses_among_each_images_own_option_texts():
    """The restricted logits pick, per image, the most similar of its own question's texts (items with fewer
    options padded and never chosen); the label names the item, not the right option."""
    backbone = load_backbone("openclip:fscl-tiny")
    gen = torch.Generator().manual_seed(0)
    arrays = [(torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy() for _ in range(5)]
    questions = [OwnQuestion("q", tuple("abc"[:k]), k - 1, tuple(f"a photo of {w} {i}" for w in ("a cat", "a dog",
                                                                                              "a cow")[:k]), ("q", "a"))
                 for i, k in enumerate((2, 3, 2, 3, 3))]
    from PIL import Image
    images = LabelledImages(arrays, list(range(5)), [f"i{i}" for i in range(5)], Image.fromarray,
                            backbone.preprocess(False), questions=questions)
    eval_set = own_question_eval_set("own", images)
    assert eval_set.block == 3 and eval_set.dataset.targets == [1, 5, 7, 11, 14]
    assert eval_set.valid == (True, True, False, True, True, True, True, True, False, *[True] * 6)
    evaluator = ZeroShotEvaluator(backbone)
    evaluator.add(eval_set)
    embeddings = evaluator.embeddings_for(0)
    (batch, labels, _), = list(evaluator.set_batches(0))
    chosen = eval_set.restrict(evaluator.logits(batch, embeddings), labels).argmax(1).tolist()
    with torch.no_grad():
        features = torch.nn.functional.normalize(backbone.encode_image(batch).float(), dim=-1)
    for i, q in enumerate(questions):  # the choice made alone, among the item's own texts
        texts = torch.nn.functional.normalize(backbone.text_features(list(q.texts)).float(), dim=-1)
        assert chosen[i] == 3 * i + int((features[i] @ texts.T).argmax())


def test_options_the_text_encoder_cannot_tell_apart_are_counted(tiny_backbone):
    """A prompt longer than the text encoder's context (fscl-tiny: 32 tokens) cuts the option off: such items are
    counted, so that a run can say its zero-shot picks the first option there."""
    from PIL import Image
    long = " ".join(["a figure of several lines and angles"] * 8)
    questions = [OwnQuestion("q", ("A", "B"), 0, (f"{long}\nThe answer is 3 cm", f"{long}\nThe answer is 4 cm"),
                             ("q", "3 cm")),
                 OwnQuestion("q", ("A", "B"), 1, ("The answer is 3 cm", "The answer is 4 cm"), ("q", "4 cm"))]
    images = LabelledImages([np.zeros((8, 8, 3), np.uint8)] * 2, [0, 1], ["a", "b"], Image.fromarray,
                            tiny_backbone.preprocess(False), questions=questions)
    evaluator = ZeroShotEvaluator(tiny_backbone)
    evaluator.add(own_question_eval_set("long", images))
    assert evaluator.indistinct_items() == {"long": 1}


def test_training_reads_each_images_own_texts_and_pairs(data, tiny_llava):
    """CLIP-loss training pairs an image with its right option's released CLIP text; the VLM loss trains the released
    question/answer pair of each training image (its label is its place in the training split)."""
    vsr = VSR(data)
    (session, *_) = vsr.sessions(5, 5, 0)
    scenario = vsr.benchmark([session], None, None)
    train = scenario.train_stream[0].dataset
    listed = vsr.listed("train")
    for i in range(len(train)):
        _, label, caption = train[i]
        question = listed.questions[label]
        assert caption == question.text == f"Based on the image, the statement '{question.prompt.split('? ', 1)[1]}' " \
                                           f"is {question.answers[question.answer]}"
    mmvp = MMVP(data)
    vlm = resolve_vlm(f"llava:{tiny_llava}").loaded(torch.device("cpu"))
    pairs = AnswerPairs(vlm, [q.pair for q in mmvp.listed("train").questions])
    user, answer = pairs.texts[0]
    assert user.startswith("Based on the image, respond to this question with a short answer: ") and \
        user.endswith("\nAnswer with the option's letter from the given choices directly.") and answer in ("(a)", "(b)")
    assert vlm.processor.tokenizer.decode(pairs.answer_ids(0)[:-1]).strip() == answer


def test_a_target_with_its_own_questions_is_one_test_set_and_its_controls_too(runs):
    run = runs / CLIP_RUN
    rows = _rows(run)
    top1 = {(r["session"], r["dataset"], r["metric"]): r["total"] for r in rows if r["metric"].startswith("top1")}
    assert set(top1) == {(s, d, "top1") for s in range(6) for d in ("vsr", "hm", "mmvp", "visonlyqa")}
    assert {d: top1[(5, d, "top1")] for d in TEST_SIZES} == TEST_SIZES
    matrix = pd.read_csv(run / "matrix.csv")
    assert matrix[[c for c in matrix.columns if "@" in c]].isna().all().all()  # no session groups, no "seen"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backward_transfer"] is None and summary["sessions"] == 5
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["chance"] == {"vsr": 0.5, "hm": 0.5, "mmvp": 0.5, "visonlyqa": pytest.approx(1 / 3)}
    first, last = (torch.load(run / "checkpoints" / f"session-{s}.pt", weights_only=False)["encoder"] for s in (1, 5))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained


def test_their_vqa_asks_their_own_prompts_with_their_metrics(runs, fscl_cache):
    run = runs / CLIP_RUN
    rows = [r for r in _rows(run) if r["metric"].startswith("vqa_")]
    metrics = {(r["session"], r["dataset"], r["metric"]): r for r in rows}
    for session in (0, 5):
        for name, total in {**TEST_SIZES, "visonlyqa": metrics[(0, "visonlyqa", "vqa_acc")]["total"]}.items():
            assert metrics[(session, name, "vqa_acc")]["total"] == total
        assert metrics[(session, "mmvp", "vqa_pair_acc")]["total"] == 75
        assert 0 <= metrics[(session, "hm", "vqa_auroc")]["value"] <= 1
        assert not any(k[1] != "mmvp" and k[2] == "vqa_pair_acc" for k in metrics)
    sets = json.loads((run / "manifest.json").read_text())["vqa_sets"]
    assert set(sets) == {"vsr", "hm", "mmvp", "visonlyqa"}
    frozen = json.loads(next((fscl_cache / "vqa").glob("vsr-own-*.json")).read_text())
    assert frozen["sha256"] == sets["vsr"]["sha256"] and frozen["prompts"] == "own" and frozen["parse"] == "vsr"
    assert frozen["items"][0]["question"].startswith("Based on the image, is this statement true or false? ")


def test_the_vlm_loss_trains_on_their_pairs(runs):
    run = runs / PPL_RUN
    summary = json.loads((run / "summary.json").read_text())
    assert [s["train_samples"] for s in summary["costs"]["sessions"]] == [30] * 5  # MMVP's released sessions
    assert summary["vqa"]["items"] == {"mmvp": 150, "vsr": TEST_ROWS, "hm": TEST_ROWS,
                                       "visonlyqa": summary["vqa"]["items"]["visonlyqa"]}
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"


def test_an_interrupted_run_resumes_to_the_same_records(runs, data, tiny_llava, tmp_path):
    reference, run = runs / CLIP_RUN, tmp_path / CLIP_RUN
    shutil.copytree(reference, run)
    for session in range(2, 6):
        (run / "checkpoints" / f"session-{session}.pt").unlink()
    for path in [run / "summary.json", *run.glob("*.csv")]:
        path.unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(run) if r["session"] < 2))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert main(_clip_args(data, tiny_llava, tmp_path)) == 0
    assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
    for name in ("matrix.csv", "vqa_matrix.csv"):
        assert (run / name).read_text() == (reference / name).read_text()
    assert _rows(run) == _rows(reference)


def test_the_report_shows_them_in_both_evaluations(runs, tmp_path):
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for target in ("vsr", "mmvp"):
        assert re.search(rf"\| {target} TI \(pp\) \| {target} CC \(pp\) \|", report)
    assert "figures/quick-vsr-openclip-fscl-tiny-5shot-vqa-curves.png" in report
    assert "figures/quick-vsr-openclip-fscl-tiny-5shot-curves.png" in report
    assert "Target stream `vsr`, backbone `openclip:fscl-tiny`, the released rows of each session for 5 shots" in report
    vqa_table = report.split("VQA (the VLM's multiple-choice accuracy)", 1)[1]
    assert re.search(r"\| mmvp pair acc\. \(%\) \| hm AUROC \|", vqa_table)  # the sets' own metrics, final
    runs_csv = pd.read_csv(tmp_path / "report" / "runs.csv")
    vsr = runs_csv[runs_csv["stream"] == "vsr"].iloc[0]
    assert vsr["chance_target"] == 0.5 and vsr["vqa_chance_target"] == 0.5


def test_the_full_matrix_of_the_paper_passes_its_dry_run_on_all_ten_layouts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for write in PAPER_WRITERS.values():
        write(tmp_path / "data")
    write_own_question_layouts(tmp_path / "data")
    assert main(["run", "paper-full-cl5", f"data_root={tmp_path / 'data'}", f"out={tmp_path / 'runs'}",
                 "strategy=[zeroshot,full-ft,ewc,layernorm,lora,spu,lorsu]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "189 run(s) of 'paper-full-cl5' from preset 'paper-full-cl5': 9 targets × 7 strategies × 3 seeds\n" in out
    assert "controls: tsi, gtsrb, aircraft, counteranimal, eurosat, dalle, vsr, hm, mmvp, visonlyqa" in out
    assert "cost of the 189 run(s) to do:" in out


def test_other_sessions_than_the_released_five_are_refused(data, capsys):
    assert main(["run", "quick", "stream=hm", f"data_root={data}", "sessions=3", "--dry-run"]) != 0
    assert "hm: its sessions are the released 5 groups; sessions: 3 cannot be made" in capsys.readouterr().err
    assert HatefulMemes.spec.own_questions and np.isclose(len(HatefulMemes.spec.session_groups), 5)


def test_vqa_build_writes_a_streams_own_questions(data, tmp_path, capsys):
    assert main(["vqa", "build", "hm", "--root", str(data), "--out", str(tmp_path / "hm.json")]) == 0
    out = capsys.readouterr().out
    assert f"hm: {TEST_ROWS} questions (its own) -> {tmp_path / 'hm.json'}" in out
    assert f"right answers: no {TEST_ROWS // 2}  yes {TEST_ROWS // 2}" in out
    frozen = json.loads((tmp_path / "hm.json").read_text())
    assert frozen["positive"] == "yes" and frozen["items"][0]["question"].endswith(
        "Is this image hateful? Answer yes or no. Answer:")


def test_the_summary_keeps_the_sets_own_metrics(runs):
    """MMVP's pair accuracy and HM's AUROC before training and after the last session, as metrics.jsonl has them."""
    run = runs / CLIP_RUN
    sets = json.loads((run / "summary.json").read_text())["vqa"]["sets"]
    rows = {(r["session"], r["dataset"], r["metric"]): r["value"] for r in _rows(run)}
    assert sets == {"mmvp": {"pair_acc": {"initial": rows[(0, "mmvp", "vqa_pair_acc")],
                                          "final": rows[(5, "mmvp", "vqa_pair_acc")]}},
                    "hm": {"auroc": {"initial": rows[(0, "hm", "vqa_auroc")], "final": rows[(5, "hm", "vqa_auroc")]}}}


def test_a_bad_test_row_is_refused_before_any_run_starts(data, tmp_path, capsys):
    """An image field pointing nowhere in the target's test split: the grid check names the file and the row."""
    root = tmp_path / "data"
    shutil.copytree(data / "vsr", root / "vsr")
    rows = (root / "vsr" / "test.jsonl").read_text().splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), "image": "no-such-image.jpg"})
    (root / "vsr" / "test.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["run", "quick", "stream=vsr", "controls=[]", f"data_root={root}", f"out={tmp_path / 'runs'}",
                 "sessions=5", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "nothing was run" in err and "test.jsonl" in err and "no-such-image.jpg" in err
    assert not (tmp_path / "runs").exists()
