"""Training pairs of the VLM loss (LoRSU-Ppl, LoRA-Ppl): a question about the image and the class's answer,
tokenized for LLaVA with loss only on the answer.

The released LoRSU-Ppl conversation (``vicuna_v1``, :func:`benchmark.vqa.prompt.conversation`)::

    {SYSTEM} USER: <image>\\nBased on the image, respond to this question with a short answer: {question} ASSISTANT: {answer}</s>

``answer`` is the stream's ``ppl_answer`` with the class name (GTSRB: "This is a {} traffic sign").
The labels are -100 everywhere except the answer's tokens and ``</s>``, so the loss (LLaVA's mean
next-token cross-entropy over the labelled positions) is the answer's. ``<image>`` is expanded into
one token per image feature, as LLaVA's processor does. Every class has one pair, tokenized once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmark.vqa.llava import VQAModelError
from benchmark.vqa.prompt import conversation

INSTRUCTION = "Based on the image, respond to this question with a short answer: {}"
IGNORE = -100  # label of the positions without loss (transformers' and the released code's)


def user_text(question: str) -> str:
    """The user's turn of a training pair (the released code strips its trailing space)."""
    return INSTRUCTION.format(question).strip()


@dataclass(frozen=True)
class PairBatch:
    """Right-padded token tensors of a batch: ``input_ids``, ``labels`` and ``attention_mask``, each [B, L]."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.labels, self.attention_mask)))


class AnswerPairs:
    """The tokenized pair of every class: the prompt (image tokens expanded) and its answer.

    Args:
        tokenizer: LLaVA's tokenizer (``processor.tokenizer``; it adds ``<s>`` itself, as Llama's does).
        image_token_id: id of ``<image>`` (``config.image_token_id``).
        image_tokens: image features per image (LLaVA's tower: patches, plus the class token with the
            ``full`` feature strategy).
        question: the stream's ``vqa_question``; ``answer``: its ``ppl_answer`` (``{}``: the class name).
        class_names: the stream's class names, by label.
    """

    def __init__(self, tokenizer, image_token_id: int, image_tokens: int, question: str, answer: str,
                 class_names: Sequence[str]) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        prompt = conversation(user_text(question), image_token)
        base = tokenizer(prompt).input_ids
        if base.count(image_token_id) != 1:
            raise VQAModelError(f"the tokenizer does not keep '{image_token}' as one token (id {image_token_id}) in "
                                f"the training prompt; the VLM loss needs it as a special token")
        at = base.index(image_token_id)
        self.pairs: list[tuple[list[int], list[int]]] = []  # per class: (input_ids, labels)
        for name in class_names:
            full = tokenizer(f"{prompt} {answer.format(name)}").input_ids
            reply = full[len(base):]
            if full[:len(base)] != base or not reply:
                raise VQAModelError(f"the tokenizer splits the prompt differently once the answer "
                                    f"{answer.format(name)!r} follows it; the VLM loss needs the prompt's tokens "
                                    f"to be a prefix of the prompt + answer")
            ids = base[:at] + [image_token_id] * image_tokens + base[at + 1:] + reply + [tokenizer.eos_token_id]
            labels = [IGNORE] * (len(ids) - len(reply) - 1) + reply + [tokenizer.eos_token_id]
            self.pairs.append((ids, labels))

    def answer_ids(self, label: int) -> list[int]:
        """The labelled token ids of class ``label``: its answer's tokens and ``</s>``."""
        return [t for t in self.pairs[label][1] if t != IGNORE]

    def batch(self, labels: Sequence[int] | Tensor) -> PairBatch:
        """The pairs of class ``labels`` [B], right-padded with the pad token (label -100, mask 0)."""
        rows = [self.pairs[int(label)] for label in labels]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, labelled) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            targets[i, :len(ids)] = torch.tensor(labelled)
            mask[i, :len(ids)] = 1
        return PairBatch(input_ids, targets, mask)
