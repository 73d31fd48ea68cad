"""The cache folder of everything fscl builds once and reuses: the mini model, the evaluated images.

``$FSCL_CACHE`` if set, else ``~/.cache/fscl``.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FSCL_CACHE"


def cache_root() -> Path:
    """``$FSCL_CACHE`` if set, else ``~/.cache/fscl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fscl").expanduser()
