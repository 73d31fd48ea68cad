"""Shared fixtures: tiny models and configs that run on CPU in seconds, no network."""
from __future__ import annotations

import os

import pytest
import torch

import benchmark  # noqa: F401  (torchvision repair first)


@pytest.fixture(scope="session", autouse=True)
def fscl_cache(tmp_path_factory):
    """A cache folder of the test session's own (``$FSCL_CACHE``, subprocesses too): the evaluation cache of
    the tests' temporary images never lands in the user's cache."""
    folder = tmp_path_factory.mktemp("fscl-cache")
    previous = os.environ.get("FSCL_CACHE")
    os.environ["FSCL_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FSCL_CACHE", None)
    else:
        os.environ["FSCL_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped ``fscl-tiny`` open_clip model (random weights, seed-fixed). Treat as read-only."""
    from benchmark.backbones import load_backbone

    return load_backbone("openclip:fscl-tiny")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """The folder of a tiny random LLaVA whose tower takes ``openclip:fscl-tiny`` (``vqa.model=llava:<folder>``)."""
    from benchmark.vlm.llava import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "tiny")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the tests marked ``gpu``: ``$FSCL_TEST_DEVICE`` (default ``cpu``).

    Those tests run on the CPU with the rest of the suite; the GPU check (``benchmarks/gpu_check.sh``)
    runs them again with ``FSCL_TEST_DEVICE=cuda pytest -m gpu``. A test that means nothing on the
    CPU skips itself when ``device.type == "cpu"``.
    """
    device = torch.device(os.environ.get("FSCL_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"FSCL_TEST_DEVICE={device}, but torch {torch.__version__} sees no CUDA device")
    return device


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine it spins idle.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    from streams.mini.pretrain import one_thread as single_thread

    with single_thread():
        yield
