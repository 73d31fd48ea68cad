"""The dense reference of LoRSU: the straightforward form the released implementation computes.

Per block the q/k/v weights are parametrized as ``W + m ⊙ (α/r)·A·B`` with a full A [3W, r],
B [r, W] (``qkv_update: separate``: one full pair per projection) and ``m`` the rows of the chosen
heads (the parametrization is re-evaluated every time the attention reads its weight), and
fc1.weight trains whole with its gradient multiplied by the 0/1 mask. Mathematically the same
update as :class:`strategies.lorsu.LoRSU`; the tests check that both reach the same weights and
``benchmarks/strategy_cost.py`` compares their cost. Not registered as a strategy.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.backbones import BlockView
from benchmark.backbones.base import parameter_owner
from strategies.lorsu import LoRSU
from strategies.lorsu.update import attach, kaiming_factor, merge


class DenseQKVLoRA(nn.Module):
    """A [3W, r] (every row), B [r, W]; :meth:`delta` = m ⊙ (α/r)·A·B, [3W, W], m = chosen ``rows``."""

    def __init__(self, rows: Tensor, width: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.rows = rows
        self.A = nn.Parameter(kaiming_factor(3 * width, rank, rows.device))
        self.B = nn.Parameter(torch.zeros(rank, width, device=rows.device))
        self.register_buffer("mask", torch.zeros(3 * width, 1, device=rows.device).index_fill_(0, rows, 1.0))
        self.scale = alpha / rank

    def delta(self) -> Tensor:
        return self.mask * (self.scale * self.A @ self.B)


class DenseSeparateQKVLoRA(nn.Module):
    """Per projection j = q, k, v: A_j [r, W] (input side), B_j [W, r]; :meth:`delta` = m ⊙ (α/r)·[B_j·A_j]_j,
    [3W, W] (the released ``MaskedLoRALinear`` on each of q, k and v, m = the chosen ``rows``)."""

    def __init__(self, rows: Tensor, width: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.rows = rows
        self.A = nn.ParameterList(nn.Parameter(kaiming_factor(rank, width, rows.device)) for _ in range(3))
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(width, rank, device=rows.device)) for _ in range(3))
        self.register_buffer("mask", torch.zeros(3 * width, 1, device=rows.device).index_fill_(0, rows, 1.0))
        self.scale = alpha / rank

    def delta(self) -> Tensor:
        return self.mask * (self.scale * torch.cat([b @ a for a, b in zip(self.A, self.B)]))


class _AddRows(nn.Module):
    """Parametrization: W + rows ``start:stop`` of the adapter's [3W, W] delta."""

    def __init__(self, adapter: DenseQKVLoRA, start: int, stop: int) -> None:
        super().__init__()
        self._adapter = (adapter,)  # not a submodule: the adapter is registered in Backbone.adapters
        self.start, self.stop = start, stop

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self._adapter[0].delta()[self.start:self.stop].to(weight.dtype)


class DenseLoRSU(LoRSU):
    """LoRSU with the dense masked q/k/v product and a gradient-masked full fc1 (the reference)."""

    def install_qkv(self, block: BlockView, rows: Tensor) -> None:
        kind = DenseQKVLoRA if self.options.qkv_update == "joint" else DenseSeparateQKVLoRA
        adapter = kind(rows, block.width, self.options.rank, self.options.alpha)
        self.backbone.adapters[f"lorsu_qkv_{block.index}"] = adapter
        self.qkv_updates.append((block, adapter))
        seen: set[int] = set()  # one parametrization per weight: the fused [3W, W] in_proj, or q, k, v each
        for j, proj in enumerate(block.qkv):
            if id(proj.weight) in seen:
                continue
            seen.add(id(proj.weight))
            start = j * block.width - (proj.rows.start or 0)  # the stacked row of the weight's row 0
            module, name = parameter_owner(block.module, proj.weight)
            attach(module, name, _AddRows(adapter, start, start + proj.weight.shape[0]))
            self._finalizers.append(lambda m=module, n=name: merge(m, n))

    def install_fc1(self, block: BlockView, index: Tensor) -> None:
        weight = block.fc1.weight
        mask = torch.zeros(weight.numel(), device=weight.device).index_fill_(0, index, 1.0).view_as(weight)
        weight.requires_grad_(True)
        hook = weight.register_hook(lambda grad: grad * mask)

        def finish() -> None:
            hook.remove()
            weight.requires_grad_(False)

        self._finalizers.append(finish)

    @torch.no_grad()
    def copy_factors_from(self, efficient: LoRSU) -> None:
        """Start from the same factors as ``efficient`` (same selection, installed on a copy)."""
        for (block, dense), (_, sparse) in zip(self.qkv_updates, efficient.qkv_updates, strict=True):
            if isinstance(dense, DenseSeparateQKVLoRA):
                for j in range(3):
                    dense.A[j].copy_(sparse.down[j])
                    rows = sparse.rows[(sparse.rows >= j * block.width) & (sparse.rows < (j + 1) * block.width)]
                    dense.B[j][rows - j * block.width] = sparse.up[j]
                continue
            dense.A[sparse.rows] = sparse.A
            dense.B.copy_(sparse.B)
        if self.proj_update is not None:
            self.proj_update.A.copy_(efficient.proj_update.A)
            self.proj_update.B.copy_(efficient.proj_update.B)
