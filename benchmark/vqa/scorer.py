"""Scoring a VLM on multiple-choice questions: the option letter it prefers, or its greedy answer.

* :func:`letter_scores` (``letter``, the default): one forward pass over a batch of questions; the
  answer is the argmax over the K option-letter tokens at the first answer position. It also keeps
  the argmax over the whole vocabulary (``strict``: it must be the right letter, as a greedy first
  token would be) and the probability mass on the K letters (how well the model keeps the format).
* :func:`generate_answers` (``generate``): the released decoding (greedy, 20 new tokens, special
  tokens skipped, stripped), for parity checks; the question set's parse rules judge the strings.

Both talk to the VLM through its family's protocol (:class:`benchmark.vlm.base.LoadedVLM`): its prompt, its
left-padded inputs (a batched score equals the unbatched one), its first-answer-token logits and letter tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from benchmark.vlm.base import LoadedVLM
from benchmark.vqa.questions import LETTERS

MAX_NEW_TOKENS = 20
Item = tuple[Image.Image, str, int]  # (image, prompt from LoadedVLM.prompt, number of options K)


@dataclass(frozen=True)
class LetterScore:
    """One question's letter scores (K options).

    ``choice``: index of the most probable of the K letters; ``top_token``: the argmax token over the
    whole vocabulary; ``top_letter``: its option index, None when it is no option letter;
    ``letter_logprobs``: the K letters' log-probabilities over the whole vocabulary.
    """

    choice: int
    top_token: int
    top_letter: int | None
    letter_logprobs: tuple[float, ...]

    @property
    def letter_mass(self) -> float:
        """Probability mass on the K option letters (1: the model answers in the format)."""
        return float(torch.tensor(self.letter_logprobs).exp().sum())


def answer_logits(vlm: LoadedVLM, items: Sequence[Item]) -> torch.Tensor:
    """The logits [B, V] of the first answer token of ``items`` (each prompt's last position), one forward pass."""
    return vlm.answer_logits(vlm.inputs([image for image, _, _ in items], [prompt for _, prompt, _ in items]))


@torch.no_grad()
def letter_scores(vlm: LoadedVLM, items: Sequence[Item]) -> list[LetterScore]:
    """Score ``items`` with one forward pass: logits [B, V] at each prompt's last position → letter scores."""
    logprobs = answer_logits(vlm, items).log_softmax(-1)
    letters = vlm.letter_token_ids(LETTERS[:max(k for _, _, k in items)])
    scores = []
    for row, (_, _, k) in zip(logprobs, items):
        ours = row[letters[:k]]  # [K]
        top = int(row.argmax())
        scores.append(LetterScore(choice=int(ours.argmax()), top_token=top,
                                  top_letter=letters[:k].index(top) if top in letters[:k] else None,
                                  letter_logprobs=tuple(ours.tolist())))
    return scores


@torch.no_grad()
def generate_answers(vlm: LoadedVLM, items: Sequence[Item], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of ``items`` (the released decoding), special tokens skipped, stripped."""
    return vlm.generate(vlm.inputs([image for image, _, _ in items], [prompt for _, prompt, _ in items]),
                        max_new_tokens)
