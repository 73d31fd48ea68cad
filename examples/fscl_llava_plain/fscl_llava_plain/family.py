"""The ``llava-plain`` family (declared in :mod:`fscl_llava_plain`): LLaVA-1.5 in the plain template.

Everything but the prompt is LLaVA's (:mod:`benchmark.vlm.llava`): the folder, its checks, the tower that
takes the run's encoder, the tokens its language model reads, the training pairs (built on :meth:`prompt`),
the answer loss.
"""
from __future__ import annotations

from benchmark.vlm.llava import LlavaFamily, LoadedLlava

ANSWER = "Answer:"


def plain_prompt(user_text: str, image_token: str) -> str:
    """The image, the user's text and the answer cue, one a line; no system prompt, no roles."""
    return f"{image_token}\n{user_text}\n{ANSWER}"


class PlainLlava(LoadedLlava):
    """A loaded LLaVA asked in the plain template; its letters are scored after ``Answer:``."""

    answer_prefix = ANSWER

    def prompt(self, user_text: str) -> str:
        return plain_prompt(user_text, self.processor.image_token)


class PlainLlavaFamily(LlavaFamily):
    """``llava-plain:/folder``: the LLaVA of ``llava:/folder``, loaded as a :class:`PlainLlava`."""

    example = "llava-plain:/path/to/llava-1.5-7b-hf"
    loaded_class = PlainLlava
