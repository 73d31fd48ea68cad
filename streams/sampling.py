"""Deterministic few-shot sampling (docs/protocol.md, "Few-shot sampling")."""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Session:
    """One few-shot session: its classes and the training sample ids drawn for it.

    ``short_classes`` lists classes that kept fewer than ``shots`` images: all of them when
    they had no more than ``shots`` (or no more readable ones, with ``skip_bad_images``).
    ``replaced`` maps each drawn id found unreadable to the id that took its place (None:
    no readable candidate was left); ``unreadable`` lists every id this draw found
    unreadable (drawn ones and candidates passed over), in the order met. Both stay empty
    unless the draw checked readability (``skip_bad_images: true``).
    """

    index: int  # 1-based
    classes: list[int]
    ids: list[str]
    short_classes: list[int]
    replaced: dict[str, str | None] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


class FewShotSampler:
    """Draws ``shots`` images per class, the same on every machine for the same seed.

    ``shots`` None takes every image of each class (``shots: all``; no class is then short).
    Each class gets its own generator seeded from (shot_seed, stream, session, class), with
    the stream name hashed by CRC-32 (not Python's salted ``hash``), so a draw depends
    neither on ``PYTHONHASHSEED`` nor on which or how many other classes exist.

    The draw is made from the class's whole listed pool, whatever the files hold: whether
    an image can be decoded never changes which images are drawn. With ``unreadable`` (a
    check of one pool index: None when it decodes, else the error), a drawn image that
    cannot be read is replaced by the next readable candidate of the class's own seeded
    order of the images not drawn (the same generator, continued after the draw).
    """

    def __init__(self, stream: str, shots: int | None, shot_seed: int) -> None:
        if shots is not None and shots < 1:
            raise ValueError(f"shots must be >= 1 (or None: every image), got {shots}")
        self.stream, self.shots, self.shot_seed = stream, shots, shot_seed

    def class_rng(self, session: int, cls: int) -> np.random.Generator:
        key = [self.shot_seed, zlib.crc32(self.stream.encode()), session, cls]
        return np.random.default_rng(np.random.SeedSequence(key))

    def sample(self, targets: Sequence[int], ids: Sequence[str], session: int, classes: Sequence[int],
               unreadable: Callable[[int], str | None] | None = None) -> Session:
        """Sample ids for ``session`` (1-based) from the training ``targets``/``ids``.

        ``unreadable``: see the class docstring; without it nothing is decoded (a drawn
        unreadable image fails the run that meets it).
        """
        targets_arr = np.asarray(targets)
        chosen: list[str] = []
        short: list[int] = []
        replaced: dict[str, str | None] = {}
        bad_met: list[str] = []
        for cls in classes:
            pool = np.flatnonzero(targets_arr == cls)  # ascending dataset order
            rng = self.class_rng(session, int(cls))
            if self.shots is None or len(pool) <= self.shots:
                if self.shots is not None:
                    short.append(int(cls))
                picked = [int(i) for i in pool]
            else:
                picked = sorted(int(i) for i in rng.choice(pool, size=self.shots, replace=False))
            if unreadable is not None:
                picked = self._replace_unreadable(picked, pool, rng, unreadable, ids, replaced, bad_met)
                if len(picked) < min(self.shots or len(pool), len(pool)) and int(cls) not in short:
                    short.append(int(cls))
            chosen.extend(ids[i] for i in picked)
        return Session(session, [int(c) for c in classes], chosen, short, replaced, bad_met)

    @staticmethod
    def _replace_unreadable(picked: list[int], pool: np.ndarray, rng: np.random.Generator,
                            unreadable: Callable[[int], str | None], ids: Sequence[str],
                            replaced: dict[str, str | None], bad_met: list[str]) -> list[int]:
        """``picked`` with each unreadable index replaced by the next readable candidate (sorted)."""
        bad = [i for i in picked if unreadable(i) is not None]
        if not bad:
            return picked
        bad_met += [ids[i] for i in bad]
        drawn = set(picked)
        rest = [int(i) for i in pool if int(i) not in drawn]  # ascending
        candidates = iter([rest[j] for j in rng.permutation(len(rest))] if rest else [])
        keep = [i for i in picked if i not in set(bad)]
        for i in bad:  # ascending: the first bad image takes the first readable candidate
            replacement = None
            for candidate in candidates:
                if unreadable(candidate) is None:
                    replacement = candidate
                    break
                bad_met.append(ids[candidate])
            replaced[ids[i]] = None if replacement is None else ids[replacement]
            if replacement is not None:
                keep.append(replacement)
        return sorted(keep)


def held_out(targets: Sequence[int], per_class: int, seed: int, stream: str) -> list[int]:
    """Indices (ascending) of ``per_class`` images per class of a training split held out for validation,
    at most half of a class (the rest stays drawable); each class by its own generator seeded from
    (seed, CRC-32 of the stream's name, class), as :class:`FewShotSampler` draws shots."""
    targets_arr = np.asarray(targets)
    chosen: list[int] = []
    for cls in np.unique(targets_arr):
        pool = np.flatnonzero(targets_arr == cls)
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stream.encode()), int(cls), 1]))
        chosen.extend(int(i) for i in rng.choice(pool, size=min(per_class, len(pool) // 2), replace=False))
    return sorted(chosen)
