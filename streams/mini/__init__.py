"""The mini world: an offline image–caption world, a tiny open_clip ViT pretrained on it, and
shifted target streams, so the whole benchmark runs in minutes on a laptop CPU.

It is *not* CLIP, and its numbers never stand in for the paper's: it exists to check the
machinery end to end and to screen a new strategy before a GPU run.

- :mod:`streams.mini.world`: vocabulary (data file ``data/world.yaml``), compositions, captions.
- :mod:`streams.mini.render`: clean renders and the sign-like visual shift (PIL, DejaVu fonts).
- :mod:`streams.mini.datasets`: streams ``mini-shapes``, ``mini-colours``, ``mini-digits``
  (clean controls of held-out compositions), ``mini-handwritten`` and ``mini-signs`` (targets).
- :mod:`streams.mini.questions`, :mod:`streams.mini.question_streams`: the question kinds of VSR, MMVP and Hateful
  Memes in mini (streams ``mini-spatial``, ``mini-pairs``, ``mini-yesno``), and the mini VLM's rows of them.
- :mod:`streams.mini.pretrain`: CLIP-loss pretraining into open_clip's local-dir layout.
- :mod:`streams.mini.backbone`: the ``mini`` backbone family (cached; built when missing).
- :mod:`streams.mini.vlm`: the ``mini`` VLM family (``vqa.model: mini``), a small VLM of the LLaVA family
  (not LLaVA's weights) with the ``mini`` encoder in its tower, trained on the world's questions (cached).

The streams and the backbone family are declared here; their modules (and the names below)
are imported on first use.
"""
from benchmark.lazy import lazy_exports
from benchmark.registry import BACKBONES, STREAMS, VLMS

__all__ = ["PretrainConfig", "cache_root", "default_model_dir", "ensure_model"]
__getattr__ = lazy_exports(__name__, {"PretrainConfig": "streams.mini.pretrain", "cache_root": "streams.mini.backbone",
                                      "default_model_dir": "streams.mini.backbone", "ensure_model": "streams.mini.backbone"})

_MINI = "streams.options:MiniOptions"
STREAMS.declare("mini-shapes", "streams.mini.datasets:MiniShapes", options=_MINI,
                summary="Mini world control: the shape of clean held-out (shape, colour) compositions.")
STREAMS.declare("mini-colours", "streams.mini.datasets:MiniColours", options=_MINI,
                summary="Mini world control: the colour of clean held-out (shape, colour) compositions.")
STREAMS.declare("mini-digits", "streams.mini.datasets:MiniDigits", options=_MINI,
                summary="Mini world control: the printed digit on clean held-out (shape, colour) compositions.")
STREAMS.declare("mini-signs", "streams.mini.datasets:MiniSigns", options=_MINI,
                summary="Mini world target: sign-like compositions under perspective, blur, low light, noise, clutter.")
STREAMS.declare("mini-spatial", "streams.mini.question_streams:MiniSpatial", options=_MINI,
                summary="Mini world, VSR-like: true/false statements about two held-out shapes' spatial relation.")
STREAMS.declare("mini-pairs", "streams.mini.question_streams:MiniPairs", options=_MINI,
                summary="Mini world, MMVP-like: image pairs that differ in one attribute, (a)/(b) options, pair accuracy.")
STREAMS.declare("mini-yesno", "streams.mini.question_streams:MiniYesNo", options=_MINI,
                summary="Mini world, Hateful-Memes-like: yes/no questions about a held-out shape (AUROC of 'yes').")
STREAMS.declare("mini-handwritten", "streams.mini.datasets:MiniHandwritten", options="streams.options:DigitsOptions",
                summary="Mini world target: scikit-learn's real handwritten digits against printed digits.")
BACKBONES.declare(
    "mini", "streams.mini.backbone:MiniBackbone",
    summary="The mini world's tiny open_clip ViT (not CLIP), pretrained on clean renders; cached.",
    load_forms=("mini  (the cached model of seed 0, pretrained first when missing; `fscl pretrain-mini`)",
                "mini:/path/to/folder  (loads, or pretrains into, that folder)"))
VLMS.declare(
    "mini", "streams.mini.vlm:MiniVLM",
    summary="The mini world's small VLM of the LLaVA family (not LLaVA's weights): the mini encoder, trained here; cached.",
    load_forms=("mini  (the cached VLM of seed 0, trained first when missing; `fscl pretrain-mini --vlm`)",
                "mini:/path/to/folder  (loads, or trains into, that folder)"))
