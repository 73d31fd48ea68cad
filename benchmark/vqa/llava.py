"""The VLM of the VQA evaluation: a transformers ``LlavaForConditionalGeneration`` whose vision tower
takes the run's current encoder.

``vqa.model`` is ``llava:/local/folder`` (``save_pretrained`` of the model and its processor, e.g.
``llava-hf/llava-1.5-7b-hf``), ``llava:org/hub-id`` (needs the hub, or ``HF_HUB_OFFLINE=1`` and the
local cache), or a family of :data:`~benchmark.registry.VQA_MODELS` such as ``mini`` (the mini
world's small VLM, declared by ``streams.mini``; built into the cache on first use).
``llava-hf/llava-1.5-7b-hf`` is the fully fine-tuned LLaVA-1.5-7B; the LoRSU paper used the
LoRA-trained ``llava-v1.5-7b-lora`` merged onto Vicuna-7B-v1.5.

:func:`swap_encoder` copies a backbone's vision encoder into the tower in memory with the mapping of
:mod:`benchmark.export` (open_clip OpenAI-layout ViT or ``hf:`` CLIP → HF ``CLIPVisionModel``);
:func:`check_encoder_fits` says before any training whether it can. LLaVA reads the tower's
``hidden_states[-2]`` without the class token (``vision_feature_layer=-2``, strategy ``default``).
"""
from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from benchmark.backbones import Backbone
from benchmark.backbones.hf import HFCLIPBackbone, _is_path
from benchmark.backbones.openclip import OpenCLIPBackbone, _hub_reachable
from benchmark.errors import FsclError
from benchmark.export import hf_vision_config, load_hf_vision, vit_layout_problems
from benchmark.registry import VQA_MODELS

IMAGE_TOKEN = "<image>"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # save_pretrained's, each maybe sharded with an index
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a fast, a SentencePiece or a BPE tokenizer's
SAVE_HINT = ("LlavaForConditionalGeneration.from_pretrained(ID).save_pretrained(DIR) and "
             "AutoProcessor.from_pretrained(ID).save_pretrained(DIR)")


class VQAModelError(FsclError, ValueError):
    """The VLM cannot be loaded, or cannot take the run's encoder; the message says what to change."""


class Llava(NamedTuple):
    """A loaded LLaVA: the model (eval mode) and its ``LlavaProcessor``."""

    model: nn.Module
    processor: object


# --------------------------------------------------------------------------- loading
def _family(spec: str):
    """The :data:`~benchmark.registry.VQA_MODELS` entry of ``spec``'s family (such as ``mini``), or None for
    ``llava:``; :class:`VQAModelError` for any other form."""
    family, _, rest = spec.partition(":")
    if family == "llava" and rest:
        return None
    if family != "llava" and family in VQA_MODELS:
        return VQA_MODELS.get(family)
    others = "".join(f", or '{name}'" for name in VQA_MODELS.names())
    raise VQAModelError(f"vqa.model '{spec}': expected 'llava:/path/to/folder' (a LlavaForConditionalGeneration "
                        f"folder with its processor) or 'llava:org/hub-id', e.g. llava:llava-hf/llava-1.5-7b-hf{others}")


def model_source(spec: str) -> tuple[str, bool]:
    """``llava:REST`` → (folder or hub id, local_files_only); a registered family's spec → its folder (built
    on first use)."""
    family, _, rest = spec.partition(":")
    entry = _family(spec)
    if entry is not None:
        return str(entry.obj.folder(rest)), True
    if _is_path(rest):
        folder = Path(rest).expanduser()
        if not (folder / "config.json").is_file():
            what = "no config.json in that folder" if folder.is_dir() else "no such folder"
            raise VQAModelError(f"vqa.model '{spec}': {what}. Put a LLaVA model there, written where there is "
                                f"internet with {SAVE_HINT} (ID such as llava-hf/llava-1.5-7b-hf).")
        return str(folder), True
    if not _hub_reachable():
        raise VQAModelError(f"vqa.model '{spec}': '{rest}' is a hub id and the hub cannot be reached from this "
                            f"machine. Where there is internet run {SAVE_HINT.replace('ID', repr(rest))}, copy DIR "
                            f"here and pass 'llava:/path/to/DIR'; or set HF_HUB_OFFLINE=1 to read the local cache.")
    return rest, False


def _check_processor(spec: str, processor, config) -> None:
    """Refuse a processor that cannot feed the model: no image token, or a wrong image-token count."""
    tokenizer = getattr(processor, "tokenizer", None)
    token = getattr(processor, "image_token", None)
    token_id = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None and token else None
    if token_id is None or token_id == tokenizer.unk_token_id or token_id != config.image_token_id:
        raise VQAModelError(
            f"vqa.model '{spec}': the tokenizer has no image token '{token or IMAGE_TOKEN}' with the id "
            f"{config.image_token_id} of config.json (image_token_id); save the model's own LlavaProcessor "
            f"(tokenizer with '{IMAGE_TOKEN}' as a special token) beside it: AutoProcessor.from_pretrained(ID)"
            f".save_pretrained(DIR)")
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    features = patches + (config.vision_feature_select_strategy == "full")
    size = processor.image_processor.crop_size["height"]
    patch = getattr(processor, "patch_size", None)
    tokens = None if patch is None else ((size // patch) ** 2 + processor.num_additional_image_tokens
                                         - (processor.vision_feature_select_strategy == "default"))
    if tokens != features:
        raise VQAModelError(
            f"vqa.model '{spec}': the processor expands '{IMAGE_TOKEN}' into {tokens} tokens (patch_size {patch}, "
            f"num_additional_image_tokens {processor.num_additional_image_tokens}, crop {size}) but the tower gives "
            f"{features} features; processor_config.json needs patch_size {vision.patch_size}, "
            f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' and "
            f"num_additional_image_tokens 1 (the class token)")


def model_identity(spec: str) -> dict[str, object]:
    """What identifies the VQA model ``spec`` names (its shared counts' key): the spec and, for a folder (a
    registered family's, or ``llava:/folder``), each file's name, size and modification time."""
    source, local = model_source(spec)
    folder = Path(source)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()) \
        if local and folder.is_dir() else []
    return {"spec": spec, "files": files}


def llava_config(spec: str):
    """The ``LlavaConfig`` of ``llava:/folder`` or ``llava:hub-id``, without its weights (the grid check);
    :class:`VQAModelError` when it is missing or no LLaVA. A registered family (``mini``) gives the
    config of its folder, or of the model it would build, without building it."""
    from transformers import AutoConfig

    entry = _family(spec)
    if entry is not None:
        return entry.obj.config(spec.partition(":")[2])
    source, local = model_source(spec)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise VQAModelError(f"vqa.model '{spec}': could not read its config.json ({err}); the folder needs what "
                            f"{SAVE_HINT} writes") from err
    if config.model_type != "llava":
        raise VQAModelError(f"vqa.model '{spec}' is a '{config.model_type}' model; expected a "
                            f"LlavaForConditionalGeneration (model_type 'llava'), e.g. llava-hf/llava-1.5-7b-hf")
    return config


def load_processor(spec: str, source: str, local: bool, config):
    """The checked (:func:`_check_processor`) ``LlavaProcessor`` of ``spec`` from ``source``
    (:func:`model_source`'s) for the model of ``config``; :class:`VQAModelError` when it cannot be loaded."""
    from transformers import AutoProcessor

    if local and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        raise VQAModelError(f"vqa.model '{spec}': no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); "
                            f"the folder needs what {SAVE_HINT} writes")
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise VQAModelError(f"vqa.model '{spec}': could not load its processor (tokenizer and image processor: "
                            f"{' '.join(str(err).split())}); the folder needs what {SAVE_HINT} writes") from err
    _check_processor(spec, processor, config)
    return processor


def weights_problem(folder: Path) -> str | None:
    """Why the weights of the model saved in ``folder`` are not all there (no weights file, or shards that its
    index lists missing), or None when they are; nothing is loaded."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return None
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                return f"its weights index {index.name} cannot be read ({err!r})"
            missing = sorted(shard for shard in shards if not (folder / shard).is_file())
            return f"{len(missing)} weight file(s) that {index.name} lists are missing: {', '.join(missing[:3])}" \
                if missing else None
    return f"no weights in the folder (none of {', '.join(WEIGHT_FILES)}, nor their sharded .index.json)"


def check_loadable(spec: str, config) -> None:
    """Raise :class:`VQAModelError` unless a ``llava:/folder`` would load: its weights files are all there
    (:func:`weights_problem`, not loaded) and its processor loads and fits the model of ``config`` (the grid
    check, before any work). Hub ids and registered families (built on first use) are not looked at."""
    rest = spec.partition(":")[2]
    if _family(spec) is not None or not _is_path(rest):
        return
    source, local = model_source(spec)
    problem = weights_problem(Path(source))
    if problem is not None:
        raise VQAModelError(f"vqa.model '{spec}': {problem}; the folder needs what {SAVE_HINT} writes")
    load_processor(spec, source, local, config)


def load_llava(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Llava:
    """Load ``llava:/folder`` or ``llava:hub-id`` (model + processor), in eval mode on ``device``.

    ``dtype``: the weights' type; default float16 on CUDA (as released), float32 elsewhere.
    """
    from transformers import LlavaForConditionalGeneration

    source, local = model_source(spec)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    processor = load_processor(spec, source, local, llava_config(spec))
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, local_files_only=local)
    except OSError as err:
        raise VQAModelError(f"vqa.model '{spec}': could not read the model ({err}); the folder "
                            f"needs what {SAVE_HINT} writes") from err
    return Llava(model.to(device).eval(), processor)


# --------------------------------------------------------------------------- the vision tower
def vision_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionModel`` of a LLaVA: ``model.model.vision_tower`` (transformers ≥4.52) or ``model.vision_tower``."""
    inner = getattr(model, "model", None)
    return inner.vision_tower if hasattr(inner, "vision_tower") else model.vision_tower


def check_encoder_fits(tower_config, backbone: Backbone) -> None:
    """Raise :class:`VQAModelError` unless the backbone's vision encoder loads into a tower of ``tower_config``.

    ``tower_config``: the tower's ``CLIPVisionConfig`` (``vision_tower(model).config``, or
    ``AutoConfig.from_pretrained(folder).vision_config`` before the model is loaded). The encoder must
    be an OpenAI-layout CLIP ViT (open_clip) or an ``hf:`` CLIPModel of the same width, depth, heads,
    MLP width, patch and image size and activation.
    """
    if isinstance(backbone, HFCLIPBackbone) and backbone.model.config.model_type == "clip":
        ours = backbone.model.config.vision_config
    else:
        problems = (vit_layout_problems(backbone.visual) if isinstance(backbone, OpenCLIPBackbone)
                    else [f"a {type(backbone.model).__name__} (not a CLIP ViT)"])
        if problems:
            raise VQAModelError(
                f"vqa: the encoder of '{backbone.spec}' cannot go into LLaVA's CLIP vision tower: it has "
                f"{'; '.join(problems)}. VQA needs an OpenAI-layout CLIP ViT (open_clip, such as "
                f"openclip:ViT-L-14-336-quickgelu@openai for LLaVA-1.5) or an hf: CLIPModel; EVA, SigLIP and "
                f"timm trunks cannot be loaded into it")
        ours = hf_vision_config(backbone.visual)
    fields = {"hidden_size": "width", "num_hidden_layers": "layers", "num_attention_heads": "heads",
              "intermediate_size": "MLP width", "patch_size": "patch size", "image_size": "image size",
              "hidden_act": "activation"}
    diffs = [f"{label} {getattr(ours, key)} (tower: {getattr(tower_config, key)})"
             for key, label in fields.items() if getattr(ours, key) != getattr(tower_config, key)]
    if diffs:
        raise VQAModelError(
            f"vqa: the encoder of '{backbone.spec}' does not fit LLaVA's vision tower: {', '.join(diffs)}. "
            f"The tower takes only the encoder architecture the VLM was trained with (LLaVA-1.5: "
            f"openclip:ViT-L-14-336-quickgelu@openai)")


def swap_encoder(model: nn.Module, backbone: Backbone) -> None:
    """Load the backbone's current vision encoder into LLaVA's tower, in memory, strictly (the tower's dtype)."""
    tower = vision_tower(model)
    check_encoder_fits(tower.config, backbone)
    load_hf_vision(getattr(tower, "vision_model", tower), backbone)  # 4.x: CLIPVisionModel.vision_model


# --------------------------------------------------------------------------- small offline LLaVAs
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)  # ids 0-4 of the tokenizers below
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def _llama_like(tokens: list[str], pre_tokenizer, decoder=None):
    """A ``PreTrainedTokenizerFast`` with one id per string of ``tokens`` after :data:`LLAMA_SPECIALS`, split
    by ``pre_tokenizer`` (anything else is ``<unk>``); prepends ``<s>``; ``<image>`` is its image token."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*LLAMA_SPECIALS, *tokens]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def char_tokenizer():
    """One token per printable character or space + character (" A" is one token, like Llama's "▁A")."""
    from tokenizers import Regex, decoders, pre_tokenizers

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    return _llama_like(chars + [" " + c for c in chars if c != " "],
                       pre_tokenizers.Split(Regex(r" ?[\s\S]"), behavior="isolated"), decoders.Fuse())


def word_tokenizer(texts: Iterable[str], whole: Iterable[str] = ()):
    """One token per word (a run of letters and digits) or punctuation mark of ``texts``, whitespace dropped,
    except that a whitespace-delimited string of ``whole`` (such as the option markers "A." to "E.") is one
    token: short sequences for a closed vocabulary (a prompt's unknown words become ``<unk>``)."""
    import re

    from tokenizers import Regex, pre_tokenizers

    kept = "".join(f"^{re.escape(w)}$|" for w in whole)
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                     pre_tokenizers.Split(Regex(kept + r"\w+|[^\w\s]"), behavior="isolated")])
    words = [word for text in texts for word, _ in split.pre_tokenize_str(text)]
    return _llama_like(sorted(set(words)), split)


def new_llava_config(vision_config, tokenizer, text: dict[str, int] | None = None):
    """The ``LlavaConfig`` of a LLaVA with tower ``vision_config`` (a ``CLIPVisionConfig``) and a Llama of
    ``text`` sizes (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``;
    default :data:`TINY_TEXT`) over ``tokenizer`` (one of the tokenizers above), reading the tower's
    ``hidden_states[-2]`` without the class token, as LLaVA-1.5 does."""
    from transformers import LlamaConfig, LlavaConfig

    text = {**TINY_TEXT, **(text or {})}
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"), ("image", IMAGE_TOKEN))}
    llama = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=text["num_attention_heads"],
                        max_position_embeddings=1024, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                        pad_token_id=ids["pad"], **text)
    return LlavaConfig(vision_config=vision_config, text_config=llama, image_token_id=ids["image"],
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def new_llava(config, seed: int = 0) -> nn.Module:
    """A random-weight ``LlavaForConditionalGeneration`` of ``config``, initialised from ``seed`` (the global
    RNG untouched)."""
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    text = config.text_config
    model.generation_config.update(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                   pad_token_id=text.pad_token_id)
    return model


def llava_processor(vision_config, tokenizer):
    """The ``LlavaProcessor`` of a LLaVA with tower ``vision_config``: ``tokenizer`` and a CLIP image processor
    at the tower's size (CLIP's mean and std), ``<image>`` expanded to one token per patch."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor, tokenizer, patch_size=vision_config.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def save_llava(folder: str | Path, model: nn.Module, processor) -> Path:
    """Write ``model`` and its ``processor`` (:func:`llava_processor`) to ``folder``, loadable as ``llava:<folder>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_llava(folder: str | Path, vision_config=None, seed: int = 0) -> Path:
    """Write a tiny random-weight LLaVA with its processor, loadable as ``llava:<folder>`` (offline tests, demos).

    ``vision_config``: the tower's ``CLIPVisionConfig``; default the vision side of ``openclip:fscl-tiny``
    (width 64, 2 layers of 4 heads, MLP 256, 32 px, patch 8, GELU). Pass
    ``benchmark.export.hf_vision_config(backbone.visual)`` to match another open_clip ViT. The language
    model is a 1-layer Llama of width 32 over a character tokenizer (:func:`char_tokenizer`).
    """
    from transformers import CLIPVisionConfig

    vision = vision_config or CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu")
    tokenizer = char_tokenizer()
    model = new_llava(new_llava_config(vision, tokenizer), seed)
    return save_llava(folder, model, llava_processor(vision, tokenizer))
