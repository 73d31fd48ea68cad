"""The cache folder of everything fscl-bench builds once and reuses: ``$FSCL_CACHE``, else ``~/.cache/fscl``
(the mini world's pretrained model and VLM, the question sets of runs' VQA evaluations, the evaluated images)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FSCL_CACHE"


def cache_root() -> Path:
    """``$FSCL_CACHE`` if set, else ``~/.cache/fscl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fscl").expanduser()
