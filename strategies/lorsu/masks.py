"""Which entries and heads LoRSU updates: the selection rules of the LoRSU paper (arXiv 2502.04098), as pure functions.

Lemma (the paper's): among binary masks with S ones, the one that keeps most of a gradient
step (max ‖m ⊙ g‖²) keeps the S entries of largest |g| — :func:`top_entries`. Corollary:
when whole heads are selected, keep the heads of largest ‖g_h‖²_F — :func:`head_scores`
and :func:`top_heads`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def mask_size(numel: int, sparsity: float) -> int:
    """⌊sparsity · numel⌋, the number of entries a mask of that density keeps."""
    return math.floor(sparsity * numel)


def top_entries(scores: Tensor, count: int) -> Tensor:
    """Flat indices [count] (ascending) of the ``count`` entries of largest ``|scores|``."""
    return torch.topk(scores.abs().flatten(), count, sorted=False).indices.sort().values


def random_entries(numel: int, count: int, device: torch.device | None = None) -> Tensor:
    """``count`` distinct flat indices in [0, numel), ascending, from the global torch RNG."""
    return torch.randperm(numel)[:count].sort().values.to(device)


def head_scores(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Score of every head, [H]: ‖I_q,h‖²_F + ‖I_k,h‖²_F + ‖I_v,h‖²_F.

    ``q``, ``k``, ``v``: importance of the three projections, each [H·d, I] with head ``h``
    owning rows ``h·d : (h + 1)·d`` (an encoder block's [W, W], d = W/H; a language-model layer's [H·d, hidden]).
    """
    return sum(m.float().reshape(num_heads, -1).square().sum(1) for m in (q, k, v))


def top_heads(scores: Tensor, k: int) -> tuple[int, ...]:
    """The ``k`` heads of largest score, ascending."""
    return tuple(sorted(torch.topk(scores, k).indices.tolist()))


def head_rows(heads: tuple[int, ...], head_dim: int, device: torch.device | None = None) -> Tensor:
    """Row indices [len(heads)·head_dim] of ``heads`` (ascending) in one projection whose head ``h`` owns rows
    ``h·head_dim : (h + 1)·head_dim``."""
    return (torch.tensor(heads, device=device)[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


def random_heads(num_heads: int, k: int) -> tuple[int, ...]:
    """``k`` distinct heads drawn from the global torch RNG, ascending."""
    return tuple(sorted(torch.randperm(num_heads)[:k].tolist()))
