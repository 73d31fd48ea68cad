"""``ewc`` (F-EWC): full fine-tuning of the vision encoder plus the EWC penalty.

Avalanche's ``EWCPlugin`` semantics in its default ``separate`` mode: after every session
the diagonal Fisher F_s is computed as ``EWCPlugin.compute_importances`` (Avalanche 0.6) does
(one pass over the session's dataset in order, the model in eval mode, the mean over batches of
the squared batch gradient; of our CLIP loss, not a classifier's) and stored with the weights
θ_s, and training adds ``ewc_lambda · Σ_s Σ_i F_s,i (θ_i − θ_s,i)²`` over all previous sessions
(zero in session 1).

Instead of one (F_s, θ_s) pair per session the sum is kept in the equivalent form
``Σ_i F_i (θ_i − μ_i)² + C`` with F = Σ_s F_s, μ = Σ_s F_s θ_s / F and the constant C, folded in
session by session (parallel-axis rule), so memory does not grow with the number of sessions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchmark.plugins import StrategyPlugin, session_gradients
from strategies.options import EWCOptions


class Anchor:
    """Σ_s F_s (θ − θ_s)² of the sessions folded in so far, as F (θ − μ)² + C, per parameter."""

    def __init__(self) -> None:
        self.fisher: list[Tensor] = []  # F, one per parameter
        self.center: list[Tensor] = []  # μ
        self.constant = 0.0  # C

    def __bool__(self) -> bool:
        return bool(self.fisher)

    @torch.no_grad()
    def add(self, fisher: list[Tensor], params: list[Tensor]) -> None:
        """Fold in one session's Fisher F_s and weights θ_s."""
        if not self.fisher:
            self.fisher = [f.clone() for f in fisher]
            self.center = [p.detach().float().clone() for p in params]
            return
        for i, (f_new, p) in enumerate(zip(fisher, params)):
            f_old, mu_old, theta = self.fisher[i], self.center[i], p.detach().float()
            f = f_old + f_new
            mu = torch.where(f > 0, (f_old * mu_old + f_new * theta) / f, theta)
            self.constant += float((f_old * (mu_old - mu).square() + f_new * (theta - mu).square()).sum())
            self.fisher[i], self.center[i] = f, mu

    def penalty(self, params: list[Tensor]) -> Tensor:
        """Σ_s Σ_i F_s,i (θ_i − θ_s,i)² at the current weights (scalar, differentiable)."""
        terms = [(f * (p.float() - mu).square()).sum() for f, mu, p in zip(self.fisher, self.center, params)]
        return torch.stack(terms).sum() + self.constant


class EWC(StrategyPlugin[EWCOptions]):
    """F-EWC: every vision-encoder parameter + the EWC penalty of the previous sessions."""

    supports_ddp = True  # the Fisher comes from session_gradients (averaged over ranks per batch)

    def __init__(self, backbone, options: EWCOptions | None = None) -> None:
        super().__init__(backbone, options or EWCOptions())
        self.params = list(backbone.visual.parameters())
        self.anchor = Anchor()
        self.last_penalty: Tensor | None = None  # the unweighted penalty of the last iteration (detached)

    def setup(self, session) -> None:
        self.backbone.visual.requires_grad_(True)

    def penalty(self) -> Tensor | None:
        """``ewc_lambda`` · Σ_s Σ_i F_s,i (θ_i − θ_s,i)² over the previous sessions (None in session 1)."""
        if not self.anchor:
            self.last_penalty = torch.zeros(())
            return None
        penalty = self.anchor.penalty(self.params)
        self.last_penalty = penalty.detach()
        return self.options.ewc_lambda * penalty

    def finish(self, session) -> None:
        self.consolidate(session)

    def state_dict(self) -> dict:
        """The anchor (F, μ, C) folded in so far: what the next sessions' penalty needs."""
        return {"fisher": self.anchor.fisher, "center": self.anchor.center, "constant": self.anchor.constant}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.fisher, self.anchor.center = list(state["fisher"]), list(state["center"])
        self.anchor.constant = float(state["constant"])

    def consolidate(self, session) -> None:
        """Fisher of the session just trained, folded into the anchor.

        As Avalanche: ``experience.dataset`` (its own transforms: here the training augmentations)
        in order, ``train_mb_size`` per batch with the last partial batch counted as one, eval mode,
        F = (1/#batches) Σ_b (∇L_b)². The pass leaves the random generators as it found them, so the
        next session draws the shuffles, augmentations and captions it would draw without it.
        """
        with session.preserved_rng():
            fisher = session_gradients(session, self.params, reduce="fisher", training=False,
                                       batches=session.session_batches(ordered=True))
        self.anchor.add(fisher, self.params)
