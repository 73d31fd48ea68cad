"""``lorsu``: Low-Rank adaptation with Structured Updates (Panos et al., arXiv 2502.04098), an Avalanche plugin.

Per session, on the plain encoder left by the previous session:

1. importance I = (1/N) Σ_b n_b ∇L_b of every block's q/k/v and fc1 weights (CLIP loss,
   training batches, at least ``importance_samples`` samples and no accumulated entry below
   ``importance_min_abs`` in magnitude, or one pass);
2. fc1: the top ⌊sparsity · numel⌋ entries of |I| per block become trainable values;
3. heads: per block the ``top_k_heads`` heads of largest ‖I_q,h‖² + ‖I_k,h‖² + ‖I_v,h‖²;
4. a rank-``rank`` update (α/r)·A·B of those heads' q/k/v rows, computed on the activations
   (``qkv_update: separate``: one for each of q, k and v, LoRSU-Ppl's);
5. (switches) q/k/v biases of all heads, fc1 bias, a LoRA of the image projection;
6. train (the template's optimizer and schedule); 7. merge everything into the weights.

``skip_last_blocks`` leaves the last blocks out of 1-7. ``lorsu-ppl`` (:class:`LoRSUPpl`) is LoRSU
trained with LLaVA's answer loss (:mod:`benchmark.vlm_template`), with the released LoRSU-Ppl defaults.

Modules: :mod:`.masks` (selection rules), :mod:`.update` (trainable pieces, merging),
:mod:`.reference` (the dense reference the efficient form is checked against).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from benchmark.backbones import Backbone, BlockView
from benchmark.config import check
from benchmark.plugins import StrategyPlugin, session_gradients
from strategies.lorsu import masks
from strategies.lorsu.update import HeadLoRA, LowRankDelta, SeparateHeadLoRA, SparseEntries, attach, merge
from strategies.options import LoRSULLMOptions, LoRSUOptions, LoRSUPplOptions, skip_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockScores:
    """Importance of one block's candidates: q, k, v [W, W] each, fc1 [hidden, W]."""

    q: Tensor
    k: Tensor
    v: Tensor
    fc1: Tensor


@dataclass(frozen=True)
class BlockSelection:
    """What one block trains in a session."""

    heads: tuple[int, ...]  # ascending
    fc1_index: Tensor | None  # [S] ascending flat indices into fc1.weight; None: fc1 weight frozen
    head_scores: Tensor | None = None  # [H], when heads were chosen by importance


def importance(session, params: list[nn.Parameter], options: LoRSUOptions | LoRSULLMOptions) -> list[Tensor]:
    """LoRSU's importance of ``params``, one fp32 tensor each: the signed mean training-loss gradient
    (1/N) Σ_b n_b ∇L_b over the session's training batches (:func:`~benchmark.plugins.session_gradients`, the model
    in eval mode), until ``options.importance_samples`` samples and every accumulated entry at magnitude >=
    ``options.importance_min_abs``, at most one pass; ``importance_sum: running``: the released LoRSU-Ppl code's
    sum, its ``.grad`` never zeroed."""
    reduce = "mean" if options.importance_sum == "batch" else "running_mean"
    return session_gradients(session, params, training=False, reduce=reduce, min_samples=options.importance_samples,
                             min_abs=options.importance_min_abs)


def _unique(params) -> list[nn.Parameter]:
    return list({id(p): p for p in params if p is not None}.values())


class LoRSU(StrategyPlugin[LoRSUOptions]):
    """LoRSU: sparse fc1 + low-rank updates of the most important heads, merged after each session."""

    needs_blocks = True
    supports_ddp = True  # scores come from session_gradients (averaged over ranks per batch); random
    # selections draw from the global torch RNG, which every rank advances identically

    def __init__(self, backbone: Backbone, options: LoRSUOptions | None = None) -> None:
        super().__init__(backbone, options or LoRSUOptions())
        opts = self.options
        depth = len(backbone.blocks())
        check(skip_blocks(opts) < depth, f"{opts.section}.skip_last_blocks", opts.skip_last_blocks,
              f"an integer in [0, {depth - 1}] (backbone '{backbone.spec}' has {depth} blocks)")
        heads = min(b.num_heads for b in backbone.blocks())
        check(opts.top_k_heads <= heads, f"{opts.section}.top_k_heads", opts.top_k_heads,
              f"an integer in [1, {heads}] (backbone '{backbone.spec}' has {heads} attention heads per block)")
        if opts.proj_lora and backbone.image_projection() is None:  # e.g. SigLIP: nothing to adapt (as in lora)
            log.warning("backbone '%s' has no image projection: lorsu.proj_lora is off", backbone.spec)
            self.options = dataclasses.replace(opts, proj_lora=False)
        self.selection: list[BlockSelection] = []
        self.qkv_updates: list[tuple[BlockView, nn.Module]] = []  # this session's q/k/v adapters
        self.proj_update: LowRankDelta | None = None
        self._finalizers: list[Callable[[], None]] = []  # merge steps, run in order after the session

    # -- the session ----------------------------------------------------------------------
    def trained_blocks(self) -> list[BlockView]:
        """The blocks LoRSU scores and updates: all but the last ``skip_last_blocks``."""
        blocks = self.backbone.blocks()
        return blocks[:len(blocks) - self.options.skip_last_blocks]

    def setup(self, session) -> None:
        blocks = self.trained_blocks()
        needs_scores = self.options.head_selection == "importance" or self.options.fc1_mask == "importance"
        scores = self.score(session, blocks) if needs_scores else None
        self.selection = self.select(blocks, scores)
        self.install(blocks, self.selection)

    def finish(self, session) -> None:
        self.merge()

    # -- 1-3: scores and selection ------------------------------------------------------------
    def score(self, session, blocks: list[BlockView]) -> list[BlockScores]:
        """Signed mean training-loss gradient of every block's q/k/v and fc1 weights on the session data.

        The released pass: the model in eval mode, one batch after another of the training loader
        until the batch that reaches ``importance_samples`` samples *and* leaves every accumulated entry
        of Σ_b n_b ∇L_b at magnitude >= ``importance_min_abs``, never past one pass. That check covers
        what the released code has unfrozen while it scores: q/k/v and fc1 weights, fc1 biases, and (CLIP
        loss only: LLaVA never reads it) the projection.
        """
        candidates = _unique(p for b in blocks for p in (b.q.weight, b.k.weight, b.v.weight, b.fc1.weight))
        projection = self.backbone.image_projection() if self.objective == "clip" else None
        checked = _unique([*candidates, *(b.fc1.bias for b in blocks), getattr(*projection) if projection else None])
        grads = importance(session, checked, self.options)
        by_id = {id(p): g for p, g in zip(checked, grads)}
        return [BlockScores(*(by_id[id(p.weight)][p.rows] for p in b.qkv), by_id[id(b.fc1.weight)]) for b in blocks]

    def select(self, blocks: list[BlockView], scores: list[BlockScores] | None) -> list[BlockSelection]:
        """Heads and fc1 entries of every block (each block chooses independently)."""
        opts = self.options
        chosen = []
        for i, block in enumerate(blocks):
            head_scores = None
            if opts.head_selection == "importance":
                s = scores[i]
                head_scores = masks.head_scores(s.q, s.k, s.v, block.num_heads)
                heads = masks.top_heads(head_scores, opts.top_k_heads)
            else:
                heads = masks.random_heads(block.num_heads, opts.top_k_heads)
            numel = block.fc1.weight.numel()
            count = masks.mask_size(numel, opts.sparsity)
            if opts.fc1_mask == "importance":
                fc1_index = masks.top_entries(scores[i].fc1, count)
            elif opts.fc1_mask == "random":
                fc1_index = masks.random_entries(numel, count, block.fc1.weight.device)
            else:
                fc1_index = None
            chosen.append(BlockSelection(heads, fc1_index, head_scores))
        return chosen

    # -- 4-5: what trains ----------------------------------------------------------------------
    def install(self, blocks: list[BlockView], selection: list[BlockSelection]) -> None:
        """Add this session's trainables for ``selection`` (one entry per block)."""
        opts = self.options
        for block, sel in zip(blocks, selection):
            self.install_qkv(block, block.qkv_rows(sel.heads))
            if sel.fc1_index is not None:
                self.install_fc1(block, sel.fc1_index)
            if opts.train_attn_bias:
                for bias in _unique(p.bias for p in block.qkv):
                    bias.requires_grad_(True)
            if opts.train_fc1_bias and block.fc1.bias is not None:
                block.fc1.bias.requires_grad_(True)
        if opts.proj_lora:
            module, name = self.backbone.image_projection()
            self.proj_update = LowRankDelta(getattr(module, name), opts.rank, opts.alpha)
            attach(module, name, self.proj_update)
            self._finalizers.append(lambda: merge(module, name))

    def install_qkv(self, block: BlockView, rows: Tensor) -> None:
        """Low-rank update of the stacked q/k/v ``rows`` [R], applied on the activations."""
        kind = HeadLoRA if self.options.qkv_update == "joint" else SeparateHeadLoRA
        update = kind(rows, block.width, self.options.rank, self.options.alpha)
        self.backbone.adapters[f"lorsu_qkv_{block.index}"] = update
        self.qkv_updates.append((block, update))
        handle = block.add_qkv_update(update)

        def finish() -> None:
            handle.remove()
            block.merge_qkv_rows(update.rows, update.delta().detach())

        self._finalizers.append(finish)

    def install_fc1(self, block: BlockView, index: Tensor) -> None:
        """Train the fc1 entries at flat ``index`` [S] as a vector of values."""
        attach(block.fc1, "weight", SparseEntries(block.fc1.weight, index))
        self._finalizers.append(lambda: merge(block.fc1, "weight"))

    # -- 7: merge ------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold every update into the weights; the encoder is plain again (the template re-freezes it)."""
        for finish in self._finalizers:
            finish()
        self._finalizers, self.qkv_updates, self.proj_update = [], [], None
        self.backbone.adapters.clear()

    # -- costs ---------------------------------------------------------------------------------
    def trainable_counts(self) -> dict[str, int]:
        """fc1 mask sizes + Σ_blocks (q/k/v update, :func:`qkv_update_size`) + projection LoRA:
        ``trainable`` counts the true free parameters, ``trainable_released`` the released code's
        logged convention; ``trainable_with_biases`` adds the dense biases to ``trainable``."""
        opts = self.options
        masked = released = biases = 0
        parts = 1 if opts.qkv_update == "joint" else 3  # one update of the stacked rows, or one per projection
        for block, sel in zip(self.trained_blocks(), self.selection):
            rows, width = 3 * len(sel.heads) * block.head_dim // parts, block.width
            fc1 = 0 if sel.fc1_index is None else len(sel.fc1_index)
            masked += fc1 + parts * qkv_update_size(rows, width, opts.rank, "free")
            released += fc1 + parts * qkv_update_size(rows, width, opts.rank, "released", parts)
            if opts.train_attn_bias:
                biases += sum(b.numel() for b in _unique(p.bias for p in block.qkv))
            if opts.train_fc1_bias and block.fc1.bias is not None:
                biases += block.fc1.bias.numel()
        if opts.proj_lora and self.selection:
            module, name = self.backbone.image_projection()
            projection = opts.rank * sum(getattr(module, name).shape)
            masked, released = masked + projection, released + projection
        return {"trainable": masked, "trainable_with_biases": masked + biases, "trainable_released": released}


def qkv_update_size(rows: int, width: int, rank: int, convention: Literal["free", "released"], parts: int = 1) -> int:
    """Parameters of a rank-``rank`` update of ``rows`` (R) q/k/v rows of width W (``parts``: 1 for the stacked
    q/k/v rows of a block, 3 for one projection's rows under ``qkv_update: separate``).

    ``free``: what really trains, min(R·W, r·(R + W)) (a dense update of the rows when that is smaller).
    ``released``: the released code's logged count, min(R·W, r·(3W/parts + W)) (its LoRA factors span all
    rows of the projection(s), masked to the chosen heads): 16.47 M (5.41 %) for ViT-L/14-336 at r = 64,
    2 heads, sparsity 0.1.
    """
    other = rows + width if convention == "free" else (3 // parts + 1) * width
    return min(rows * width, rank * other)


class LoRSUPpl(LoRSU):
    """LoRSU-Ppl: LoRSU trained with LLaVA's answer loss (needs vqa.model), blocks 0..L-2.

    The VLM template (:mod:`benchmark.vlm_template`) trains it, with the released LoRSU-Ppl defaults
    (:class:`strategies.options.LoRSUPplOptions`: separate q/k/v updates, the last block skipped).
    """

    objective = "vlm"
    supports_ddp = False  # the VLM template has no data-parallel path

    def __init__(self, backbone: Backbone, options: LoRSUPplOptions | None = None) -> None:
        super().__init__(backbone, options or LoRSUPplOptions())
