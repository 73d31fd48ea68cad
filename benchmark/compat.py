"""Import-time compatibility fixes for the torch stack.

PyPI's ``torchvision`` wheels are CUDA builds. Beside a CPU-only ``torch`` of the same
release their import fails with ``operator torchvision::nms does not exist``, because the
compiled ops library cannot load and the Python side then registers fake kernels for ops
that were never defined. We need no compiled torchvision op (images are decoded with PIL,
transforms are pure Python), so on exactly that error we define the two missing schemas
and import again. Where torchvision imports cleanly (a matched CUDA build) nothing is
changed: defining the schemas first would abort the process on newer torch releases.

``import benchmark`` does not import torch: it installs :class:`TorchvisionRepair`, which
runs :func:`ensure_torchvision` when anything (avalanche, open_clip, timm, peft,
transformers, our own code) first imports torchvision.

A user's own script (``import open_clip`` to load an export) need not import ``benchmark``
first: in an environment with exactly that mismatch (the one the Makefile builds),
:func:`install_startup_repair` puts a ``.pth`` file into site-packages that installs the
finder at interpreter start (no torch import until torchvision is imported).
"""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library_keepalive: list = []  # a torch.library.Library is unregistered when collected
MISMATCH = "torchvision::nms does not exist"  # the error of a CUDA torchvision beside a CPU torch
STARTUP_FILE = "fscl_torchvision_repair.pth"
# site runs a .pth line that starts with "import"; it does nothing once fscl-bench is uninstalled
STARTUP_LINE = ('import importlib.util as u; u.find_spec("benchmark") and '
                '__import__("benchmark.compat").compat.TORCHVISION_REPAIR.install()')


def ensure_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch/CUDA-torchvision mismatch if needed."""
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if MISMATCH not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _library_keepalive.append(lib)
    import torchvision  # noqa: F401,F811


class TorchvisionRepair(MetaPathFinder, Loader):
    """Runs :func:`ensure_torchvision` at the first import of torchvision, whoever imports it.

    Placed first on ``sys.meta_path``, it answers a lookup of ``torchvision`` with the spec the
    other finders give, but with itself as the loader; a lookup alone (``importlib.util.find_spec``,
    as transformers does to see what is installed) changes nothing. When the import system loads
    the module, the finder removes itself, runs the repair (which imports torchvision through the
    ordinary finders) and hands that module back with its own spec.
    """

    def __init__(self) -> None:
        self._spec: ModuleSpec | None = None

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                ours = ModuleSpec(fullname, self, origin=spec.origin, is_package=spec.submodule_search_locations is not None)
                ours.submodule_search_locations = spec.submodule_search_locations
                return ours
        return None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        self.uninstall()
        ensure_torchvision()
        module = sys.modules["torchvision"]
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the import system set ours; the module was already executed

    def install(self) -> None:
        """Put the finder first on ``sys.meta_path`` unless torchvision is imported already."""
        if "torchvision" not in sys.modules and self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


TORCHVISION_REPAIR = TorchvisionRepair()


def install_startup_repair(site_dir: Path | None = None) -> bool:
    """Make every interpreter of this environment repair the mismatch, or leave it alone: the
    :data:`STARTUP_FILE` in ``site_dir`` (default: this interpreter's site-packages) is written when a
    plain ``import torchvision`` in a fresh interpreter fails with exactly that error, and removed when
    it imports cleanly (a matched pair). Returns whether it is written."""
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / STARTUP_FILE
    path.unlink(missing_ok=True)  # judge the environment without it
    done = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    needed = done.returncode != 0 and MISMATCH in done.stderr
    if needed:
        path.write_text(STARTUP_LINE + "\n")
    return needed
