"""A tiny PaliGemma end to end through ``fscl run``: VQA scored by letter and by generation, ``lorsu-ppl`` training
an ``hf:`` SiglipModel through PaliGemma's answer loss (only the chosen encoder parameters move) and its resume
after session 1 to the same numbers (zero-shot is evaluated too: the backbone is a whole SiglipModel); PaliGemma's
own tower alone (``hf-vision:``, no text tower) trained and evaluated by VQA only (``evaluate: [vqa]``), and the
grid check's refusal of what needs its missing text tower."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_tiny_siglip
from benchmark.cache import CACHE_ENV
from benchmark.cli import main
from benchmark.vlm.paligemma import save_tiny_paligemma

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

SETTINGS = ("seed=0", "sessions=2", "train.epochs=1", "digits.test_fraction=0.1", "keep_checkpoints=all",
            "--no-progress")
TRAINED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.fc1.weight",
           "mlp.fc1.bias")  # what lorsu-ppl trains: chosen heads' q/k/v rows and the first MLP layer


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"siglip": save_tiny_siglip(root / "siglip"), "paligemma": save_tiny_paligemma(root / "paligemma")}


@pytest.fixture(scope="module")
def args(models, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")  # this module's question sets
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield ["run", "quick", f"backbone=hf:{models['siglip']}", f"vqa.model=paligemma:{models['paligemma']}",
               *SETTINGS]


@pytest.fixture(scope="module")
def lorsu_ppl(args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main([*args, "strategy=lorsu-ppl", f"out={out}"]) == 0
    (run,) = out.glob("quick/digits/*/lorsu-ppl/5-s0")
    return run


def test_lorsu_ppl_trains_only_the_chosen_encoder_parameters_through_paligemma(lorsu_ppl, models):
    summary = json.loads((lorsu_ppl / "summary.json").read_text())
    assert summary["vqa"]["evaluated"] == [0, 2]
    assert all(0 < c["lm_flops_per_sample"] < c["flops_per_sample"] for c in summary["costs"]["sessions"])
    start = load_backbone(f"hf:{models['siglip']}").visual.state_dict()
    final = torch.load(lorsu_ppl / "checkpoints/session-2.pt", weights_only=False)["encoder"]
    moved = {name for name, value in final.items() if not torch.equal(value, start[name])}
    assert moved and all(name.startswith("tower.encoder.layers.") and name.endswith(TRAINED) for name in moved)
    assert {name.split(".")[3] for name in moved} == {"0", "1"}  # PaliGemma reads the last block too
    mass = {r["session"]: r["value"] for r in metric_rows(lorsu_ppl) if r["metric"] == "vqa_letter_mass"}
    assert set(mass) == {0, 2} and mass[2] != mass[0]  # the trained encoder went into PaliGemma's tower


def test_an_interrupted_lorsu_ppl_run_resumes_to_the_same_numbers(lorsu_ppl, args, tmp_path):
    run = tmp_path / lorsu_ppl.relative_to(lorsu_ppl.parents[4])
    shutil.copytree(lorsu_ppl, run)
    # what a process stopped during session 2 leaves: session 1's checkpoint, no results, status running
    (run / "checkpoints" / "session-2.pt").unlink()
    for name in ("summary.json", "matrix.csv", "vqa_matrix.csv"):
        (run / name).unlink()
    kept = [row for row in metric_rows(run) if row["session"] < 2]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert main([*args, "strategy=lorsu-ppl", f"out={tmp_path}"]) == 0
    assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
    for name in ("matrix.csv", "vqa_matrix.csv"):
        assert (run / name).read_text() == (lorsu_ppl / name).read_text()
    encoders = [torch.load(r / "checkpoints/session-2.pt", weights_only=False)["encoder"] for r in (run, lorsu_ppl)]
    assert all(torch.equal(encoders[0][name], value) for name, value in encoders[1].items())


def test_generate_scoring_records_its_rows(args, tmp_path):
    assert main([*args, "strategy=zeroshot", "vqa.scoring=generate", f"out={tmp_path}"]) == 0
    (run,) = tmp_path.glob("quick/digits/*/zeroshot/5-s0")
    rows = [r for r in metric_rows(run) if r["metric"].startswith("vqa_")]
    assert {(r["session"], r["metric"], r["scoring"]) for r in rows} == {
        (s, m, "generate") for s in (0, 2) for m in ("vqa_acc", "vqa_parsed")}
    assert all(r["value"] == r["correct"] / r["total"] for r in rows if r["metric"] == "vqa_acc")


def test_the_grid_check_refuses_an_encoder_paligemma_cannot_take(args, tmp_path, capsys):
    assert main([*args, "backbone=openclip:fscl-tiny", "strategy=lorsu-ppl", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cannot go into PaliGemma's SigLIP vision tower" in err and "openclip:fscl-tiny" in err
    assert not any(tmp_path.iterdir())  # before any work


def test_the_trained_tower_exports_as_a_siglip_vision_model_paligemma_takes(lorsu_ppl, models, tmp_path):
    from benchmark.vlm.spec import resolve_vlm

    out = tmp_path / "tower"
    assert main(["export", str(lorsu_ppl), "--session", "2", "--format", "hf-siglip-vision", "--out", str(out)]) == 0
    tower = load_backbone(f"hf-vision:{out}")
    final = torch.load(lorsu_ppl / "checkpoints/session-2.pt", weights_only=False)["encoder"]
    assert all(torch.equal(final[f"tower.{name}"], p) for name, p in tower.visual.tower.named_parameters())
    resolve_vlm(f"paligemma:{models['paligemma']}").check_encoder(tower)


def test_paligemmas_own_tower_alone_trains_and_is_scored_by_vqa_only(args, models, tmp_path):
    tower = [f"backbone=hf-vision:{models['paligemma']}", "evaluate=[vqa]"]
    assert main([*args, *tower, "strategy=[zeroshot,lorsu-ppl]", f"out={tmp_path}"]) == 0
    (run,) = tmp_path.glob("quick/digits/*/lorsu-ppl/5-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"vqa", "costs"} and not (run / "matrix.csv").exists()
    assert summary["vqa"]["evaluated"] == [0, 2] and (run / "vqa_matrix.csv").is_file()
    assert {r["metric"] for r in metric_rows(run)} >= {"vqa_acc", "vqa_letter_mass"}
    assert not any(r["metric"].startswith("top1") for r in metric_rows(run))
    (zeroshot,) = tmp_path.glob("quick/digits/*/zeroshot/5-s0")
    assert json.loads((zeroshot / "summary.json").read_text())["vqa"]["target_improvement"] == 0


@pytest.mark.parametrize("extra, needs", [
    ([], "zero-shot evaluation (evaluate: zeroshot; set evaluate: [vqa] with a vqa.model)"),
    (["evaluate=[vqa]", "strategy=full-ft"], "the CLIP loss of full-ft (train it with a VLM-loss strategy, *-ppl)"),
    (["evaluate=[vqa]", "vqa.mode=hard"], "vqa.mode: hard (its distractors are ranked by text embeddings; use random)"),
])
def test_the_grid_check_refuses_what_needs_the_missing_text_tower(args, models, tmp_path, capsys, extra, needs):
    backbone = f"hf-vision:{models['paligemma']}"
    assert main([*args, f"backbone={backbone}", "strategy=lorsu-ppl", *extra, f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{backbone} has no text tower (a vision tower alone): it cannot give {needs}" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())
