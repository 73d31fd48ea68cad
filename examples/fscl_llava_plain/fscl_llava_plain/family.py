"""The ``llava-plain`` family (declared in :mod:`fscl_llava_plain`): LLaVA-1.5 in the plain template.

Everything but the prompt is LLaVA's (:mod:`benchmark.vlm.llava`): the folder, its checks, the tower that
takes the run's encoder, the tokens its language model reads, the answer loss.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from benchmark.vlm.base import IGNORE, answer_token_ids
from benchmark.vlm.llava import LlavaFamily, LoadedLlava
from benchmark.vlm.spec import VLMError

ANSWER = "Answer:"


def plain_prompt(user_text: str, image_token: str) -> str:
    """The image, the user's text and the answer cue, one a line; no system prompt, no roles."""
    return f"{image_token}\n{user_text}\n{ANSWER}"


class PlainLlava(LoadedLlava):
    """A loaded LLaVA asked in the plain template."""

    def prompt(self, user_text: str) -> str:
        return plain_prompt(user_text, self.processor.image_token)

    def letter_token_ids(self, letters: Sequence[str]) -> list[int]:
        """The tokens of ``" A"``, ``" B"``, ... after ``Answer:`` (Llama: ``▁A``)."""
        return answer_token_ids(self.processor.tokenizer, ANSWER, [f" {letter}" for letter in letters])

    def pair_tokens(self, user_text: str, answer: str) -> tuple[list[int], list[int]]:
        """The prompt, its image token repeated once per image feature, then `` {answer}</s>``; labelled on the
        answer and ``</s>``."""
        tokenizer, image = self.processor.tokenizer, self.processor.image_token
        prompt = self.prompt(user_text).replace(image, image * self.image_tokens)
        base, full = (tokenizer(text).input_ids for text in (prompt, f"{prompt} {answer}"))
        reply = full[len(base):] + [tokenizer.eos_token_id]
        if full[:len(base)] != base or len(reply) < 2:
            raise VLMError(f"llava-plain: the tokenizer splits the prompt differently once the answer {answer!r} "
                           f"follows it; the VLM loss needs the prompt's tokens to be a prefix of prompt + answer")
        return base + reply, [IGNORE] * len(base) + reply


class PlainLlavaFamily(LlavaFamily):
    """``llava-plain:/folder``: the LLaVA of ``llava:/folder``, loaded as a :class:`PlainLlava`."""

    example = "llava-plain:/path/to/llava-1.5-7b-hf"

    def load(self, device: torch.device, dtype: torch.dtype | None = None) -> PlainLlava:
        llava = super().load(device, dtype)
        return PlainLlava(self, llava.model, llava.processor)
