"""The mini world's generator and streams: determinism, caption/label alignment, real shift."""
import re

import numpy as np
import pytest

from benchmark.registry import STREAMS
from streams.mini.datasets import (
    MiniColours,
    MiniDigits,
    MiniHandwritten,
    MiniOptions,
    MiniShapes,
    MiniSigns,
    ProceduralStream,
    rendered,
    sign_composition,
)
from streams.mini.pretrain import corpus_batch, corpus_scenes
from streams.mini.render import render, render_shifted
from streams.mini.world import rng_for, world

CONTROLS = (MiniShapes, MiniColours, MiniDigits)
SMALL = MiniOptions(train_per_class=4, test_per_class=4, seed=3)


def test_streams_are_registered():
    for name in ("mini-shapes", "mini-colours", "mini-digits", "mini-handwritten", "mini-signs"):
        assert name in STREAMS


def test_generator_is_deterministic_and_seed_sensitive():
    w = world()
    images, captions = corpus_batch(w, seed=0, step=5, batch_size=32)
    again, captions_again = corpus_batch(w, seed=0, step=5, batch_size=32)
    assert images.dtype == np.uint8 and images.shape == (32, w.image_size, w.image_size, 3)
    assert np.array_equal(images, again) and captions == captions_again
    other, other_captions = corpus_batch(w, seed=1, step=5, batch_size=32)
    assert not np.array_equal(images, other) and captions != other_captions
    # a stream's split is the same when rendered anew (the process cache is bypassed)
    first = rendered.__wrapped__(MiniSigns, "test", 3, 0)[0]
    assert np.array_equal(first, rendered.__wrapped__(MiniSigns, "test", 3, 0)[0])
    assert not np.array_equal(first, rendered.__wrapped__(MiniSigns, "test", 3, 1)[0])


def _words(caption: str) -> list[str]:
    return re.findall(r"\w+", caption)


def test_pretraining_captions_describe_their_scene_and_never_show_held_out_pairs():
    w = world()
    scenes = corpus_scenes(w, seed=0, step=0, batch_size=400)
    assert sum(c.shape is None for c, _ in scenes) > 40  # bare glyphs are part of the corpus
    for comp, caption in scenes:
        assert (comp.shape, comp.colour) not in w.held_out
        words = _words(caption)
        assert [x for x in words if x in w.shapes] in ([], [comp.shape])
        assert [x for x in words if x in w.colours or x == "black"] in ([], [comp.colour])
        glyph = re.search(r"\b(number|letter) (\w)\b", caption)
        assert glyph is None or (glyph[1], glyph[2]) == (w.kind(comp.glyph), comp.glyph)
        assert any(x in words for x in (comp.shape, comp.colour, comp.glyph)), caption


@pytest.mark.parametrize("stream", [*CONTROLS, MiniSigns])
def test_stream_labels_match_their_scenes(stream: type[ProceduralStream]):
    w, rng = world(), rng_for("alignment")
    for label, name in enumerate(stream.spec.class_names):
        comp = stream.composition(w, label, rng)
        attribute = {MiniShapes: comp.shape, MiniColours: comp.colour, MiniDigits: comp.glyph}.get(stream)
        if stream is MiniSigns:
            assert w.describe(comp).rstrip(".") == f"a {name}"  # the class name is the full caption
            assert (comp.shape, comp.colour) not in w.held_out
        else:
            assert attribute == name
            assert (comp.shape, comp.colour) in w.held_out  # controls: compositions pretraining never saw
        prompts = [t.format(name) for t in stream.spec.templates]
        assert all(name in p for p in prompts)


def test_stream_datasets_have_labels_ids_and_images():
    for stream in (*CONTROLS, MiniSigns):
        data = stream(".", SMALL).dataset("test")
        n_classes = len(stream.spec.class_names)
        assert len(data) == 4 * n_classes and sorted(set(data.targets)) == list(range(n_classes))
        assert len(set(data.ids)) == len(data)
        image, label = data[0]
        assert image.size == (world().image_size,) * 2 and image.mode == "RGB" and label == 0
    sessions = MiniSigns(".", SMALL).sessions(5, shots=2, shot_seed=0)
    assert [len(s.classes) for s in sessions] == [2] * 5 and all(len(s.ids) == 4 for s in sessions)
    assert len(MiniHandwritten(".").dataset("test")) > 500


def test_bad_sign_names_are_refused():
    w = world()
    assert sign_composition(w, "red circle with the number 3") == ("circle", "red", "3")
    with pytest.raises(ValueError, match="vocabulary"):
        sign_composition(w, "red circle with the letter 3")
    held_shape, held_colour = min(w.held_out)
    with pytest.raises(ValueError, match="held out"):
        sign_composition(w, f"{held_colour} {held_shape} with the number 1")


def _flat_fraction(images: np.ndarray) -> np.ndarray:
    """Share of horizontally neighbouring pixels with equal grey level, [N]: the flat background."""
    gray = images.astype(np.int16).sum(-1)
    return (np.diff(gray, axis=2) == 0).mean((1, 2))


def _sharpness(images: np.ndarray) -> np.ndarray:
    """The steepest horizontal step of each image (0–255 units), [N]: high for printed edges."""
    return np.abs(np.diff(images.astype(np.float32).mean(-1), axis=2)).max((1, 2))


def test_targets_differ_from_the_pretraining_distribution():
    """A simple statistic separates each target from clean renders; controls stay close."""
    w = world()
    corpus, _ = corpus_batch(w, seed=0, step=0, batch_size=300)
    controls = np.concatenate([rendered(s, "test", 10, 0)[0] for s in CONTROLS])
    signs = rendered(MiniSigns, "test", 10, 0)[0]
    # brightness: signs in low light are far darker than the clean world, controls are not
    assert signs.mean() < 0.6 * corpus.mean()
    assert abs(controls.mean() - corpus.mean()) < 0.1 * corpus.mean()
    # clean renders are mostly flat background; noise and clutter leave the signs almost no flat pixel
    assert np.median(_flat_fraction(corpus)) > 0.5 and np.median(_flat_fraction(signs)) < 0.1
    # handwritten digits (8x8 scans, as the model sees them at 32 px) are far blurrier than printed glyphs
    bare = np.stack([render(w, c) for c, _ in corpus_scenes(w, 0, 0, 300) if c.shape is None and c.colour == "black"])
    hand = MiniHandwritten(".").dataset("test")
    upscaled = np.stack([np.asarray(hand.load(x).resize((w.image_size,) * 2)) for x in hand.items[:200]])
    assert np.median(_sharpness(upscaled)) < 0.6 * np.median(_sharpness(bare))


def test_clean_render_is_fast_enough():
    import time

    w, rng = world(), rng_for("speed")
    comps = [w.sample(rng, w.pairs(held_out=False), bare_fraction=0.25) for _ in range(500)]
    start = time.perf_counter()
    for c in comps:
        render(w, c)
    assert 500 / (time.perf_counter() - start) > 1000  # thousands per second on one free core
    assert render_shifted(w, comps[0], rng).shape == (w.image_size, w.image_size, 3)
