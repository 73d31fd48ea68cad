"""``fscl data check`` on good and broken trees, and a paper preset end to end on tiny trees."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_streams_layouts import PAPER_WRITERS, corrupt, write_dalle, write_eurosat, write_gtsrb, write_image

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.runs import control_subset, run_dir


# --------------------------------------------------------------------------- fscl data check
def _check(capsys, *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_data_check_good_tree_reports_counts_and_sessions(tmp_path, capsys):
    write_gtsrb(tmp_path)
    code, out = _check(capsys, "gtsrb", "--root", str(tmp_path), "--shots", "3")
    assert code == 0, out
    assert "images: train 86, test 43" in out and out.rstrip().endswith("OK: gtsrb is usable")
    assert "   14  14                            2      1  stop" in out
    assert "session 1: 9 classes, 18 train images; fewer than 3 images (all kept)" in out
    assert "session 5: 8 classes, 16 train images" in out
    # --root may also name the stream's own folder
    assert _check(capsys, "gtsrb", "--root", str(tmp_path / "gtsrb"))[0] == 0


def test_data_check_lists_unreadable_files_and_fails(tmp_path, capsys):
    base = write_eurosat(tmp_path)
    bad = [corrupt(base / "2750" / "River" / f"River_{i}.jpg") for i in (1, 2)]
    code, out = _check(capsys, "eurosat", "--root", str(tmp_path), "-o", "split_seed=3")
    assert code == 1
    assert "2 of" in out and "images cannot be read" in out and all(str(p) in out for p in bad)
    assert "skip_bad_images: true" in out and "NOT USABLE" in out


def test_data_check_wrong_layout_shows_the_expected_tree(tmp_path, capsys):
    (tmp_path / "gtsrb" / "GTSRB").mkdir(parents=True)
    code, out = _check(capsys, "gtsrb", "--root", str(tmp_path))
    assert code == 1
    assert f"missing: {tmp_path / 'gtsrb' / 'GTSRB' / 'Training'}" in out and "GT-final_test.csv" in out
    code, out = _check(capsys, "dalle", "--root", str(tmp_path / "nowhere"))
    assert code == 1 and "data folder not found" in out and "v2/<activity words joined by dashes>_<n>.png" in out


def test_data_check_empty_class_and_bad_option(tmp_path, capsys):
    base = write_dalle(tmp_path)
    for f in (base / "v2").glob("walking_*"):
        f.unlink()
    code, out = _check(capsys, "dalle", "--root", str(tmp_path))
    assert code == 1 and "empty class 'walking' in the test split: no images" in out and "v2/walking_<n>.png" in out
    code, out = _check(capsys, "eurosat", "--root", str(tmp_path), "-o", "test_fraction=2")
    assert code == 2 and "test_fraction" in out
    code, out = _check(capsys, "imagefolder", "--root", str(tmp_path))
    assert code == 2 and "imagefolder.root" in out


# --------------------------------------------------------------------------- presets
def test_control_subset_is_seeded_and_fixed():
    first = control_subset(1000, 50, 0, "gtsrb")
    assert first == control_subset(1000, 50, 0, "gtsrb") == sorted(set(first)) and len(first) == 50
    assert first != control_subset(1000, 50, 1, "gtsrb") and first != control_subset(1000, 50, 0, "aircraft")
    assert control_subset(10, 50, 0, "dalle") == list(range(10))


@pytest.mark.parametrize("preset,sessions,shots", [("paper-cl5", 5, [5]), ("paper-cl20", 5, [20]),
                                                   ("paper-cl50", 5, [50]), ("paper-offline", 1, [5, 20, 50])])
def test_paper_presets_grid(preset, sessions, shots):
    cfg = load_config(preset)
    runs = cfg.expand()
    assert cfg.sessions == sessions and cfg.backbone == "openclip:ViT-L-14-336-quickgelu@openai"
    assert len(runs) == 5 * 11 * 3 * len(shots)
    assert {r.stream for r in runs} == {"tsi", "gtsrb", "aircraft", "counteranimal", "eurosat"}
    assert {r.strategy for r in runs} == {"zeroshot", "full-ft", "ewc", "layernorm", "lora", "spu", "lorsu",
                                          "lora-llm", "lora-llm-last", "lora-vlm", "lorsu-llm"}  # VLM-side: vqa.model
    for run in runs:  # controls: the other targets + dalle
        assert run.controls == [c for c in ("tsi", "gtsrb", "aircraft", "counteranimal", "eurosat", "dalle")
                                if c != run.stream]


@pytest.fixture
def tiny_paper_root(tmp_path) -> Path:
    root = tmp_path / "data"
    for name, write in PAPER_WRITERS.items():
        if name != "eurosat":
            write(root)
    base = write_eurosat(root, per_class=4)
    shutil.rmtree(base / "2750" / "Forest")  # 2 images of Forest: 1 train image, fewer than 2 shots
    for i in (1, 2):
        write_image(base / "2750" / "Forest" / f"Forest_{i}.jpg", i)
    corrupt(root / "dalle" / "v2" / "walking_0.png")  # skipped with skip_bad_images
    return root


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_paper_preset_end_to_end_on_tiny_trees(tiny_paper_root, tmp_path, capsys):
    out = tmp_path / "runs"
    overrides = [f"data_root={tiny_paper_root}", f"out={out}", "backbone=openclip:fscl-tiny", "stream=[tsi,eurosat]",
                 "strategy=[zeroshot,full-ft]", "seed=0", "shots=2", "sessions=2", "train.epochs=1",
                 "train.batch_size=8", "control_subset=20", "skip_bad_images=true", "loggers=[]"]
    assert main(["run", "paper-cl5", "--no-progress", *overrides]) == 0, capsys.readouterr().err
    cfg = load_config("paper-cl5", overrides)
    runs = {(r.stream, r.strategy): run_dir(r) for r in cfg.expand()}
    assert len(runs) == 4

    tsi = runs["tsi", "full-ft"]
    config = yaml.safe_load((tsi / "config.yaml").read_text())
    assert config["controls"] == ["gtsrb", "aircraft", "counteranimal", "eurosat", "dalle"]
    manifest = json.loads((tsi / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    subsets = manifest["control_subsets"]
    assert set(subsets) == {"gtsrb", "aircraft", "counteranimal", "dalle"}  # eurosat's test split has 8 images
    assert subsets["aircraft"]["size"] == 20 and subsets["aircraft"]["of"] == 100
    assert all(i.endswith(".jpg") for i in subsets["aircraft"]["ids"])
    zeroshot = json.loads((runs["tsi", "zeroshot"] / "manifest.json").read_text())
    assert zeroshot["control_subsets"] == subsets  # fixed and seeded: the same for every strategy
    # the subset is drawn from every listed image, readable or not; the bad one is met only if drawn
    drawn = control_subset(subsets["dalle"]["of"], 20, 0, "dalle")
    listed = sorted(p.relative_to(tiny_paper_root / "dalle").as_posix()
                    for p in (tiny_paper_root / "dalle" / "v2").iterdir())
    met = "v2/walking_0.png" in [listed[i] for i in drawn]
    assert manifest.get("skipped_images", {}).get("dalle", {}).get("ids") == (["v2/walking_0.png"] if met else None)
    assert "v2/walking_0.png" not in subsets["dalle"]["ids"] and subsets["dalle"]["size"] == 20 - met
    assert set(manifest["splits"]) == {"eurosat", "counteranimal"}
    splits = json.loads((tsi / "splits.json").read_text())
    assert len(splits["eurosat"]["test"]) == manifest["splits"]["eurosat"]["test"] == 10
    samples = json.loads((tsi / "samples.json").read_text())
    assert [len(v) for v in samples.values()] == [28, 26]  # 2 shots of each class of each session (14 + 13)
    assert len((tsi / "matrix.csv").read_text().strip().splitlines()) == 1 + 3

    eurosat = json.loads((runs["eurosat", "full-ft"] / "manifest.json").read_text())
    assert eurosat["classes_with_fewer_shots"] == {"session_1": [1]}  # Forest: 1 training image, kept
    assert "eurosat" in eurosat["splits"] and "tsi" in eurosat["control_subsets"]
