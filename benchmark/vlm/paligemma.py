"""PaliGemma: a transformers ``PaliGemmaForConditionalGeneration`` whose SigLIP vision tower takes the run's encoder.

``vqa.model`` is ``paligemma:/local/folder`` (``save_pretrained`` of the model and its processor, e.g.
``google/paligemma-3b-mix-224``) or ``paligemma:org/hub-id`` (needs the hub, or ``HF_HUB_OFFLINE=1`` and the local
cache). Facts of transformers' PaliGemma (read in ``models/paligemma/`` of transformers 5) that this family relies on
(4.x scaled the image features and built the prefix-LM mask otherwise: :meth:`PaliGemmaFamily.config` refuses it):

* **Tower**: a ``SiglipVisionModel`` without the attention-pool head (``vision_use_head=False``); it takes an ``hf:``
  SiglipModel or an ``hf-vision:`` SiglipVisionModel of the same shape (its head, if any, is not copied:
  :func:`swap_into_tower`); open_clip's SigLIP (timm, fused ``qkv``) and any CLIP ViT are refused
  (:func:`check_encoder_fits`). PaliGemma *trained* its tower with the language model (unlike LLaVA-1.5, whose CLIP
  tower stayed frozen), so the tower no longer matches SigLIP's text tower: the VLM-loss strategies (``*-ppl``) are
  the meaningful ones, on an ``hf-vision:`` backbone of PaliGemma's own tower (``hf-vision:/paligemma-folder``).
* **Tokens read**: ``get_image_features`` is the tower's ``last_hidden_state`` (the last block's output through
  ``post_layernorm``, every patch, no class token) through ``multi_modal_projector`` (one linear, vision width →
  the text width, ``projection_dim``), unscaled (Gemma's embedding scale ``sqrt(hidden_size)`` applies to the
  text tokens only: the image features replace the ``<image>`` embeddings after it). No block is past the feature
  layer: :meth:`PaliGemmaFamily.unread_blocks` is 0.
* **Prompt**: the processor writes ``<image>`` × ``image_seq_length`` (the tower's patches), then ``<bos>``, the
  prompt and ``"\\n"``; a ``suffix`` (the answer) follows with ``<eos>`` and has ``token_type_ids`` 1 (labels on it
  alone, -100 on the prefix). The tokenizer adds no ``<bos>`` itself. Questions are asked as the mix checkpoints'
  VQA task, ``answer en {text}`` (:data:`TASK`); the answer follows the ``"\\n"`` without a space, so letters are
  scored at the token of ``"A"`` after ``"\\n"`` (an answer's further tokens: the suffix). Images are resized to
  the tower's square (SigLIP squashes, no crop) and normalised with mean = std = 0.5.
* **Attention**: prefix-LM. ``token_type_ids`` 0 (image + prompt) attend to each other both ways, 1 (the answer)
  causally; Gemma's own attention is bidirectional (``use_bidirectional_attention``), so the causal part comes only
  from the mask built from ``token_type_ids``: every call passes them (the answer loss derives them from its labels).
* **Positions**: 1-indexed (``arange + 1`` without ``position_ids``), shifted by the padding under left padding
  (harmless for Gemma's rotary, relative positions, up to rounding); scoring and the answer loss pass
  ``cumsum(attention_mask)`` clamped to ≥ 1, what ``generate`` computes (``cumsum - 1``, then PaliGemma's ``+ 1``).
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from benchmark.backbones import Backbone
from benchmark.export import load_exact, siglip_tower
from benchmark.vlm.base import (
    IGNORE,
    LoadedVLM,
    PairBatch,
    SavedVLMFamily,
    answer_token_sequences,
    tower_differences,
    with_continuations,
)
from benchmark.vlm.spec import VLMError

IMAGE_TOKEN = "<image>"
TASK = "answer en {}"  # PaliGemma's VQA task prefix (the mix checkpoints')


# --------------------------------------------------------------------------- the family (no weights)
class PaliGemmaFamily(SavedVLMFamily):
    """PaliGemma (PaliGemmaForConditionalGeneration): a SigLIP tower trained with its Gemma, prefix-LM prompt.

    ``paligemma:/folder`` or ``paligemma:org/hub-id``."""

    example = "paligemma:/path/to/paligemma-3b-mix-224"
    model_class = "PaliGemmaForConditionalGeneration"
    model_type = "paligemma"
    hub_example = "google/paligemma-3b-mix-224"
    cuda_dtype = torch.bfloat16  # as released; Gemma overflows float16
    takes = ("an hf: SiglipModel or an hf-vision: SigLIP tower of the same shape (PaliGemma's own: "
             "hf-vision:/path/to/paligemma-folder)")

    def config(self):
        """The ``PaliGemmaConfig``, read without weights; :class:`VLMError` under transformers 4.x."""
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise VLMError(f"vqa.model '{self.spec}': the PaliGemma family needs transformers >= 5 (its image features "
                           f"and prefix-LM mask); this environment has {transformers.__version__}")
        return super().config()

    def check_processor(self, processor) -> None:
        """Refuse a processor whose image token is not the config's, or that does not expand it into one token per
        patch, or resizes to another size than the tower's."""
        config = self.config()
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        found = (getattr(processor, "image_token_id", None), getattr(processor, "image_seq_length", None),
                 processor.image_processor.size.get("height"))
        if found != (config.image_token_id, patches, vision.image_size):
            raise VLMError(f"vqa.model '{self.spec}': the processor (image token id, tokens per image, image size "
                           f"{found}) does not fit the model's ({config.image_token_id}, {patches}, "
                           f"{vision.image_size}); save the model's own PaliGemmaProcessor beside it: "
                           f"AutoProcessor.from_pretrained(ID).save_pretrained(DIR)")

    def check_encoder(self, backbone: Backbone) -> None:
        check_encoder_fits(self.tower_config(), backbone)

    def encoder_tokens(self, backbone: Backbone, images: Tensor) -> Tensor:
        """The backbone's SigLIP ``last_hidden_state``: its last block's output through its ``post_layernorm``, every
        patch: [B, N, W]."""
        return siglip_tower(backbone).post_layernorm(backbone.hidden_states(images, -1))

    def unread_blocks(self) -> int:
        return 0

    def load(self, device: torch.device, dtype: torch.dtype | None = None) -> LoadedPaliGemma:
        return LoadedPaliGemma(self, *self.pretrained(device, dtype))


def check_encoder_fits(tower_config, backbone: Backbone) -> None:
    """Raise :class:`VLMError` unless the backbone's encoder loads into a PaliGemma tower of ``tower_config``: an
    HF SigLIP tower (``hf:`` SiglipModel, ``hf-vision:`` SiglipVisionModel; its skeleton is enough) of the same
    width, depth, heads, MLP width, patch and image size and activation."""
    tower = siglip_tower(backbone)
    if tower is None:
        raise VLMError(f"vqa: the encoder of '{backbone.spec}' cannot go into PaliGemma's SigLIP vision tower: it is "
                       f"a {type(backbone.visual).__name__} of {type(backbone.model).__name__}, not a transformers "
                       f"SigLIP tower. VQA with PaliGemma needs {PaliGemmaFamily.takes}; CLIP ViTs and open_clip's "
                       f"SigLIP (timm, fused qkv) cannot be loaded into it")
    diffs = tower_differences(tower.config, tower_config)
    if diffs:
        raise VLMError(f"vqa: the encoder of '{backbone.spec}' does not fit PaliGemma's vision tower: "
                       f"{', '.join(diffs)}. The tower takes only the SigLIP it was trained with (PaliGemma-3B-224: "
                       f"google/siglip-so400m-patch14-224, or its own tower as hf-vision:/path/to/paligemma-folder)")


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``SiglipVisionModel`` of a PaliGemma (``model.model.vision_tower``)."""
    return model.model.vision_tower


def swap_into_tower(model: nn.Module, backbone: Backbone) -> None:
    """Copy the backbone's current SigLIP tower into the tower of the ``PaliGemmaForConditionalGeneration``
    ``model``, in memory, strictly (every tower parameter given, in the tower's dtype); the backbone's
    attention-pool head is left out when the tower has none (PaliGemma's)."""
    tower = vision_tower(model)
    check_encoder_fits(tower.config, backbone)
    target = getattr(tower, "vision_model", tower)  # transformers 4.x: SiglipVisionModel.vision_model
    ours = dict(siglip_tower(backbone).named_parameters())
    if not hasattr(target, "head"):
        ours = {name: p for name, p in ours.items() if not name.startswith("head.")}
    load_exact(target, ours)


# --------------------------------------------------------------------------- the loaded model
class LoadedPaliGemma(LoadedVLM):
    """A loaded PaliGemma and its ``PaliGemmaProcessor``."""

    def prompt(self, user_text: str) -> str:
        return self.processor.image_token + TASK.format(user_text)

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Tensor]:
        """Left-padded: ``input_ids``/``attention_mask``/``token_type_ids`` [B, L] and ``pixel_values`` [B, 3, S, S]."""
        batch = self.processor(images=[image.convert("RGB") for image in images], text=list(prompts),
                               return_tensors="pt", padding=True, padding_side="left")
        batch.pop("labels", None)  # all -100 without a suffix
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return {key: value.to(self.model.device) for key, value in batch.items()}

    def continuation_logits(self, batch: dict[str, Tensor], continuations: Sequence[Sequence[int]]) -> Tensor:
        """As :meth:`LoadedVLM.continuation_logits`; the continuation is the answer (suffix, ``token_type_ids`` 1:
        read causally, the prefix both ways)."""
        extended, mask = with_continuations(batch, continuations, self.pad_id)
        if mask.shape[1]:
            extended["token_type_ids"] = torch.cat([batch["token_type_ids"], torch.ones_like(mask)], 1)
        position_ids = extended["attention_mask"].cumsum(-1).clamp(min=1)  # 1-indexed from each row's first real token
        return self.model(**extended, position_ids=position_ids, logits_to_keep=mask.shape[1] + 1).logits.float()

    def answer_tokens(self, answers: Sequence[str]) -> list[list[int]]:
        """The tokens of each answer after the prompt's ``"\\n"`` (the processor's end of the prefix)."""
        return answer_token_sequences(self.processor.tokenizer, "\n", answers)

    def generate(self, batch: dict[str, Tensor], max_new_tokens: int) -> list[str]:
        out = self.model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)  # [B, L + new]
        answers = self.processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [answer.strip() for answer in answers]

    def pair_tokens(self, user_text: str, answer: str) -> tuple[list[int], list[int]]:
        """What the processor makes of ``prompt(user_text)`` with ``answer`` as its suffix: image tokens, ``<bos>``,
        the prompt, ``"\\n"``, then the answer and ``<eos>`` (the labelled part)."""
        tokenizer, processor = self.processor.tokenizer, self.processor
        prefix = (processor.image_token * processor.image_seq_length + tokenizer.bos_token + TASK.format(user_text)
                  + "\n")
        base = tokenizer(prefix, add_special_tokens=False).input_ids
        reply = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if base.count(processor.image_token_id) != processor.image_seq_length:
            raise VLMError(f"the tokenizer does not keep '{processor.image_token}' as one token in the training "
                           f"prompt; the VLM loss needs it as a special token")
        return base + reply, [IGNORE] * len(base) + reply

    @cached_property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def answer_loss(self, tokens: Tensor, pairs: PairBatch) -> Tensor:
        """As :meth:`LoadedVLM.answer_loss`; the prefix (unlabelled positions) attends both ways, the answer causally
        (``token_type_ids`` = labelled), positions 1-indexed."""
        model = self.model
        image_embeds = self.projector(tokens.to(model.dtype))  # [B, N, H]
        embeds = model.get_input_embeddings()(pairs.input_ids)  # [B, L, H], Gemma's sqrt(H) scale included
        slots = (pairs.input_ids == model.config.image_token_id).unsqueeze(-1)  # [B, L, 1]
        if int(slots.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise VLMError(f"the prompts hold {int(slots.sum())} image tokens for {image_embeds.shape[0]} images "
                           f"of {image_embeds.shape[1]} features")
        embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
        out = model(inputs_embeds=embeds, attention_mask=pairs.attention_mask, labels=pairs.labels,
                    token_type_ids=(pairs.labels != IGNORE).long(),
                    position_ids=pairs.attention_mask.cumsum(-1).clamp(min=1))
        return out.loss.float()

    def swap_encoder(self, backbone: Backbone) -> None:
        swap_into_tower(self.model, backbone)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def language_modules(self) -> list[nn.Module]:
        return [self.language_model, self.model.get_output_embeddings()]

    def llm_layers(self) -> nn.ModuleList:
        return self.language_model.layers


# --------------------------------------------------------------------------- small offline PaliGemmas
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", IMAGE_TOKEN)  # ids 0-4 of gemma_char_tokenizer
TINY_GEMMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16}


def gemma_char_tokenizer():
    """A Gemma-like ``PreTrainedTokenizerFast`` (no download): :data:`GEMMA_SPECIALS`, then one token per printable
    character or space + character (``"A"`` and ``" A"`` are one token each); it adds no ``<bos>`` (PaliGemma's
    processor writes it), and a pair's second text has token type 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*GEMMA_SPECIALS, *chars, *(" " + c for c in chars if c != " ")]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def paligemma_processor(vision_config, tokenizer):
    """The ``PaliGemmaProcessor`` of a PaliGemma with tower ``vision_config``: a ``SiglipImageProcessor`` at the
    tower's size (mean = std = 0.5) expanding ``<image>`` into one token per patch. It adds PaliGemma's 1152
    ``<loc>``/``<seg>`` tokens to ``tokenizer``."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    size = vision_config.image_size
    image_processor = SiglipImageProcessor(size={"height": size, "width": size},
                                           image_seq_length=(size // vision_config.patch_size) ** 2)
    return PaliGemmaProcessor(image_processor, tokenizer)


def save_tiny_paligemma(folder: str | Path, vision_config=None, seed: int = 0) -> Path:
    """Write a tiny random-weight PaliGemma with its processor, loadable as ``paligemma:<folder>`` (offline tests).

    ``vision_config``: the tower's ``SiglipVisionConfig``; default the vision side of
    :func:`~benchmark.backbones.hf.save_tiny_siglip` (width 64, 2 layers of 4 heads, MLP 256, 32 px, patch 8), without
    the head. The language model is a 1-layer Gemma of width 32 (:data:`TINY_GEMMA`) over
    :func:`gemma_char_tokenizer`, initialised from ``seed`` (the global RNG untouched).
    """
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    vision = vision_config or SiglipVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=32, patch_size=8)
    vision.vision_use_head = False
    tokenizer = gemma_char_tokenizer()
    processor = paligemma_processor(vision, tokenizer)  # grows the vocabulary: size the model after it
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           (("pad_token_id", "<pad>"), ("eos_token_id", "<eos>"), ("bos_token_id", "<bos>"))}
    text = {"model_type": "gemma", "vocab_size": len(tokenizer), "max_position_embeddings": 1024, **TINY_GEMMA, **ids}
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text, image_token_index=processor.image_token_id,
                             projection_dim=TINY_GEMMA["hidden_size"], hidden_size=TINY_GEMMA["hidden_size"],
                             vocab_size=len(tokenizer), pad_token_id=ids["pad_token_id"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.update(**ids)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
