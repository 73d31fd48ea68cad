"""Shared fixtures: tiny models and configs that run on CPU in seconds, no network."""
from __future__ import annotations

import pytest
import torch

import benchmark  # noqa: F401  (torchvision repair first)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped ``fscl-tiny`` open_clip model (random weights, seed-fixed). Treat as read-only."""
    from benchmark.backbones import load_backbone

    return load_backbone("openclip:fscl-tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine it spins idle.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
