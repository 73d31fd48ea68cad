"""Shared fixtures: tiny models and configs that run on CPU in seconds, no network."""
from __future__ import annotations

import pytest

import benchmark  # noqa: F401  (torchvision repair first)
from benchmark.config import load_config


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped ``fscl-tiny`` open_clip model (random weights, seed-fixed). Treat as read-only."""
    from benchmark.backbones import load_backbone

    return load_backbone("openclip:fscl-tiny")


@pytest.fixture
def quick_config(tmp_path):
    """A 2-session, 1-seed digits config writing into a temporary runs folder."""

    def make(*overrides: str):
        return load_config("quick", [f"out={tmp_path / 'runs'}", "seed=0", "train.epochs=1", *overrides])

    return make
