"""Training pairs of the VLM loss (LoRSU-Ppl, LoRA-Ppl): a question about the image and the class's answer,
tokenized by the run's VLM with loss only on the answer.

The user's text of a pair is the released LoRSU-Ppl instruction around the stream's question::

    Based on the image, respond to this question with a short answer: {question}

and the answer is the stream's ``ppl_answer`` with the class name (GTSRB: "This is a {} traffic sign"). The VLM
puts them in its own prompt format (:meth:`benchmark.vlm.base.LoadedVLM.pair_tokens`; LLaVA-1.5: the ``vicuna_v1``
conversation, then `` {answer}</s>``), its image token expanded into one token per image feature; the labels are
-100 everywhere except the answer's tokens and the end of sequence, so the loss (the VLM's mean next-token
cross-entropy over the labelled positions) is the answer's. Every class has one pair, tokenized once. A stream
with its own questions (VSR, Hateful Memes, MMVP, VisOnlyQA) brings the pair of each training image, worded as the
released trainer words it (:attr:`benchmark.vqa.questions.OwnQuestion.pair`; VisOnlyQA's without the
instruction), and each image's label is its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from benchmark.vlm.base import IGNORE, LoadedVLM, PairBatch

INSTRUCTION = "Based on the image, respond to this question with a short answer: {}"


def user_text(question: str) -> str:
    """The user's turn of a training pair (the released code strips its trailing space)."""
    return INSTRUCTION.format(question).strip()


class AnswerPairs:
    """The tokenized training pair of every label: the prompt (image tokens expanded) and its answer.

    Args:
        vlm: the run's loaded VLM (its tokenizer and prompt format).
        texts: the (user text, answer) of each label. Pairs are tokenized on first use, once each (a stream with
            its own questions has one pair per training image, most never drawn).
    """

    def __init__(self, vlm: LoadedVLM, texts: Sequence[tuple[str, str]]) -> None:
        self.pad_id = vlm.pad_id
        self.vlm = vlm
        self.texts = list(texts)
        self._tokens: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def for_classes(cls, vlm: LoadedVLM, question: str, answer: str, class_names: Sequence[str]) -> AnswerPairs:
        """One pair per class: the stream's ``vqa_question`` in the released instruction, and its ``ppl_answer``
        (``{}``: the class name)."""
        return cls(vlm, [(user_text(question), answer.format(name)) for name in class_names])

    def pair(self, label: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of ``label``'s pair (:meth:`~benchmark.vlm.base.LoadedVLM.pair_tokens`)."""
        if label not in self._tokens:
            self._tokens[label] = self.vlm.pair_tokens(*self.texts[label])
        return self._tokens[label]

    def answer_ids(self, label: int) -> list[int]:
        """The labelled token ids of ``label``: its answer's tokens and the end of sequence."""
        return [t for t in self.pair(label)[1] if t != IGNORE]

    def batch(self, labels: Sequence[int] | Tensor) -> PairBatch:
        """The pairs of ``labels`` [B], right-padded with the pad token (label -100, mask 0)."""
        rows = [self.pair(int(label)) for label in labels]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, labelled) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            targets[i, :len(ids)] = torch.tensor(labelled)
            mask[i, :len(ids)] = 1
        return PairBatch(input_ids, targets, mask)
