"""The mini VLM's language model, set rather than learned: a three-block Llama that answers a multiple-choice
question with the option whose class name's weight the image embedding is closest to, and names an image's class
with the closest class name — the zero-shot rule of the encoder in the tower, computed by attention heads.

The residual stream (width :data:`WIDTH`) is split into named blocks (:class:`Layout`): the image semantic ``S``
(what the projector writes: the encoder's image head, :func:`streams.mini.vlm.clip_head`), the word semantic ``T``
(a class name's zero-shot classifier weight), the copied image semantic ``V``, one-hot letters and flags. Every
text token has the same norm (a padding coordinate), so RMSNorm scales all of them alike. One head per block:

1. It looks one token back (rotary phases of the fastest frequencies, a sink on ``<s>`` for every other distance):
   a class-name token copies the option letter of the marker before it ("A." … "E.", "(a)", "(b)"), and an image
   token marks whether it follows ":" (of "USER:") — only the class token does (``IS_CLS``).
2. Every text token copies the class token's semantic into ``V`` (attention keyed on ``IS_CLS``).
3. Every text token attends over the class-name tokens with the score ``<V, T>`` (on rotary frequencies too slow
   to turn over a prompt), far above every other token: the last token gets the letter of the best match.

The output layer reads the copied letter for the answer letters, ``<V, T>`` (× the encoder's logit scale) for the
class names, and the flags for "." after a class name and ``</s>`` after "." (the mini streams' short answer is
the class name: ``{}.``), so that the VLM loss of an answer is, at its class name, the CLIP loss of the image
against every class name. The MLPs are zero.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

WIDTH = 160
HEAD = 128  # head dimension: 64 rotary pairs, the slow ones constant over a prompt
HEADS = 1
BLOCKS = 3
ROPE_THETA = 1e12
FAST = (0, 1)  # rotary pairs of the look-one-back heads (1 and 0.65 rad per token): their cosines peak one token back
SLOW = HEAD // 2 - 1  # the slowest rotary pair (1e-12 rad per token): flags and sinks; the content pairs precede it
NORM = 16.0  # every text token's squared norm
IMAGE_FLAG = 4.0  # an image token's flag: its squared norm is about NORM too
SEMANTIC = 45  # coordinates of each semantic block: the span of up to 45 class names' weights
SCALE = math.sqrt(WIDTH / NORM)  # a text token's coordinates after RMSNorm (weight 1), × this


@dataclass
class Layout:
    """Where each block of the residual stream lives: semantic blocks of ``semantic`` coordinates (the span of the
    class names' weights), flags, and one coordinate per option letter in each letter block (``letters``)."""

    semantic: int = SEMANTIC
    letters: int = 5

    def __post_init__(self) -> None:
        d, n = self.semantic, self.letters
        self.S, self.T, self.V = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
        at = 3 * d
        (self.ONE, self.IMG, self.CONCEPT, self.MARKER, self.COLON, self.PERIOD, self.SINK, self.PAD,
         self.IS_CLS) = range(at, at + 9)
        at += 9
        self.L, self.C, self.ANSWER = (slice(at + i * n, at + (i + 1) * n) for i in range(3))
        if at + 3 * n > WIDTH:
            raise ValueError(f"the mini language model needs {at + 3 * n} coordinates, it has {WIDTH}")


def rotary_frequencies() -> Tensor:
    """θ_j of every rotary pair j (radians per token), as Llama computes them."""
    return ROPE_THETA ** (-torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD)


@dataclass(frozen=True)
class Vocabulary:
    """What the language model must know of its tokens: the id of each class name with its word semantic (a row of
    ``concepts`` [K, semantic]), the id and letter of each option marker, the ids of ``<s>``, ":", "." and
    ``</s>``, and every answer letter's id with its letter."""

    concept_ids: Sequence[int]
    concepts: Tensor
    markers: dict[int, int]
    answers: dict[int, int]
    bos: int
    colon: int
    period: int
    eos: int


def text_config() -> dict:
    """The Llama sizes of this language model (``hidden_size``, heads, head dimension, rotary base, ...)."""
    return {"hidden_size": WIDTH, "intermediate_size": 8, "num_hidden_layers": BLOCKS, "num_attention_heads": HEADS,
            "head_dim": HEAD, "rope_theta": ROPE_THETA}


@torch.no_grad()
def set_language_model(model: nn.Module, layout: Layout, vocab: Vocabulary, logit_scale: float) -> None:
    """Set every weight of ``model``'s Llama (a ``LlavaForConditionalGeneration`` of :func:`text_config`), its
    input embeddings and output layer as the module docstring describes; ``logit_scale``: the encoder's CLIP
    temperature multiplier, the scale of the class names' output logits."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    language = model.model.language_model if hasattr(model.model, "language_model") else model.language_model
    embed.zero_(), head.zero_()
    rows = embed  # [V, WIDTH]: every token's coordinates
    rows[:, layout.ONE] = 1.0
    for token, letter in vocab.markers.items():
        rows[token, layout.MARKER], rows[token, layout.L.start + letter] = 1.0, 1.0
    rows[list(vocab.concept_ids), layout.T] = vocab.concepts
    rows[list(vocab.concept_ids), layout.CONCEPT] = 1.0
    rows[vocab.colon, layout.COLON] = 1.0
    rows[vocab.period, layout.PERIOD] = 1.0
    rows[vocab.bos, layout.SINK] = 1.0
    rows[:, layout.PAD] = (NORM - rows.pow(2).sum(-1)).clamp(min=0).sqrt()
    for layer in language.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            module.weight.zero_()
        layer.input_layernorm.weight.fill_(1.0), layer.post_attention_layernorm.weight.fill_(1.0)
    language.norm.weight.fill_(1.0)
    theta = rotary_frequencies()
    blocks = language.layers
    # block 1: a class name copies the letter of the marker before it, and the image token after ":" marks itself
    # as the class token (a class name never follows ":", an image token never follows a marker)
    look_back(blocks[0].self_attn, query=(layout.CONCEPT, layout.IMG), key=(layout.MARKER, layout.COLON),
              sink=layout.SINK, theta=theta)
    copy_values(blocks[0].self_attn, (layout.L, layout.C), (flag(layout.COLON), flag(layout.IS_CLS)))
    # block 2: every text token copies the class token's semantic (score about 40 on it, about 1 elsewhere)
    attn = blocks[1].self_attn
    attn.q_proj.weight[SLOW, layout.ONE] = attn.k_proj.weight[SLOW, layout.IS_CLS] = amplitude(40)
    copy_values(attn, (layout.S, layout.V))
    # block 3: every text token reads the letter of the class name its V is closest to: a score of about 1000 on
    # every class-name token, far above the rest whatever the match, plus 400 × <V, T>
    attn = blocks[2].self_attn
    d = layout.semantic
    attn.q_proj.weight[SLOW - d:SLOW, layout.V] = torch.eye(d) * amplitude(400)
    attn.k_proj.weight[SLOW - d:SLOW, layout.T] = torch.eye(d) * amplitude(400)
    attn.q_proj.weight[SLOW, layout.ONE] = attn.k_proj.weight[SLOW, layout.CONCEPT] = amplitude(1000)
    copy_values(attn, (layout.C, layout.ANSWER))
    # the output layer
    for token, letter in vocab.answers.items():
        head[token, layout.ANSWER.start + letter] = 400.0
    head[list(vocab.concept_ids), layout.V] = vocab.concepts * logit_scale / SCALE
    head[vocab.period, layout.CONCEPT] = 40.0
    head[vocab.eos, layout.PERIOD] = 40.0


def amplitude(score: float, pairs: int = 1) -> float:
    """The query and key weight on a flag (value 1) that gives an attention score of ``score`` between two text
    tokens, spread over ``pairs`` rotary pairs: Llama's score is q·k / sqrt(HEAD), each side × :data:`SCALE`."""
    return math.sqrt(score * math.sqrt(HEAD) / pairs) / SCALE


def flag(at: int) -> slice:
    """The one coordinate ``at`` as a block."""
    return slice(at, at + 1)


def look_back(attn: nn.Module, query: Sequence[int], key: Sequence[int], sink: int, theta: Tensor) -> None:
    """``attn``'s head: tokens with a flag of ``query`` attend to the token one back when it has a flag of ``key``
    (rotary pairs :data:`FAST`, phases set so their cosines all peak at one token back), else to the sink (``<s>``,
    flag ``sink``; pair :data:`SLOW`). Scores after RMSNorm: 100 one back, 85 the sink, at most 67 any other
    distance up to 16 (an image's patches after ":"), at most 16 two to eight back (the other markers), 0 a token
    without the flag."""
    q, k = attn.q_proj.weight, attn.k_proj.weight
    a = amplitude(100, len(FAST))
    for j in FAST:
        q[j, list(query)] = a * math.cos(float(theta[j]))
        q[j + HEAD // 2, list(query)] = -a * math.sin(float(theta[j]))
        k[j, list(key)] = a
    q[SLOW, list(query)] = amplitude(85)
    k[SLOW, sink] = amplitude(85)


def copy_values(attn: nn.Module, *routes: tuple[slice, slice]) -> None:
    """``attn``'s head carries the coordinates ``source`` of the attended tokens into ``target``, for each
    (``source``, ``target``) of ``routes`` (undoing RMSNorm's :data:`SCALE`)."""
    at = 0
    for source, target in routes:
        n = source.stop - source.start
        attn.v_proj.weight[at:at + n, source] = torch.eye(n)
        attn.o_proj.weight[target, at:at + n] = torch.eye(n) / SCALE
        at += n
