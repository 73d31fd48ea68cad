"""The mini world: an offline image–caption world, a tiny open_clip ViT pretrained on it, and
shifted target streams, so the whole benchmark runs in minutes on a laptop CPU.

It is *not* CLIP, and its numbers never stand in for the paper's: it exists to check the
machinery end to end and to screen a new strategy before a GPU run.

- :mod:`streams.mini.world`: vocabulary (data file ``data/world.yaml``), compositions, captions.
- :mod:`streams.mini.render`: clean renders and the sign-like visual shift (PIL, DejaVu fonts).
- :mod:`streams.mini.datasets`: streams ``mini-shapes``, ``mini-colours``, ``mini-digits``
  (clean controls of held-out compositions), ``mini-handwritten`` and ``mini-signs`` (targets).
- :mod:`streams.mini.pretrain`: CLIP-loss pretraining into open_clip's local-dir layout.
- :mod:`streams.mini.backbone`: the ``mini`` backbone family (cached; built when missing).
"""
from streams.mini import backbone, datasets  # noqa: F401  (registers the streams and the backbone)
from streams.mini.backbone import cache_root, default_model_dir, ensure_model
from streams.mini.pretrain import PretrainConfig

__all__ = ["PretrainConfig", "cache_root", "default_model_dir", "ensure_model"]
