"""The four packages are ours (PyPI has unrelated 'benchmark', 'strategies', 'reports')."""
from pathlib import Path

import benchmark
import reports
import strategies
import streams

REPO = Path(__file__).resolve().parents[1]


def test_packages_come_from_this_repository():
    for module in (benchmark, strategies, streams, reports):
        assert Path(module.__file__).resolve().parent.parent == REPO, module.__file__


def test_torchvision_imports_after_benchmark():
    import torchvision
    from torchvision import transforms

    assert transforms.ToTensor() is not None and torchvision.__version__


def test_ensure_torchvision_is_idempotent():
    from benchmark.compat import ensure_torchvision

    ensure_torchvision()
    ensure_torchvision()
