"""open_clip models: ``openclip:NAME[@TAG|@/path/ckpt]`` and ``openclip:local-dir:/path``.

Three vision-tower layouts behind the same block view: open_clip's own ViT (fused
``nn.MultiheadAttention``: OpenAI CLIP, LAION), timm EVA trunks (EVA02: separate q/k/v; EVA01:
fused ``qkv`` with separate q/v biases) and a timm ViT trunk with a fused ``qkv`` linear
(SigLIP); see :mod:`benchmark.backbones.timm_trunk`.

Tokenizers: CLIP's BPE vocabulary ships with open_clip. Models whose config names a hub
tokenizer (SigLIP's ``hf_tokenizer_name``) read it from a local folder when one is given —
the ``local-dir:`` folder itself, or the folder of a ``NAME@/path/ckpt`` checkpoint — holding
the files ``AutoTokenizer.save_pretrained`` writes; otherwise from the hub, which fails fast
offline with a message that says so.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from benchmark.backbones import BackboneLoadError
from benchmark.backbones.base import Backbone, BlockView, NoHiddenStatesError, ProjectionRows, WeightsSource
from benchmark.backbones.timm_trunk import route_qkv_through_module, timm_block_views, timm_image_projection

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # our tiny configs, e.g. "fscl-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a local HF tokenizer folder holds one
INIT_SEED = 0  # untrained models (no tag) are initialised from this seed, whatever the run seed
HUB_HOST = "huggingface.co"


def parse(rest: str) -> tuple[str, str | None]:
    """``NAME@TAG`` → (NAME, TAG); ``local-dir:/p`` → ("local-dir:/p", None); ``NAME`` → (NAME, None)."""
    if rest.startswith("local-dir:"):
        if not rest[len("local-dir:") :]:
            raise ValueError("openclip:local-dir: needs a folder path, e.g. openclip:local-dir:/models/mini")
        return rest, None
    name, _, tag = rest.partition("@")
    if not name:
        raise ValueError(f"openclip backbone '{rest}' needs a model name, e.g. openclip:ViT-B-16@openai")
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model '{name}'; see open_clip.list_models() (e.g. ViT-B-16, ViT-L-14-336, fscl-tiny)"
        )
    return name, tag or None


def _is_path(tag: str) -> bool:
    return "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return True  # the user asked for the local cache; let huggingface_hub read it
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def hub_source(repo_id: str, filenames: tuple[str, ...]) -> WeightsSource:
    """Hub weights: ready when one of ``filenames`` of ``repo_id`` is in the local Hugging Face cache, or when the
    hub can be reached now (``HF_HUB_OFFLINE`` set: the cache only)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return WeightsSource(f"the Hugging Face cache ({cached})", True)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    reachable = not offline and _hub_reachable()
    return WeightsSource(f"the Hugging Face hub ({repo_id}), not in the local cache: needs internet"
                         + ("" if reachable else " (HF_HUB_OFFLINE is set)" if offline else
                            f", and {HUB_HOST} cannot be reached from this machine"), reachable)


def resolve_name(name: str, tag: str | None) -> str:
    """The open_clip model to build for ``NAME@TAG``.

    Weights trained with QuickGELU (OpenAI's ``@openai``, MetaCLIP's, ...) on a config without it
    get the config's ``-quickgelu`` variant: open_clip would build GELU and only warn, and every
    activation of the pretrained model would be off. Local checkpoint files and folders are built
    as named (their config says what they need).
    """
    if tag is None or _is_path(tag) or name.startswith("local-dir:"):
        return name
    wants = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    if not wants or model_config(name).get("quick_gelu", False):
        return name
    variant = f"{name}-quickgelu"
    if variant not in open_clip.list_models():
        raise BackboneLoadError(f"the weights '{name}@{tag}' were trained with QuickGELU, but open_clip has no "
                                f"'{variant}' config to build them with; register one (quick_gelu: true)")
    log.info("openclip:%s@%s: the weights were trained with QuickGELU, building '%s'", name, tag, variant)
    return variant


def _create(name: str, tag: str | None) -> tuple[nn.Module, Callable, Callable]:
    if tag is not None and _is_path(tag) and not Path(tag).is_file():
        raise BackboneLoadError(f"checkpoint file not found: {tag}")
    if tag is not None and not _is_path(tag) and not _hub_reachable():
        raise BackboneLoadError(
            f"pretrained weights '{name}@{tag}' come from the Hugging Face hub, which cannot be reached "
            f"from this machine. Pass a local checkpoint instead: 'openclip:{name}@/path/to/weights.pt' "
            f"(a state dict; OpenAI weights need the '-quickgelu' model name), or a folder saved in "
            f"open_clip's layout: 'openclip:local-dir:/path/to/folder'."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=tag)
        except (FileNotFoundError, RuntimeError, ValueError) as err:
            raise BackboneLoadError(f"could not load open_clip model '{name}' (weights: {tag}): {err}") from err
    if tag is None and not name.startswith("local-dir:"):
        log.warning("openclip:%s has no pretrained weights: random initialisation (seed %d)", name, INIT_SEED)
    return model, train_tf, eval_tf


def _skeleton(name: str) -> nn.Module:
    """open_clip model ``name`` on the meta device: every module and shape, no weights (no download)."""

    def no_weights_warning(record: logging.LogRecord) -> bool:  # open_clip warns on the root logger for
        return not record.getMessage().startswith("No pretrained weights loaded")  # every model without weights

    root = logging.getLogger()
    root.addFilter(no_weights_warning)
    try:
        return open_clip.create_model(name, pretrained=None, load_weights=False, device="meta")
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise BackboneLoadError(f"could not build open_clip model '{name}': {err}") from err
    finally:
        root.removeFilter(no_weights_warning)


def model_config(name: str) -> dict:
    """A copy of the open_clip model config of ``name`` (a registered name or ``local-dir:/path``), or {}."""
    try:
        return open_clip.get_model_config(name) or {}
    except FileNotFoundError:  # a local-dir without open_clip_config.json: the model load says what is missing
        return {}


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _tokenizer(name: str, tag: str | None) -> Callable:
    """open_clip's tokenizer for the model, with hub tokenizers taken from a local folder when given."""
    text_cfg = model_config(name).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name") or ""
    needs_hub = bool(hub_name) or (not name.startswith("local-dir:") and "siglip" in name.lower())
    save = f"AutoTokenizer.from_pretrained('{hub_name or '<hub id>'}').save_pretrained(DIR)"
    files = f"{' / '.join(TOKENIZER_FILES)} and the vocabulary"
    if not needs_hub:
        return open_clip.get_tokenizer(name)
    if name.startswith("local-dir:"):  # open_clip reads a local-dir's own tokenizer files, whatever the config names
        folder = Path(name[len("local-dir:") :])
        if not _has_tokenizer_files(folder):
            raise BackboneLoadError(f"open_clip folder {folder} needs its Hugging Face tokenizer ('{hub_name}') inside "
                                    f"it and holds none. Save it where there is internet ({save}) and put its files "
                                    f"({files}) in {folder}.")
        return open_clip.get_tokenizer(name)
    local = Path(hub_name).expanduser()
    if local.is_absolute() and local.is_dir():  # the config itself names a local tokenizer folder
        return open_clip.get_tokenizer(name)
    if tag is not None and _is_path(tag) and _has_tokenizer_files(Path(tag).parent):
        kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
        return open_clip.tokenizer.HFTokenizer(str(Path(tag).parent), context_length=text_cfg.get("context_length"),
                                               tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    if not _hub_reachable():
        raise BackboneLoadError(
            f"open_clip model '{name}' takes its tokenizer ('{hub_name or 'SigLIP'}') from the Hugging Face hub, "
            f"which cannot be reached from this machine. Save it where there is internet ({save}) and put its files "
            f"({files}) in the checkpoint's folder (openclip:{name}@/path/to/folder/weights.safetensors), or in an "
            f"open_clip local-dir folder (openclip:local-dir:/path).")
    return open_clip.get_tokenizer(name)


class OpenCLIPBackbone(Backbone):
    """open_clip models: OpenAI/LAION ViTs (fused attention), EVA01/EVA02 (timm trunks), SigLIP (timm, fused qkv)."""

    def __init__(self, spec: str, rest: str, weights: bool = True) -> None:
        name, tag = parse(rest)
        name = resolve_name(name, tag)
        if weights:
            tokenizer = _tokenizer(name, tag)  # before the weights: a missing tokenizer fails fast
            model, train_tf, eval_tf = _create(name, tag)
        else:  # the architecture only (a skeleton): no weights, no tokenizer, nothing allocated
            tokenizer, model, train_tf, eval_tf = None, _skeleton(name), None, None
        super().__init__(spec, model, model.visual, (train_tf, eval_tf))
        if hasattr(model.visual, "trunk"):
            route_qkv_through_module(model.visual.trunk)  # EVA01: q/v biases outside the qkv module otherwise
        self.source_name = name  # open_clip's model name, or "local-dir:/path"
        self._tokenizer = tokenizer

    @property
    def hf_tokenizer(self):
        """The Hugging Face tokenizer inside open_clip's ``HFTokenizer`` (SigLIP), or None (CLIP's BPE)."""
        inner = getattr(self._tokenizer, "tokenizer", None)
        return inner if hasattr(inner, "save_pretrained") else None

    @classmethod
    def check_spec(cls, rest: str) -> None:
        parse(rest)

    @classmethod
    def weights_source(cls, rest: str) -> WeightsSource:
        name, tag = parse(rest)
        if name.startswith("local-dir:"):
            return WeightsSource.folder(Path(name[len("local-dir:"):]).expanduser(), "open_clip_config.json")
        if tag is None:
            return WeightsSource(f"none: random initialisation (seed {INIT_SEED}), no pretrained weights", True)
        if _is_path(tag):
            return WeightsSource(f"local file {tag}" + ("" if Path(tag).is_file() else " (not found)"),
                                 Path(tag).is_file())
        hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
        if not hub:
            return WeightsSource(f"open_clip has no hub entry for '{name}@{tag}'", False)
        repo_id, filename = os.path.split(hub)
        default = "open_clip_pytorch_model.bin"  # open_clip's file when the entry names none (a safetensors twin first)
        return hub_source(repo_id, (filename,) if filename else ("open_clip_model.safetensors", default))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(texts)

    def hidden_states(self, images: Tensor, layer: int) -> Tensor:
        """A fused-attention (OpenAI-layout) ViT's: class token, patches, position embedding, ``ln_pre``, then the
        first ``layer`` resblocks (as HF CLIP's ``hidden_states[layer]``)."""
        visual = self.visual
        transformer = getattr(visual, "transformer", None)
        if transformer is None or not hasattr(visual, "conv1"):
            raise NoHiddenStatesError(f"'{self.spec}': a VLM reads the hidden states of an OpenAI-layout ViT only")
        blocks = transformer.resblocks
        count = layer if layer >= 0 else len(blocks) + 1 + layer
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, patches, W]
        cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = visual.ln_pre(visual.patch_dropout(torch.cat([cls, x], 1) + visual.positional_embedding.to(x.dtype)))
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:count]:
            x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    def image_projection(self) -> tuple[nn.Module, str] | None:
        """``visual.proj`` [W, D] (a tensor test: a strategy may have parametrized it), or a timm tower's linear."""
        if hasattr(self.visual, "trunk"):
            return timm_image_projection(self.visual)
        proj = getattr(self.visual, "proj", None)
        return (self.visual, "proj") if isinstance(proj, Tensor) and proj.dim() == 2 else None

    def blocks(self) -> list[BlockView]:
        if hasattr(getattr(self.visual, "trunk", None), "blocks"):
            return timm_block_views(self.visual.trunk)
        transformer = getattr(self.visual, "transformer", None)
        if transformer is None:
            return []  # e.g. a ResNet tower: no transformer blocks
        views = []
        for i, block in enumerate(transformer.resblocks):
            attn = block.attn
            if not isinstance(attn, nn.MultiheadAttention):
                raise TypeError(f"block {i}: unsupported attention module {type(attn).__name__}")
            width = attn.embed_dim
            q, k, v = (ProjectionRows(attn.in_proj_weight, attn.in_proj_bias, slice(j * width, (j + 1) * width))
                       for j in range(3))
            views.append(
                BlockView(
                    index=i,
                    num_heads=attn.num_heads,
                    head_dim=attn.head_dim,
                    q=q,
                    k=k,
                    v=v,
                    fc1=block.mlp.c_fc,
                    norms=(block.ln_1, block.ln_2),
                    module=block,
                )
            )
        return views
