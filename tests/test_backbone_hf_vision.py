"""The ``hf-vision:`` backbone family: an HF vision tower alone (no text tower), from a SiglipVisionModel folder
written by ``fscl export --format hf-siglip-vision``'s writer, or taken out of a VLM folder."""
import pytest
import torch

from benchmark.backbones import backbone_skeleton, check_backbone_string, load_backbone, weights_source
from benchmark.backbones.hf import NoTextTowerError, save_tiny_clip, save_tiny_siglip
from benchmark.backbones.openclip import BackboneLoadError
from benchmark.cli import main
from benchmark.export import write_hf_siglip_vision


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """An ``hf:`` tiny SiglipModel backbone."""
    return load_backbone(f"hf:{save_tiny_siglip(tmp_path_factory.mktemp('siglip'))}").eval()


@pytest.fixture(scope="module")
def tower_folder(siglip, tmp_path_factory):
    return write_hf_siglip_vision(siglip, tmp_path_factory.mktemp("tower") / "tower")


@pytest.fixture(scope="module")
def tower(tower_folder):
    return load_backbone(f"hf-vision:{tower_folder}").eval()


def test_a_tower_folder_loads_frozen_with_the_image_features_of_its_siglip(tower, siglip):
    assert not tower.has_text_tower and siglip.has_text_tower
    assert not any(p.requires_grad for p in tower.parameters())
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_image(images()), siglip.encode_image(images()), rtol=0, atol=0)
    assert tower.image_normalisation == ((0.5,) * 3, (0.5,) * 3)
    assert tower.image_projection() is None  # SigLIP: the attention-pool head, no projection


def test_block_views_and_trainable_parts_are_the_towers(tower):
    blocks = tower.blocks()
    assert len(blocks) == 2 and (blocks[0].num_heads, blocks[0].head_dim) == (4, 16)
    assert blocks[1].q.weight is blocks[1].module.self_attn.q_proj.weight
    assert len(tower.norm_layers()) == 2 * 2 + 1 + 1  # two per block, post_layernorm, the head's
    assert any(b is blocks[0].v.bias for b in tower.bias_parameters())


def test_the_text_side_says_there_is_none(tower):
    for call in (lambda: tower.tokenize(["a"]), lambda: tower.encode_text(torch.zeros(1, 4, dtype=torch.long)),
                 lambda: tower.logit_scale, lambda: tower.text_features(["a"])):
        with pytest.raises(NoTextTowerError, match=r"vision tower alone \(hf-vision:\).*VQA.*\*-ppl"):
            call()


def test_skeleton_and_weights_source_need_no_weights(tower_folder, tmp_path):
    skeleton = backbone_skeleton(f"hf-vision:{tower_folder}")
    assert skeleton.blocks()[0].q.weight.device.type == "meta" and not skeleton.has_text_tower
    assert weights_source(f"hf-vision:{tower_folder}").ready
    assert not weights_source(f"hf-vision:{tmp_path}").ready


def test_preprocess_resizes_to_the_tower_input(tower):
    from PIL import Image

    assert tower.preprocess(False)(Image.new("RGB", (8, 8), "white")).shape == (3, 32, 32)


def test_a_clip_vision_folder_loads_with_its_projection(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from benchmark.export import to_hf_clip_vision

    clip = load_backbone(f"hf:{save_tiny_clip(tmp_path / 'clip')}").eval()
    to_hf_clip_vision(clip).save_pretrained(tmp_path / "clip-tower")
    tower = load_backbone(f"hf-vision:{tmp_path / 'clip-tower'}").eval()
    assert isinstance(tower.model, CLIPVisionModelWithProjection)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_image(images()), clip.encode_image(images()), rtol=0, atol=0)
    assert tower.image_projection()[0] is tower.model.visual_projection


def test_bad_inputs_are_refused_with_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="hf-vision: needs a local folder or a hub id"):
        check_backbone_string("hf-vision:")
    with pytest.raises(BackboneLoadError, match="no config.json.*SiglipVisionModel.save_pretrained"):
        load_backbone(f"hf-vision:{tmp_path}")
    whole = save_tiny_siglip(tmp_path / "whole")
    with pytest.raises(BackboneLoadError, match=rf"'siglip' model.*pass a CLIPModel / SiglipModel folder as hf:{whole}"):
        load_backbone(f"hf-vision:{whole}")
    (tmp_path / "other").mkdir()  # a model with no vision tower
    (tmp_path / "other" / "config.json").write_text('{"model_type": "gemma", "vocab_size": 10}')
    with pytest.raises(BackboneLoadError, match="'gemma' model; hf-vision: takes a vision tower .* or a VLM holding"):
        load_backbone(f"hf-vision:{tmp_path / 'other'}")


def test_ls_backbones_lists_the_family(capsys):
    assert main(["ls", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "hf-vision" in out and "no text tower" in out and "hf-vision:/path/to/vlm-folder" in out


@pytest.mark.parametrize("family", ["paligemma", "llava"])
def test_the_tower_of_a_vlm_folder_is_its_vision_tower(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from benchmark.vlm.llava import save_tiny_llava, vision_tower
    from benchmark.vlm.paligemma import save_tiny_paligemma

    folder = (save_tiny_paligemma if family == "paligemma" else save_tiny_llava)(tmp_path / family)
    tower = load_backbone(f"hf-vision:{folder}").eval()
    theirs = vision_tower(AutoModelForImageTextToText.from_pretrained(folder)).eval()
    ours = dict(tower.model.named_parameters())
    assert ours.keys() == dict(theirs.named_parameters()).keys()
    assert all(torch.equal(ours[name], p) for name, p in theirs.named_parameters())
    with torch.no_grad():
        hidden = theirs(pixel_values=images()).last_hidden_state
        expected = hidden.mean(dim=1) if family == "paligemma" else theirs(pixel_values=images()).pooler_output
        torch.testing.assert_close(tower.encode_image(images()), expected, rtol=0, atol=0)
    assert backbone_skeleton(f"hf-vision:{folder}").blocks()[0].q.weight.device.type == "meta"
    (folder / "model.safetensors").unlink()
    with pytest.raises(BackboneLoadError, match="model.safetensors is missing"):
        load_backbone(f"hf-vision:{folder}")


def test_a_llava_takes_its_own_tower_back_from_hf_vision(tmp_path):
    from PIL import Image

    from benchmark.vlm.llava import save_tiny_llava
    from benchmark.vlm.spec import resolve_vlm

    folder = save_tiny_llava(tmp_path / "llava")
    family = resolve_vlm(f"llava:{folder}")
    family.check_encoder(backbone_skeleton(f"hf-vision:{folder}"))
    vlm = family.load(torch.device("cpu"))
    batch = vlm.inputs([Image.new("RGB", (40, 30), "red")], [vlm.prompt("which? A. x B. y")])
    with torch.no_grad():
        before = vlm.answer_logits(batch)
        vlm.swap_encoder(load_backbone("openclip:fscl-tiny"))  # another encoder of the tower's shape
        other = vlm.answer_logits(batch)
        vlm.swap_encoder(load_backbone(f"hf-vision:{folder}"))
        torch.testing.assert_close(vlm.answer_logits(batch), before, rtol=0, atol=0)
    assert not torch.equal(other, before)
