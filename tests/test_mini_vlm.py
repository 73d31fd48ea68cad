"""The mini VLM (``vqa.model: mini``): a small LLaVA-shaped model on a one-step mini encoder, trained a few
steps in a temporary ``$FSCL_CACHE`` — deterministic builds, the real ``from_pretrained`` path through the
spec, the tower = the mini encoder, the cache, the grid check without building, the CLI and a run."""
from __future__ import annotations

import json

import pytest
import torch

from benchmark.backbones import load_backbone
from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.grid import vqa_problems
from benchmark.runs import run_dir
from benchmark.vlm.llava import letter_tokens, vision_tower
from benchmark.vlm.spec import VLMError, resolve_vlm
from benchmark.vqa.questions import LETTERS
from streams.mini import vlm
from streams.mini.backbone import CACHE_ENV, default_model_dir
from streams.mini.pretrain import PretrainConfig, pretrain
from streams.mini.vlm import WEIGHTS, VLMConfig, build, default_vlm_dir, ensure_vlm, question_batch

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

def small(seed: int = 0, steps: int = 2) -> VLMConfig:
    """A recipe of seconds: a 1-layer Llama of width 32, a pool of 2 renders per class, 2 alignment steps."""
    return VLMConfig(seed=seed, steps=steps, batch_size=10, width=32, layers=1, heads=2, warmup_steps=1, pool=2,
                     align_steps=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A ``$FSCL_CACHE`` whose ``mini`` backbone (the real architecture: the grid check reads it) is pretrained
    one step."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        pretrain(default_model_dir(), PretrainConfig(steps=1, batch_size=8, warmup_steps=1), progress=False)
        yield root


@pytest.fixture(scope="module")
def built(cache):
    """(folder, manifest) of the cached mini VLM (``vqa.model: mini``), trained with :func:`small`."""
    folder = default_vlm_dir()
    return folder, build(folder, small(), progress=False)


def test_the_vlm_is_cached_with_its_manifest_and_versioned_key(built, cache):
    folder, manifest = built
    assert folder.parent == cache and folder.name == "mini-llava-v1.2.2-s0" and (folder / WEIGHTS).is_file()
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert "NOT LLaVA" in manifest["what"] and manifest["steps"] == 2 and manifest["seed"] == 0
    assert set(manifest["vqa_acc"]) == {"mini-shapes", "mini-colours", "mini-digits", "mini-handwritten", "mini-signs"}
    assert all(0 <= acc <= 1 for acc in manifest["vqa_acc"].values()) and len(manifest["weights_sha256"]) == 64


def test_same_seed_same_weights(built, tmp_path):
    _, manifest = built
    again = build(tmp_path / "again", small(), progress=False)
    other = build(tmp_path / "other", small(seed=1), progress=False)
    assert again["weights_sha256"] == manifest["weights_sha256"] and again["vqa_acc"] == manifest["vqa_acc"]
    assert other["weights_sha256"] != manifest["weights_sha256"]


def test_the_build_gives_the_same_weights_for_any_thread_count(built, tmp_path):
    _, manifest = built  # built in one thread (the module's one_thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = build(tmp_path / "two", small(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the build restored the caller's threads
    assert again["weights_sha256"] == manifest["weights_sha256"] and again["vqa_acc"] == manifest["vqa_acc"]


def test_the_spec_loads_through_from_pretrained_and_the_tower_is_the_mini_encoder(built, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, manifest = built
    model = resolve_vlm("mini").load("cpu").model
    assert isinstance(model, LlavaForConditionalGeneration) and vlm.weights_digest(model) == manifest["weights_sha256"]
    assert resolve_vlm(f"mini:{folder}").load("cpu").model.config.to_dict() == model.config.to_dict()
    backbone = load_backbone("mini")  # the cached encoder
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captured = {}
    hook = backbone.visual.transformer.resblocks[-2].register_forward_hook(lambda m, i, out: captured.update(out=out))
    with torch.no_grad():
        backbone.visual(x)
        hook.remove()
        ours = vision_tower(model)(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert vision_tower(model).config.num_hidden_layers == len(backbone.visual.transformer.resblocks)
    torch.testing.assert_close(ours, captured["out"], rtol=1e-4, atol=1e-5)
    assert not model.training


def test_the_word_tokenizer_covers_every_mini_prompt_with_single_letter_tokens():
    tokenizer = vlm.tokenizer()
    assert len(letter_tokens(tokenizer, LETTERS)) == 5
    assert tokenizer.convert_tokens_to_ids("<image>") not in (None, tokenizer.unk_token_id)
    batch = question_batch(seed=0, step=0, batch_size=10, image_token="<image>")
    ids = [tokenizer(prompt).input_ids for _, _, prompt, _ in batch]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert max(map(len, ids)) < 100  # a character tokenizer needs several times as many
    assert all(0 <= answer < 5 and 0 <= label < len(vlm.STREAMS[s].spec.class_names) for s, label, _, answer in batch)
    two = question_batch(seed=0, step=0, batch_size=10, image_token="<image>", options=2)
    assert [s for s, *_ in two] == [s for s, *_ in batch]
    assert all(prompt.count("\nB. ") == 1 and "\nC. " not in prompt and answer < 2 for *_, prompt, answer in two)


def test_training_lowers_the_letter_loss(cache):
    _, _, losses = vlm.train(small(steps=12), progress=False)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5


def test_a_cached_vlm_is_not_trained_again(built):
    folder, _ = built
    stamp = (folder / WEIGHTS).stat().st_mtime_ns
    assert ensure_vlm(folder) == folder and resolve_vlm("mini").folder == folder
    assert (folder / WEIGHTS).stat().st_mtime_ns == stamp


def test_the_grid_check_reads_the_planned_config_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    runs = load_config("mini", ["stream=mini-signs", "strategy=zeroshot", "seed=0", "vqa.model=mini"]).expand()
    assert runs[0].vqa.model == "mini" and vqa_problems(runs) == []
    assert not (tmp_path / "empty").exists()  # neither the backbone nor the VLM was built
    config = resolve_vlm("mini").config()
    assert config.model_type == "llava" and config.vision_feature_layer == -2
    assert config.vision_config.hidden_size == 64 and config.text_config.vocab_size == len(vlm.tokenizer())


def test_bad_specs_are_refused_naming_the_allowed_forms(tmp_path):
    with pytest.raises(ConfigError, match="mini"):
        load_config(None, ["vqa.model=minix"])
    for spec in ("mini:relative-name", "mini:llava:/x"):
        with pytest.raises(VLMError, match="mini:/path/to/folder"):
            resolve_vlm(spec)
    with pytest.raises(VLMError, match=r"invalid value 'minix:/x'; allowed: \(did you mean 'mini'\?\) .*llava:/path/to/folder"):
        resolve_vlm("minix:/x")


def test_pretrain_mini_vlm_verb(cache, tmp_path, capsys):
    out = tmp_path / "vlm"
    assert main(["pretrain-mini", "--vlm", "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 1 and "VQA accuracy (letter) mini-signs" in capsys.readouterr().out
    assert main(["pretrain-mini", "--vlm", "--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out


def test_a_mini_run_scores_vqa_with_the_mini_vlm(built, tmp_path):
    small_sets = [f"{name}.{key}=2" for name in ("mini-signs", "mini-shapes", "mini-colours", "mini-digits")
                  for key in ("train_per_class", "test_per_class")]
    overrides = [f"out={tmp_path}", "stream=mini-signs", "strategy=full-ft", "seed=0", "shots=2", "sessions=2",
                 "train.epochs=1", "vqa.model=mini", *small_sets]
    assert main(["run", "mini", "--no-progress", *overrides]) == 0
    (run,) = load_config("mini", overrides).expand()
    rows = [json.loads(line) for line in (run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    vqa = {(r["session"], r["dataset"]) for r in rows if r["metric"] == "vqa_acc"}
    assert vqa == {(s, d) for s in (0, 2) for d in ("mini-signs", "mini-shapes", "mini-colours", "mini-digits")}
    summary = json.loads((run_dir(run) / "summary.json").read_text())
    assert summary["vqa"]["target"] == "mini-signs" and summary["vqa"]["evaluated"] == [0, 2]


def test_the_standardisation_folds_into_the_projector():
    generator = torch.Generator().manual_seed(0)

    class Projector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear_1, self.linear_2 = torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear_2(torch.nn.functional.gelu(self.linear_1(x)))

    x = 5 + 3 * torch.randn(2, 7, 6, generator=generator)
    standardised = vlm.Standardised(Projector(), x.flatten(0, 1).mean(0), x.flatten(0, 1).std(0))
    expected = standardised(x).detach()
    torch.testing.assert_close(standardised.fold()(x), expected, rtol=1e-4, atol=1e-5)
