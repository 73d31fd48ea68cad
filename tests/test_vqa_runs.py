"""VQA as an evaluation of runs: ``fscl run quick ... vqa.model=llava:<folder>`` end to end on CPU with a tiny
random LLaVA whose tower takes ``openclip:fscl-tiny`` — metric rows, vqa_matrix.csv, the summary's vqa block,
the manifest's question-set hashes, ``vqa.sessions: all`` with a subset, the grid check's refusals and resume;
letter vs generate scoring, ``vqa.sets``, the cached question sets, ddp (gloo, 2 ranks) and the report."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from benchmark import checkpoints
from benchmark.cache import CACHE_ENV
from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.grid import GridCheckError, run_grid
from benchmark.metrics import AccuracyMatrix
from benchmark.registry import STREAMS
from benchmark.vlm.base import LoadedVLM
from benchmark.vlm.llava import save_tiny_llava
from benchmark.vlm.spec import resolve_vlm
from benchmark.vqa.build import cached_question_set, check_asks
from benchmark.vqa.evaluate import VQASet, score_set, vqa_rows
from benchmark.vqa.questions import LETTERS, MultipleChoiceSet, QuestionItem, QuestionSetError
from streams.digits import Digits

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"
SETTINGS = ("seed=0", "sessions=2", "train.epochs=1", "--no-progress")


@STREAMS.register("test-vqa-digits")
class OtherDigits(Digits):
    """Test stream: the digits again under another name, to serve as a control of ``digits``."""


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _vqa_rows(run: Path) -> list[dict]:
    return [row for row in _rows(run) if row["metric"].startswith("vqa_")]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """A cache folder of this module's own: the runs' question sets are frozen there."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def runs(llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "quick", "strategy=[zeroshot,full-ft]", f"vqa.model=llava:{llava}", f"out={out}",
                 "keep_checkpoints=all", *SETTINGS]) == 0
    return out


def test_runs_score_vqa_before_training_and_after_the_last_session(runs):
    for strategy in ("zeroshot", "full-ft"):
        run = runs / RUN.format(strategy)
        rows = _vqa_rows(run)
        assert {(r["session"], r["metric"]) for r in rows} == {
            (s, m) for s in (0, 2) for m in ("vqa_acc", "vqa_acc_strict", "vqa_letter_mass")}
        assert {r["dataset"] for r in rows} == {"digits"} and {r["total"] for r in rows} == {540}
        acc = {r["session"]: r for r in rows if r["metric"] == "vqa_acc"}
        assert all(r["value"] == r["correct"] / r["total"] for r in acc.values())
        assert (run / "vqa_matrix.csv").read_text().splitlines() == [
            "session,digits", f"0,{acc[0]['value']:.6f}", "1,", f"2,{acc[2]['value']:.6f}"]
        vqa = json.loads((run / "summary.json").read_text())["vqa"]
        assert vqa["evaluated"] == [0, 2] and vqa["sessions"] == 2 and vqa["target"] == "digits"
        assert vqa["target_improvement"] == pytest.approx(acc[2]["value"] - acc[0]["value"])
        assert "backward_transfer" not in vqa and "target_auc" not in vqa
        manifest = json.loads((run / "manifest.json").read_text())
        assert set(manifest["vqa_sets"]) == {"digits"} and len(manifest["vqa_sets"]["digits"]["sha256"]) == 64
        assert manifest["vqa_sets"]["digits"] | {"sha256": None} == {"sha256": None, "mode": "random", "seed": 0,
                                                                     "items": 540}
    zeroshot, full_ft = (_vqa_rows(runs / RUN.format(s)) for s in ("zeroshot", "full-ft"))
    assert json.loads((runs / RUN.format("zeroshot") / "summary.json").read_text())["vqa"]["target_improvement"] == 0
    assert [r["value"] for r in zeroshot if r["session"] == 0] == [r["value"] for r in zeroshot if r["session"] == 2]
    mass = {r["session"]: r["value"] for r in full_ft if r["metric"] == "vqa_letter_mass"}
    assert mass[2] != mass[0]  # the trained encoder went into the tower
    shas = {json.loads((runs / RUN.format(s) / "manifest.json").read_text())["vqa_sets"]["digits"]["sha256"]
            for s in ("zeroshot", "full-ft")}
    assert len(shas) == 1  # the same questions for every strategy


def test_vqa_leaves_the_top1_numbers_as_they_are_without_it(runs, tmp_path):
    assert main(["run", "quick", "strategy=full-ft", f"out={tmp_path}", *SETTINGS]) == 0
    run = RUN.format("full-ft")
    assert (tmp_path / run / "matrix.csv").read_text() == (runs / run / "matrix.csv").read_text()
    assert not (tmp_path / run / "vqa_matrix.csv").exists()
    assert "vqa" not in json.loads((tmp_path / run / "summary.json").read_text())


def test_vqa_row_0_is_scored_once_per_grid_and_a_strategy_that_never_trains_scores_once(runs, llava, tmp_path,
                                                                                         monkeypatch):
    manifests = {s: json.loads((runs / RUN.format(s) / "manifest.json").read_text())["vqa_session0"]
                 for s in ("zeroshot", "full-ft")}
    assert manifests["zeroshot"]["shared"] == [] and manifests["full-ft"]["shared"] == ["digits"]
    assert manifests["zeroshot"]["keys"] == manifests["full-ft"]["keys"]  # the same pretrained encoder and questions
    stored = json.loads((runs / "quick" / ".session0" / f"{manifests['full-ft']['keys']['digits']}.json").read_text())
    assert stored["dataset"] == "digits" and stored["total"] == 540
    # scored by the run itself (no store in this folder): the same rows as read from the store
    calls = []
    monkeypatch.setattr("benchmark.vqa.session.score_set", lambda *a, **k: calls.append(a[1].name) or score_set(*a, **k))
    for strategy in ("full-ft", "zeroshot"):
        assert main(["run", "quick", f"strategy={strategy}", f"vqa.model=llava:{llava}", f"out={tmp_path / strategy}",
                     *SETTINGS]) == 0
        assert _vqa_rows(tmp_path / strategy / RUN.format(strategy)) == _vqa_rows(runs / RUN.format(strategy))
    assert calls == ["digits", "digits", "digits"]  # full-ft: before and after training; zeroshot: once


def test_the_dry_run_counts_vqa_questions_and_estimates_them_from_earlier_runs_or_a_probe(runs, llava, tmp_path,
                                                                                          capsys):
    args = ["run", "quick", "strategy=[zeroshot,full-ft]", f"vqa.model=llava:{llava}", *SETTINGS, "--dry-run"]
    # 540 questions before training (once for the grid), 540 after full-ft's last session, none again for zeroshot
    head = "openclip:fscl-tiny: 2 run(s), 2 training steps, 1,620 evaluated images, 1,080 VQA questions"
    assert main([*args, f"out={runs}"]) == 0  # both finished there: nothing to do, nothing counted
    out = capsys.readouterr().out
    assert "to run: 0; finished, skipped: 2" in out and "cost: none, every run is finished" in out
    assert main([*args, f"out={runs}", "seed=1"]) == 0  # seed 1's runs, at the rates of the finished seed 0's
    out = capsys.readouterr().out
    assert head in out and re.search(rf"[\d.]+ questions/s \(llava:{llava}\), the rates of 2 finished run", out), out
    assert main([*args, f"out={tmp_path}", "--probe"]) == 0
    out = capsys.readouterr().out
    assert head in out and re.search(r"[\d.]+ questions/s \(llava:.*measured now \(5 full .* random images, "
                                     r"5 batches of the target questions;", out), out
    # + 100 after full-ft's session 1, and at the ends (once for the grid before training, after full-ft's last)
    assert main([*args, f"out={tmp_path}", "vqa.sessions=all", "vqa.subset=100"]) == 0
    assert "1,380 VQA questions" in capsys.readouterr().out


def _interrupt_in_session_2(reference: Path, run: Path) -> None:
    """Copy the finished run ``reference`` (2 sessions, every checkpoint kept) to ``run`` as a process stopped
    during session 2 leaves it: session 1's checkpoint, no results, status running."""
    shutil.copytree(reference, run)
    (run / "checkpoints" / "session-2.pt").unlink()
    for path in [run / "summary.json", *run.glob("*.csv")]:
        path.unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(run) if r["session"] < 2))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))


def test_an_interrupted_run_resumes_to_the_same_vqa_records(runs, llava, tmp_path):
    reference = runs / RUN.format("full-ft")
    run = tmp_path / RUN.format("full-ft")
    _interrupt_in_session_2(reference, run)
    assert main(["run", "quick", "strategy=full-ft", f"vqa.model=llava:{llava}", f"out={tmp_path}",
                 "keep_checkpoints=all", *SETTINGS]) == 0
    assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
    assert (run / "vqa_matrix.csv").read_text() == (reference / "vqa_matrix.csv").read_text()
    assert _vqa_rows(run) == _vqa_rows(reference)
    vqa = json.loads((run / "summary.json").read_text())["vqa"]
    assert vqa == json.loads((reference / "summary.json").read_text())["vqa"]


def test_all_sessions_ask_a_seeded_subset_at_every_session_and_the_full_sets_at_the_ends(llava, tmp_path):
    overrides = ["strategy=[zeroshot,full-ft]", f"vqa.model=llava:{llava}", f"out={tmp_path}", "vqa.sessions=all",
                 "vqa.subset=20", "controls=[test-vqa-digits]", "control_subset=30", *SETTINGS]
    assert main(["run", "quick", *overrides, "keep_checkpoints=all"]) == 0
    for strategy in ("zeroshot", "full-ft"):
        run = tmp_path / RUN.format(strategy)
        totals = {(r["session"], r["dataset"], r["metric"]): r["total"] for r in _vqa_rows(run)
                  if r["metric"] in ("vqa_acc", "vqa_acc_subset")}
        assert totals == {**{(s, "digits", "vqa_acc"): 540 for s in (0, 2)},
                          **{(s, "test-vqa-digits", "vqa_acc"): 30 for s in (0, 2)},
                          **{(s, name, "vqa_acc_subset"): 20 for s in (0, 1, 2) for name in ("digits", "test-vqa-digits")}}
        summary = json.loads((run / "summary.json").read_text())
        full, subset = summary["vqa"], summary["vqa_subset"]
        assert full["evaluated"] == [0, 2] and full["basis"] == "all"
        assert full["items"] == {"digits": 540, "test-vqa-digits": 30}
        assert subset["evaluated"] == [0, 1, 2] and subset["basis"] == "subset"
        assert subset["items"] == {"digits": 20, "test-vqa-digits": 20}
        for name, block in (("vqa_matrix.csv", full), ("vqa_subset_matrix.csv", subset)):
            matrix = pd.read_csv(run / name, index_col="session")
            metric = "vqa_acc" if block is full else "vqa_acc_subset"
            rows = {(r["session"], r["dataset"]): r["value"] for r in _vqa_rows(run) if r["metric"] == metric}
            assert {key: matrix.loc[key] for key in rows} == pytest.approx(rows, abs=1e-6)
            assert matrix.loc[1].isna().all() == (block is full)  # the full sets: the ends only
    sets = json.loads((run / "manifest.json").read_text())["vqa_sets"]
    assert sets["digits"]["subset"] == 20 and sets["test-vqa-digits"] | {"sha256": None} == {
        "sha256": None, "mode": "random", "seed": 0, "items": 30, "subset": 20}
    # zeroshot never changes the encoder: on either basis no curve moves and nothing is forgotten (the subset's
    # session 1 against the full sets' ends showed a change that was none)
    summary = json.loads((tmp_path / RUN.format("zeroshot") / "summary.json").read_text())
    for block in (summary["vqa"], summary["vqa_subset"]):
        assert block["target_curve"] == block["control_curve"] == [0.0] * len(block["evaluated"])
        assert set(block["forgetting"].values()) == {0.0}
    # resumed after session 1, full-ft ends with the same records on both bases (checkpoints carry both matrices)
    _interrupt_in_session_2(tmp_path / RUN.format("full-ft"), tmp_path / "resumed" / RUN.format("full-ft"))
    assert main(["run", "quick", *overrides, "strategy=full-ft", f"out={tmp_path / 'resumed'}"]) == 0
    resumed, reference = tmp_path / "resumed" / RUN.format("full-ft"), tmp_path / RUN.format("full-ft")
    for name in ("vqa_matrix.csv", "vqa_subset_matrix.csv"):
        assert (resumed / name).read_text() == (reference / name).read_text()
    assert _vqa_rows(resumed) == _vqa_rows(reference)
    again, first = (json.loads((run / "summary.json").read_text()) for run in (resumed, reference))
    assert again["vqa"] == first["vqa"] and again["vqa_subset"] == first["vqa_subset"]


def test_the_grid_check_refuses_what_vqa_cannot_do_in_one_message_before_any_work(llava, tmp_path):
    cfg = load_config("quick", [f"out={tmp_path}", "seed=0", "strategy=zeroshot", "controls=[test-vqa-digits]",
                                "backbone=[openclip:fscl-tiny,openclip:ViT-B-16]", f"vqa.model=llava:{llava}",
                                "vqa.sets=[test-vqa-digits,mnist]"])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    message = str(err.value)
    assert ("vqa.sets: 'mnist' is neither the target nor a control of the run on 'digits'; allowed: digits, "
            "test-vqa-digits") in message
    assert "openclip:ViT-B-16' does not fit LLaVA's vision tower" in message
    generator = np.random.default_rng(0)
    for name in ("cats", "dogs"):  # a control without a question
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(generator.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "pets" / name / f"{i}.png")
    cfg = load_config("quick", [f"out={tmp_path / 'runs'}", "seed=0", "strategy=zeroshot",
                                f"vqa.model=llava:{tmp_path / 'missing'}", "controls=[imagefolder]",
                                f"data_root={tmp_path}", "imagefolder.root=pets"])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    message = str(err.value)
    assert "2 problem(s); nothing was run" in message and "no such folder" in message
    assert "vqa: stream 'imagefolder' has no question" in message
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.parametrize("override, message", [
    ("vqa.model=clip:x", "vqa.model: invalid value 'clip:x'"),
    ("vqa.mode=easy", "vqa.mode: invalid value 'easy'"),
    ("vqa.subset=0", "vqa.subset: invalid value 0"),
    ("vqa.batch_size=0", "vqa.batch_size: invalid value 0"),
    ("vqa.scoring=beam", "vqa.scoring: invalid value 'beam'"),
    ("vqa.sets=digits", "vqa.sets: invalid value 'digits'"),
])
def test_vqa_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quick", [override])


def test_records_and_checkpoints_from_before_vqa_still_match_their_runs():
    run = load_config("quick", ["seed=0"]).expand()[0]
    old = {k: v for k, v in run.to_dict().items() if k != "vqa"}
    assert checkpoints.config_differences(old, run.to_dict()) == []
    assert checkpoints.config_differences(old, load_config("quick", ["seed=0", "vqa.model=llava:/x"]).expand()[0]
                                          .to_dict()) == ["vqa.model: None -> 'llava:/x'"]
    state = checkpoints.SessionState(session=1, config=old, encoder={}, strategy={}, rng={},
                                      matrix=AccuracyMatrix.empty("digits", [], 2), costs={})
    assert state.vqa_matrix is None


def _answer_b(vlm: LoadedVLM) -> None:
    """Rig the model to answer "B" and stop: the letter B wins the prompt's last position, end-of-sequence
    every later (decoding) step."""
    model = vlm.model
    letter_b, eos = vlm.letter_token_ids(LETTERS)[1], vlm.processor.tokenizer.eos_token_id
    prefill = {}
    model.register_forward_pre_hook(lambda module, args, kwargs: prefill.update(on=kwargs["input_ids"].shape[1] > 1),
                                    with_kwargs=True)

    def boost(module, args, out):
        rig = torch.zeros(out.shape[-1])
        rig[letter_b if prefill["on"] else eos] = 50.0
        return out + rig

    model.lm_head.register_forward_hook(boost)


def test_letter_and_generate_scoring_agree_on_a_model_that_answers_in_the_format(llava):
    vlm = resolve_vlm(f"llava:{llava}").load("cpu")
    _answer_b(vlm)
    generator = torch.Generator().manual_seed(0)
    images = [(Image.fromarray(torch.randint(0, 256, (32, 40, 3), dtype=torch.uint8, generator=generator).numpy()), 0)
              for _ in range(7)]
    answers = [1, 0, 1, 2, 1, 3, 0]  # B is right for items 0, 2, 4
    questions = MultipleChoiceSet("test", tuple(QuestionItem(str(i), "Which?", ("a", "b", "c", "d"), a)
                                                for i, a in enumerate(answers)))
    qset = VQASet("test", questions, images)
    letter = score_set(vlm, qset, batch_size=3, scoring="letter")
    generate = score_set(vlm, qset, batch_size=3, scoring="generate")
    assert generate == {"total": 7, "correct": 3, "parsed": 7}
    assert letter | {"letter_mass": None} == {"total": 7, "correct": 3, "strict_correct": 3, "letter_mass": None}
    assert vqa_rows(2, "test", generate, "generate") == [
        {"session": 2, "dataset": "test", "total": 7, "scoring": "generate", "metric": "vqa_acc", "value": 3 / 7,
         "correct": 3},
        {"session": 2, "dataset": "test", "total": 7, "scoring": "generate", "metric": "vqa_parsed", "value": 1.0}]


def test_generate_scoring_in_a_run_records_its_rows(llava, tmp_path):
    assert main(["run", "quick", "strategy=zeroshot", f"vqa.model=llava:{llava}", f"out={tmp_path}",
                 "vqa.scoring=generate", "vqa.batch_size=64", *SETTINGS]) == 0
    rows = _vqa_rows(tmp_path / RUN.format("zeroshot"))
    assert {(r["session"], r["metric"], r["scoring"]) for r in rows} == {
        (s, m, "generate") for s in (0, 2) for m in ("vqa_acc", "vqa_parsed")}
    assert all(r["value"] == r["correct"] / r["total"] for r in rows if r["metric"] == "vqa_acc")


def test_vqa_sets_choose_the_controls_asked(llava, tmp_path):
    assert main(["run", "quick", "strategy=zeroshot", f"vqa.model=llava:{llava}", f"out={tmp_path}",
                 "controls=[test-vqa-digits]", "control_subset=10", "vqa.sets=[digits]", *SETTINGS]) == 0
    run = tmp_path / RUN.format("zeroshot")
    assert {r["dataset"] for r in _vqa_rows(run)} == {"digits"}
    assert {r["dataset"] for r in _rows(run) if r["metric"] == "top1"} == {"digits", "test-vqa-digits"}
    assert (run / "vqa_matrix.csv").read_text().splitlines()[0] == "session,digits"
    assert json.loads((run / "summary.json").read_text())["vqa"]["controls"] == []


def test_question_sets_are_frozen_in_the_cache_and_checked_before_reuse(runs, cache, tmp_path, caplog):
    (frozen,) = (cache / "vqa").glob("digits-*-random-s0.json")
    sha = json.loads((runs / RUN.format("zeroshot") / "manifest.json").read_text())["vqa_sets"]["digits"]["sha256"]
    assert MultipleChoiceSet.load(frozen, expected_sha256=sha).name == "digits"
    stream = STREAMS.get("digits").obj("data", None)
    test = stream.dataset("test").with_classes(range(10))
    before = frozen.stat().st_mtime_ns
    assert cached_question_set("digits", stream, test, "random", 0, None, cache).sha256 == sha  # read back, not rebuilt
    assert frozen.stat().st_mtime_ns == before
    body = json.loads(frozen.read_text())
    body["items"][0]["answer"] = (body["items"][0]["answer"] + 1) % 5  # tampered: its hash no longer matches
    frozen.write_text(json.dumps(body))
    with caplog.at_level("WARNING"):
        assert cached_question_set("digits", stream, test, "random", 0, None, cache).sha256 == sha  # rebuilt
    assert "rebuilding the cached question set" in caplog.text and "changed after it was written" in caplog.text
    assert MultipleChoiceSet.load(frozen).sha256 == sha
    with pytest.raises(QuestionSetError, match=r"other images than the 9 test images"):
        check_asks(MultipleChoiceSet.load(frozen), test.subset(range(9)), stream.spec.class_names)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder should be
    with caplog.at_level("WARNING"):
        assert cached_question_set("digits", stream, test, "random", 0, None, blocked).sha256 == sha
    assert "cannot cache the question set" in caplog.text


def test_a_run_whose_question_sets_changed_is_not_resumed(runs, llava, tmp_path):
    run = tmp_path / RUN.format("full-ft")
    shutil.copytree(runs / RUN.format("full-ft"), run)
    (run / "checkpoints" / "session-2.pt").unlink()
    (run / "summary.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["vqa_sets"]["digits"]["sha256"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(QuestionSetError, match="its VQA question sets changed since it started: digits"):
        run_grid(load_config("quick", ["strategy=full-ft", f"vqa.model=llava:{llava}", f"out={tmp_path}",
                                       "keep_checkpoints=all", *SETTINGS[:-1]]), progress=False)


@pytest.mark.slow  # two processes start, load and run (~50 s on two shared cores)
def test_ddp_scores_a_share_of_the_questions_per_process_and_sums_the_counts(runs, llava, cache, tmp_path):
    from test_distributed import _launch

    (outcomes, _) = _launch(tmp_path, ["strategy=zeroshot", f"vqa.model=llava:{llava}", f"out={tmp_path / 'ddp'}",
                                       "ddp=true", *SETTINGS[:-1]], {CACHE_ENV: str(cache)})
    assert [status for _, status, _ in outcomes] == ["finished"]
    single, ddp = _vqa_rows(runs / RUN.format("zeroshot")), _vqa_rows(tmp_path / "ddp" / RUN.format("zeroshot"))
    assert [{**r, "value": None} for r in ddp] == [{**r, "value": None} for r in single]  # the same counts
    assert all(type(r["total"]) is int for r in ddp)
    assert [r["value"] for r in ddp] == pytest.approx([r["value"] for r in single], abs=1e-9)


def test_the_report_of_runs_with_vqa_shows_vqa_first(runs, tmp_path):
    from reports import write_report

    paths = write_report(runs / "quick", tmp_path, reference="zeroshot")
    markdown = paths.markdown.read_text()
    assert markdown.index("**VQA (the VLM's multiple-choice accuracy)**") < markdown.index("**Zero-shot classification")
    results = pd.read_csv(paths.results_csv).set_index("strategy")
    summary = json.loads((runs / RUN.format("full-ft") / "summary.json").read_text())["vqa"]
    assert results.loc["full-ft", "vqa_target_improvement_mean"] == pytest.approx(summary["target_improvement"])
    assert results.loc["zeroshot", "vqa_target_improvement_mean"] == 0
    assert any(p.name.endswith("-vqa-matrix.png") for p in paths.figures)
