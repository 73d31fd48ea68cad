"""Scoring a LLaVA on multiple-choice questions: the option letter it prefers, or its greedy answer.

* :func:`letter_scores` (``letter``, the default): one forward pass over a batch of questions; the
  answer is the argmax over the K option-letter tokens at the first answer position. It also keeps
  the argmax over the whole vocabulary (``strict``: it must be the right letter, as a greedy first
  token would be) and the probability mass on the K letters (how well the model keeps the format).
* :func:`generate_answers` (``generate``): the released decoding (greedy, 20 new tokens, special
  tokens skipped, stripped), for parity checks; the question set's parse rules judge the strings.

Batches are left-padded with explicit ``position_ids`` (a plain forward would number the padding),
so a batched score equals the unbatched one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from benchmark.vqa.llava import VQAModelError
from benchmark.vqa.prompt import ASSISTANT, encode
from benchmark.vqa.questions import LETTERS

MAX_NEW_TOKENS = 20
Item = tuple[Image.Image, str, int]  # (image, prompt from prompt.conversation, number of options K)


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


def letter_token_ids(tokenizer, k: int = len(LETTERS)) -> list[int]:
    """The token of each of the first ``k`` letters as the model's first answer token after ``ASSISTANT:``.

    Found tokenizer-agnostically: the first token that ``"ASSISTANT: L"`` adds to ``"ASSISTANT:"``
    (Llama: ``▁A``); it must decode to the letter alone.
    """
    base = tokenizer(ASSISTANT, add_special_tokens=False).input_ids
    ids = []
    for letter in LETTERS[:k]:
        full = tokenizer(f"{ASSISTANT} {letter}", add_special_tokens=False).input_ids
        new = full[len(base):]
        if full[:len(base)] != base or not new or tokenizer.decode(new[:1]).strip() != letter:
            raise VQAModelError(f"the tokenizer has no single first token for the answer ' {letter}' after "
                             f"'{ASSISTANT}' (it gives {tokenizer.convert_ids_to_tokens(new)}); letter scoring needs one")
        ids.append(new[0])
    return ids


def model_inputs(model: nn.Module, processor, items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs of ``items`` on the model's device, images in its dtype."""
    batch = encode(processor, [image for image, _, _ in items], [prompt for _, prompt, _ in items])
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return {key: value.to(model.device) for key, value in batch.items()}


def sequence_logits(model: nn.Module, batch: dict[str, torch.Tensor], logits_to_keep: int = 0) -> torch.Tensor:
    """Float logits [B, L', V] of left-padded ``batch`` (:func:`model_inputs`) at the last ``logits_to_keep``
    positions (0: all L), with position ids counted from each row's first real token; differentiable."""
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return model(**batch, position_ids=position_ids, logits_to_keep=logits_to_keep).logits.float()


def answer_logits(model: nn.Module, processor, items: Sequence[Item]) -> torch.Tensor:
    """The logits [B, V] of the first answer token of ``items`` (each prompt's last position), one forward pass."""
    return sequence_logits(model, model_inputs(model, processor, items), logits_to_keep=1)[:, -1]


@torch.no_grad()
def letter_scores(model: nn.Module, processor, items: Sequence[Item]) -> list[LetterScore]:
    """Score ``items`` with one forward pass: logits [B, V] at each prompt's last position → letter scores."""
    logprobs = answer_logits(model, processor, items).log_softmax(-1)
    letters = letter_token_ids(processor.tokenizer, max(k for _, _, k in items))
    scores = []
    for row, (_, _, k) in zip(logprobs, items):
        ours = row[letters[:k]]  # [K]
        top = int(row.argmax())
        scores.append(LetterScore(choice=int(ours.argmax()), top_token=top,
                                  top_letter=letters[:k].index(top) if top in letters[:k] else None,
                                  letter_logprobs=tuple(ours.tolist())))
    return scores


@torch.no_grad()
def generate_answers(model: nn.Module, processor, items: Sequence[Item],
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of ``items`` (the released decoding), special tokens skipped, stripped."""
    batch = model_inputs(model, processor, items)
    out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)  # [B, L + new]
    answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]
