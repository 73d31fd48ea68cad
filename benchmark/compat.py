"""Import-time compatibility fixes for the torch stack.

PyPI's ``torchvision`` wheels are CUDA builds. Beside a CPU-only ``torch`` of the same
release their import fails with ``operator torchvision::nms does not exist``, because the
compiled ops library cannot load and the Python side then registers fake kernels for ops
that were never defined. We need no compiled torchvision op (images are decoded with PIL,
transforms are pure Python), so on exactly that error we define the two missing schemas
and import again. Where torchvision imports cleanly (a matched CUDA build) nothing is
changed: defining the schemas first would abort the process on newer torch releases.
"""
from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library_keepalive: list = []  # a torch.library.Library is unregistered when collected


def ensure_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch/CUDA-torchvision mismatch if needed."""
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _library_keepalive.append(lib)
    import torchvision  # noqa: F401,F811
