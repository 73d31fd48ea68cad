"""The LLaVA-1.5 conversation (``vicuna_v1``) around a question, and image preprocessing, as released by LoRSU.

The prompt of a question set's user text (:meth:`benchmark.vqa.questions.QuestionSet.prompt`:
the question, the lettered options and the answer instruction) is::

    A chat between a curious user and an artificial intelligence assistant. The assistant gives
    helpful, detailed, and polite answers to the user's questions. USER: <image>\n{user text} ASSISTANT:

(one line; ``\n`` is a newline). Images are padded to a square with the image processor's mean
colour (``expand2square``), then resized, cropped and normalised by the model's image processor.
The model's ``LlavaProcessor`` expands ``<image>`` into one token per patch feature and
tokenizes the whole string at once; the released code tokenizes the text on either side of
``<image>`` separately (``tokenizer_image_token``), which may differ by a leading-space token
after the image.
"""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
ASSISTANT = "ASSISTANT:"


def conversation(user_text: str, image_token: str = "<image>") -> str:
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


def encode(processor, images: Sequence[Image.Image], prompts: Sequence[str]):
    """Model inputs of a batch, left-padded: ``input_ids``/``attention_mask`` [B, L] and ``pixel_values``
    [B, 3, S, S] (S: the image processor's crop size); ``<image>`` expanded to the tower's patch count."""
    return processor(images=pad_to_square(images, processor.image_processor), text=list(prompts),
                     return_tensors="pt", padding=True, padding_side="left")
