"""The VLM loss of the backbone's vision encoder: LLaVA's next-token loss on the answer, with the run's own encoder
in place of LLaVA's vision tower.

The encoder is trained where it lives, in the run's backbone (open_clip, or an ``hf:`` CLIP): its hidden states
at LLaVA's feature layer (``vision_feature_layer``, -2: the input of the last block, which therefore never
matters) go through LLaVA's frozen projector into the image-token positions of the frozen language model's
input embeddings. This is LLaVA's own forward (``get_image_features`` then the language model) with the tower
replaced by the same weights in the open_clip layout, so every strategy works on the open_clip modules as in the
CLIP path, and both evaluations (zero-shot, and VQA through :func:`benchmark.vqa.llava.swap_encoder`) read the
updated weights directly. Nothing of LLaVA is trained: its parameters are frozen and never handed to an
optimizer; gradients flow through it to the encoder only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.backbones import Backbone
from benchmark.backbones.hf import HFCLIPBackbone
from benchmark.backbones.openclip import OpenCLIPBackbone
from benchmark.vqa.llava import VQAModelError, check_encoder_fits, vision_tower
from benchmark.vqa.pairs import PairBatch


def encoder_tokens(backbone: Backbone, images: Tensor, layer: int, select: str) -> Tensor:
    """The vision encoder's hidden states after its first ``layer`` blocks (transformers' ``hidden_states[layer]``:
    0 = the embeddings after the pre-norm; negative counts from the end, -1 = the last block's output).

    Args:
        images: [B, 3, S, S], the backbone's preprocessing.
        select: ``default`` drops the class token (LLaVA-1.5), ``full`` keeps it.
    Returns: [B, N, W] with N = patches (+1 with ``full``); only the blocks up to ``layer`` run.
    """
    if isinstance(backbone, OpenCLIPBackbone):
        visual = backbone.visual
        blocks = visual.transformer.resblocks
        count = layer if layer >= 0 else len(blocks) + 1 + layer
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, patches, W]
        cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = visual.ln_pre(visual.patch_dropout(torch.cat([cls, x], 1) + visual.positional_embedding.to(x.dtype)))
        if not visual.transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:count]:
            x = block(x)
        hidden = x if visual.transformer.batch_first else x.transpose(0, 1)
    elif isinstance(backbone, HFCLIPBackbone):
        hidden = backbone.visual.tower(pixel_values=images, output_hidden_states=True).hidden_states[layer]
    else:
        raise VQAModelError(f"the VLM loss needs a CLIP ViT encoder (open_clip or hf:), not '{backbone.spec}'")
    return hidden[:, 1:] if select == "default" else hidden


class VLMLoss(nn.Module):
    """LLaVA's answer loss of a batch, from the encoder's tokens; ``model`` is a ``LlavaForConditionalGeneration``
    (frozen here). Its vision tower is never run: :meth:`forward` takes the encoder's tokens instead."""

    def __init__(self, model: nn.Module, backbone: Backbone) -> None:
        super().__init__()
        check_encoder_fits(vision_tower(model).config, backbone)
        self.llava = model.requires_grad_(False)
        config = model.config
        self.layer, self.select = config.vision_feature_layer, config.vision_feature_select_strategy
        if not isinstance(self.layer, int):
            raise VQAModelError(f"the VLM loss reads one feature layer; this LLaVA concatenates {self.layer}")
        self.image_token_id = config.image_token_id
        inner = getattr(model, "model", None)  # transformers >= 4.52: model.model.multi_modal_projector
        self.projector = (inner if hasattr(inner, "multi_modal_projector") else model).multi_modal_projector

    @property
    def image_tokens(self) -> int:
        """Image features per image: the tower's patches (+1 with the ``full`` feature strategy)."""
        vision = vision_tower(self.llava).config
        return (vision.image_size // vision.patch_size) ** 2 + (self.select == "full")

    def forward(self, tokens: Tensor, pairs: PairBatch) -> Tensor:
        """Mean next-token cross-entropy over the labelled positions (scalar, fp32).

        ``tokens``: [B, N, W] from :func:`encoder_tokens`; ``pairs``: the batch's tokenized pairs
        (:class:`benchmark.vqa.pairs.PairBatch`, on the model's device).
        """
        image_embeds = self.projector(tokens.to(self.llava.dtype))  # [B, N, H]; fp32 tokens into an fp16/bf16 LLaVA
        embeds = self.llava.get_input_embeddings()(pairs.input_ids)  # [B, L, H]
        slots = (pairs.input_ids == self.image_token_id).unsqueeze(-1)  # [B, L, 1]
        if int(slots.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise VQAModelError(f"the prompts hold {int(slots.sum())} image tokens for {image_embeds.shape[0]} images "
                                f"of {image_embeds.shape[1]} features")
        embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
        out = self.llava(inputs_embeds=embeds, attention_mask=pairs.attention_mask, labels=pairs.labels)
        return out.loss.float()
