"""Every encoder family behind one block view, on tiny offline models.

Families beyond the fused open_clip ViT and HF CLIPModel (covered in test_strategies): open_clip
with a timm EVA02 trunk (separate q/k/v, SwiGLU MLP, rotary embeddings) or an EVA01 trunk (fused
bias-less qkv, separate q/v biases), open_clip SigLIP (timm
ViT trunk with one fused ``qkv`` linear, attention-pool head, a hub tokenizer read from a local
folder) and HF ``SiglipModel``. For each: load, encode, block views, the activation-level q/k/v
update, and zero-shot evaluation plus one session of lorsu, lora and layernorm through ``fscl run``.
"""
from __future__ import annotations

import json
import math
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_char_tokenizer, save_tiny_siglip
from benchmark.backbones.openclip import BackboneLoadError, OpenCLIPBackbone
from benchmark.backbones.timm_trunk import route_qkv_through_module, timm_block_views
from benchmark.cli import main
from benchmark.export import ExportError, to_hf_clip_vision, write_openclip
from strategies.lorsu.update import HeadLoRA

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]

W, HEADS, HEAD_DIM, LAYERS = 64, 4, 16, 2
TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # builder arguments timm passes along
VISION = {"img_size": 32, "patch_size": 8, "embed_dim": W, "depth": LAYERS, "num_heads": HEADS}


@register_model
def fscl_test_eva02(pretrained: bool = False, **kwargs) -> Eva:
    """A tiny EVA02 trunk: separate q/k/v (no k bias), SwiGLU with its inner norm, rotary embeddings."""
    kwargs = {k: v for k, v in kwargs.items() if k not in TIMM_ONLY}
    return Eva(**{**VISION, "mlp_ratio": 4 * 2 / 3, "qkv_fused": False, "swiglu_mlp": True, "scale_mlp": True,
                  "scale_attn_inner": True, "use_rot_pos_emb": True, "ref_feat_shape": (4, 4), **kwargs})


@register_model
def fscl_test_eva01(pretrained: bool = False, **kwargs) -> Eva:
    """A tiny EVA01 trunk: fused bias-less qkv linear with separate q/v bias parameters, plain MLP."""
    kwargs = {k: v for k, v in kwargs.items() if k not in TIMM_ONLY}
    return Eva(**{**VISION, "mlp_ratio": 4.0, **kwargs})


@register_model
def fscl_test_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny SigLIP trunk: fused qkv linear, no class token, attention-pool (MAP) head."""
    kwargs = {k: v for k, v in kwargs.items() if k not in TIMM_ONLY}
    return VisionTransformer(**{**VISION, "class_token": False, "global_pool": "map", **kwargs})


CONFIGS = {
    "fscl-test-eva02": {  # as open_clip's EVA02 configs: the trunk's classifier is the projection
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "fscl_test_eva02", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "fscl-test-eva01": {  # as open_clip's EVA01-g-14
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "fscl_test_eva01", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "fscl-test-siglip": {  # as open_clip's SigLIP configs: no projection, a hub tokenizer
        "embed_dim": W, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "fscl_test_siglip", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 128, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": W, "heads": 2, "layers": 1,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}},
}
FAMILIES = ("eva02", "eva01", "siglip", "hf-siglip")


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """Load strings of the three families' tiny models (configs registered, files written)."""
    folder = tmp_path_factory.mktemp("families")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    siglip = folder / "siglip"  # a checkpoint with the tokenizer's files beside it
    save_char_tokenizer(siglip)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_file(open_clip.create_model("fscl-test-siglip").state_dict(), str(siglip / "weights.safetensors"))
    return {"eva02": "openclip:fscl-test-eva02", "eva01": "openclip:fscl-test-eva01",
            "siglip": f"openclip:fscl-test-siglip@{siglip}/weights.safetensors",
            "hf-siglip": f"hf:{save_tiny_siglip(folder / 'hf-siglip', width=W, layers=LAYERS, heads=HEADS)}"}


@pytest.fixture(params=FAMILIES)
def family(request, specs) -> tuple[str, str]:
    return request.param, specs[request.param]


def test_each_family_loads_frozen_encodes_and_exposes_its_blocks(family):
    name, spec = family
    backbone = load_backbone(spec).eval()
    assert not any(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        image = backbone.encode_image(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        text = backbone.encode_text(backbone.tokenize(["a photo of the number: 3.", "7"]))
    assert image.shape[0] == text.shape[0] == 2 and image.shape[1] == text.shape[1]
    blocks = backbone.blocks()
    assert len(blocks) == LAYERS
    for block in blocks:
        assert (block.num_heads, block.head_dim) == (HEADS, HEAD_DIM)
        assert all(p.weight_rows().shape == (W, W) for p in block.qkv)
        assert block.fc1.weight.shape[1] == W and len(block.norms) >= 2
        fused = block.q.weight is block.k.weight is block.v.weight
        assert fused == (name in ("siglip", "eva01"))
        if fused:  # timm's qkv linear: rows q 0:W, k W:2W, v 2W:3W
            assert [(p.rows.start, p.rows.stop) for p in block.qkv] == [(0, W), (W, 2 * W), (2 * W, 3 * W)]
        if name == "siglip":  # one bias shared like the weight
            assert block.q.bias is block.v.bias and block.q.bias.shape == (3 * W,)
        elif name == "eva01":  # q_bias and v_bias beside the fused weight, no k bias
            assert block.k.bias is None and block.q.bias.shape == block.v.bias.shape == (W,)
    projection = backbone.image_projection()
    if name.startswith("eva"):
        assert getattr(*projection) is backbone.visual.trunk.head.weight
    else:
        assert projection is None  # SigLIP's pooled features are the joint embedding
    norms = backbone.norm_layers()
    assert all(n in norms for b in blocks for n in b.norms)


def test_qkv_update_on_activations_equals_the_merged_weight_change(family):
    backbone = load_backbone(family[1]).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = backbone.encode_image(x)
    block = backbone.blocks()[1]
    update = HeadLoRA(block.qkv_rows((1, 3)), block.width, 4, 8.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for factor in (update.A, update.B):  # not the global RNG: the values must not depend on earlier tests
            factor.copy_(torch.randn(factor.shape, generator=gen))
        handle = block.add_qkv_update(update)
        updated = backbone.encode_image(x)
        handle.remove()
        torch.testing.assert_close(backbone.encode_image(x), original, rtol=0, atol=1e-6)
        assert (updated - original).norm() > 1e-2 * original.norm()  # the update matters (EVA outputs are ~1e-4)
        before = [p.weight_rows().clone() for p in block.qkv]
        block.merge_qkv_rows(update.rows, update.delta())
        # another fp32 summation order: the error scales with the outputs, not with each element
        torch.testing.assert_close(backbone.encode_image(x), updated, rtol=1e-4, atol=1e-4 * updated.abs().max().item())
    chosen = torch.zeros(W, dtype=torch.bool)
    for h in (1, 3):
        chosen[block.head_rows(h)] = True
    for proj, old in zip(block.qkv, before):
        changed_rows = (proj.weight_rows() != old).any(dim=1)
        assert torch.equal(changed_rows, chosen)


def test_zero_shot_and_one_session_of_lorsu_lora_layernorm_through_fscl_run(family, tmp_path):
    """Defaults only: on SigLIP (no image projection) lorsu's proj_lora turns itself off."""
    name, spec = family
    assert main(["run", "quick", f"out={tmp_path}", "--no-progress", "seed=0", "sessions=1", "train.epochs=1",
                 "shots=2", "digits.test_fraction=0.05", "train.lr=0.01", "strategy=[lorsu,lora,layernorm]",
                 f"backbone={spec}", "lorsu.rank=4", "lora.rank=4", "keep_checkpoints=all"]) == 0
    backbone = load_backbone(spec)
    pretrained = backbone.visual.state_dict()
    names = {id(p): n for n, p in backbone.visual.named_parameters()}
    qkv_names = {names[id(proj.weight)] for b in backbone.blocks() for proj in b.qkv}
    norm_names = {names[id(p)] for m in backbone.norm_layers() for p in m.parameters()}
    runs = sorted(tmp_path.glob("quick/digits/*/*/2-s0"))
    assert [r.parts[-2] for r in runs] == ["layernorm", "lora", "lorsu"]
    for run in runs:
        assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        top1 = {r["session"]: r["value"] for r in rows if r["metric"] == "top1" and r["dataset"] == "digits"}
        assert set(top1) == {0, 1} and all(0 <= v <= 1 for v in top1.values())  # zero-shot, then after session 1
        encoder = torch.load(run / "checkpoints" / "session-1.pt", map_location="cpu", weights_only=False)["encoder"]
        assert set(encoder) == set(pretrained)  # merged back into a plain encoder
        changed = {k for k, v in encoder.items() if not torch.equal(v, pretrained[k])}
        if run.parts[-2] == "layernorm":
            assert changed and changed <= norm_names
        else:  # the q/k/v update reached the attention (hooks / peft layers on the projection modules)
            assert changed & qkv_names, run.parts[-2]
        assert all(math.isfinite(v.float().sum()) for v in encoder.values())


def test_siglip_tokenizer_from_the_hub_fails_offline_saying_where_to_put_it(specs, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(BackboneLoadError, match=r"tokenizer.*save_pretrained.*checkpoint's folder"):
        load_backbone("openclip:fscl-test-siglip")
    assert time.perf_counter() - start < 15
    # the local-dir form takes the tokenizer from its folder (written here by the open_clip export)
    backbone = load_backbone(specs["siglip"])
    assert isinstance(backbone, OpenCLIPBackbone) and backbone.hf_tokenizer is not None
    folder = write_openclip(backbone, tmp_path / "siglip-dir")
    again = load_backbone(f"openclip:local-dir:{folder}")
    tokens = backbone.tokenize(["a photo of the number: 3."])
    assert torch.equal(again.tokenize(["a photo of the number: 3."]), tokens)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(tokens), backbone.encode_text(tokens), rtol=0, atol=0)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(BackboneLoadError, match=rf"holds none.*put its files .* in {folder}"):
        load_backbone(f"openclip:local-dir:{folder}")


def test_eva01_attention_is_routed_through_its_qkv_module_without_changing_outputs():
    trunk = Eva(**VISION, qkv_fused=True).eval()  # EVA01's layout: F.linear(x, qkv.weight, q/k/v bias)
    with pytest.raises(TypeError, match="route_qkv_through_module"):
        timm_block_views(trunk)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for attn in (b.attn for b in trunk.blocks):
            attn.q_bias.copy_(torch.randn(attn.q_bias.shape, generator=gen))
            attn.v_bias.copy_(torch.randn(attn.v_bias.shape, generator=gen))
        before = trunk(x)
        route_qkv_through_module(trunk)
        torch.testing.assert_close(trunk(x), before, rtol=1e-5, atol=1e-6)
    assert len(timm_block_views(trunk)) == LAYERS


def test_hf_clip_vision_export_refuses_timm_trunks_and_siglip(specs):
    for name in ("eva02", "eva01", "hf-siglip"):
        with pytest.raises(ExportError, match="OpenAI-layout CLIP ViT"):
            to_hf_clip_vision(load_backbone(specs[name]))


def test_ls_backbones_lists_families_load_forms_and_known_tags(capsys):
    assert main(["ls", "backbones"]) == 0
    out = capsys.readouterr().out
    for text in ("openclip", "EVA02", "SigLIP", "hf ", "SiglipModel", "local-dir:/path", "hf:/path/to/folder"):
        assert text in out, text
    pretrained = {f"{m}@{t}" for m, t in open_clip.list_pretrained()}
    tags = [line.split("tags: ", 1)[1] for line in out.splitlines() if "tags: " in line]
    open_clip_tags = [t for t in tags if not t.startswith(("hf:", "hf-vision:"))]
    assert open_clip_tags and set(open_clip_tags) <= pretrained
    assert any(t.startswith("EVA02") for t in tags) and any("SigLIP" in t for t in tags)
    assert out.count("load: openclip:NAME@TAG") == 1  # the mini family (an open_clip subclass) does not repeat it
