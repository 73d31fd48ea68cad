"""The mini VLM (``vqa.model: mini``): a small LLaVA-shaped model on a one-step mini encoder, built in a temporary
``$FSCL_CACHE`` — deterministic builds, the real ``from_pretrained`` path through the spec, the tower = the mini
encoder, answers by the encoder's zero-shot rule, VQA that rises when the encoder learns the target, a vocabulary
without ``<unk>``, the cache, the grid check without building, the CLI and a run."""
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
from streams.mini.vlm import WEIGHTS, VLMConfig, build, default_vlm_dir, ensure_vlm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

def small(seed: int = 0) -> VLMConfig:
    """The build on 2 renders per class (the projector's scale)."""
    return VLMConfig(seed=seed, pool=2)


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
    assert folder.parent == cache and folder.name == "mini-llava-v1.2.3-s0" and (folder / WEIGHTS).is_file()
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert "NOT LLaVA" in manifest["what"] and manifest["config"]["pool"] == 2 and manifest["seed"] == 0
    assert set(manifest["vqa_acc"]) == {"mini-shapes", "mini-colours", "mini-digits", "mini-handwritten", "mini-signs",
                                        "mini-spatial", "mini-pairs", "mini-yesno"}
    assert all(0 <= acc <= 1 for acc in manifest["vqa_acc"].values()) and len(manifest["weights_sha256"]) == 64


def test_every_seed_same_weights(built, tmp_path):
    _, manifest = built  # nothing in the build draws: the seed only names the cache folder (seed 0 again: below)
    other = build(tmp_path / "other", small(seed=1), progress=False)
    assert other["weights_sha256"] == manifest["weights_sha256"] and other["vqa_acc"] == manifest["vqa_acc"]
    assert default_vlm_dir(1) != default_vlm_dir(0)


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


def every_prompt() -> list[str]:
    """Every text the suite sends the mini VLM: each mini stream's VQA prompts in the conversation (letters, or its
    own) and their answers, and its VLM-loss pairs (class streams: every class; own-question streams: every test row)."""
    from benchmark.registry import STREAMS
    from benchmark.vlm.llava import conversation
    from benchmark.vqa.build import build_question_set
    from benchmark.vqa.pairs import user_text

    texts = []
    for name in ("mini-shapes", "mini-colours", "mini-digits", "mini-handwritten", "mini-signs", "mini-spatial",
                 "mini-pairs", "mini-yesno"):
        stream = STREAMS.get(name).obj(".", None)
        test = stream.dataset("test")
        qset = build_question_set(stream, test=test)
        texts += [conversation(qset.prompt(item)) + " " + answer for item in qset.items for answer in qset.answers(item)]
        if stream.spec.own_questions:
            texts += [" ".join(q.pair) for q in test.questions]
        else:
            texts += [user_text(stream.spec.vqa_question) + " " + stream.spec.ppl_answer.format(c)
                      for c in stream.spec.class_names]
    return texts


def test_the_vocabulary_covers_every_prompt_the_suite_sends_with_single_letter_and_class_tokens():
    tokenizer = vlm.tokenizer()
    assert len(letter_tokens(tokenizer, LETTERS)) == 5
    assert tokenizer.convert_tokens_to_ids("<image>") not in (None, tokenizer.unk_token_id)
    unknown = {text for text in every_prompt() if tokenizer.unk_token_id in tokenizer(text).input_ids}
    assert not unknown, sorted(unknown)[:3]
    for name in ("red circle with the number 3", "circle", "7", "K"):
        assert len(tokenizer(name, add_special_tokens=False).input_ids) == 1
    assert tokenizer.decode(tokenizer("A. red circle with the number 3").input_ids, skip_special_tokens=True) \
        == "A. red circle with the number 3"


def test_the_vlm_answers_a_lettered_question_by_the_encoders_zero_shot_rule(built):
    """Every answer letter is the option whose class name's zero-shot weight is closest to the image token of the
    class token (the projector's reading of the encoder's image head); that reading agrees with the encoder's own
    image embedding on the choice among the options for nearly every question (ln_post's per-image scale is a mean)."""
    import torch.nn.functional as F

    from benchmark.registry import STREAMS
    from benchmark.vqa.build import build_question_set
    from benchmark.vqa.evaluate import VQASet, score_set
    from streams.mini.language import Layout

    loaded = resolve_vlm("mini").load("cpu")
    backbone = load_backbone("mini")
    projector, layout = loaded.projector, Layout()
    words = loaded.model.get_input_embeddings().weight[:, layout.T]  # the class names' weights, as the VLM holds them
    for name in ("mini-signs", "mini-colours"):
        stream = STREAMS.get(name).obj(".", None)
        test = stream.dataset("test")
        qset = build_question_set(stream, test=test)
        images = test.with_transform(None)
        pixels = torch.stack([backbone.preprocess(False)(images[i][0]) for i in range(len(test))])
        with torch.no_grad():
            embeddings = backbone.encode_image(pixels)
            read = projector(backbone.hidden_states(pixels, -1)[:, 0])[:, layout.S]
            weights = torch.stack([F.normalize(backbone.text_features(
                [t.format(c) for t in stream.spec.templates]), dim=-1).mean(0) for c in stream.spec.class_names])
        names = list(stream.spec.class_names)
        rules = [[int((e[i] @ w[[index(c) for c in item.choices]].T).argmax()) for i, item in enumerate(qset.items)]
                 for e, w, index in ((read, words, vlm.token_id), (embeddings, weights, names.index))]
        counts = score_set(loaded, VQASet(name, qset, images), 64)
        assert counts["correct"] == sum(r == item.answer for r, item in zip(rules[0], qset.items)), name
        assert sum(a == b for a, b in zip(*rules)) >= 0.97 * len(qset.items), name


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
    assert config.model_type == "llava" and config.vision_feature_layer == -1
    assert config.vision_feature_select_strategy == "full" and config.projector_hidden_act == "linear"
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
    assert main(["pretrain-mini", "--vlm", "--out", str(out), "--steps", "1"]) == 2
    assert "the mini VLM is built, not trained" in capsys.readouterr().err and not out.exists()
    assert main(["pretrain-mini", "--vlm", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == vlm.RECIPE and "VQA accuracy (letter) mini-signs" in capsys.readouterr().out
    assert main(["pretrain-mini", "--vlm", "--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out


def test_a_mini_run_scores_vqa_with_the_mini_vlm(built, tmp_path):
    datasets = ("mini-signs", "mini-shapes", "mini-colours", "mini-digits", "mini-spatial", "mini-pairs", "mini-yesno")
    small_sets = [f"{name}.{key}=2" for name in datasets for key in ("train_per_class", "test_per_class")]
    overrides = [f"out={tmp_path}", "stream=mini-signs", "strategy=full-ft", "seed=0", "shots=2", "sessions=2",
                 "train.epochs=1", "vqa.model=mini", *small_sets]
    assert main(["run", "mini", "--no-progress", *overrides]) == 0
    (run,) = load_config("mini", overrides).expand()
    rows = [json.loads(line) for line in (run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    vqa = {(r["session"], r["dataset"]) for r in rows if r["metric"] == "vqa_acc"}
    assert vqa == {(s, d) for s in (0, 2) for d in datasets}
    summary = json.loads((run_dir(run) / "summary.json").read_text())
    assert summary["vqa"]["target"] == "mini-signs" and summary["vqa"]["evaluated"] == [0, 2]


def test_vqa_on_mini_signs_rises_when_full_fine_tuning_teaches_the_encoder_the_target(built, tmp_path):
    """The mini VLM's VQA follows its encoder: full fine-tuning of the (one-step) mini encoder on mini-signs (one
    session of every class, 5 shots) raises its VQA accuracy on mini-signs by more than 10 points, for seeds 0-2."""
    sizes = ["mini-signs.train_per_class=8", "mini-signs.test_per_class=10"]
    overrides = [f"out={tmp_path}", "stream=mini-signs", "strategy=full-ft", "seed=[0,1,2]", "shots=5", "sessions=1",
                 "train.epochs=10", "full-ft.train.lr=1e-3", "controls=[]", "vqa.model=mini", *sizes]
    assert main(["run", "mini", "--no-progress", *overrides]) == 0
    gains = [json.loads((run_dir(run) / "summary.json").read_text())["vqa"]["target_improvement"]
             for run in load_config("mini", overrides).expand()]
    assert min(gains) > 0.10, gains
