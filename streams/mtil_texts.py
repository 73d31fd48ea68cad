"""The MTIL datasets' texts as ZSCL gives them, and the published MTIL orders and few-shot k.

MTIL (ZSCL, ICCV 2023, ``Thunderbeee/ZSCL``) trains a CLIP model on eleven whole datasets in turn. Each
dataset's class names and templates there are ZSCL's own (``mtil/src/datasets/collections.py``), which
differ in places from our streams' (CLIP's prompts). ``streams/data/mtil/<stream>.yaml`` holds them:
``class_keys`` (our stream's key of each class; its label where the stream has no keys) and
``class_names`` in ZSCL's label order, and ZSCL's ``templates``, the first being the one ZSCL trains with.
:func:`mtil_spec` maps them onto our stream's label order through the keys. ZSCL's splits, where they
differ from ours, are the member streams' option ``split: zscl`` (docs/fidelity.md, "MTIL datasets").
"""
from __future__ import annotations

from dataclasses import replace

import yaml

from benchmark.registry import STREAMS
from streams.base import DATA_DIR, StreamSpec

MTIL_DIR = DATA_DIR / "mtil"

# ZSCL's Order I (its mtil/scripts, e.g. ZSCL.sh) and Order II (results.ipynb's order [9, 6, 7, 8, 5, 10, 0, 1,
# 3, 4, 2] over Order I; the order of its Order II scripts, e.g. ZSCL_minus.sh), as our stream names.
MTIL_ORDERS: dict[str, tuple[str, ...]] = {
    "I": ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101", "mnist", "pets",
          "stanfordcars", "sun397"),
    "II": ("stanfordcars", "food101", "mnist", "pets", "flowers102", "sun397", "aircraft", "caltech101", "dtd",
           "eurosat", "cifar100"),
}

# Shots per class of few-shot MTIL: 5 in MoE-Adapters' released training script (JiazuoYu/MoE-Adapters4CL,
# mtil/scripts/train/train_few_shot_router11_experts22_1000iters.sh: --few_shot=5). DIKI's configs/MTIL-FS.yaml
# (lloongx/DIKI) sets num_shots: 16 instead; the two published few-shot protocols differ.
MTIL_FS_SHOTS = 5


def mtil_spec(name: str) -> StreamSpec:
    """The spec of MTIL dataset ``name`` (one of :data:`MTIL_ORDERS`' streams): our stream's spec with ZSCL's
    class names (in our label order) and ZSCL's templates (``templates[0]``: ZSCL's training template)."""
    if name not in MTIL_ORDERS["I"]:
        raise ValueError(f"mtil: unknown dataset {name!r}; allowed: {', '.join(MTIL_ORDERS['I'])}")
    spec = STREAMS.get(name).obj.spec
    path = MTIL_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    keys, names = data["class_keys"], data["class_names"]
    if len(keys) != len(names) or len(set(keys)) != len(keys) or set(keys) != set(spec.keys):
        raise ValueError(f"{path}: class_keys must name each of the {len(spec.keys)} classes of stream "
                         f"{name!r} exactly once, one per class name")
    by_key = dict(zip(keys, names))
    return replace(spec, class_names=tuple(by_key[k] for k in spec.keys), templates=tuple(data["templates"]))
