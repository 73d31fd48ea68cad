"""The ``hf:`` backbone family: a local transformers CLIP folder, separate q/k/v block views, offline errors."""
import time

import pytest
import torch
from torch import nn

from benchmark.backbones import check_backbone_string, load_backbone
from benchmark.backbones.hf import save_tiny_clip
from benchmark.backbones.openclip import BackboneLoadError


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("hf-tiny"))


@pytest.fixture(scope="module")
def hf_backbone(hf_folder):
    return load_backbone(f"hf:{hf_folder}")


def test_folder_loads_frozen_with_working_encoders(hf_backbone, hf_folder):
    assert not any(p.requires_grad for p in hf_backbone.parameters())
    assert hf_backbone.encode_image(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))).shape == (3, 32)
    tokens = hf_backbone.tokenize(["a photo of the digit 3.", "zero"])
    # <start> z e r o</w> <end>, then padding with <end>
    assert tokens.shape == (2, 32) and tokens[1, 0] == 0 and tokens[1, 4] != 1 and (tokens[1, 5:] == 1).all()
    feats = hf_backbone.text_features(["a photo of the digit 3.", "zero"])
    assert feats.shape == (2, 32) and feats.norm(dim=-1).allclose(torch.ones(2))
    assert not torch.allclose(feats[0], feats[1])  # the character tokenizer tells texts apart
    reloaded = load_backbone(f"hf:{hf_folder}")
    assert torch.equal(reloaded.visual.projection.weight, hf_backbone.visual.projection.weight)


def test_preprocess_resizes_to_the_model_input(hf_backbone):
    from PIL import Image

    image = Image.new("RGB", (8, 8), "white")
    assert hf_backbone.preprocess(True)(image).shape == (3, 32, 32)
    assert hf_backbone.preprocess(False)(image).shape == (3, 32, 32)


def test_block_views_expose_separate_qkv_projections(hf_backbone):
    blocks = hf_backbone.blocks()
    assert len(blocks) == 2
    block = blocks[1]
    attn = block.module.self_attn
    assert (block.num_heads, block.head_dim, block.width) == (4, 16, 64)
    assert block.q.weight is attn.q_proj.weight and block.k.weight is attn.k_proj.weight
    assert block.v.weight is attn.v_proj.weight and block.v.bias is attn.v_proj.bias
    assert block.q.weight is not block.k.weight and block.q.rows == slice(0, 64)
    assert block.fc1 is block.module.mlp.fc1 and block.fc1.weight.shape == (256, 64)
    assert all(isinstance(n, nn.LayerNorm) for n in block.norms)
    # the vision tower's blocks, not the text tower's
    assert block.module is hf_backbone.model.vision_model.encoder.layers[1]


def test_other_trainable_parts_are_found_by_type(hf_backbone):
    module, name = hf_backbone.image_projection()
    assert getattr(module, name) is hf_backbone.model.visual_projection.weight
    assert len(hf_backbone.norm_layers()) == 2 * 2 + 2  # two per block + pre and post
    biases = hf_backbone.bias_parameters()
    assert any(b is hf_backbone.blocks()[0].q.bias for b in biases) and all(b.dim() == 1 for b in biases)
    text_params = {id(p) for p in hf_backbone.model.text_model.parameters()}
    assert not any(id(b) in text_params for b in biases)


def test_offline_hub_id_fails_fast_and_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(BackboneLoadError, match=r"hf:/path/to/DIR"):
        load_backbone("hf:openai/clip-vit-base-patch16")
    assert time.perf_counter() - start < 15


def test_bad_folders_and_empty_specs_are_rejected(tmp_path):
    with pytest.raises(BackboneLoadError, match="no config.json"):
        load_backbone(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="hf: needs a local folder or a hub id"):
        check_backbone_string("hf:")
