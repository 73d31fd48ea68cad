"""LLaVA-1.5, the paper's VLM: a transformers ``LlavaForConditionalGeneration`` whose CLIP vision tower takes the
run's encoder.

``vqa.model`` is ``llava:/local/folder`` (``save_pretrained`` of the model and its processor, e.g.
``llava-hf/llava-1.5-7b-hf``) or ``llava:org/hub-id`` (needs the hub, or ``HF_HUB_OFFLINE=1`` and the local
cache). ``llava-hf/llava-1.5-7b-hf`` is the fully fine-tuned LLaVA-1.5-7B; the LoRSU paper used the
LoRA-trained ``llava-v1.5-7b-lora`` merged onto Vicuna-7B-v1.5. The mini world's VLM (``vqa.model: mini``)
is a small model of this family.

* **Tower**: a ``CLIPVisionModel``; it takes an OpenAI-layout CLIP ViT (open_clip) or an ``hf:`` CLIPModel of
  the same shape, mapped with :mod:`benchmark.export` (:func:`check_encoder_fits`, :meth:`LoadedLlava.swap_encoder`).
  LLaVA-1.5 kept its pretrained CLIP tower frozen, so the CLIP-loss strategies are meaningful with it.
* **Tokens read**: the tower's ``hidden_states[vision_feature_layer]`` (-2: the input of the last block, which
  therefore never matters: :meth:`LlavaFamily.unread_blocks` is 1) without the class token
  (``vision_feature_select_strategy`` ``default``), through the projector into the ``<image>`` positions.
* **Prompt**: the released ``vicuna_v1`` conversation (:func:`conversation`)::

      A chat between a curious user and an artificial intelligence assistant. The assistant gives
      helpful, detailed, and polite answers to the user's questions. USER: <image>\\n{user text} ASSISTANT:

  (one line). Images are padded to a square with the image processor's mean colour (``expand2square``), then
  resized, cropped and normalised by the model's image processor; the ``LlavaProcessor`` expands ``<image>``
  into one token per patch feature and tokenizes the whole string at once (the released
  ``tokenizer_image_token`` tokenizes either side of ``<image>`` apart, which may differ by a leading-space
  token after the image). Letters are scored at the first token after ``ASSISTANT:`` (Llama: ``▁A``).
* **Answer loss**: LLaVA's own forward (``get_image_features`` then the language model) with the encoder's
  tokens in place of the tower's; a training pair is the prompt + `` {answer}</s>``, labelled on the answer and
  ``</s>``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from benchmark.backbones import Backbone
from benchmark.backbones.openclip import OpenCLIPBackbone
from benchmark.export import hf_tower, hf_vision_config, load_hf_vision, vit_layout_problems
from benchmark.vlm.base import (
    IGNORE,
    LoadedVLM,
    PairBatch,
    SavedVLMFamily,
    answer_token_sequences,
    single_tokens,
    tower_differences,
    with_continuations,
)
from benchmark.vlm.spec import VLMError
from benchmark.vlm.tokenizers import IMAGE_TOKEN, char_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
ASSISTANT = "ASSISTANT:"


def conversation(user_text: str, image_token: str = IMAGE_TOKEN) -> str:
    """The released ``vicuna_v1`` prompt: the image, then ``user_text``, up to the assistant's turn."""
    return f"{SYSTEM} USER: {image_token}\n{user_text} {ASSISTANT}"


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, filled with ``background`` (as released)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_to_square(images: Sequence[Image.Image], image_processor) -> list[Image.Image]:
    """RGB ``images`` padded to squares with the processor's mean colour (``image_mean`` × 255, truncated)."""
    background = tuple(int(x * 255) for x in image_processor.image_mean)
    return [expand2square(image.convert("RGB"), background) for image in images]


# --------------------------------------------------------------------------- the family (no weights)
class LlavaFamily(SavedVLMFamily):
    """LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``): ``llava:/folder`` or ``llava:org/hub-id``."""

    example = "llava:/path/to/llava-1.5-7b-hf"
    model_class = "LlavaForConditionalGeneration"
    model_type = "llava"
    hub_example = "llava-hf/llava-1.5-7b-hf"
    loaded_class: ClassVar[type[LoadedLlava]]  # what load() gives (set below, after its class); variants override
    takes = ("an OpenAI-layout CLIP ViT (open_clip, such as openclip:ViT-L-14-336-quickgelu@openai for LLaVA-1.5), "
             "an hf: CLIPModel or an hf-vision: CLIP tower")

    def check_processor(self, processor) -> None:
        """Refuse a processor that cannot feed the model: no image token, or a wrong image-token count."""
        config, spec = self.config(), self.spec
        tokenizer = getattr(processor, "tokenizer", None)
        token = getattr(processor, "image_token", None)
        token_id = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None and token else None
        if token_id is None or token_id == tokenizer.unk_token_id or token_id != config.image_token_id:
            raise VLMError(
                f"vqa.model '{spec}': the tokenizer has no image token '{token or IMAGE_TOKEN}' with the id "
                f"{config.image_token_id} of config.json (image_token_id); save the model's own LlavaProcessor "
                f"(tokenizer with '{IMAGE_TOKEN}' as a special token) beside it: AutoProcessor.from_pretrained(ID)"
                f".save_pretrained(DIR)")
        features = image_features(config)
        size = processor.image_processor.crop_size["height"]
        patch = getattr(processor, "patch_size", None)
        tokens = None if patch is None else ((size // patch) ** 2 + processor.num_additional_image_tokens
                                             - (processor.vision_feature_select_strategy == "default"))
        if tokens != features:
            vision = config.vision_config
            raise VLMError(
                f"vqa.model '{spec}': the processor expands '{IMAGE_TOKEN}' into {tokens} tokens (patch_size {patch}, "
                f"num_additional_image_tokens {processor.num_additional_image_tokens}, crop {size}) but the tower gives "
                f"{features} features; processor_config.json needs patch_size {vision.patch_size}, "
                f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' and "
                f"num_additional_image_tokens 1 (the class token)")

    def check_encoder(self, backbone: Backbone) -> None:
        check_encoder_fits(self.tower_config(), backbone)

    def _feature_layer(self) -> int:
        layer = self.config().vision_feature_layer
        if not isinstance(layer, int):
            raise VLMError(f"the VLM loss reads one feature layer; vqa.model '{self.spec}' concatenates {layer}")
        return layer

    def encoder_tokens(self, backbone: Backbone, images: Tensor) -> Tensor:
        """``hidden_states[vision_feature_layer]`` of the backbone's encoder, without the class token under the
        ``default`` feature strategy (LLaVA-1.5), with it under ``full``: [B, N, W]."""
        hidden = backbone.hidden_states(images, self._feature_layer())
        return hidden[:, 1:] if self.config().vision_feature_select_strategy == "default" else hidden

    def unread_blocks(self) -> int:
        layer, blocks = self.config().vision_feature_layer, self.tower_config().num_hidden_layers
        if not isinstance(layer, int):
            return 0
        return blocks - (layer if layer >= 0 else blocks + 1 + layer)

    def load(self, device: torch.device, dtype: torch.dtype | None = None) -> LoadedLlava:
        return self.loaded_class(self, *self.pretrained(device, dtype))


def image_features(config) -> int:
    """Image features per image of a ``LlavaConfig``: the tower's patches (+1 with the ``full`` feature strategy)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionModel`` of a LLaVA: ``model.model.vision_tower`` (transformers ≥4.52) or ``model.vision_tower``."""
    inner = getattr(model, "model", None)
    return inner.vision_tower if hasattr(inner, "vision_tower") else model.vision_tower


def check_encoder_fits(tower_config, backbone: Backbone) -> None:
    """Raise :class:`VLMError` unless the backbone's vision encoder loads into a tower of ``tower_config``.

    ``tower_config``: the tower's ``CLIPVisionConfig``. The encoder must be an OpenAI-layout CLIP ViT (open_clip),
    an ``hf:`` CLIPModel or an ``hf-vision:`` CLIP tower of the same width, depth, heads, MLP width, patch and image
    size and activation.
    """
    tower = hf_tower(backbone, "clip_vision_model")
    if tower is not None:
        ours = tower.config
    else:
        problems = (vit_layout_problems(backbone.visual) if isinstance(backbone, OpenCLIPBackbone)
                    else [f"a {type(backbone.model).__name__} (not a CLIP ViT)"])
        if problems:
            raise VLMError(
                f"vqa: the encoder of '{backbone.spec}' cannot go into LLaVA's CLIP vision tower: it has "
                f"{'; '.join(problems)}. VQA needs {LlavaFamily.takes}; EVA, SigLIP and timm trunks cannot be "
                f"loaded into it")
        ours = hf_vision_config(backbone.visual)
    diffs = tower_differences(ours, tower_config)
    if diffs:
        raise VLMError(
            f"vqa: the encoder of '{backbone.spec}' does not fit LLaVA's vision tower: {', '.join(diffs)}. "
            f"The tower takes only the encoder architecture the VLM was trained with (LLaVA-1.5: "
            f"openclip:ViT-L-14-336-quickgelu@openai)")


def swap_into_tower(model: nn.Module, backbone: Backbone) -> None:
    """Load the backbone's current vision encoder into the tower of the ``LlavaForConditionalGeneration`` ``model``,
    in memory, strictly (the tower's dtype)."""
    tower = vision_tower(model)
    check_encoder_fits(tower.config, backbone)
    load_hf_vision(getattr(tower, "vision_model", tower), backbone)  # 4.x: CLIPVisionModel.vision_model


def answer_tokens(tokenizer, answers: Sequence[str], prefix: str = ASSISTANT) -> list[list[int]]:
    """The tokens of ``" {answer}"`` after ``prefix`` (``ASSISTANT:``) for each of ``answers`` (Llama: ``▁A``;
    ``▁(``, ``a``, ``)``)."""
    return answer_token_sequences(tokenizer, prefix, [f" {answer}" for answer in answers])


def letter_tokens(tokenizer, letters: Sequence[str], prefix: str = ASSISTANT) -> list[int]:
    """The tokens of ``" A"``, ``" B"``, ... after ``prefix`` (``ASSISTANT:``; Llama: ``▁A``)."""
    return single_tokens(letters, answer_tokens(tokenizer, letters, prefix))


# --------------------------------------------------------------------------- the loaded model
class LoadedLlava(LoadedVLM):
    """A loaded LLaVA and its ``LlavaProcessor``. A variant in another prompt format overrides :meth:`prompt` and
    :attr:`answer_prefix` (the prompt's end, after which the letters are scored)."""

    answer_prefix: ClassVar[str] = ASSISTANT

    def prompt(self, user_text: str) -> str:
        return conversation(user_text, self.processor.image_token)

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Tensor]:
        """Left-padded: ``input_ids``/``attention_mask`` [B, L] and ``pixel_values`` [B, 3, S, S] (S: the image
        processor's crop size), ``<image>`` expanded to the tower's feature count."""
        processor = self.processor
        batch = processor(images=pad_to_square(images, processor.image_processor), text=list(prompts),
                          return_tensors="pt", padding=True, padding_side="left")
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return {key: value.to(self.model.device) for key, value in batch.items()}

    def sequence_logits(self, batch: dict[str, Tensor], logits_to_keep: int = 0) -> Tensor:
        """Float logits [B, L', V] of left-padded ``batch`` at the last ``logits_to_keep`` positions (0: all L),
        with position ids counted from each row's first real token; differentiable."""
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # [B, L]
        return self.model(**batch, position_ids=position_ids, logits_to_keep=logits_to_keep).logits.float()

    def continuation_logits(self, batch: dict[str, Tensor], continuations: Sequence[Sequence[int]]) -> Tensor:
        extended, mask = with_continuations(batch, continuations, self.pad_id)
        return self.sequence_logits(extended, logits_to_keep=mask.shape[1] + 1)

    def answer_tokens(self, answers: Sequence[str]) -> list[list[int]]:
        return answer_tokens(self.processor.tokenizer, answers, self.answer_prefix)

    def generate(self, batch: dict[str, Tensor], max_new_tokens: int) -> list[str]:
        out = self.model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)  # [B, L + new]
        answers = self.processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [answer.strip() for answer in answers]

    @property
    def image_tokens(self) -> int:
        """Image features per image: the tower's patches (+1 with the ``full`` feature strategy)."""
        return image_features(self.model.config)

    def pair_tokens(self, user_text: str, answer: str) -> tuple[list[int], list[int]]:
        """:meth:`prompt` (``<image>`` expanded into :attr:`image_tokens` ids) + `` {answer}</s>``; the tokenizer
        adds ``<s>`` itself, as Llama's does."""
        tokenizer, image_token_id = self.processor.tokenizer, self.model.config.image_token_id
        image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        prompt = self.prompt(user_text)
        base = tokenizer(prompt).input_ids
        if base.count(image_token_id) != 1:
            raise VLMError(f"the tokenizer does not keep '{image_token}' as one token (id {image_token_id}) in "
                           f"the training prompt; the VLM loss needs it as a special token")
        at = base.index(image_token_id)
        full = tokenizer(f"{prompt} {answer}").input_ids
        reply = full[len(base):]
        if full[:len(base)] != base or not reply:
            raise VLMError(f"the tokenizer splits the prompt differently once the answer {answer!r} follows it; the "
                           f"VLM loss needs the prompt's tokens to be a prefix of the prompt + answer")
        ids = base[:at] + [image_token_id] * self.image_tokens + base[at + 1:] + reply + [tokenizer.eos_token_id]
        return ids, [IGNORE] * (len(ids) - len(reply) - 1) + reply + [tokenizer.eos_token_id]

    @property
    def projector(self) -> nn.Module:
        inner = getattr(self.model, "model", None)  # transformers >= 4.52: model.model.multi_modal_projector
        return (inner if hasattr(inner, "multi_modal_projector") else self.model).multi_modal_projector

    def answer_loss(self, tokens: Tensor, pairs: PairBatch) -> Tensor:
        model = self.model
        image_embeds = self.projector(tokens.to(model.dtype))  # [B, N, H]; fp32 tokens into an fp16/bf16 LLaVA
        embeds = model.get_input_embeddings()(pairs.input_ids)  # [B, L, H]
        slots = (pairs.input_ids == model.config.image_token_id).unsqueeze(-1)  # [B, L, 1]
        if int(slots.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise VLMError(f"the prompts hold {int(slots.sum())} image tokens for {image_embeds.shape[0]} images "
                           f"of {image_embeds.shape[1]} features")
        embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
        out = model(inputs_embeds=embeds, attention_mask=pairs.attention_mask, labels=pairs.labels)
        return out.loss.float()

    def swap_encoder(self, backbone: Backbone) -> None:
        swap_into_tower(self.model, backbone)

    @property
    def language_model(self) -> nn.Module:
        inner = getattr(self.model, "model", self.model)
        return getattr(inner, "language_model", None) or self.model.language_model

    def language_modules(self) -> list[nn.Module]:
        return [self.language_model, self.model.get_output_embeddings()]

    def llm_layers(self) -> nn.ModuleList:
        return self.language_model.layers


LlavaFamily.loaded_class = LoadedLlava


# --------------------------------------------------------------------------- small offline LLaVAs
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def new_llava_config(vision_config, tokenizer, text: dict[str, int] | None = None, **reading):
    """The ``LlavaConfig`` of a LLaVA with tower ``vision_config`` (a ``CLIPVisionConfig``) and a Llama of
    ``text`` sizes (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``;
    default :data:`TINY_TEXT`) over ``tokenizer`` (one of :mod:`benchmark.vlm.tokenizers`), reading the tower's
    ``hidden_states[-2]`` without the class token through a GELU projector, as LLaVA-1.5 does; ``reading``
    overrides those (``vision_feature_layer``, ``vision_feature_select_strategy``, ``projector_hidden_act``)."""
    from transformers import LlamaConfig, LlavaConfig

    text = {**TINY_TEXT, **(text or {})}
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"), ("image", IMAGE_TOKEN))}
    llama = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=text["num_attention_heads"],
                        max_position_embeddings=1024, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                        pad_token_id=ids["pad"], **text)
    reading = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
               **reading}
    return LlavaConfig(vision_config=vision_config, text_config=llama, image_token_id=ids["image"], **reading)


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


def llava_processor(vision_config, tokenizer, strategy: str = "default"):
    """The ``LlavaProcessor`` of a LLaVA with tower ``vision_config``: ``tokenizer`` and a CLIP image processor
    at the tower's size (CLIP's mean and std), ``<image>`` expanded to one token per patch (and one for the class
    token under the ``full`` ``strategy``)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor, tokenizer, patch_size=vision_config.patch_size,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1)


def save_llava(folder: str | Path, model: nn.Module, processor) -> Path:
    """Write ``model`` and its ``processor`` (:func:`llava_processor`) to ``folder``, loadable as ``llava:<folder>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_llava(folder: str | Path, vision_config=None, seed: int = 0, text: dict[str, int] | None = None) -> Path:
    """Write a tiny random-weight LLaVA with its processor, loadable as ``llava:<folder>`` (offline tests, demos).

    ``vision_config``: the tower's ``CLIPVisionConfig``; default the vision side of ``openclip:fscl-tiny``
    (width 64, 2 layers of 4 heads, MLP 256, 32 px, patch 8, GELU). Pass
    ``benchmark.export.hf_vision_config(backbone.visual)`` to match another open_clip ViT. The language
    model is a 1-layer Llama of width 32 over a character tokenizer (:func:`~benchmark.vlm.tokenizers.char_tokenizer`);
    ``text`` overrides its sizes (:data:`TINY_TEXT`, e.g. ``{"num_hidden_layers": 3}``).
    """
    from transformers import CLIPVisionConfig

    vision = vision_config or CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu")
    tokenizer = char_tokenizer()
    model = new_llava(new_llava_config(vision, tokenizer, text), seed)
    return save_llava(folder, model, llava_processor(vision, tokenizer))
