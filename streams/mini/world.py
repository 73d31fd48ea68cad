"""The mini world's vocabulary and its compositions: what a render shows and how it is captioned.

A :class:`Composition` is one scene: a shape of one colour with a printed glyph on it (or a
glyph alone, a *bare* glyph), at some size and position, in one font, on a background. The
vocabulary (shapes, colours, glyphs, fonts, held-out pairs, caption grammar) is data:
``streams/mini/data/world.yaml``, versioned. Every random draw goes through
:func:`rng_for`, keyed by that version, so the same keys give the same scenes everywhere.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

DATA_DIR = Path(__file__).parent / "data"
RGB = tuple[int, int, int]
INK = {"black": (20, 20, 20), "white": (250, 250, 250)}  # glyph ink on a shape: chosen by contrast
BARE_INK = "black"  # the extra ink colour a bare glyph may have (captioned like a colour)


@dataclass(frozen=True)
class Composition:
    """One scene. Lengths and positions are fractions of the image side.

    ``shape`` is None for a bare glyph, whose ``colour`` is then its ink colour (a palette
    colour or ``black``). ``size`` is the shape's circumradius (or, for a bare glyph, the
    glyph's font size); ``cx, cy`` its centre; ``angle`` a small rotation in degrees.
    """

    shape: str | None
    colour: str
    glyph: str
    font: str
    size: float
    cx: float
    cy: float
    angle: float
    background: RGB


@dataclass(frozen=True)
class World:
    """The vocabulary of ``world.yaml`` (see that file for the meaning of each field)."""

    version: int
    image_size: int
    shapes: tuple[str, ...]
    colours: dict[str, RGB]
    digits: tuple[str, ...]
    letters: tuple[str, ...]
    fonts: tuple[str, ...]
    bare_glyph_fraction: float
    jitter: float
    held_out: frozenset[tuple[str, str]]
    captions: dict[str, tuple[str, ...]]
    mention_probability: float
    group_size: int
    vary: dict[str, float]

    @classmethod
    def load(cls, path: Path = DATA_DIR / "world.yaml") -> World:
        data = yaml.safe_load(Path(path).read_text())
        world = cls(
            version=int(data["version"]),
            image_size=int(data["image_size"]),
            shapes=tuple(data["shapes"]),
            colours={k: tuple(v) for k, v in data["colours"].items()},
            digits=tuple(str(d) for d in data["digits"]),
            letters=tuple(str(c) for c in data["letters"]),
            fonts=tuple(data["fonts"]),
            bare_glyph_fraction=float(data["bare_glyph_fraction"]),
            jitter=float(data["jitter"]),
            held_out=frozenset((s, c) for s, c in data["held_out"]),
            captions={k: tuple(v) for k, v in data["captions"].items()},
            mention_probability=float(data["mention_probability"]),
            group_size=int(data["group_size"]),
            vary={k: float(v) for k, v in data["vary"].items()},
        )
        for shape, colour in world.held_out:
            if shape not in world.shapes or colour not in world.colours:
                raise ValueError(f"{path}: held-out pair ({shape}, {colour}) is not in the vocabulary")
        return world

    @property
    def glyphs(self) -> tuple[str, ...]:
        return self.digits + self.letters

    def kind(self, glyph: str) -> str:
        """``number`` for a digit, ``letter`` otherwise (the word captions use)."""
        return "number" if glyph in self.digits else "letter"

    def pairs(self, held_out: bool) -> list[tuple[str, str]]:
        """The (shape, colour) pairs pretraining sees (``held_out=False``) or never sees."""
        return [(s, c) for s in self.shapes for c in self.colours if ((s, c) in self.held_out) == held_out]

    def describe(self, comp: Composition, mention: str = "scg") -> str:
        """The caption of ``comp`` mentioning the attributes in ``mention`` (first template).

        ``mention`` is a subset of ``"scg"`` (shape, colour, glyph), in that order.
        """
        return self._caption(comp, mention, 0)

    def caption(self, comp: Composition, rng: np.random.Generator, required: str = "") -> str:
        """A pretraining caption: each attribute mentioned with ``mention_probability``
        (at least one; always those in ``required``), in a template drawn from the grammar."""
        available = "cg" if comp.shape is None else "scg"
        while True:
            mention = "".join(a for a in available if a in required or rng.random() < self.mention_probability)
            if mention:
                break
        key = ("bare_" + mention) if comp.shape is None else mention
        if key not in self.captions:  # a bare glyph's colour alone says too little: add the glyph
            mention, key = "cg", "bare_cg"
        return self._caption(comp, mention, int(rng.integers(len(self.captions[key]))))

    def _caption(self, comp: Composition, mention: str, template: int) -> str:
        key = ("bare_" + mention) if comp.shape is None else mention
        return self.captions[key][template].format(
            shape=comp.shape, colour=comp.colour, glyph=comp.glyph, kind=self.kind(comp.glyph))

    def sample(
        self,
        rng: np.random.Generator,
        pairs: Sequence[tuple[str, str]],
        glyphs: Sequence[str] | None = None,
        bare_fraction: float = 0.0,
        size: tuple[float, float] = (0.34, 0.48),
    ) -> Composition:
        """A clean scene: a (shape, colour) pair from ``pairs`` (or, with probability
        ``bare_fraction``, a bare glyph) and a glyph from ``glyphs`` (default: all);
        the shape's circumradius is drawn from ``size`` (fractions of the image side)."""
        glyphs = self.glyphs if glyphs is None else glyphs
        glyph = glyphs[int(rng.integers(len(glyphs)))]
        font = self.fonts[int(rng.integers(len(self.fonts)))]
        tint = rng.integers(-12, 13, size=3)
        background = tuple(int(v) for v in np.clip(int(rng.integers(200, 246)) + tint, 0, 255))
        if rng.random() < bare_fraction:
            inks = [*self.colours, BARE_INK]
            size = float(rng.uniform(0.55, 0.9))
            return Composition(None, inks[int(rng.integers(len(inks)))], glyph, font, size,
                               *self._centre(rng), float(rng.uniform(-8, 8)), background)
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        radius = float(rng.uniform(*size))
        return Composition(shape, colour, glyph, font, radius, *self._centre(rng),
                           float(rng.uniform(-10, 10)), background)

    def _centre(self, rng: np.random.Generator) -> tuple[float, float]:
        """A scene centre: the image centre moved by at most ``jitter`` along each axis."""
        dx, dy = rng.uniform(-self.jitter, self.jitter, size=2)
        return 0.5 + float(dx), 0.5 + float(dy)


    def minimal_group(
        self, rng: np.random.Generator, pairs: Sequence[tuple[str, str]], bare_fraction: float = 0.0,
    ) -> list[tuple[Composition, str]]:
        """``group_size`` captioned scenes that differ from one base scene in a single attribute
        (glyph, shape or colour, drawn with ``vary`` weights), everything else identical, each
        caption mentioning that attribute: in-batch hard negatives for the CLIP loss."""
        base = self.sample(rng, pairs, bare_fraction=bare_fraction)
        names = list(self.vary)
        attribute = names[int(rng.choice(len(names), p=np.array([self.vary[n] for n in names])))]
        if base.shape is None and attribute == "shape":
            attribute = "glyph"
        if attribute == "glyph":
            options = [replace(base, glyph=g) for g in self.glyphs]
        elif attribute == "shape":
            options = [replace(base, shape=x) for x in self.shapes if (x, base.colour) in pairs]
        else:
            inks = [*self.colours, BARE_INK] if base.shape is None else self.colours
            options = [replace(base, colour=c) for c in inks if base.shape is None or (base.shape, c) in pairs]
        chosen = rng.choice(len(options), size=min(self.group_size, len(options)), replace=False)
        return [(options[i], self.caption(options[i], rng, required=attribute[0])) for i in chosen]


@lru_cache(maxsize=1)
def world() -> World:
    """The shipped world (loaded once)."""
    return World.load()


def rng_for(*keys: int | str) -> np.random.Generator:
    """A generator seeded from ``keys`` (strings hashed with CRC-32, never Python's ``hash``)
    and the world version, so a draw is the same on every machine and in every process."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence([world().version, *ints]))
