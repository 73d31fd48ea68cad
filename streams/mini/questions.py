"""The mini world's question kinds: mini versions of the questions that VSR, MMVP and Hateful Memes bring.

Each row is a scene (a list of :class:`~streams.mini.world.Composition`, drawn by
:func:`~streams.mini.render.render_scene`) and an :class:`~benchmark.vqa.questions.OwnQuestion` in the released
wording of the set it mirrors, so a mini run goes through every code path of the real sets:

- ``spatial`` (VSR): two small shapes without a glyph, side by side or one above the other; the statement "The
  {colour} {shape} is {left of|right of|above|below} the {colour} {shape}." judged true or false
  (:func:`streams.vsr.vsr_question`; the CLIP texts short, :func:`spatial_question`). A false statement names the
  opposite relation on the same axis.
- ``pairs`` (MMVP): two scenes identical but for one attribute (colour, shape or printed glyph); both ask the same
  question with the options ``(a) <first scene's value> (b) <second scene's>``, so the first answers ``(a)`` and
  the second ``(b)``; ``group`` is the pair's id (pair accuracy; :func:`streams.mmvp.mmvp_question`).
- ``yesno`` (Hateful Memes): one scene; "Is there a {colour} {shape} in the image?" or "Is the shape a
  {shape}?", answered yes or no in HM's prompt structure (``... Answer yes or no. Answer:``), the VLM-loss pair
  in its short-answer wrapper (:func:`streams.own_questions.short_answer_pair`). A "no" asks about the scene with
  its shape or its colour changed.

Balance: a row's answer is its index's parity (a pair holds one of each), so every split, and every one of its
groups (:func:`row_group`), holds each answer equally often, or one more of one when its size is odd. The
relation (``spatial``), the attribute (``pairs``) and the question form (``yesno``) cycle with the index too.

Determinism: every draw of row ``index`` (of pair ``index // 2`` for ``pairs``) comes from
:func:`~streams.mini.world.rng_for` keyed by (``mini-questions``, version, kind, split, seed, index): the same row in
every process and on every machine, whatever else was drawn before. The scenes use the (shape, colour) pairs held
out from pretraining (the controls' pairs, as ``mini-shapes``). Only a ``pairs`` row that varies the shape (or the colour
of a shape with one held-out colour) takes its second scene's pair from the whole vocabulary, since no two held-out
pairs share a colour. No torch runs here (the wordings' modules import it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from benchmark.vqa.questions import OwnQuestion
from streams.hm import ANSWERS as YES_NO
from streams.mini.world import Composition, World, rng_for, world
from streams.mmvp import mmvp_question
from streams.own_questions import short_answer_pair
from streams.vsr import vsr_question

KINDS = ("spatial", "pairs", "yesno")
VERSION = 1  # of the drawing rules below: the key of every draw (the streams pass their data file's version)
ROWS_PER_UNIT = {"spatial": 1, "pairs": 2, "yesno": 1}  # a unit: one row, or a pair of rows drawn together

RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPATIAL_SIZE = (0.16, 0.2)  # circumradius, fraction of the side
SPATIAL_OFFSET = (0.21, 0.27)  # each centre's distance from the middle along the relation's axis
SPATIAL_CROSS = 0.08  # at most this far from the middle across it: the axis is never in doubt

ATTRIBUTES = ("colour", "shape", "glyph")
PAIR_QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
                  "glyph": "What is printed on the shape?"}
YESNO_FORMS = ("presence", "identity")


# --------------------------------------------------------------------------- wordings
def spatial_statement(subject: tuple[str, str], relation: str, reference: tuple[str, str]) -> str:
    """The statement about two (shape, colour) objects, e.g. "The red circle is left of the blue square."."""
    return f"The {subject[1]} {subject[0]} is {relation} the {reference[1]} {reference[0]}."


def spatial_question(subject: tuple[str, str], relation: str, reference: tuple[str, str], label: int) -> dict:
    """VSR's released wording of the statement (eval prompt, answers, VLM-loss pair), with short CLIP texts: the
    statement with the opposite relation (``false``) and the statement (``true``). The mini text encoder reads 16
    tokens, which would cut VSR's released CLIP texts before their last word, the option."""
    statement = spatial_statement(subject, relation, reference)
    return {**vsr_question(statement, label),
            "texts": (spatial_statement(subject, OPPOSITE[relation], reference), statement)}


def pair_options(values: Sequence[str]) -> str:
    """``(a) red (b) blue``: the options of a pair question, in the released MMVP format."""
    return " ".join(f"({letter}) {value}" for letter, value in zip("ab", values))


def yesno_question(form: str, shape: str, colour: str, label: int) -> dict:
    """A yes/no question in Hateful Memes' structure (eval prompt, no/yes CLIP texts, VLM-loss pair)."""
    if form == "presence":
        asked = f"Is there a {colour} {shape} in the image?"
        texts = (f"There is no {colour} {shape} in the image.", f"There is a {colour} {shape} in the image.")
    else:
        asked = f"Is the shape a {shape}?"
        texts = (f"The shape is not a {shape}.", f"The shape is a {shape}.")
    return dict(prompt=f"{asked} Answer yes or no. Answer:", answers=YES_NO, answer=label, texts=texts,
                pair=short_answer_pair(f"{asked} (Answer yes or no)", YES_NO[label]))


# --------------------------------------------------------------------------- scenes
def _other(rng: np.random.Generator, values: Sequence[str], current: str, keep: Callable[[str], bool] = bool) -> str:
    """Another value than ``current``, drawn among those ``keep`` accepts, else (none) among all the others."""
    others = [v for v in values if v != current]
    kept = [v for v in others if keep(v)] or others
    return kept[int(rng.integers(len(kept)))]


def _spatial(w: World, rng: np.random.Generator, pool: list[tuple[str, str]], index: int):
    label, relation = index % 2, RELATIONS[index // 2 % len(RELATIONS)]
    a = w.sample(rng, pool, glyphs=("",), size=SPATIAL_SIZE)
    b = w.sample(rng, [p for p in pool if p != (a.shape, a.colour)], glyphs=("",), size=SPATIAL_SIZE)
    actual = relation if label else OPPOSITE[relation]
    sign = -1.0 if actual in ("left of", "above") else 1.0  # the subject's side (image y grows downwards)
    far = rng.uniform(*SPATIAL_OFFSET, size=2)
    along = (0.5 + sign * float(far[0]), 0.5 - sign * float(far[1]))
    across = 0.5 + rng.uniform(-SPATIAL_CROSS, SPATIAL_CROSS, size=2)
    horizontal = actual in ("left of", "right of")
    centres = [(along[i], float(across[i])) if horizontal else (float(across[i]), along[i]) for i in range(2)]
    scene = [replace(a, cx=centres[0][0], cy=centres[0][1]),
             replace(b, cx=centres[1][0], cy=centres[1][1], background=a.background)]
    return scene, spatial_question((a.shape, a.colour), relation, (b.shape, b.colour), label)


def _pairs(w: World, rng: np.random.Generator, pool: list[tuple[str, str]], index: int):
    member, attribute = index % 2, ATTRIBUTES[index // 2 % len(ATTRIBUTES)]
    base = w.sample(rng, pool)
    if attribute == "glyph":
        other = replace(base, glyph=_other(rng, w.glyphs, base.glyph))
    elif attribute == "colour":  # the other scene's pair from the pool when it has one
        other = replace(base, colour=_other(rng, list(w.colours), base.colour, lambda c: (base.shape, c) in pool))
    else:
        other = replace(base, shape=_other(rng, w.shapes, base.shape, lambda x: (x, base.colour) in pool))
    values = [getattr(c, attribute) for c in (base, other)]
    return [(base, other)[member]], mmvp_question(PAIR_QUESTIONS[attribute], pair_options(values), member,
                                                  index // 2)


def _yesno(w: World, rng: np.random.Generator, pool: list[tuple[str, str]], index: int):
    label, form = index % 2, YESNO_FORMS[index // 2 % len(YESNO_FORMS)]
    scene = w.sample(rng, pool)
    shape, colour = scene.shape, scene.colour
    if not label and (form == "identity" or rng.random() < 0.5):
        shape = _other(rng, w.shapes, shape)
    elif not label:
        colour = _other(rng, list(w.colours), colour)
    return [scene], yesno_question(form, shape, colour, label)


_DRAW: dict[str, Callable] = {"spatial": _spatial, "pairs": _pairs, "yesno": _yesno}


# --------------------------------------------------------------------------- public
def question_row(kind: str, split: str, seed: int, index: int, *, version: int = VERSION
                 ) -> tuple[list[Composition], OwnQuestion]:
    """Row ``index`` of ``kind``'s ``split`` (any string key: ``train``, ``test``, ``validation-0``, ...) for data
    ``seed``: its scene (of the (shape, colour) pairs pretraining never saw) and its question."""
    if kind not in _DRAW:
        raise ValueError(f"question kind {kind!r}: allowed: {', '.join(KINDS)}")
    w = world()
    unit = index // ROWS_PER_UNIT[kind]
    rng = rng_for("mini-questions", version, kind, split, seed, unit)
    scene, parts = _DRAW[kind](w, rng, w.pairs(held_out=True), index)
    return scene, OwnQuestion(**parts)


def split_rows(kind: str, per_group: int, groups: int) -> int:
    """The rows of a split of ``per_group`` rows per group (``pairs``: rounded up to whole pairs)."""
    unit = ROWS_PER_UNIT[kind]
    return -(-per_group // unit) * unit * groups


def row_group(kind: str, index: int, groups: int) -> int:
    """The group (session class) of row ``index``: its unit's index modulo ``groups`` (a pair's rows share it)."""
    return index // ROWS_PER_UNIT[kind] % groups


def vocabulary_texts() -> list[str]:
    """Texts holding every word any kind can emit in a prompt, an answer, a CLIP text or a VLM-loss pair: the
    world's shapes, colours and glyphs, and each wording with each of its fixed alternatives filled."""
    w = world()
    shape, colour = w.pairs(held_out=False)[0]
    parts = [spatial_question((shape, colour), relation, (shape, colour), label)
             for relation in RELATIONS for label in (0, 1)]
    parts += [mmvp_question(PAIR_QUESTIONS[a], pair_options((shape, colour)), m, 0) for a in ATTRIBUTES for m in (0, 1)]
    parts += [yesno_question(form, shape, colour, label) for form in YESNO_FORMS for label in (0, 1)]
    texts = [" ".join(w.shapes), " ".join(w.colours), " ".join(w.glyphs)]
    for p in parts:
        texts += [p["prompt"], *p["answers"], *p["texts"], *p["pair"]]
    return texts
