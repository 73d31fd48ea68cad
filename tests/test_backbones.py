"""open_clip backbone: load strings, local checkpoints, offline failure, block views."""
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from benchmark.backbones import load_backbone
from benchmark.backbones.openclip import BackboneLoadError, resolve_name


def _perturbed_state(backbone):
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    state["visual.proj"] += 1.0
    return state


def test_checkpoint_file_is_loaded(tmp_path, tiny_backbone):
    state = _perturbed_state(tiny_backbone)
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = load_backbone(f"openclip:fscl-tiny@{path}")
    assert torch.equal(loaded.model.visual.proj, state["visual.proj"])
    assert not torch.equal(loaded.model.visual.proj, tiny_backbone.model.visual.proj)


def test_local_dir_is_loaded(tmp_path, tiny_backbone):
    state = _perturbed_state(tiny_backbone)
    cfg = open_clip.get_model_config("fscl-tiny")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(state, tmp_path / "open_clip_model.safetensors")
    loaded = load_backbone(f"openclip:local-dir:{tmp_path}")
    assert torch.equal(loaded.model.visual.proj, state["visual.proj"])
    assert loaded.tokenize(["a cat"]).shape == (1, cfg["text_cfg"]["context_length"])


def test_missing_checkpoint_and_offline_hub_tag_say_what_to_pass(tmp_path):
    with pytest.raises(BackboneLoadError, match="checkpoint file not found"):
        load_backbone(f"openclip:fscl-tiny@{tmp_path}/none.pt")
    with pytest.raises(BackboneLoadError, match="openclip:ViT-B-32-quickgelu@/path/to/weights.pt"):
        load_backbone("openclip:ViT-B-32@openai")


@pytest.mark.parametrize("name", ["ViT-L-14-336", "ViT-L-14-336-quickgelu", "ViT-B-16"])
def test_openai_weights_build_the_quickgelu_model(name):
    resolved = resolve_name(name, "openai")
    assert resolved.endswith("-quickgelu")
    # the activation the resolved config builds, on a tiny copy of its towers (no download)
    cfg = open_clip.get_model_config(resolved)
    tiny = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=16),
                text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    model = open_clip.model.CLIP(quick_gelu=cfg["quick_gelu"], **tiny)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_gelu_weights_and_local_files_keep_the_named_config(tmp_path):
    assert resolve_name("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"
    assert resolve_name("ViT-B-16", None) == "ViT-B-16"
    assert resolve_name("ViT-B-16", f"{tmp_path}/weights.pt") == "ViT-B-16"
    assert resolve_name("ViT-B-16", "no-such-tag") == "ViT-B-16"  # open_clip names the known tags


def test_everything_starts_frozen_and_encoders_have_the_documented_shapes(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert tiny_backbone.encode_image(images).shape == (3, 32)
    assert tiny_backbone.text_features(["a", "b"]).norm(dim=-1).allclose(torch.ones(2))


def test_block_views_expose_fused_qkv_rows(tiny_backbone):
    blocks = tiny_backbone.blocks()
    assert len(blocks) == 2
    block = blocks[0]
    attn = block.module.attn
    assert (block.num_heads, block.head_dim, block.width) == (4, 16, 64)
    assert block.q.weight is block.k.weight is block.v.weight is attn.in_proj_weight
    assert torch.equal(block.k.weight_rows(), attn.in_proj_weight[64:128])
    assert block.head_rows(2) == slice(32, 48)
    assert block.fc1.weight.shape == (256, 64)
    with pytest.raises(IndexError):
        block.head_rows(4)
