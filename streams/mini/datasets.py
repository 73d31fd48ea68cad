"""The mini world's streams: clean controls of held-out compositions and two shifted targets.

Controls (``mini-shapes``, ``mini-colours``, ``mini-digits``) classify one attribute of clean
renders of the (shape, colour) pairs pretraining never saw. Targets show the same concepts
under a real visual shift: ``mini-handwritten`` (scikit-learn's real handwritten digits
against printed ones) and ``mini-signs`` (sign-like compositions in the wild). Procedural
streams need no files: each split is rendered once per process from (options.seed, world
version, stream version) and kept as a uint8 array.
"""
from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from streams.base import LabelledImages, Split, Stream, StreamSpec
from streams.digits import Digits
from streams.mini.render import render, render_shifted
from streams.mini.world import DATA_DIR, Composition, World, rng_for, world
from streams.options import MiniOptions


def mini_spec(name: str) -> StreamSpec:
    """The spec of the mini stream ``name`` (its data file in :data:`~streams.mini.world.DATA_DIR`)."""
    return StreamSpec.from_file(DATA_DIR / f"{name}.yaml")


class ProceduralStream(Stream):
    """A mini stream rendered on the fly: subclasses say which scene shows a class."""

    @classmethod
    @abstractmethod
    def composition(cls, w: World, label: int, rng: np.random.Generator) -> Composition:
        """A random scene of class ``label``."""

    @classmethod
    def draw(cls, w: World, label: int, rng: np.random.Generator) -> np.ndarray:
        """One image of class ``label``, uint8 [S, S, 3] (clean unless a subclass shifts it)."""
        return render(w, cls.composition(w, label, rng))

    def dataset(self, split: Split) -> LabelledImages:
        opts = self.options or MiniOptions()
        per_class = opts.train_per_class if split == "train" else opts.test_per_class
        images, targets = rendered(type(self), split, per_class, opts.seed)
        ids = [f"{self.spec.name}/{split}/{opts.seed}/{i}" for i in range(len(targets))]
        return LabelledImages(images, targets, ids, Image.fromarray)


@lru_cache(maxsize=32)
def rendered(stream: type[ProceduralStream], split: Split, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of one split, class by class: (uint8 [C·per_class, S, S, 3] read-only,
    labels [C·per_class]). Deterministic from (world version, stream version, seed, split)."""
    spec, w = stream.spec, world()
    rng = rng_for(spec.version, seed, spec.name, split)
    targets = np.repeat(np.arange(len(spec.class_names)), per_class)
    return read_only([stream.draw(w, int(label), rng) for label in targets]), targets


def read_only(images: Sequence[np.ndarray]) -> np.ndarray:
    """``images`` stacked into one read-only array [N, ...]: a rendered split, cached and shared by its readers."""
    stacked = np.stack(images)
    stacked.setflags(write=False)
    return stacked


class MiniShapes(ProceduralStream):
    """Mini world control: the shape of clean held-out (shape, colour) compositions."""

    spec = mini_spec("mini-shapes")

    @classmethod
    def composition(cls, w: World, label: int, rng: np.random.Generator) -> Composition:
        shape = cls.spec.class_names[label]
        return w.sample(rng, [p for p in w.pairs(held_out=True) if p[0] == shape])


class MiniColours(ProceduralStream):
    """Mini world control: the colour of clean held-out (shape, colour) compositions."""

    spec = mini_spec("mini-colours")

    @classmethod
    def composition(cls, w: World, label: int, rng: np.random.Generator) -> Composition:
        colour = cls.spec.class_names[label]
        return w.sample(rng, [p for p in w.pairs(held_out=True) if p[1] == colour])


class MiniDigits(ProceduralStream):
    """Mini world control: the printed digit on clean held-out (shape, colour) compositions."""

    spec = mini_spec("mini-digits")

    @classmethod
    def composition(cls, w: World, label: int, rng: np.random.Generator) -> Composition:
        return w.sample(rng, w.pairs(held_out=True), glyphs=[cls.spec.class_names[label]])


SIGN_NAME = re.compile(r"(?P<colour>\w+) (?P<shape>\w+) with the (?P<kind>number|letter) (?P<glyph>\w)")
SIGN_SIZE = (0.36, 0.48)  # circumradius range: a sign fills most of the frame


def sign_composition(w: World, class_name: str) -> tuple[str, str, str]:
    """(shape, colour, glyph) of a ``mini-signs`` class name such as
    "red circle with the number 3"; a pair held out from pretraining is refused."""
    match = SIGN_NAME.fullmatch(class_name)
    if not match or match["shape"] not in w.shapes or match["colour"] not in w.colours \
            or match["glyph"] not in w.glyphs or w.kind(match["glyph"]) != match["kind"]:
        raise ValueError(f"mini-signs: '{class_name}' is not '<colour> <shape> with the <number|letter> <glyph>' "
                         f"in the world's vocabulary")
    if (match["shape"], match["colour"]) in w.held_out:
        raise ValueError(f"mini-signs: '{class_name}' uses a pair held out from pretraining")
    return match["shape"], match["colour"], match["glyph"]


class MiniSigns(ProceduralStream):
    """Mini world target: sign-like compositions under perspective, blur, low light, noise, clutter."""

    spec = mini_spec("mini-signs")

    @classmethod
    def composition(cls, w: World, label: int, rng: np.random.Generator) -> Composition:
        """The clean scene behind one image of class ``label`` (before the shift)."""
        shape, colour, glyph = sign_composition(w, cls.spec.class_names[label])
        return w.sample(rng, [(shape, colour)], glyphs=[glyph], size=SIGN_SIZE)

    @classmethod
    def draw(cls, w: World, label: int, rng: np.random.Generator) -> np.ndarray:
        """One shifted image of class ``label``, uint8 [S, S, 3]."""
        return render_shifted(w, cls.composition(w, label, rng), rng)


class MiniHandwritten(Digits):
    """Mini world target: scikit-learn's real handwritten digits against printed digits."""

    spec = mini_spec("mini-handwritten")


for _name in MiniSigns.spec.class_names:
    sign_composition(world(), _name)  # a bad class name fails at import, not in the middle of a run
