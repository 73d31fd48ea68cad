"""fscl-bench core: config, registry, backbones, CLIP template, evaluation, metrics, runs.

Importing this package imports no torch; it arranges for the torchvision repair of
:mod:`benchmark.compat` to run at the first import of torchvision, by whichever package
(avalanche, open_clip, timm, peft, transformers) comes first.
"""
import warnings

from benchmark.compat import TORCHVISION_REPAIR

# avalanche imports qpsolvers eagerly; only its GEM/A-GEM strategies need a QP solver.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
TORCHVISION_REPAIR.install()

__version__ = "0.1.0"
