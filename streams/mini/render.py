"""Rendering compositions with PIL: clean scenes and sign-like scenes under a visual shift.

Scenes are drawn at twice the output size and box-downsampled (PIL's ``reduce``), which
anti-aliases the polygons. Glyphs use the DejaVu fonts that ship with matplotlib. A clean
32-pixel render costs ~0.1 ms; a shifted sign ~0.5 ms (one core).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from streams.mini.world import INK, Composition, World

SUPERSAMPLE = 2
# Glyph font size relative to the shape's circumradius, and the glyph's offset below the
# centre (same unit): what fits inside each shape.
GLYPH_SCALE = {"circle": 1.3, "square": 1.25, "triangle": 0.85, "diamond": 0.95, "hexagon": 1.25, "star": 0.8}
GLYPH_DROP = {"triangle": 0.22}


@lru_cache(maxsize=512)
def font(name: str, px: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font of matplotlib's data folder at ``px`` pixels (cached)."""
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), px)


def shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of ``shape`` with circumradius ``r`` (pixels), rotated by
    ``angle`` degrees; triangles point up, squares are axis-aligned, diamonds stand on a corner."""
    if shape == "circle":
        n, start, radii = 48, 0.0, [r]
    elif shape == "square":
        n, start, radii = 4, 45.0, [r]
    elif shape == "diamond":
        n, start, radii = 4, 0.0, [r]
    elif shape == "triangle":
        n, start, radii = 3, -90.0, [r]
    elif shape == "hexagon":
        n, start, radii = 6, 0.0, [r]
    elif shape == "star":
        n, start, radii = 10, -90.0, [r, 0.45 * r]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = []
    for i in range(n):
        theta = math.radians(start + angle + 360.0 * i / n)
        radius = radii[i % len(radii)]
        points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
    return points


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white glyph ink, whichever contrasts more with the shape colour ``rgb``."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return INK["black"] if luminance > 140 else INK["white"]


def draw(world: World, comp: Composition, canvas: Image.Image) -> None:
    """Draw ``comp`` (shape and glyph, no background) onto ``canvas`` (any square size)."""
    side = canvas.size[0]
    pen = ImageDraw.Draw(canvas)
    cx, cy, r = comp.cx * side, comp.cy * side, comp.size * side
    if comp.shape is None:
        rgb = world.colours.get(comp.colour, INK["black"])
        pen.text((cx, cy), comp.glyph, fill=rgb, font=font(comp.font, max(4, round(r))), anchor="mm")
        return
    rgb = world.colours[comp.colour]
    pen.polygon(shape_points(comp.shape, cx, cy, r, comp.angle), fill=rgb)
    px = max(4, round(GLYPH_SCALE[comp.shape] * r))
    pen.text((cx, cy + GLYPH_DROP.get(comp.shape, 0.0) * r), comp.glyph, fill=_ink(rgb),
             font=font(comp.font, px), anchor="mm")


def render(world: World, comp: Composition) -> np.ndarray:
    """A clean render, uint8 [S, S, 3] with S = ``world.image_size``."""
    return render_scene(world, [comp])


def render_scene(world: World, comps: Sequence[Composition]) -> np.ndarray:
    """Several compositions on one clean render, drawn in order on the first one's background (the others'
    backgrounds play no part), uint8 [S, S, 3]. One composition renders exactly as :func:`render`."""
    side = world.image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), comps[0].background)
    for comp in comps:
        draw(world, comp, canvas)
    return np.asarray(canvas.reduce(SUPERSAMPLE))


@dataclass(frozen=True)
class Shift:
    """Strengths of the sign-like visual shift, each drawn uniformly from its range.

    Lengths are fractions of the image side; ``blur`` is a Gaussian radius in output pixels;
    ``light`` multiplies intensities; ``noise`` is a Gaussian std in 0–255 units.
    """

    perspective: tuple[float, float] = (0.05, 0.18)  # corner displacement
    blur: tuple[float, float] = (0.3, 1.0)
    light: tuple[float, float] = (0.25, 0.7)
    noise: tuple[float, float] = (4.0, 14.0)
    clutter: tuple[int, int] = (6, 14)  # number of distractor strokes and patches


def _clutter(rng: np.random.Generator, side: int, count: int) -> Image.Image:
    """A busy background: a colour gradient with random patches, bars and lines in muted colours."""
    a, b = rng.integers(40, 200, size=3), rng.integers(40, 200, size=3)
    ramp = np.linspace(0.0, 1.0, side)[:, None, None]
    grid = (a * (1 - ramp) + b * ramp) * np.ones((1, side, 1))
    canvas = Image.fromarray(grid.astype(np.uint8), "RGB")
    pen = ImageDraw.Draw(canvas)
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(30, 220, size=3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1, 1.1, size=4) * side)
        kind = rng.integers(3)
        if kind == 0:
            pen.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=colour)
        elif kind == 1:
            pen.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 7)))
        else:
            pen.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour,
                        width=int(rng.integers(2, 5)))
    return canvas


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` [4, 2] to input points ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, float), src.reshape(8)).tolist()


def render_shifted(world: World, comp: Composition, rng: np.random.Generator, shift: Shift = Shift()) -> np.ndarray:
    """``comp`` as a sign in the wild: cluttered background, perspective, blur, low light and
    sensor noise. uint8 [S, S, 3]."""
    side = world.image_size * SUPERSAMPLE
    scene = _clutter(rng, side, int(rng.integers(shift.clutter[0], shift.clutter[1] + 1))).convert("RGBA")
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw(world, comp, layer)
    corners = np.array([[0, 0], [side, 0], [side, side], [0, side]], float)
    jitter = rng.uniform(*shift.perspective) * side * rng.uniform(-1, 1, size=(4, 2))
    layer = layer.transform((side, side), Image.Transform.PERSPECTIVE,
                            _perspective_coeffs(corners, corners + jitter), Image.Resampling.BILINEAR)
    scene.alpha_composite(layer)
    scene = scene.convert("RGB").filter(ImageFilter.GaussianBlur(rng.uniform(*shift.blur) * SUPERSAMPLE))
    pixels = np.asarray(scene.reduce(SUPERSAMPLE), dtype=np.float32)
    cast = rng.uniform(0.8, 1.2, size=3)  # a coloured illuminant
    pixels = pixels * rng.uniform(*shift.light) * cast
    pixels = pixels + rng.normal(0.0, rng.uniform(*shift.noise), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)
