"""``fscl export``: a run's encoder after session N as an HF CLIPVisionModel folder or an open_clip folder.

One tiny OpenAI-layout open_clip ViT (quick_gelu, as OpenAI CLIP) trained two LoRSU sessions
through ``fscl run``; the exported HF model must give the open_clip image features (1e-5), load
as the vision tower of a tiny LLaVA, and the fused→separate conversion must leave LoRSU's
importance scores and head choices unchanged.
"""
from __future__ import annotations

import json
import re
import textwrap

import open_clip
import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import _HFVisual, hf_block_views
from benchmark.cli import main
from benchmark.config import TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.export import ExportError, encoder_after, to_hf_clip_vision
from benchmark.records import RunLock, RunRecord
from benchmark.template import CLIPTemplate
from strategies.lorsu import LoRSU, LoRSUOptions
from streams.digits import Digits

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

MODEL = "fscl-test-quickgelu"
SPEC = f"openclip:{MODEL}"
TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The tiny quick_gelu ViT registered with open_clip; its backbone string."""
    folder = tmp_path_factory.mktemp("model")
    (folder / f"{MODEL}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(folder / f"{MODEL}.json")
    return SPEC


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    """A finished 2-session LoRSU run of the tiny quick_gelu ViT that kept only its last checkpoint."""
    out = tmp_path_factory.mktemp("export") / "runs"
    assert main(["run", "quick", f"out={out}", "--no-progress", "seed=0", "train.epochs=1", "shots=2",
                 "digits.test_fraction=0.05", "strategy=lorsu", "lorsu.rank=4", "train.lr=0.01", f"backbone={SPEC}",
                 "keep_checkpoints=last"]) == 0
    (run,) = out.glob("quick/digits/*/lorsu/2-s0")
    return run


def encoder_from_checkpoint(run, session: int):
    """The backbone with the checkpoint's encoder, loaded here without benchmark.export."""
    backbone = load_backbone(SPEC)
    state = torch.load(run / "checkpoints" / f"session-{session}.pt", map_location="cpu", weights_only=False)
    backbone.visual.load_state_dict(state["encoder"])
    return backbone.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def printed_snippet(out: str) -> dict:
    """The names that the loading snippet printed by ``fscl export`` (after "load it in a script:") defines."""
    code = textwrap.dedent(out.split("load it in a script:\n", 1)[1])
    names: dict = {}
    exec(code, names)
    return names


def test_hf_export_gives_the_open_clip_image_features(run_dir, tmp_path, capsys):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out = tmp_path / "tower"
    assert main(["export", str(run_dir), "--session", "2", "--format", "hf-clip-vision", "--out", str(out)]) == 0
    snippet = printed_snippet(capsys.readouterr().out)
    assert isinstance(snippet["model"], CLIPVisionModelWithProjection)
    assert isinstance(snippet["processor"], CLIPImageProcessor)
    trained = encoder_from_checkpoint(run_dir, 2)
    pretrained = load_backbone(SPEC).eval()
    hf = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    assert hf.config.hidden_act == "quick_gelu" and hf.config.num_hidden_layers == 2
    x = images()
    with torch.no_grad():
        expected = trained.encode_image(x)
        assert not torch.allclose(expected, pretrained.encode_image(x), atol=1e-4)  # the sessions changed it
        torch.testing.assert_close(hf(pixel_values=x).image_embeds, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(snippet["model"].eval()(pixel_values=x).image_embeds, expected, rtol=0, atol=1e-5)
    processor = CLIPImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))


def test_tiny_llava_takes_the_exported_tower(run_dir, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    out = tmp_path / "tower"
    assert main(["export", str(run_dir), "--session", "2", "--format", "hf-clip-vision", "--out", str(out)]) == 0
    image_token = 63
    config = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(out),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64),
        image_token_id=image_token, vision_feature_layer=-2, vision_feature_select_strategy="default")
    llava = LlavaForConditionalGeneration(config).eval()
    tower = CLIPVisionModel.from_pretrained(out).eval()  # as LLaVA-1.5 loads its vision tower
    llava.model.vision_tower.load_state_dict(tower.state_dict())  # strict: every name and shape matches
    x = images(1)
    patches = (32 // 8) ** 2  # "default" drops the class token
    input_ids = torch.tensor([[1] + [image_token] * patches + [5, 6, 7]])
    with torch.no_grad():
        logits = llava(input_ids=input_ids, pixel_values=x).logits
        ours = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        theirs = llava.model.vision_tower(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert logits.shape == (1, input_ids.shape[1], 64) and torch.isfinite(logits).all()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_openclip_export_loads_as_a_local_dir_backbone(run_dir, tmp_path, capsys):
    out = tmp_path / "oc"
    assert main(["export", str(run_dir), "--session", "2", "--format", "openclip", "--out", str(out)]) == 0
    snippet = printed_snippet(capsys.readouterr().out)
    exported = load_backbone(f"openclip:local-dir:{out}").eval()
    trained = encoder_from_checkpoint(run_dir, 2)
    tokens = trained.tokenize(["a photo of the number: 3."])
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images()), trained.encode_image(images()), rtol=0, atol=0)
        torch.testing.assert_close(exported.encode_text(tokens), trained.encode_text(tokens), rtol=0, atol=0)
        plain = snippet["model"].eval()  # open_clip alone, as the printed snippet loads it
        torch.testing.assert_close(plain.encode_image(images()), trained.encode_image(images()), rtol=0, atol=0)
        torch.testing.assert_close(plain.encode_text(snippet["tokenizer"](["a photo of the number: 3."])),
                                   trained.encode_text(tokens), rtol=0, atol=0)


def test_unstored_session_names_the_keep_checkpoints_setting(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--session", "1", "--format", "openclip", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "session 1 is not stored" in err and "keep_checkpoints=all" in err and "keep_checkpoints: last" in err
    with pytest.raises(ExportError, match="sessions 1..2"):
        encoder_after(run_dir, 3)
    pretrained = encoder_after(run_dir, 0)  # session 0 needs no checkpoint
    torch.testing.assert_close(pretrained.encode_image(images()), load_backbone(SPEC).encode_image(images()))
    with pytest.raises(ExportError, match="not a run folder"):
        encoder_after(tmp_path, 1)


def test_a_run_that_kept_no_checkpoint_is_exported_after_the_command_the_error_gives(tiny_model, tmp_path, capsys):
    """The advice says --force: without it the finished run would be skipped, keeping no checkpoint."""
    out = tmp_path / "runs"
    assert main(["run", "quick", f"out={out}", "--no-progress", "seed=0", "shots=2", "strategy=zeroshot",
                 "digits.test_fraction=0.05", f"backbone={tiny_model}"]) == 0
    (run,) = out.glob("quick/digits/*/zeroshot/2-s0")
    capsys.readouterr()
    target = ["export", str(run), "--session", "1", "--format", "openclip", "--out", str(tmp_path / "oc")]
    assert main(target) == 2
    (advice,) = re.findall(r"'(fscl run [^']+)'", capsys.readouterr().err)
    assert advice == f"fscl run {run / 'config.yaml'} keep_checkpoints=all --force"
    assert main(["run", *advice.split()[2:-1]]) == 0 and "1 skipped" in capsys.readouterr().out  # no --force: skipped
    assert main(["run", *advice.split()[2:], "--no-progress"]) == 0 and "1 finished" in capsys.readouterr().out
    assert main(target) == 0


def test_hf_export_refuses_towers_it_cannot_express():
    backbone = load_backbone("openclip:fscl-tiny")  # plain GELU is fine; a timm trunk is not (see families tests)
    assert to_hf_clip_vision(backbone).config.hidden_act == "gelu"
    backbone.visual.ln_pre = torch.nn.Identity()
    with pytest.raises(ExportError, match="no ln_pre.*--format openclip"):
        to_hf_clip_vision(backbone)


def test_hf_clip_backbone_exports_as_it_is(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from benchmark.backbones.hf import save_tiny_clip

    backbone = load_backbone(f"hf:{save_tiny_clip(tmp_path / 'clip')}").eval()
    hf = to_hf_clip_vision(backbone)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images()).image_embeds, backbone.encode_image(images()),
                                   rtol=0, atol=0)
    assert isinstance(hf, CLIPVisionModelWithProjection)


def scores_and_heads(backbone, blocks):
    """LoRSU's importance scores and head choices of ``blocks`` on one digits session of ``backbone``."""
    stream = Digits("unused")
    tf = backbone.preprocess(False)
    scenario = stream.benchmark(stream.sessions(2, 2, shot_seed=0), tf, tf)
    template = CLIPTemplate(
        backbone=backbone, class_names=stream.spec.class_names, templates=stream.spec.templates[:1],
        train=TrainConfig(epochs=1, batch_size=8), zeroshot=ZeroShotEvaluator(backbone), seed=0,
        device=torch.device("cpu"), plugins=[], evaluator=EvaluationPlugin(loggers=[]))
    template.experience = scenario.train_stream[0]
    template.adapted_dataset = template.experience.dataset
    template.make_train_dataloader(shuffle=False)
    lorsu = LoRSU(load_backbone(SPEC), LoRSUOptions(top_k_heads=2))  # score/select use only the given blocks
    scores = lorsu.score(template, blocks)
    return scores, lorsu.select(blocks, scores)


def test_lorsu_scores_and_heads_are_the_same_on_the_separate_qkv_form(run_dir):
    fused = load_backbone(SPEC)
    separate = load_backbone(SPEC)
    hf = to_hf_clip_vision(separate)
    separate.model.visual = separate.visual = _HFVisual(hf.vision_model, hf.visual_projection)
    hf_blocks = hf_block_views(hf.vision_model)
    assert hf_blocks[0].q.weight is not hf_blocks[0].k.weight  # really separate q/k/v linears
    fused_scores, fused_sel = scores_and_heads(fused, fused.blocks())
    separate_scores, separate_sel = scores_and_heads(separate, hf_blocks)
    assert all(s.q.abs().sum() > 0 and s.fc1.abs().sum() > 0 for s in fused_scores)
    for a, b, sa, sb in zip(fused_scores, separate_scores, fused_sel, separate_sel):
        for x, y in ((a.q, b.q), (a.k, b.k), (a.v, b.v), (a.fc1, b.fc1)):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(sb.head_scores, sa.head_scores, rtol=1e-4, atol=0)
        assert sb.heads == sa.heads and torch.equal(sb.fc1_index, sa.fc1_index)


def test_a_failed_run_s_missing_session_is_explained_by_its_failure(tmp_path, capsys):
    run = tmp_path / "run"
    record = RunRecord(run)
    record.start({"backbone": SPEC, "sessions": 2, "keep_checkpoints": "all"}, {"seed": 0}, {"session_1": ["a"]})
    record.update_manifest(status="failed", reason="session 1: non-finite loss (nan)")
    with pytest.raises(ExportError) as err:
        encoder_after(run, 2)
    assert "the run is failed: session 1: non-finite loss (nan)" in str(err.value)
    assert "keep_checkpoints=all" not in str(err.value)  # it was set: no advice to set it


def test_a_run_whose_process_is_gone_is_said_interrupted_with_the_command_that_resumes_it(tmp_path):
    run = tmp_path / "run"
    record = RunRecord(run)
    record.start({"backbone": "openclip:fscl-tiny", "sessions": 2, "keep_checkpoints": "all"}, {"seed": 0}, {"session_1": ["a"]})
    record.update_manifest(command=["/usr/bin/fscl", "run", "quick", "seed=0"])
    with pytest.raises(ExportError) as err:  # status running, no lock: its process died
        encoder_after(run, 2)
    assert ("the run was interrupted (its status says running, but its process is gone); the command that started "
            "it resumes it (fscl run quick seed=0); its checkpoints keep no session") in str(err.value)
    with RunLock(run), pytest.raises(ExportError, match="the run is still running; its checkpoints"):
        encoder_after(run, 2)  # a live process (this one) holds it
    record.update_manifest(status="interrupted", reason="interrupted in training session 2")
    with pytest.raises(ExportError, match=r"the run was interrupted: interrupted in training session 2; the command"):
        encoder_after(run, 2)


def test_hf_siglip_export_loads_in_transformers_with_the_backbone_s_features(tmp_path):
    from transformers import SiglipImageProcessor, SiglipVisionModel

    from benchmark.backbones.hf import save_tiny_siglip
    from benchmark.export import loading_snippet, write_hf_siglip_vision

    backbone = load_backbone(f"hf:{save_tiny_siglip(tmp_path / 'siglip')}").eval()
    out = write_hf_siglip_vision(backbone, tmp_path / "tower")
    names = printed_snippet("load it in a script:\n" + loading_snippet("hf-siglip-vision", out))
    assert isinstance(names["model"], SiglipVisionModel) and isinstance(names["processor"], SiglipImageProcessor)
    processor = names["processor"]
    assert (processor.size.height, processor.size.width) == (32, 32) and list(processor.image_mean) == [0.5] * 3
    with torch.no_grad():
        torch.testing.assert_close(names["model"](pixel_values=images()).pooler_output, backbone.encode_image(images()),
                                   rtol=0, atol=0)
    again = write_hf_siglip_vision(load_backbone(f"hf-vision:{out}"), tmp_path / "again")  # from the tower alone
    with torch.no_grad():
        torch.testing.assert_close(SiglipVisionModel.from_pretrained(again)(pixel_values=images()).pooler_output,
                                   backbone.encode_image(images()), rtol=0, atol=0)


def test_hf_siglip_export_refuses_other_backbones(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--session", "0", "--format", "hf-siglip-vision",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "needs a transformers SigLIP tower" in err and f"not '{SPEC}'" in err and "--format openclip" in err
    assert not (tmp_path / "x").exists()
