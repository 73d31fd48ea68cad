"""``digits``: the real handwritten digits of ``sklearn.datasets.load_digits`` (no download)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from streams.base import DATA_DIR, LabelledImages, Split, Stream, StreamSpec
from streams.options import DigitsOptions


def _to_image(pixels: np.ndarray) -> Image.Image:
    """8×8 ink values in [0, 16] → a black-on-white RGB image of 8×8 pixels."""
    return Image.fromarray((255 - pixels * 255 / 16).astype(np.uint8), mode="L").convert("RGB")


@lru_cache(maxsize=4)
def _split(test_fraction: float, split_seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(digits.target)), test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    return {"images": digits.images, "targets": digits.target,
            "train": np.sort(train_idx), "test": np.sort(test_idx)}


class Digits(Stream):
    """Real handwritten digits of scikit-learn (10 classes, seeded stratified split)."""

    spec = StreamSpec.from_file(DATA_DIR / "digits.yaml")

    def dataset(self, split: Split) -> LabelledImages:
        opts = self.options or DigitsOptions()
        data = _split(opts.test_fraction, opts.split_seed)
        idx = data[split]
        return LabelledImages(data["images"][idx], data["targets"][idx], [f"digits/{i}" for i in idx], _to_image)
