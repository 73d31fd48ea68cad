"""Every check of a grid before any work (one message for every problem), and what a run that fails keeps."""
import json
import re

import fscl_test_strategies  # noqa: F401  (test-last-block)
import huggingface_hub
import numpy as np
import pytest
import yaml
from PIL import Image
from test_streams_layouts import PAPER_WRITERS

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.dryrun import grid_warnings
from benchmark.grid import GridCheckError, check_grid, run_grid


def test_every_data_problem_of_the_grid_is_named_before_any_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FSCL_CACHE", str(tmp_path / "cache"))  # an empty model cache: building 'mini' would show
    cfg = load_config("quick", [f"out={tmp_path / 'runs'}", f"data_root={tmp_path / 'nowhere'}", "backbone=mini",
                                "stream=[digits,gtsrb,eurosat]", "strategy=[zeroshot,full-ft]", "seed=0",
                                "sessions=12"])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    message = str(err.value)
    assert "3 problem(s); nothing was run" in message
    assert "digits: 12 sessions but only 10 classes" in message  # a stream on no disk at all, too many sessions
    assert f"gtsrb: data folder not found: {tmp_path / 'nowhere' / 'gtsrb'}" in message
    assert f"eurosat: data folder not found: {tmp_path / 'nowhere' / 'eurosat'}" in message
    assert "(runs: gtsrb/zeroshot/5-s0, gtsrb/full-ft/5-s0)" in message  # each problem once, with its runs
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_checked_data_is_shared_by_the_runs_of_a_stream():
    runs = load_config("quick", ["strategy=[zeroshot,full-ft]", "seed=[0,1]", "controls=[digits]",
                                 "stream=digits"]).expand()
    data = check_grid(runs)
    assert len(data) == 4 and len({id(d.stream) for d in data}) == 1  # one scan for the grid
    assert [s.ids for s in data[0].sessions] == [s.ids for s in data[2].sessions]  # same seed, other strategy
    assert [s.ids for s in data[0].sessions] != [s.ids for s in data[1].sessions]  # seed 1 draws its own shots


def test_a_finished_run_is_not_reused_for_another_configuration(tmp_path):
    base = [f"out={tmp_path}", "strategy=full-ft", "seed=0", "sessions=1", "train.epochs=1"]
    (outcome,) = run_grid(load_config("quick", base), progress=False)
    assert outcome.status == "finished"
    assert [o.status for o in run_grid(load_config("quick", [*base, "device=cpu"]), progress=False)] == ["skipped"]
    changed = load_config("quick", [*base, "train.lr=0.0007"])
    with pytest.raises(GridCheckError) as err:
        run_grid(changed, progress=False)
    assert f"{outcome.path} finished with another configuration: train.lr: 0.0005 -> 0.0007" in str(err.value)
    assert "--force runs it again" in str(err.value)
    (again,) = run_grid(changed, progress=False, force=True)
    assert again.status == "finished" and again.path == outcome.path
    assert yaml.safe_load((outcome.path / "config.yaml").read_text())["train"]["lr"] == 0.0007
    assert [o.status for o in run_grid(changed, progress=False, force=True)] == ["skipped"]  # nothing changed now


def test_a_runs_folder_that_cannot_be_written_is_named_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = load_config("quick", [f"out={blocker / 'runs'}", "strategy=zeroshot", "seed=0"])
    with pytest.raises(GridCheckError, match=rf"out: cannot write run records into {blocker / 'runs' / 'quick'}"):
        run_grid(cfg, progress=False)


def _write_folder_stream(root, bad: bool) -> None:
    """Two class folders of real PNGs (and, with ``bad``, one file that is not an image)."""
    gen = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(gen.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    if bad:
        (root / "dogs" / "broken.jpg").write_bytes(b"not an image")


def test_an_unreadable_image_met_mid_run_fails_that_run_and_the_grid_goes_on(tmp_path):
    _write_folder_stream(tmp_path / "data" / "pets-bad", bad=True)
    cfg = load_config("quick", [f"out={tmp_path / 'runs'}", f"data_root={tmp_path / 'data'}", "seed=0",
                                "strategy=[zeroshot,full-ft]", "sessions=1", "train.epochs=1",
                                "controls=[imagefolder]", "imagefolder.root=pets-bad"])
    outcomes = run_grid(cfg, progress=False)
    assert [o.status for o in outcomes] == ["failed", "failed"]  # both met it; the second still ran
    for outcome in outcomes:
        assert "broken.jpg" in outcome.reason  # met by the evaluation before training, not in session 1
        assert outcome.reason.startswith("evaluation before training (session 0): ")
        manifest = json.loads((outcome.path / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "broken.jpg" in manifest["reason"]
        summary = json.loads((outcome.path / "summary.json").read_text())
        assert "target_improvement" not in summary and "costs" in summary  # no final metric for a failed run


def test_the_command_line_says_where_a_grid_comes_from_and_dry_run_checks_it(tmp_path, capsys):
    assert main(["run", "stream=digits", "strategy=zeroshot", f"out={tmp_path}", "--dry-run"]) == 0
    assert "1 run(s) of 'digits' from the defaults (no preset):" in capsys.readouterr().out
    assert main(["run", "quick", "seed=0", "strategy=zeroshot", f"out={tmp_path}", "--dry-run"]) == 0
    assert "of 'quick' from preset 'quick'" in capsys.readouterr().out
    assert main(["run", "stream=gtsrb", f"data_root={tmp_path / 'none'}", f"out={tmp_path}", "--dry-run"]) == 2
    assert f"gtsrb: data folder not found: {tmp_path / 'none' / 'gtsrb'}" in capsys.readouterr().err


def test_force_on_the_command_line_runs_a_changed_finished_run_again(tmp_path, capsys):
    base = ["run", "quick", f"out={tmp_path}", "strategy=zeroshot", "seed=0", "sessions=1", "--no-progress"]
    assert main(base) == 0
    assert main([*base, "train.eval_batch_size=32"]) == 2
    assert "finished with another configuration: train.eval_batch_size: 64 -> 32" in capsys.readouterr().err
    assert main([*base, "train.eval_batch_size=32", "--force"]) == 0
    assert "1 finished" in capsys.readouterr().out


def test_what_a_strategy_refuses_on_its_backbone_is_found_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FSCL_CACHE", str(tmp_path / "cache"))  # 'mini' is checked from its config, never pretrained
    cfg = load_config("quick", [f"out={tmp_path / 'runs'}", "strategy=[full-ft,lorsu,layernorm]", "seed=0",
                                "backbone=[openclip:fscl-tiny,mini]", "lorsu.top_k_heads=999"])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    message = str(err.value)
    assert "lorsu on openclip:fscl-tiny: lorsu.top_k_heads: invalid value 999; allowed: an integer in [1, 4]" in message
    assert "lorsu on mini: lorsu.top_k_heads: invalid value 999" in message
    assert "full-ft" not in message and "layernorm" not in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no run started, nothing built


def test_backbone_skeletons_have_the_blocks_of_the_real_models(tmp_path):
    from benchmark.backbones import backbone_skeleton, load_backbone

    for spec in ("openclip:fscl-tiny", "openclip:ViT-L-14-336@openai"):  # a hub tag: no download for a skeleton
        skeleton = backbone_skeleton(spec)
        blocks = skeleton.blocks()
        assert all(p.is_meta for p in skeleton.parameters())
        if spec.endswith("fscl-tiny"):
            real = load_backbone(spec).blocks()
            assert [(b.num_heads, b.head_dim, b.fc1.weight.shape) for b in blocks] == [
                (b.num_heads, b.head_dim, b.fc1.weight.shape) for b in real]
        else:
            assert (len(blocks), blocks[0].num_heads, blocks[0].width) == (24, 16, 1024)


def test_the_dry_run_of_a_paper_preset_says_what_it_will_and_will_not_produce(tmp_path, capsys, monkeypatch):
    """A compact summary instead of 105 folders; VQA off in a paper setting; the hub weights need internet (an empty
    Hugging Face cache here, and no internet: a real run would fail loading them)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for write in PAPER_WRITERS.values():
        write(tmp_path / "data")
    grid = ["run", "paper-cl5", f"data_root={tmp_path / 'data'}", f"out={tmp_path / 'runs'}", "shots=1", "--dry-run"]
    assert main(grid) == 2  # its VLM-side baselines need a VLM
    err = capsys.readouterr().err
    for strategy in ("lora-llm", "lora-llm-last", "lora-vlm", "lorsu-llm"):
        assert f"{strategy} trains with a VLM's answer loss and needs vqa.model" in err
    assert "or leave it out of the grid (strategy=[...])" in err
    grid.append("strategy=[zeroshot,full-ft,ewc,layernorm,lora,spu,lorsu]")
    assert main(grid) == 0
    out = capsys.readouterr().out
    assert "105 run(s) of 'paper-cl5' from preset 'paper-cl5': 5 targets × 7 strategies × 3 seeds\n" in out
    assert "  strategies: zeroshot, full-ft, ewc, layernorm, lora, spu, lorsu\n" in out
    assert f"  to run: 105; finished, skipped: 0 -> {tmp_path / 'runs' / 'paper-cl5'}" in out
    assert str(tmp_path / "runs" / "paper-cl5" / "tsi") not in out  # no folder listed without -v
    assert "VQA: off — set `vqa.model=llava:" in out and "for the paper's headline numbers" in out
    weights = out.split("\nweights:\n", 1)[1].splitlines()[0]
    assert weights.startswith("  openclip:ViT-L-14-336-quickgelu@openai: ")
    assert "the Hugging Face hub (timm/vit_large_patch14_clip_336.openai), not in the local cache: needs internet" in weights
    if "cannot be reached from this machine" in weights:  # no internet here (CI): the run would fail
        assert "a run on this machine fails loading them" in weights
    assert "cost of the 105 run(s) to do:" in out
    assert main([*grid, "strategy=zeroshot", "seed=0", "-v"]) == 0
    listed = re.findall(r"^    to run   (.+)$", capsys.readouterr().out, re.M)
    assert len(listed) == 5 and listed[0].endswith("paper-cl5/tsi/openclip-ViT-L-14-336-quickgelu-openai/zeroshot/1-s0")


def test_the_dry_run_counts_the_cost_of_the_runs_to_do_only(tmp_path, capsys):
    base = ["run", "quick", f"out={tmp_path}", "seed=0", "sessions=1", "train.epochs=1", "--no-progress"]
    assert main([*base, "strategy=full-ft"]) == 0
    capsys.readouterr()
    assert main([*base, "strategy=[zeroshot,full-ft]", "--dry-run", "-v"]) == 0
    out = capsys.readouterr().out
    assert "to run: 1; finished, skipped: 1" in out and "VQA: off (vqa.model: null)" in out
    assert re.search(r"^    finished .+/full-ft/5-s0$", out, re.M) and re.search(r"^    to run   .+/zeroshot/5-s0$", out, re.M)
    assert "openclip:fscl-tiny: none: random initialisation" in out
    assert "cost of the 1 run(s) to do:\n  openclip:fscl-tiny: 1 run(s), 0 training steps" in out
    assert main([*base, "strategy=full-ft", "--dry-run"]) == 0
    assert "cost: none, every run is finished" in capsys.readouterr().out


def test_a_strategy_at_the_base_rate_beside_tuned_ones_is_warned_about(tmp_path, capsys, caplog):
    grid = ["quick", f"out={tmp_path}", "seed=0", "strategy=[zeroshot,full-ft,layernorm]", "full-ft.train.lr=1e-4"]
    assert main(["run", *grid, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("warnings:\n  layernorm trains at the base train.lr 0.0005 while full-ft run at their own (tuned) rates: "
            "an unfair comparison. Tune it the same way ('fscl tune quick strategy=layernorm'") in out
    assert "zeroshot" not in out.split("warnings:", 1)[1]  # it trains nothing
    assert main(["run", *grid, "sessions=1", "train.epochs=1", "--no-progress"]) == 0  # a real grid logs it too
    assert "layernorm trains at the base train.lr 0.0005" in caplog.text
    assert not grid_warnings(load_config("quick", ["strategy=[full-ft,layernorm]", "train.lr=[1e-4,1e-3]",
                                                   "full-ft.train.lr=1e-4"]), [])  # swept for all: fair
    mini = load_config("mini")  # every strategy that trains has its tuned rate
    assert not [w for w in grid_warnings(mini, mini.expand()) if "train.lr" in w]


def test_a_strategy_that_trains_only_what_the_vlm_never_reads_is_warned_about(tmp_path):
    from benchmark.backbones import backbone_skeleton
    from benchmark.export import hf_vision_config
    from benchmark.vlm.llava import save_tiny_llava

    llava = save_tiny_llava(tmp_path / "llava", hf_vision_config(backbone_skeleton("mini").visual))  # reads [-2]
    cfg = load_config("quick", ["backbone=mini", f"vqa.model=llava:{llava}", "seed=0",
                                "strategy=[test-last-block,full-ft,lorsu]"])
    warnings = grid_warnings(cfg, cfg.expand())
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"test-last-block on mini trains only parameters that llava:{llava} never reads (")
    assert warnings[0].endswith("): its VQA scores cannot change")
    without = load_config("quick", ["backbone=mini", "seed=0", "strategy=test-last-block"])
    assert not grid_warnings(without, without.expand())  # no VLM: nothing to warn about
    mini = load_config("quick", ["backbone=mini", "vqa.model=mini", "seed=0", "strategy=test-last-block"])
    assert not grid_warnings(mini, mini.expand())  # the mini VLM reads the last block's output


def test_where_each_backbone_s_weights_come_from(tmp_path, monkeypatch):
    from benchmark.backbones import weights_source

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    assert weights_source("openclip:fscl-tiny") == (
        "none: random initialisation (seed 0), no pretrained weights", True)
    checkpoint = tmp_path / "w.pt"
    assert weights_source(f"openclip:ViT-B-16@{checkpoint}") == (f"local file {checkpoint} (not found)", False)
    checkpoint.write_bytes(b"")
    assert weights_source(f"openclip:ViT-B-16@{checkpoint}") == (f"local file {checkpoint}", True)
    assert not weights_source(f"openclip:local-dir:{tmp_path}").ready
    assert not weights_source(f"hf:{tmp_path}").ready
    # a model in the Hugging Face cache's own layout (models--ORG--NAME/refs/main -> snapshots/REV/FILE)
    repo = tmp_path / "hf-cache" / "models--openai--clip-vit-base-patch16"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    cached = weights_source("hf:openai/clip-vit-base-patch16")
    assert cached.ready and cached.where.startswith("the Hugging Face cache (")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = weights_source("openclip:ViT-B-16@openai")  # not cached, and the hub not to be asked
    assert not offline.ready and offline.where.endswith("needs internet (HF_HUB_OFFLINE is set)")
