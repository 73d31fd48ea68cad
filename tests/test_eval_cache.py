"""The evaluation cache (uint8 images decoded once) and the shared session-0 row: the numbers never move.

Cached and uncached evaluation give the same logits, bit for bit, as the per-image transform the
evaluation used before; a damaged cache file is rebuilt; a grid's records are the same whether its runs
share row 0 and cache their images or not; the shared row follows the backbone, the set and the transform.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from benchmark import image_cache
from benchmark.cli import main
from benchmark.estimate import session_steps
from benchmark.evaluation import EvalSet, ZeroShotEvaluator
from benchmark.image_cache import HEADER_BYTES, cache_path, cached_images, check_file, split_eval_transform
from benchmark.shared_rows import FOLDER
from streams.base import LabelledImages, open_image
from streams.digits import Digits

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> LabelledImages:
    """20 real image files (PNG and JPEG, RGB, grayscale and RGBA) of different sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths, targets = [], []
    for i in range(20):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        mode, ext = [("RGB", "png"), ("L", "jpg"), ("RGBA", "png"), ("RGB", "jpg")][i % 4]
        pixels = rng.integers(0, 256, (h, w, len(mode)) if mode != "L" else (h, w), dtype=np.uint8)
        path = folder / f"{i}.{ext}"
        Image.fromarray(pixels, mode).save(path)
        paths.append(path)
        targets.append(i % 10)
    return LabelledImages(paths, targets, [f"photo/{i}" for i in range(20)], open_image)


def _logits_before(backbone, dataset, embeddings) -> torch.Tensor:
    """The evaluation as it was: the whole transform per image, float batches of a plain loader."""
    with torch.no_grad():
        return torch.cat([torch.nn.functional.normalize(backbone.encode_image(x).float(), dim=-1) @ embeddings.T
                          for x, *_ in DataLoader(dataset, batch_size=7)])


def _logits(evaluator, dataset, embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pairs = [(evaluator.logits(x, embeddings), y) for x, y, _ in evaluator.batches(dataset)]
    return torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])


@pytest.mark.parametrize("source", ["photos", "digits"])
def test_cached_and_uncached_evaluation_give_the_same_logits_as_the_per_image_transform(
        source, photos, tiny_backbone, fscl_cache):
    data = photos if source == "photos" else Digits("unused").dataset("test").subset(range(0, 540, 13))
    data = data.with_transform(tiny_backbone.preprocess(False))
    embeddings = ZeroShotEvaluator(tiny_backbone).class_embeddings("digits", Digits.spec.class_names,
                                                                  Digits.spec.templates)
    before = _logits_before(tiny_backbone, data, embeddings)
    assert split_eval_transform(data.transform) is not None
    for cache in ("off", "disk", "device", "disk"):  # the last one warm: read from the file
        for workers in (0, 2):
            evaluator = ZeroShotEvaluator(tiny_backbone, batch_size=7, cache=cache, num_workers=workers)
            logits, labels = _logits(evaluator, data, embeddings)
            assert torch.equal(logits, before), (cache, workers)
            assert labels.tolist() == data.targets
    key = image_cache.images_key(data, split_eval_transform(data.transform))
    assert check_file(cache_path(key), key) == (len(data), 3, 32, 32)
    counts = ZeroShotEvaluator(tiny_backbone, cache="disk").accuracy(data, "digits", Digits.spec.class_names,
                                                                     Digits.spec.templates)
    assert counts == int((before.argmax(1) == torch.tensor(data.targets)).sum()) / len(data)


def test_a_transform_that_does_not_split_is_evaluated_as_it_is(photos, tiny_backbone):
    plain = tiny_backbone.preprocess(False)
    odd = transforms.Compose([*plain.transforms, transforms.Lambda(lambda x: x.flip(-1))])
    assert split_eval_transform(odd) is None
    data = photos.with_transform(odd)
    embeddings = torch.nn.functional.normalize(torch.randn(10, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    logits, _ = _logits(ZeroShotEvaluator(tiny_backbone, batch_size=7, cache="disk"), data, embeddings)
    assert torch.equal(logits, _logits_before(tiny_backbone, data, embeddings))


def _corrupt_pixels(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 5)
        byte = f.read(1)
        f.seek(HEADER_BYTES + 5)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "bad header", "other key"])
def test_a_corrupted_or_partial_cache_file_is_detected_and_rebuilt(damage, photos, tiny_backbone, monkeypatch,
                                                                   tmp_path):
    data = photos.with_transform(tiny_backbone.preprocess(False))
    split = split_eval_transform(data.transform)
    good, key = cached_images(data, split, folder=tmp_path)
    good = good.clone()
    path = cache_path(key, tmp_path)
    if damage == "flipped byte":
        _corrupt_pixels(path)
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
    elif damage == "bad header":
        with open(path, "r+b") as f:
            f.write(b"garbage!")
    else:
        other = cache_path("0" * 64, tmp_path)
        shutil.copy(path, other)
        assert check_file(other, "0" * 64) is None  # a file is only ever read as its own key
    monkeypatch.setattr(image_cache, "_VERIFIED", set())  # a new process: the digest is checked again
    assert check_file(path, key) is None or damage == "other key"
    images, again = cached_images(data, split, folder=tmp_path)
    assert again == key and torch.equal(images, good)
    assert check_file(path, key) == tuple(good.shape)


def test_a_crash_while_writing_leaves_no_file(photos, tiny_backbone, tmp_path, monkeypatch):
    data = photos.with_transform(tiny_backbone.preprocess(False))

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_cache.UInt8Images, "__getitem__", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_images(data, split_eval_transform(data.transform), folder=tmp_path)
    assert not [p for p in (tmp_path / image_cache.FOLDER).iterdir() if not p.name.endswith(".lock")]


def _row_keys(backbone, dataset) -> str:
    evaluator = ZeroShotEvaluator(backbone)
    evaluator.add(EvalSet("photos", "digits", Digits.spec.class_names, Digits.spec.templates, dataset))
    return evaluator.row_keys({"device": "cpu"})["photos"]


def test_the_shared_row_key_follows_the_backbone_the_set_ids_and_the_transform(photos, tiny_backbone):
    plain = tiny_backbone.preprocess(False)
    key = _row_keys(tiny_backbone, photos.with_transform(plain))
    assert _row_keys(tiny_backbone, photos.with_transform(plain)) == key  # the same model, set, transform
    changed = copy.deepcopy(tiny_backbone)
    with torch.no_grad():
        changed.visual.proj[0, 0] += 1e-3
    assert _row_keys(changed, photos.with_transform(plain)) != key
    assert _row_keys(tiny_backbone, photos.subset(range(19)).with_transform(plain)) != key
    resized = transforms.Compose([transforms.Resize(33), *plain.transforms[1:]])
    assert _row_keys(tiny_backbone, photos.with_transform(resized)) != key
    other_mean = transforms.Compose([*plain.transforms[:-1], transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert _row_keys(tiny_backbone, photos.with_transform(other_mean)) != key


def _records(run: Path) -> dict:
    """What a run's records say, without wall times and memory (which vary from run to run)."""
    summary = json.loads((run / "summary.json").read_text())
    for session in summary["costs"]["sessions"]:
        for field in ("train_seconds", "peak_memory_mb", "setup_seconds"):
            session.pop(field)
    return {"metrics": (run / "metrics.jsonl").read_text(), "matrix": (run / "matrix.csv").read_text(),
            "summary": summary}


def _run(out: Path, *overrides: str) -> int:
    return main(["run", "quick", f"out={out}", "--no-progress", "seed=0", "sessions=2", "train.epochs=2", "train.batch_size=8",
                 "controls=[mini-shapes]", "control_subset=60", *overrides])


def test_a_grids_records_are_the_same_with_and_without_sharing_and_caching(tmp_path):
    strategies = ("zeroshot", "full-ft", "layernorm")
    assert _run(tmp_path / "shared", f"strategy=[{','.join(strategies)}]", "train.num_workers=2") == 0
    stored = sorted((tmp_path / "shared" / "quick" / FOLDER).glob("*.json"))
    assert len(stored) == 2 + 1  # the target's two session groups and the control, once for the grid
    manifests = [json.loads((tmp_path / "shared" / RUN.format(s) / "manifest.json").read_text()) for s in strategies]
    assert manifests[0]["evaluation"]["session0"]["shared"] == []  # the first run evaluated row 0
    assert manifests[1]["evaluation"]["session0"]["shared"] == ["digits@s1", "digits@s2", "mini-shapes"]
    assert manifests[2]["evaluation"]["images"] == manifests[0]["evaluation"]["images"]
    assert manifests[0]["eval_timing"]["images"] == sum(json.loads(p.read_text())["total"] for p in stored)
    for strategy in strategies:  # alone in its grid (nothing shared), images decoded at every evaluation
        assert _run(tmp_path / strategy, f"strategy={strategy}", "eval_cache=off", "train.num_workers=0") == 0
        assert _records(tmp_path / strategy / RUN.format(strategy)) == _records(tmp_path / "shared" /
                                                                               RUN.format(strategy)), strategy


def test_resume_with_the_cache_and_a_new_backbone_gets_its_own_row(tmp_path):
    assert _run(tmp_path, "strategy=full-ft", "keep_checkpoints=all") == 0
    run = tmp_path / RUN.format("full-ft")
    reference = _records(run)
    (run / "checkpoints" / "session-2.pt").unlink()  # as if stopped after session 1
    (run / "summary.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert _run(tmp_path, "strategy=full-ft", "keep_checkpoints=all") == 0
    assert _records(run) == reference
    assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
    stored = set((tmp_path / "quick" / FOLDER).glob("*.json"))
    assert len(stored) == 3
    assert _run(tmp_path, "strategy=zeroshot", "control_subset=50") == 0  # other control ids: that row is new
    new = set((tmp_path / "quick" / FOLDER).glob("*.json")) - stored
    assert [json.loads(p.read_text())["dataset"] for p in new] == ["mini-shapes"]


def test_session_steps_follow_the_loaders_drop_last_rule():
    assert session_steps(25, 8, 2, "auto") == 6 and session_steps(25, 8, 2, False) == 8
    assert session_steps(5, 8, 3, "auto") == 3 and session_steps(16, 8, 1, True) == 2


def test_dry_run_counts_steps_and_images_and_estimates_from_earlier_runs(tmp_path, capsys):
    grid = ("strategy=[zeroshot,full-ft]", "--dry-run")
    assert _run(tmp_path, *grid) == 0
    out = capsys.readouterr().out
    # full-ft: 2 sessions of 25 samples, batches of 8 (the last dropped) x 2 epochs; images: the 540 test digits and
    # 60 control images once for row 0, then twice more for full-ft (zeroshot evaluates once)
    assert "openclip:fscl-tiny: 2 run(s), 12 training steps, 1,800 evaluated images" in out
    assert "no estimate: no finished run of openclip:fscl-tiny on cpu" in out
    assert _run(tmp_path, "strategy=full-ft") == 0
    capsys.readouterr()
    assert _run(tmp_path, *grid) == 0
    out = capsys.readouterr().out
    assert re.search(r"estimate: about \d+ s on cpu at [\d.]+ steps/s, [\d,]+ images/s, the rates of 1 finished",
                     out), out
    # two local processes share the two runs left to do (full-ft is finished: neither counted nor run)
    assert _run(tmp_path, "strategy=[zeroshot,full-ft,layernorm]", "--dry-run", "--jobs", "2") == 0
    assert re.search(r"estimate: about \d+ s on cpu, in 2 processes about \d+ s at", capsys.readouterr().out)
    assert _run(tmp_path / "new", *grid, "--probe") == 0  # no earlier run there: rates measured now
    assert re.search(r"estimate: about \d+ s on cpu at [\d.]+ steps/s, [\d,]+ images/s, measured now \(5 full",
                     capsys.readouterr().out)
    assert _run(tmp_path, "--probe") == 2  # only with --dry-run
    assert "--probe measures rates for the estimate of --dry-run" in capsys.readouterr().err


def test_an_image_stored_in_a_file_is_keyed_by_that_files_state(tmp_path):
    """A row of a parquet file (VisOnlyQA) is cached under a key that changes when the file does."""
    from benchmark.image_cache import sources_key
    from streams.base import LabelledImages
    from streams.visonlyqa import TableRow, load_table_image

    table = tmp_path / "split-00000-of-00001.parquet"
    table.write_bytes(b"first")
    data = LabelledImages([TableRow(str(table), 0, "image")], [0], ["split/0"], load_table_image)
    before = sources_key(data)
    table.write_bytes(b"second, longer")
    assert sources_key(data) != before
