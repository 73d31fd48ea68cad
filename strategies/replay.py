"""``replay``: rehearsal of earlier sessions' shots with Avalanche's replay buffer.

Every vision-encoder parameter trains on the session's samples together with the buffer's (Avalanche's
``ReplayPlugin`` concatenates the buffer to the experience's data; here the buffer joins the session's dataset
before the template builds its loader, so the replayed samples are shuffled into the same batches, augmented by
the same per-sample seeds and trained with the same CLIP loss, each over its own class's captions). After each
session the buffer is updated by Avalanche's ``ExperienceBalancedBuffer(buffer_size)`` (``adaptive_size``: the
capacity split evenly over the sessions seen, each session's share a reservoir sample of its shots), its draws
from a generator of the session's own (:func:`strategies.seeding.session_generator`), never the training ones.

State: the buffer's sample ids (positions in their session's training set) and the sizes of the sessions seen;
at a resume the buffer is rebuilt by the same seeded updates and checked against the ids.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from avalanche.benchmarks.utils import AvalancheDataset, concat_datasets
from avalanche.training.storage_policy import ExperienceBalancedBuffer
from torch.utils.data import TensorDataset

from benchmark.backbones import Backbone
from benchmark.plugins import StrategyPlugin, TrainingSession
from strategies.options import ReplayOptions
from strategies.seeding import session_generator


class Replay(StrategyPlugin[ReplayOptions]):
    """Replay: full fine-tuning on the session's shots + Avalanche's buffer of earlier sessions' shots."""

    def __init__(self, backbone: Backbone, options: ReplayOptions | None = None) -> None:
        super().__init__(backbone, options or ReplayOptions())
        self.seed = 0  # the run's seed, read at the first session's setup (session.seed)
        self.policy = ExperienceBalancedBuffer(self.options.buffer_size, adaptive_size=True)
        self.sizes: list[int] = []  # training samples of each session folded into the buffer

    def buffer_ids(self) -> list[list[int]]:
        """The buffer: per earlier session (in order) the positions of its kept samples in its training set."""
        return [[int(item[0]) for item in group.buffer] for group in self.policy.buffer_groups.values()]

    def update(self, size: int) -> None:
        """Fold a session of ``size`` training samples into the buffer (Avalanche's update on the samples'
        positions, its ``torch.rand`` draws from the session's own generator)."""
        self.sizes.append(size)
        positions = AvalancheDataset([TensorDataset(torch.arange(size))])
        seed = int(torch.randint(2**62, (1,), generator=session_generator(self.seed, len(self.sizes), "replay")))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy.post_adapt(None, SimpleNamespace(dataset=positions))

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        """The buffer's samples join the session's training set (before the loader is built)."""
        stream = strategy.experience.origin_stream
        replayed = [stream[g].dataset.subset(ids) for g, ids in enumerate(self.buffer_ids())]
        if replayed:
            strategy.adapted_dataset = concat_datasets([strategy.adapted_dataset, *replayed]).train()

    def setup(self, session: TrainingSession) -> None:
        self.seed = session.seed
        self.backbone.visual.requires_grad_(True)

    def finish(self, session: TrainingSession) -> None:
        self.update(len(session.session_batches(ordered=True).dataset))

    def state_dict(self) -> dict[str, Any]:
        """The sizes of the sessions seen and the buffer's ids (what a resume rebuilds and checks)."""
        return {"seed": self.seed, "sizes": list(self.sizes), "ids": self.buffer_ids()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.sizes = state["seed"], []
        self.policy = ExperienceBalancedBuffer(self.options.buffer_size, adaptive_size=True)
        for size in state["sizes"]:
            self.update(size)
        if self.buffer_ids() != state["ids"]:
            raise RuntimeError("replay: the buffer rebuilt from the checkpoint's seed and session sizes differs from "
                               "the ids it saved (another Avalanche version?); start the run again with --force")
