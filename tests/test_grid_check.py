"""Every check of a grid before any work (one message for every problem), and what a run that fails keeps."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.runner import GridCheckError, check_grid, run_grid


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
