"""Training pairs of the VLM loss (LoRSU-Ppl, LoRA-Ppl): a question about the image and the class's answer,
tokenized by the run's VLM with loss only on the answer.

The user's text of a pair is the released LoRSU-Ppl instruction around the stream's question::

    Based on the image, respond to this question with a short answer: {question}

and the answer is the stream's ``ppl_answer`` with the class name (GTSRB: "This is a {} traffic sign"). The VLM
puts them in its own prompt format (:meth:`benchmark.vlm.base.LoadedVLM.pair_tokens`; LLaVA-1.5: the ``vicuna_v1``
conversation, then `` {answer}</s>``), its image token expanded into one token per image feature; the labels are
-100 everywhere except the answer's tokens and the end of sequence, so the loss (the VLM's mean next-token
cross-entropy over the labelled positions) is the answer's. Every class has one pair, tokenized once.
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
    """The tokenized pair of every class: the prompt (image tokens expanded) and its answer.

    Args:
        vlm: the run's loaded VLM (its tokenizer and prompt format).
        question: the stream's ``vqa_question``; ``answer``: its ``ppl_answer`` (``{}``: the class name).
        class_names: the stream's class names, by label.
    """

    def __init__(self, vlm: LoadedVLM, question: str, answer: str, class_names: Sequence[str]) -> None:
        self.pad_id = vlm.pad_id
        self.pairs = [vlm.pair_tokens(user_text(question), answer.format(name)) for name in class_names]

    def answer_ids(self, label: int) -> list[int]:
        """The labelled token ids of class ``label``: its answer's tokens and the end of sequence."""
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
