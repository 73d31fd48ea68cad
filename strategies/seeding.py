"""Random draws of a strategy that resume cannot disturb: each session's own generator, from the run seed."""
from __future__ import annotations

import zlib

import numpy as np
import torch


def session_generator(seed: int, session: int, purpose: str) -> torch.Generator:
    """A CPU generator of its own for ``purpose`` in session ``session`` (1-based) of a run of seed ``seed``: the
    same draws whether the run went straight through or resumed before the session, and none taken from the
    generators of training (shuffling, augmentations, captions)."""
    key = np.random.SeedSequence([seed, session, zlib.crc32(purpose.encode())])
    return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] % 2**63))
