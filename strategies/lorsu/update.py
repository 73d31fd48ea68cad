"""The trainable pieces LoRSU adds for one session, and how they merge back into the weights.

- :class:`SparseEntries`: a parametrization of a weight whose entries at fixed flat indices
  are trainable values; the optimizer holds only those values (state ∝ mask size).
- :class:`HeadLoRA`: the structured low-rank update of a block's chosen q/k/v rows, applied
  on the activations through :meth:`benchmark.backbones.BlockView.add_qkv_update`;
  :class:`SeparateHeadLoRA`: the same with one pair of factors for each of q, k and v (LoRSU-Ppl).
- :class:`LowRankDelta`: a plain LoRA parametrization ``W + (α/r)·A·B`` of a whole weight
  (LoRSU's and LoRA's image-projection update).
- :class:`RowsLowRank`, :class:`SparseDelta`: additive parametrizations of a weight that another owner keeps
  (``lorsu-llm``'s on the process's loaded VLM): a low-rank update of some rows, and a sparse one of some
  entries. The weight is never written, and the gradient reaching it is the effective weight's.

Factor convention (the released code's): ``ΔW = (α/r)·A·B`` with ``A`` [rows, r] Kaiming-uniform and
``B`` [r, in] zero, so the model is unchanged at step 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


def kaiming_factor(rows: int, rank: int, device: torch.device | None = None) -> Tensor:
    """A [rows, rank] Kaiming-uniform factor (``nn.Linear``'s default init, a = √5), global RNG."""
    factor = torch.empty(rows, rank, device=device)
    nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
    return factor


class SparseEntries(nn.Module):
    """Parametrization: ``weight`` with its entries at flat ``index`` [S] replaced by ``values`` [S].

    ``values`` start as the current entries, so the model is unchanged at step 0; entries
    outside ``index`` are copied bit for bit. The weight gradient is still formed densely by
    the layer's backward and then gathered at ``index`` (a 10 % unstructured mask does not make
    the matrix product cheaper); what shrinks is the optimizer state.
    """

    def __init__(self, weight: Tensor, index: Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(weight.device))
        self.values = nn.Parameter(weight.detach().flatten()[self.index].clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight.flatten().scatter(0, self.index, self.values.to(weight.dtype)).view_as(weight)


class HeadLoRA(nn.Module):
    """Low-rank update of the stacked q/k/v ``rows`` [R] of one block: ``x ↦ (α/r)·x·Bᵀ·Aᵀ`` [..., R].

    A [R, r], B [r, W]. Only the chosen rows are ever computed (no [3W, W] product).
    """

    def __init__(self, rows: Tensor, width: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.A = nn.Parameter(kaiming_factor(len(rows), rank, rows.device))
        self.B = nn.Parameter(torch.zeros(rank, width, device=rows.device))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.B), self.A) * self.scale

    def delta(self) -> Tensor:
        """The weight update of the chosen rows, [R, W]."""
        return self.scale * self.A @ self.B


class SeparateHeadLoRA(nn.Module):
    """Low-rank updates of the chosen rows of q, k and v, one rank-r pair of factors each (LoRSU-Ppl's):
    ``x ↦ [(α/r)·x·Dⱼᵀ·Uⱼᵀ]ⱼ`` [..., R], j = q, k, v in the order of ``rows``.

    ``rows`` [R]: stacked q/k/v row indices (ascending, as :meth:`BlockView.qkv_rows` gives them), so
    projection j owns those in [j·W, (j+1)·W). Dⱼ [r, W] (input side) Kaiming-uniform, Uⱼ [Rⱼ, r] zero: the
    released ``MaskedLoRALinear`` (``lora_A`` Kaiming, ``lora_B`` zero) restricted to the chosen rows.
    """

    def __init__(self, rows: Tensor, width: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        counts = [int(((rows >= j * width) & (rows < (j + 1) * width)).sum()) for j in range(3)]
        self.down = nn.ParameterList(nn.Parameter(kaiming_factor(rank, width, rows.device)) for _ in range(3))
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(n, rank, device=rows.device)) for n in counts)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([nn.functional.linear(nn.functional.linear(x, d), u) for d, u in zip(self.down, self.up)],
                         -1) * self.scale

    def delta(self) -> Tensor:
        """The weight update of the chosen rows, [R, W]."""
        return self.scale * torch.cat([u @ d for d, u in zip(self.down, self.up)])


class LowRankDelta(nn.Module):
    """Parametrization ``W + (α/r)·A·B`` of a 2-D weight [O, I]; A [O, r] Kaiming, B [r, I] zero."""

    def __init__(self, weight: Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        rows, cols = weight.shape
        self.A = nn.Parameter(kaiming_factor(rows, rank, weight.device))
        self.B = nn.Parameter(torch.zeros(rank, cols, device=weight.device))
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.scale * self.A @ self.B).to(weight.dtype)

    def parameter_count(self) -> int:
        return self.A.numel() + self.B.numel()


class RowsLowRank(nn.Module):
    """Parametrization ``W + Δ`` of a weight [O, I] whose rows ``rows`` [R] get Δ = (α/r)·U·D: D [r, I] (input side)
    Kaiming-uniform, U [R, r] zero (the released ``MaskedLoRALinear`` restricted to its mask's rows), or the
    ``factors`` (U, D) given (drawing nothing). Only the chosen rows' update is formed."""

    def __init__(self, rows: Tensor, in_features: int, rank: int, alpha: float,
                 factors: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        up, down = factors or (torch.zeros(len(rows), rank, device=rows.device),
                               kaiming_factor(rank, in_features, rows.device))
        self.up, self.down = nn.Parameter(up), nn.Parameter(down)
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight.index_add(0, self.rows, (self.scale * self.up @ self.down).to(weight.dtype))


class SparseDelta(nn.Module):
    """Parametrization ``W + Δ`` with Δ zero except at flat ``index`` [S]: ``values`` [S] (zero at first, or given)."""

    def __init__(self, index: Tensor, values: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.values = nn.Parameter(torch.zeros(len(index), device=index.device) if values is None else values)

    def forward(self, weight: Tensor) -> Tensor:
        return weight.flatten().index_add(0, self.index, self.values.to(weight.dtype)).view_as(weight)


def attach(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    """Parametrize ``module.<name>`` (its parameters appear under the module, so the optimizer sees them)."""
    parametrize.register_parametrization(module, name, parametrization)


def merge(module: nn.Module, name: str) -> None:
    """Fold the parametrization of ``module.<name>`` into the original parameter (same object, frozen)."""
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    getattr(module, name).requires_grad_(False)
