"""The mini model: few-step pretraining on a tiny config, its local-dir folder, the `mini`
backbone, the `pretrain-mini` verb and the `mini` preset end to end."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.backbones import load_backbone
from benchmark.cli import main
from benchmark.config import load_config
from benchmark.runs import run_dir
from streams.mini.backbone import CACHE_ENV, WEIGHTS, default_model_dir, ensure_model
from streams.mini.pretrain import PretrainConfig, corpus_batch, pretrain, to_tensor, train
from streams.mini.world import world

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
STREAMS = ("mini-shapes", "mini-colours", "mini-digits", "mini-handwritten", "mini-signs")


def tiny(seed: int = 0, steps: int = 3) -> PretrainConfig:
    return PretrainConfig(seed=seed, steps=steps, batch_size=16, warmup_steps=1, model=TINY_MODEL)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(folder, manifest) of a 3-step pretraining of a 1-block, 4-head model."""
    folder = tmp_path_factory.mktemp("cache") / "mini-tiny"
    return folder, pretrain(folder, tiny(), progress=False)


def test_pretraining_writes_a_local_dir_model_with_its_manifest(tiny_model):
    folder, manifest = tiny_model
    assert {p.name for p in folder.iterdir()} == {"open_clip_config.json", WEIGHTS, "manifest.json"}
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 0 and manifest["steps"] == 3 and manifest["data_version"] == world().version
    assert set(manifest["zero_shot_top1"]) == set(STREAMS)
    assert all(0.0 <= v <= 1.0 for v in manifest["zero_shot_top1"].values())
    assert "not CLIP" in manifest["what"]


def test_mini_backbone_loads_the_folder(tiny_model):
    folder, _ = tiny_model
    backbone = load_backbone(f"mini:{folder}")
    assert backbone.spec == f"mini:{folder}"
    blocks = backbone.blocks()
    assert len(blocks) == 1 and blocks[0].num_heads == 4 and blocks[0].head_dim == 8
    assert not any(p.requires_grad for p in backbone.parameters())
    images, captions = corpus_batch(world(), seed=0, step=0, batch_size=4)
    # the pretraining batches are exactly what the benchmark's eval preprocessing makes of a render
    reference = torch.stack([backbone.preprocess(False)(Image.fromarray(x)) for x in images])
    assert torch.allclose(to_tensor(images), reference, atol=1e-5)
    assert backbone.encode_image(reference).shape == (4, 32)
    assert backbone.encode_text(backbone.tokenize(captions)).shape == (4, 32)


def test_same_seed_same_weights():
    first, losses = train(tiny(seed=0, steps=2), progress=False)
    second, _ = train(tiny(seed=0, steps=2), progress=False)
    other, _ = train(tiny(seed=1, steps=2), progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_build_gives_the_same_weights_for_any_thread_count(tmp_path):
    """Three steps of the real recipe (its model, batches of 64): split over two threads, the matmuls and sums add in
    another order, which changed the weights before the build ran in one thread."""
    cfg, threads, digests = PretrainConfig(steps=3, batch_size=64, warmup_steps=1), torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            pretrain(tmp_path / str(count), cfg, progress=False)
            assert torch.get_num_threads() == count  # restored after the build
            digests.append(hashlib.sha256((tmp_path / str(count) / WEIGHTS).read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]


def test_cache_location_and_build_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert default_model_dir().parent == tmp_path / "cache"
    assert f"v{world().version}." in default_model_dir().name and default_model_dir(3).name.endswith("-s3")
    folder = ensure_model(tmp_path / "m", tiny(steps=1), progress=False)
    stamp = (folder / WEIGHTS).stat().st_mtime_ns
    assert ensure_model(folder, tiny(steps=1), progress=False) == folder  # present: not rebuilt
    assert (folder / WEIGHTS).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="folder path"):
        load_backbone("mini:local-dir:/x")


def test_pretrain_mini_verb(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["pretrain-mini", "--out", str(out), "--steps", "1", "--seed", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["steps"] == 1
    assert "zero-shot top-1 mini-signs" in capsys.readouterr().out
    assert main(["pretrain-mini", "--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out


def test_mini_preset_lists_every_strategy_both_targets_and_three_seeds():
    cfg = load_config("mini")
    assert set(cfg.strategy) == {"zeroshot", "full-ft", "ewc", "layernorm", "lora", "spu", "lorsu", "lora-ppl",
                                 "lorsu-ppl", "lora-llm"} and cfg.vqa.model == "mini"  # the VLM-loss ones: the mini VLM
    assert cfg.stream == ["mini-handwritten", "mini-signs"] and cfg.seed == [0, 1, 2]
    assert cfg.sessions == 5 and cfg.shots == 5 and cfg.backbone == "mini"
    assert cfg.controls == ["mini-shapes", "mini-colours", "mini-digits", "mini-spatial", "mini-pairs", "mini-yesno"]
    assert len(cfg.expand()) == 60


def test_mini_questions_preset_trains_every_question_kind_as_a_target():
    cfg = load_config("mini-questions")
    assert cfg.stream == ["mini-pairs", "mini-spatial", "mini-yesno"] and cfg.vqa.model == "mini"
    assert cfg.controls == ["mini-shapes", "mini-colours", "mini-digits"] and len(cfg.expand()) == 36


def test_mini_preset_runs_end_to_end(tiny_model, tmp_path):
    folder, _ = tiny_model
    small = [f"{name}.{key}=2" for name in ("mini-signs", "mini-shapes", "mini-colours", "mini-digits", "mini-spatial",
                                            "mini-pairs", "mini-yesno") for key in ("train_per_class", "test_per_class")]
    overrides = [f"out={tmp_path}", f"backbone=mini:{folder}", "stream=mini-signs", "strategy=[zeroshot,full-ft,lorsu]",
                 "seed=0", "shots=2", "train.epochs=1", "vqa.model=null", *small]  # VQA: tests/test_mini_vlm.py
    assert main(["run", "mini", "--no-progress", *overrides]) == 0
    for run in load_config("mini", overrides).expand():
        path = run_dir(run)
        assert json.loads((path / "manifest.json").read_text())["status"] == "finished"
        header, *rows = (path / "matrix.csv").read_text().splitlines()
        assert "mini-signs" in header and "mini-digits" in header and len(rows) == 6  # pretrained + 5 sessions
