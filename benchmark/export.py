"""Hand the vision encoder of a run back to the model that uses it (``fscl export``).

The encoder after session N comes from the run's per-session checkpoint
(``checkpoints/session-N.pt``, see :mod:`benchmark.checkpoints`); session 0 is the pretrained
encoder the run started from. The encoder formats:

* ``openclip``: an open_clip ``local-dir`` folder (``open_clip_config.json`` +
  ``open_clip_model.safetensors``, the text side unchanged, plus the tokenizer files when the
  model's tokenizer is a Hugging Face one), loadable as ``openclip:local-dir:DIR`` or with
  ``open_clip.create_model_and_transforms("local-dir:DIR")``;
* ``hf-clip-vision``: a transformers ``CLIPVisionModelWithProjection`` folder with a
  ``preprocessor_config.json`` — the form LLaVA-1.5's vision tower loads
  (``CLIPVisionModel.from_pretrained(DIR)`` reads it, ignoring the projection). From an
  open_clip ViT of the OpenAI layout the fused ``in_proj`` [3W, W] is split into q/k/v, and
  ``c_fc``/``c_proj``, ``ln_1``/``ln_2``, ``ln_pre``/``ln_post``, the class, positional and
  patch embeddings and ``proj`` ([W, D], stored transposed) are mapped; an ``hf:`` CLIP
  backbone is written as it is;
* ``hf-siglip-vision``: a transformers ``SiglipVisionModel`` folder with a ``preprocessor_config.json``
  (a ``SiglipImageProcessor``), from an ``hf:`` SiglipModel or ``hf-vision:`` SigLIP backbone, written as it
  is (its attention-pool head included: PaliGemma's tower has none and ignores it); it loads as
  ``hf-vision:DIR``.

``fscl export --format vlm`` writes instead the VLM that a VLM-side strategy adapted (a PEFT adapter folder or
the merged model: :mod:`benchmark.vlm.export`).
"""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from benchmark import checkpoints
from benchmark.backbones import Backbone, load_backbone
from benchmark.backbones.hf import HFCLIPBackbone, HFVisionBackbone
from benchmark.backbones.openclip import OpenCLIPBackbone, model_config
from benchmark.errors import FsclError
from benchmark.records import STATUS_FINISHED, STATUS_INTERRUPTED, STATUS_RUNNING, RunLock, RunRecord

ExportFormat = Literal["openclip", "hf-clip-vision", "hf-siglip-vision"]


class ExportError(FsclError, RuntimeError):
    """The encoder cannot be exported as asked; the message says what to do instead."""


# --------------------------------------------------------------------------- the encoder after session N
def run_config(run_dir: str | Path, session: int) -> dict[str, Any]:
    """The resolved config (``config.yaml``) of the run in ``run_dir``, after checking that it has ``session`` (0:
    what the run started from)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{run_dir} is not a run folder (no config.yaml); pass a folder written by 'fscl run'")
    config = yaml.safe_load(config_path.read_text())
    sessions = int(config.get("sessions", 0))
    if not 0 <= session <= sessions:
        raise ExportError(f"--session {session}: the run has sessions 1..{sessions} (0 = the pretrained encoder)")
    return config


def session_checkpoint(run_dir: str | Path, config: dict[str, Any], session: int, what: str = "encoder") -> dict:
    """The saved :class:`~benchmark.checkpoints.SessionState` (as a dict) of ``session`` ≥ 1 of the run in ``run_dir``
    (``config``: its :func:`run_config`); an :class:`ExportError` that says why when it is not stored (``what``: the
    exported thing, in words)."""
    run_dir = Path(run_dir)
    saved = checkpoints.saved_sessions(run_dir)
    if session not in saved:
        kept = f"sessions {', '.join(map(str, saved))}" if saved else "no session"
        manifest = RunRecord(run_dir).manifest() or {}
        if manifest.get("status") != STATUS_FINISHED:  # failed or cut short: the session may never have trained
            raise ExportError(f"the {what} after session {session} is not stored in {run_dir}: "
                              f"{unfinished(run_dir, manifest)}; its checkpoints keep {kept}.")
        keep = config.get("keep_checkpoints", "none")
        advice = (f"Run it again keeping them (--force: a finished run is skipped otherwise): 'fscl run "
                  f"{run_dir / 'config.yaml'} keep_checkpoints=all --force' (keep_checkpoints=last keeps only the "
                  f"final one)" if keep != "all" else "The run kept every session it checkpointed")
        raise ExportError(
            f"the {what} after session {session} is not stored in {run_dir}: its checkpoints keep {kept} "
            f"(keep_checkpoints: {keep}). {advice}; session 0 (pretrained) needs none.")
    path = checkpoints.checkpoint_dir(run_dir) / f"session-{session}.pt"
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file (it holds RNG states)


def encoder_after(run_dir: str | Path, session: int) -> Backbone:
    """The run's backbone with the vision encoder it had after ``session`` (0: pretrained), on CPU."""
    config = run_config(run_dir, session)
    backbone = load_backbone(config["backbone"], "cpu")
    if session > 0:
        backbone.visual.load_state_dict(session_checkpoint(run_dir, config, session)["encoder"])
    return backbone


def unfinished(run_dir: Path, manifest: dict) -> str:
    """Why the run in ``run_dir`` (with ``manifest``) has not finished, in words: failed (with its reason), still
    running, or interrupted (its status says so, or says running while no live process holds its lock), with
    the command that resumes it."""
    status = manifest.get("status", "unfinished")
    reason = f": {manifest['reason']}" if manifest.get("reason") else ""
    if status == STATUS_RUNNING and RunLock(run_dir).is_held():
        return "the run is still running"
    if status not in (STATUS_RUNNING, STATUS_INTERRUPTED):
        return f"the run is {status}{reason}"
    gone = "" if status == STATUS_INTERRUPTED else " (its status says running, but its process is gone)"
    command = manifest.get("command") or []
    again = f" ({shlex.join(['fscl', *command[1:]])})" if command else ""
    return f"the run was interrupted{reason}{gone}; the command that started it resumes it{again}"


# --------------------------------------------------------------------------- open_clip folder
def write_openclip(backbone: Backbone, out: str | Path) -> Path:
    """Write the whole open_clip model (updated vision side) as a ``local-dir`` folder."""
    import open_clip
    from safetensors.torch import save_file

    if not isinstance(backbone, OpenCLIPBackbone):
        raise ExportError(f"--format openclip needs an open_clip backbone, not '{backbone.spec}'; "
                          f"use --format hf-clip-vision for hf: CLIP models")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = backbone.source_name
    config = {"model_cfg": model_config(name),
              "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(backbone.model))}
    tokenizer = backbone.hf_tokenizer
    if tokenizer is not None:  # SigLIP's: the folder must hold it to load offline
        tokenizer.save_pretrained(out)
        # any name makes open_clip read a local-dir's own tokenizer files; keep the original hub id when there is one
        config["model_cfg"].setdefault("text_cfg", {}).setdefault("hf_tokenizer_name", "local")
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2, default=list))
    state = {k: v.detach().contiguous().clone() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


# --------------------------------------------------------------------------- HF CLIPVisionModel folder
def vit_layout_problems(visual: nn.Module) -> list[str]:
    """Why a ``CLIPVisionModel`` cannot express an open_clip vision tower (empty: it can)."""
    problems = []
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        problems.append(f"a {type(visual).__name__} tower (timm trunk or ResNet), not open_clip's ViT")
    else:
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            problems.append("pooling other than the class token")
        if isinstance(visual.ln_pre, nn.Identity):
            problems.append("no ln_pre")
        if visual.conv1.bias is not None:
            problems.append("a patch embedding with a bias")
        plain = all(isinstance(b.attn, nn.MultiheadAttention) and isinstance(b.ls_1, nn.Identity)
                    and isinstance(b.ls_2, nn.Identity) and set(dict(b.mlp.named_children())) == {"c_fc", "gelu", "c_proj"}
                    for b in visual.transformer.resblocks)
        if not plain:
            problems.append("blocks with layer scale, extra norms or another MLP")
        elif _hidden_act(visual) is None:
            problems.append(f"the activation {visual.transformer.resblocks[0].mlp.gelu}, which transformers' CLIP lacks")
    return problems


def _vit_or_fail(visual: nn.Module) -> None:
    """Refuse open_clip vision towers that a CLIPVisionModel cannot express."""
    problems = vit_layout_problems(visual)
    if problems:
        raise ExportError("--format hf-clip-vision needs an OpenAI-layout CLIP ViT; this model has "
                          + "; ".join(problems) + ". Use --format openclip.")


def _hidden_act(visual: nn.Module) -> str | None:
    """transformers' name of the blocks' activation; None when it has none."""
    import open_clip.transformer as oct

    act = visual.transformer.resblocks[0].mlp.gelu
    if isinstance(act, oct.QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    return None


def hf_vision_config(visual: nn.Module):
    """The ``CLIPVisionConfig`` of an open_clip OpenAI-layout ViT."""
    from transformers import CLIPVisionConfig

    _vit_or_fail(visual)
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, num_channels=visual.conv1.in_channels,
        image_size=visual.image_size[0], patch_size=visual.conv1.kernel_size[0], hidden_act=_hidden_act(visual),
        layer_norm_eps=visual.ln_pre.eps, projection_dim=visual.proj.shape[1],
    )


def _layer_norm(prefix: str, norm: nn.LayerNorm) -> dict[str, Tensor]:
    return {f"{prefix}.weight": norm.weight, f"{prefix}.bias": norm.bias}


def _linear(prefix: str, linear: nn.Linear) -> dict[str, Tensor]:
    return {f"{prefix}.weight": linear.weight, f"{prefix}.bias": linear.bias}


def hf_encoder_state(resblocks: nn.ModuleList) -> dict[str, Tensor]:
    """open_clip residual blocks → HF CLIP ``encoder.layers.{i}.*`` tensors (q/k/v split from ``in_proj``)."""
    state: dict[str, Tensor] = {}
    for i, block in enumerate(resblocks):
        prefix = f"encoder.layers.{i}"
        attn = block.attn
        weights, biases = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            state[f"{prefix}.self_attn.{name}.weight"], state[f"{prefix}.self_attn.{name}.bias"] = w, b
        state.update(_linear(f"{prefix}.self_attn.out_proj", attn.out_proj))
        state.update(_layer_norm(f"{prefix}.layer_norm1", block.ln_1))
        state.update(_layer_norm(f"{prefix}.layer_norm2", block.ln_2))
        state.update(_linear(f"{prefix}.mlp.fc1", block.mlp.c_fc))
        state.update(_linear(f"{prefix}.mlp.fc2", block.mlp.c_proj))
    return state


def hf_vision_state(visual: nn.Module) -> dict[str, Tensor]:
    """open_clip ViT → tensors of HF's ``CLIPVisionTransformer`` (names relative to it)."""
    _vit_or_fail(visual)
    return {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        **_layer_norm("pre_layrnorm", visual.ln_pre),  # (sic: transformers' name)
        **hf_encoder_state(visual.transformer.resblocks),
        **_layer_norm("post_layernorm", visual.ln_post),
    }


def load_exact(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``tensors`` into ``module``: every parameter must be given, nothing else (buffers kept)."""
    params = set(dict(module.named_parameters()))
    if params != set(tensors):
        raise ExportError(f"weight mapping mismatch: missing {sorted(params - set(tensors))}, "
                          f"unexpected {sorted(set(tensors) - params)}")
    with torch.no_grad():
        module.load_state_dict({**module.state_dict(), **{k: v.detach().clone() for k, v in tensors.items()}})


def hf_tower(backbone: Backbone, model_type: str) -> nn.Module | None:
    """The transformers vision tower of an ``hf:`` or ``hf-vision:`` backbone whose config is of ``model_type``
    (``clip_vision_model``, ``siglip_vision_model``), its parameters named as a ``CLIPVisionModel`` /
    ``SiglipVisionModel``'s in transformers 5 (as their ``vision_model``'s in 4.x); None for any other backbone."""
    if not isinstance(backbone, (HFCLIPBackbone, HFVisionBackbone)):
        return None
    tower = backbone.visual.tower
    return tower if tower.config.model_type == model_type else None


def _is_hf_clip(backbone: Backbone) -> bool:
    return isinstance(backbone, HFCLIPBackbone) and backbone.model.config.model_type == "clip"


def load_hf_vision(transformer: nn.Module, backbone: Backbone) -> None:
    """Copy the backbone's current vision encoder into an HF CLIP vision transformer, strictly.

    ``transformer`` holds ``embeddings``, ``pre_layrnorm``, ``encoder.layers``, ``post_layernorm``
    (``CLIPVisionModel.vision_model``; in transformers 5 also a ``CLIPVisionModel`` itself, such as
    LLaVA's vision tower); every parameter is replaced, in the module's own dtype and device. The backbone: an
    OpenAI-layout open_clip ViT, or an ``hf:`` CLIPModel or ``hf-vision:`` CLIP tower (copied as it is).
    """
    tower = hf_tower(backbone, "clip_vision_model")
    if tower is not None:
        load_exact(transformer, dict(tower.named_parameters()))
    elif isinstance(backbone, OpenCLIPBackbone):
        load_exact(transformer, hf_vision_state(backbone.visual))
    else:
        raise ExportError(f"--format hf-clip-vision needs an OpenAI-layout CLIP ViT, not '{backbone.spec}'")


def to_hf_clip_vision(backbone: Backbone):
    """A ``CLIPVisionModelWithProjection`` with the backbone's current vision weights."""
    from transformers import CLIPVisionModelWithProjection

    if _is_hf_clip(backbone):
        config = copy.deepcopy(backbone.model.config.vision_config)
        config.projection_dim = backbone.model.config.projection_dim
        model = CLIPVisionModelWithProjection(config)
        load_hf_vision(model.vision_model, backbone)
        load_exact(model.visual_projection, dict(backbone.visual.projection.named_parameters()))
        return model.eval()
    if not isinstance(backbone, OpenCLIPBackbone):
        raise ExportError(f"--format hf-clip-vision needs an OpenAI-layout CLIP ViT, not '{backbone.spec}'")
    visual = backbone.visual
    model = CLIPVisionModelWithProjection(hf_vision_config(visual))
    load_hf_vision(model.vision_model, backbone)
    load_exact(model.visual_projection, {"weight": visual.proj.T})
    return model.eval()


def write_hf_clip_vision(backbone: Backbone, out: str | Path) -> Path:
    """Write ``CLIPVisionModelWithProjection`` + ``preprocessor_config.json`` (CLIP's resize/crop/normalise)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor

    model = to_hf_clip_vision(backbone)
    out = Path(out)
    model.save_pretrained(out)
    size = model.config.image_size
    if isinstance(backbone, OpenCLIPBackbone):
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(backbone.model)
        mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)
    else:
        mean, std = backbone.image_normalisation
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(mean or OPENAI_DATASET_MEAN),
                       image_std=list(std or OPENAI_DATASET_STD)).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- HF SiglipVisionModel folder
def siglip_tower(backbone: Backbone) -> nn.Module | None:
    """The transformers SigLIP vision tower of an ``hf:`` SiglipModel or ``hf-vision:`` SigLIP backbone (see
    :func:`hf_tower`), or None for any other backbone."""
    return hf_tower(backbone, "siglip_vision_model")


def to_hf_siglip_vision(backbone: Backbone):
    """A ``SiglipVisionModel`` with the backbone's current vision weights (:func:`siglip_tower`'s, exactly)."""
    from transformers import SiglipVisionModel

    tower = siglip_tower(backbone)
    if tower is None:
        raise ExportError(f"--format hf-siglip-vision needs a transformers SigLIP tower (an hf: SiglipModel or an "
                          f"hf-vision: SiglipVisionModel backbone), not '{backbone.spec}'; use --format openclip for "
                          f"open_clip models (their SigLIP included) and hf-clip-vision for CLIP ViTs")
    model = SiglipVisionModel(copy.deepcopy(tower.config))
    load_exact(getattr(model, "vision_model", model), dict(tower.named_parameters()))
    return model.eval()


def write_hf_siglip_vision(backbone: Backbone, out: str | Path) -> Path:
    """Write ``SiglipVisionModel`` + ``preprocessor_config.json`` (SigLIP's square resize, the backbone's mean/std)."""
    from transformers import SiglipImageProcessor

    model, (mean, std) = to_hf_siglip_vision(backbone), backbone.image_normalisation
    model.save_pretrained(out)
    SiglipImageProcessor(size=dict.fromkeys(("height", "width"), model.config.image_size),
                         image_mean=list(mean or (0.5,) * 3), image_std=list(std or (0.5,) * 3)).save_pretrained(out)
    return Path(out)


WRITERS = {"openclip": write_openclip, "hf-clip-vision": write_hf_clip_vision,
           "hf-siglip-vision": write_hf_siglip_vision}
FORMATS: tuple[str, ...] = tuple(WRITERS)


def loading_snippet(fmt: ExportFormat, out: str | Path) -> str:
    """Python that loads the export at ``out`` with open_clip or transformers alone, in any script of the
    environment (printed by ``fscl export``); it defines ``model`` and ``preprocess`` (open_clip's image
    transform) or ``processor`` (transformers' image processor)."""
    folder = str(Path(out).resolve())
    if fmt == "openclip":
        return (f"import open_clip\n"
                f"model, _, preprocess = open_clip.create_model_and_transforms({f'local-dir:{folder}'!r})\n"
                f"tokenizer = open_clip.get_tokenizer({f'local-dir:{folder}'!r})\n"
                f"# image_features = model.encode_image(preprocess(pil_image).unsqueeze(0))\n")
    if fmt == "hf-siglip-vision":
        return (f"from transformers import SiglipImageProcessor, SiglipVisionModel\n"
                f"model = SiglipVisionModel.from_pretrained({folder!r})\n"
                f"processor = SiglipImageProcessor.from_pretrained({folder!r})\n"
                f"# image_features = model(**processor(images=pil_image, return_tensors='pt')).pooler_output\n"
                f"# as a backbone: hf-vision:{folder}\n")
    return (f"from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection\n"
            f"model = CLIPVisionModelWithProjection.from_pretrained({folder!r})\n"
            f"processor = CLIPImageProcessor.from_pretrained({folder!r})\n"
            f"# image_features = model(**processor(images=pil_image, return_tensors='pt')).image_embeds\n"
            f"# LLaVA-1.5's vision tower: CLIPVisionModel.from_pretrained({folder!r}) (mm_vision_tower)\n")


def export(run_dir: str | Path, session: int, fmt: ExportFormat, out: str | Path) -> Path:
    """Write the run's vision encoder after ``session`` to ``out`` in format ``fmt``."""
    if fmt not in WRITERS:
        raise ExportError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    return WRITERS[fmt](encoder_after(run_dir, session), out)
