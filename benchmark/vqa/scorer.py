"""Scoring a VLM on multiple-choice questions: the option it prefers, or its greedy answer.

* :func:`option_scores` (``letter``, the default) needs no parse: an item's options are the answers that name them
  (the letters ``A``, ``B``, ... of a lettered set; ``true``/``false``, ``no``/``yes``, ``(a)``/``(b)`` of a set
  with its own questions), each the tokens it adds after the prompt (:meth:`~benchmark.vlm.base.LoadedVLM.answer_tokens`).
  When the options share a token prefix P (none for letters) and each has a token right after it, all distinct, one
  forward pass with P appended decides: the option whose token there is the most probable. It also keeps the argmax
  over the whole vocabulary there (``strict``: it must be the right option's token, as a greedy decoding's would be)
  and the probability mass on the options. Otherwise (one option's tokens start another's, such as ``no`` and
  ``no way``) each option's summed log-likelihood decides, one forward pass per option.
* :func:`generate_answers` (``generate``): the released decoding (greedy, 20 new tokens, special tokens skipped,
  stripped), for parity checks; the question set's parse rules judge the strings.

Both talk to the VLM through its family's protocol (:class:`benchmark.vlm.base.LoadedVLM`): its prompt, its
left-padded inputs (a batched score equals the unbatched one), the logits of an answer's first tokens and the tokens
of the answers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from benchmark.vlm.base import LoadedVLM
from benchmark.vlm.spec import VLMError

MAX_NEW_TOKENS = 20
Item = tuple[Image.Image, str, tuple[str, ...]]  # (image, prompt from LoadedVLM.prompt, the answer naming each option)


@dataclass(frozen=True)
class OptionScore:
    """One question's option scores (K options).

    ``choice``: index of the preferred option; ``logprobs``: each option's log-probability over the whole vocabulary
    that the answer starts with its tokens up to its deciding token (the first where the options differ), or with all
    its tokens (summed log-likelihood, when no token decides); ``top_token``: the argmax token over the whole
    vocabulary at the deciding position (None without one); ``top_option``: the option whose deciding token it is,
    None when it is none; ``mass``: the probability that the answer starts with one of the options (1: the model
    answers in the format).
    """

    choice: int
    logprobs: tuple[float, ...]
    top_token: int | None
    top_option: int | None
    mass: float

    @property
    def probs(self) -> tuple[float, ...]:
        """Each option's probability normalised over the K options (softmax of :attr:`logprobs`)."""
        return tuple(torch.tensor(self.logprobs, dtype=torch.float64).softmax(0).tolist())


@dataclass(frozen=True)
class Options:
    """How an item's options are told apart: their ``tokens``, their common token prefix ``prefix`` and the token
    right after it of each (``deciding``; None when some option ends there or two share it: summed log-likelihood)."""

    tokens: tuple[tuple[int, ...], ...]
    prefix: tuple[int, ...]
    deciding: tuple[int, ...] | None

    @classmethod
    def of(cls, answers: Sequence[str], tokens: Sequence[Sequence[int]]) -> Options:
        """The options of ``answers``, whose tokens are ``tokens``; :class:`VLMError` when two are the same tokens."""
        tokens = tuple(tuple(t) for t in tokens)
        if len(set(tokens)) < len(tokens):
            raise VLMError(f"the answers {list(answers)} give the same tokens twice ({[list(t) for t in tokens]}); "
                           f"option scoring cannot tell those options apart")
        width = 0
        while all(len(t) > width for t in tokens) and len({t[width] for t in tokens}) == 1:
            width += 1
        following = [t[width] if len(t) > width else None for t in tokens]
        deciding = None if None in following or len(set(following)) < len(following) else tuple(following)
        return cls(tokens, tokens[0][:width], deciding)

    def disjoint(self) -> list[int]:
        """The options whose tokens no other option's tokens start (the events "the answer starts with the
        option's tokens" of these are disjoint; an option another one starts with is already counted in it)."""
        return [i for i, t in enumerate(self.tokens)
                if not any(j != i and t[:len(other)] == other for j, other in enumerate(self.tokens))]


def _rows(batch: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """The ``rows`` of every (batch-first) tensor of ``batch``; ``batch`` itself when they are all of it."""
    if rows == list(range(len(batch["input_ids"]))):
        return batch
    index = torch.tensor(rows, device=batch["input_ids"].device)
    return {key: value[index] for key, value in batch.items()}


def _summed(logprobs: Tensor, tokens: Sequence[int]) -> Tensor:
    """Sum of ``logprobs`` [C + 1, V] of ``tokens`` at positions 0, 1, ... (0 for no tokens)."""
    positions = torch.arange(len(tokens), device=logprobs.device)
    return logprobs[positions, torch.tensor(list(tokens), dtype=torch.long, device=logprobs.device)].sum()


@torch.no_grad()
def option_scores(vlm: LoadedVLM, items: Sequence[Item]) -> list[OptionScore]:
    """Score ``items``: one forward pass for those with deciding tokens (their prefixes appended; lettered sets: the
    logits [B, V] at each prompt's last position), plus one per option for the others (:class:`OptionScore`)."""
    tokens = {answers: vlm.answer_tokens(answers) for answers in {answers for _, _, answers in items}}
    options = [Options.of(answers, tokens[answers]) for _, _, answers in items]
    batch = vlm.inputs([image for image, _, _ in items], [prompt for _, prompt, _ in items])
    scores: dict[int, OptionScore] = {}
    deciding = [row for row, o in enumerate(options) if o.deciding is not None]
    if deciding:
        logits = vlm.continuation_logits(_rows(batch, deciding), [options[row].prefix for row in deciding])
        for row, logprobs in zip(deciding, logits.log_softmax(-1)):  # logprobs [C + 1, V]
            prefix, ids = options[row].prefix, list(options[row].deciding)
            at = logprobs[len(prefix)]  # [V]: the deciding position
            ours = at[ids] + _summed(logprobs, prefix)  # [K]
            top = int(at.argmax())
            scores[row] = OptionScore(int(ours.argmax()), tuple(ours.tolist()), top,
                                      ids.index(top) if top in ids else None,
                                      float(torch.tensor(ours.tolist()).exp().sum()))
    summed = [row for row, o in enumerate(options) if o.deciding is None]
    likelihoods: dict[int, list[float]] = {row: [] for row in summed}
    for k in range(max((len(options[row].tokens) for row in summed), default=0)):
        rows = [row for row in summed if len(options[row].tokens) > k]
        logits = vlm.continuation_logits(_rows(batch, rows), [options[row].tokens[k] for row in rows])
        for row, logprobs in zip(rows, logits.log_softmax(-1)):
            likelihoods[row].append(float(_summed(logprobs, options[row].tokens[k])))
    for row in summed:
        ours = torch.tensor(likelihoods[row])
        scores[row] = OptionScore(int(ours.argmax()), tuple(likelihoods[row]), None, None,
                                  float(ours[options[row].disjoint()].exp().sum()))
    return [scores[row] for row in range(len(items))]


@torch.no_grad()
def generate_answers(vlm: LoadedVLM, items: Sequence[Item], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of ``items`` (the released decoding), special tokens skipped, stripped."""
    return vlm.generate(vlm.inputs([image for image, _, _ in items], [prompt for _, prompt, _ in items]),
                        max_new_tokens)
