"""fscl-bench core: config, registry, backbones, CLIP template, evaluation, metrics, runs.

Importing this package first repairs the torchvision import where needed (see
:mod:`benchmark.compat`), so it must be imported before avalanche, open_clip, timm or peft.
"""
import warnings

from benchmark.compat import ensure_torchvision

# avalanche imports qpsolvers eagerly; only its GEM/A-GEM strategies need a QP solver.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
ensure_torchvision()

__version__ = "0.1.0"
