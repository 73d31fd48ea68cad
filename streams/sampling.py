"""Deterministic few-shot sampling (docs/protocol.md, "Few-shot sampling")."""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Session:
    """One few-shot session: its classes and the training sample ids drawn for it.

    ``short_classes`` lists classes that had no more than ``shots`` images (all kept).
    """

    index: int  # 1-based
    classes: list[int]
    ids: list[str]
    short_classes: list[int]


class FewShotSampler:
    """Draws ``shots`` images per class, the same on every machine for the same seed.

    Each class gets its own generator seeded from (shot_seed, stream, session, class), with
    the stream name hashed by CRC-32 (not Python's salted ``hash``), so a draw depends
    neither on ``PYTHONHASHSEED`` nor on which or how many other classes exist.
    """

    def __init__(self, stream: str, shots: int, shot_seed: int) -> None:
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        self.stream, self.shots, self.shot_seed = stream, shots, shot_seed

    def class_rng(self, session: int, cls: int) -> np.random.Generator:
        key = [self.shot_seed, zlib.crc32(self.stream.encode()), session, cls]
        return np.random.default_rng(np.random.SeedSequence(key))

    def sample(self, targets: Sequence[int], ids: Sequence[str], session: int, classes: Sequence[int]) -> Session:
        """Sample ids for ``session`` (1-based) from the training ``targets``/``ids``."""
        targets_arr = np.asarray(targets)
        chosen: list[str] = []
        short: list[int] = []
        for cls in classes:
            pool = np.flatnonzero(targets_arr == cls)  # ascending dataset order
            if len(pool) <= self.shots:
                short.append(int(cls))
                picked = pool
            else:
                picked = np.sort(self.class_rng(session, int(cls)).choice(pool, size=self.shots, replace=False))
            chosen.extend(ids[i] for i in picked)
        return Session(session, [int(c) for c in classes], chosen, short)
