"""The cache folder of everything fscl-bench builds once and reuses: ``$FSCL_CACHE``, else ``~/.cache/fscl``
(the mini world's pretrained model and VLM, the question sets of runs' VQA evaluations, the evaluated images)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FSCL_CACHE"


def cache_root() -> Path:
    """``$FSCL_CACHE`` if set, else ``~/.cache/fscl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fscl").expanduser()


def cache_problem() -> str | None:
    """Why the cache folder cannot be used (a file, a folder that cannot be made or written), naming
    ``$FSCL_CACHE`` and the fix; None when it can be."""
    from benchmark.records import write_problem

    root = cache_root().absolute()
    problem = write_problem(root)
    if problem is None:
        return None
    where = f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if os.environ.get(CACHE_ENV) else f"{CACHE_ENV} unset, so {root}"
    return (f"{CACHE_ENV}: the cache folder {root} cannot be written ({problem}; {where}); set {CACHE_ENV} to a "
            f"writable folder (e.g. export {CACHE_ENV}=/scratch/$USER/fscl-cache)")
