"""The mini world's VLM: a small LLaVA-shaped model built here, so the offline demo scores VQA.

It is a real transformers ``LlavaForConditionalGeneration`` of the ``llava`` VLM family (:mod:`benchmark.vlm.llava`;
NOT LLaVA's weights) whose vision tower is the ``mini`` encoder (mapped with :mod:`benchmark.export`'s open_clip →
HF mapping). Its answers follow its encoder: when an update of the encoder raises its zero-shot accuracy on some
images, the VLM's VQA accuracy on them rises with it, as LLaVA's does with a better CLIP tower, because its
projector reads features that were contrastively aligned to text. Three choices make it so:

* **It reads what the CLIP head reads**: the tower's last hidden states with the class token
  (``vision_feature_layer`` −1, ``vision_feature_select_strategy`` ``full``), through a *linear* projector (LLaVA-1.0's
  form, ``projector_hidden_act`` ``linear``) set to the encoder's own image head — ``ln_post`` (its centring and
  gains, the per-token scale replaced by its mean over clean renders) and ``proj`` (:func:`clip_head`): the class
  token's image token is the encoder's image embedding, in the space where the text tower put the class names.
* **Its words for the classes are the text tower's**: every class name of the mini streams (and every glyph of
  the world) is one token, a multi-word name such as "red circle with the number 3" too
  (:func:`~benchmark.vlm.tokenizers.word_tokenizer`'s ``phrases``), whose embedding carries the encoder's
  zero-shot classifier weight for it (:func:`concept_weights`).
* **Its language model compares them**: a three-block Llama whose weights are set, not learned
  (:mod:`streams.mini.language`): a lettered question is answered with the option whose class name's weight is
  closest to the image embedding — the zero-shot rule among the options, exactly — and the answer to the VLM-loss
  question (the stream's ``ppl_answer``, the class name) is scored against every class name with the encoder's
  logit scale, so the VLM loss is the CLIP loss of the image against the class names.

A small language model *trained* on questions about clean renders (this module's recipes 1 and 2) learned to read
the renders' patches instead of the encoder's alignment to text: its VQA accuracy stayed where it was when the
encoder learned a shifted target, or fell. The language model knows nothing of images apart from the encoder, so
what the VQA table measures is the encoder. Nothing in the build is random: every seed gives the same weights
(the seed stays in the cache key and the manifest, for a recipe that draws). The folder::

    <folder>/config.json, model.safetensors, generation_config.json     the LlavaForConditionalGeneration
    <folder>/processor_config.json, tokenizer.json, ...                  its LlavaProcessor
    <folder>/manifest.json     recipe, seed, wall time, pretrained VQA accuracy per mini stream

is written to a temporary sibling folder and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from benchmark.records import atomic_folder, write_json
from benchmark.vlm.llava import (
    ASSISTANT,
    SYSTEM,
    LlavaFamily,
    LoadedLlava,
    llava_processor,
    new_llava,
    new_llava_config,
    save_llava,
    swap_into_tower,
    vision_tower,
)
from benchmark.vlm.spec import VLMError, VLMSpec
from benchmark.vlm.tokenizers import word_tokenizer
from benchmark.vqa.pairs import user_text
from benchmark.vqa.questions import LETTERS, MC_SUFFIX
from streams.mini import language
from streams.mini.backbone import cache_root, default_model_dir, ensure_built, ensure_model
from streams.mini.datasets import MiniColours, MiniDigits, MiniHandwritten, MiniShapes, MiniSigns, ProceduralStream
from streams.mini.pretrain import RECIPE as BACKBONE_RECIPE
from streams.mini.pretrain import build_facts, one_thread
from streams.mini.question_streams import MiniPairs, MiniSpatial, MiniYesNo
from streams.mini.questions import vocabulary_texts
from streams.mini.render import render
from streams.mini.world import Composition, World, rng_for, world

log = logging.getLogger(__name__)

RECIPE = 3  # bump when the build changes: part of the cache key
WEIGHTS = "model.safetensors"
STREAMS = (MiniShapes, MiniColours, MiniDigits, MiniHandwritten, MiniSigns)
QUESTION_STREAMS = (MiniSpatial, MiniPairs, MiniYesNo)
READING = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "linear"}
MARKERS = {**{f"{letter}.": i for i, letter in enumerate(LETTERS)}, "(a)": 0, "(b)": 1}  # option marker → letter
ANSWERS = {**{letter: i for i, letter in enumerate(LETTERS)}, "(a)": 0, "(b)": 1}  # answer token → letter
GLYPH_TEMPLATE = "the letter {}."  # the CLIP text of a letter glyph no stream names


@dataclass
class VLMConfig:
    """The build: ``pool`` clean renders per class of every mini stream set the projector's scale
    (:func:`clip_head`); ``backbone``: the folder of the mini encoder that goes into the tower (default: the cached
    ``mini``); ``seed``: kept in the cache key and the manifest (nothing in this build draws)."""

    seed: int = 0
    pool: int = 16
    backbone: str | None = None


def default_vlm_dir(seed: int = 0) -> Path:
    """Where the mini VLM of seed ``seed`` is cached (versioned by world, backbone recipe and VLM recipe)."""
    return cache_root() / f"mini-llava-v{world().version}.{BACKBONE_RECIPE}.{RECIPE}-s{seed}"


# --------------------------------------------------------------------------- words
def concepts() -> dict[str, list[str]]:
    """Every class name of the mini streams, then every glyph of the world no stream names (but the answer letters
    "A" to "E") → its CLIP templates (the templates of the streams that name it, in order, once each;
    :data:`GLYPH_TEMPLATE` for a glyph): the words whose embeddings carry the text tower's classifier weights
    (:func:`concept_weights`)."""
    out: dict[str, list[str]] = {}
    for stream in STREAMS:
        for name in stream.spec.class_names:
            out.setdefault(name, [])
            out[name] += [t for t in stream.spec.templates if t not in out[name]]
    for glyph in world().glyphs:
        if glyph not in ANSWERS:  # "A" to "E" answer lettered questions: they name no class
            out.setdefault(glyph, [GLYPH_TEMPLATE])
    return out


def vocabulary() -> list[str]:
    """Every text the suite sends the mini VLM: the prompt's fixed parts, the option markers and letters, the mini
    streams' questions, class names and VLM-loss pairs, the mini question kinds' texts (the world's words among
    them): the tokenizer's vocabulary."""
    texts = [SYSTEM, f"USER: {ASSISTANT}", MC_SUFFIX, *MARKERS, *ANSWERS, *concepts(), *vocabulary_texts()]
    for stream in STREAMS:
        spec = stream.spec
        texts += [spec.vqa_question, user_text(spec.vqa_question),
                  *(spec.ppl_answer.format(name) for name in spec.class_names)]
    return texts


@lru_cache(maxsize=1)
def tokenizer():
    """The word-level tokenizer of :func:`vocabulary`: the option markers, answer letters, ``<image>`` and every
    class name (multi-word ones too) are single tokens."""
    return word_tokenizer(vocabulary(), whole=[*MARKERS], phrases=list(concepts()))


def token_id(text: str) -> int:
    """The id of ``text``, one token of :func:`tokenizer` (a :class:`VLMError` otherwise)."""
    ids = tokenizer()(text, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer().unk_token_id:
        raise VLMError(f"the mini VLM's tokenizer reads {text!r} as {ids}, not one known token")
    return ids[0]


def scene(stream: type[ProceduralStream] | type[MiniHandwritten], w: World, label: int,
          rng: np.random.Generator) -> Composition:
    """A clean scene of class ``label`` of ``stream`` from the pretraining distribution (pairs never held
    out): a shape, a colour, a printed digit on a shape, a printed digit alone (for handwritten digits) or
    a sign's composition, unshifted."""
    name, pairs = stream.spec.class_names[label], w.pairs(held_out=False)
    if stream is MiniShapes:
        return w.sample(rng, [p for p in pairs if p[0] == name])
    if stream is MiniColours:
        return w.sample(rng, [p for p in pairs if p[1] == name])
    if stream is MiniDigits:
        return w.sample(rng, pairs, glyphs=[name])
    if stream is MiniHandwritten:
        return w.sample(rng, pairs, glyphs=[name], bare_fraction=1.0)
    return MiniSigns.composition(w, label, rng)


# --------------------------------------------------------------------------- the model
def llava_config(vision_config):
    """The ``LlavaConfig`` with tower ``vision_config``: :data:`READING`, the Llama of :mod:`streams.mini.language`."""
    return new_llava_config(vision_config, tokenizer(), language.text_config(), **READING)


def planned_config():
    """The ``LlavaConfig`` the build gives with the ``mini`` encoder, without building anything."""
    from benchmark.backbones import backbone_skeleton
    from benchmark.export import hf_vision_config

    return llava_config(hf_vision_config(backbone_skeleton("mini").visual))


def new_model(cfg: VLMConfig, progress: bool = True):
    """(random-weight ``LlavaForConditionalGeneration`` with the mini encoder in its tower, processor, the encoder's
    backbone)."""
    from benchmark.backbones import load_backbone
    from benchmark.export import hf_vision_config
    folder = ensure_model(Path(cfg.backbone) if cfg.backbone else default_model_dir(), progress=progress)
    backbone = load_backbone(f"mini:{folder}").eval()
    vision = hf_vision_config(backbone.visual)
    model = new_llava(llava_config(vision), cfg.seed)
    swap_into_tower(model, backbone)
    return model, llava_processor(vision, tokenizer(), READING["vision_feature_select_strategy"]), backbone


@torch.no_grad()
def class_tokens(model, processor, per_class: int) -> torch.Tensor:
    """The tower's last hidden state of the class token [M, W] for ``per_class`` clean renders (:func:`scene`) of
    every class of every mini stream."""
    w, tower, out = world(), vision_tower(model), []
    for stream in STREAMS:
        rng = rng_for(RECIPE, "mini-vlm-pool", stream.spec.name)
        classes = len(stream.spec.class_names)
        images = [Image.fromarray(render(w, scene(stream, w, c, rng))) for c in range(classes) for _ in range(per_class)]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        out.append(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0])
    return torch.cat(out)


@torch.no_grad()
def clip_head(projector: nn.Module, visual: nn.Module, tokens: torch.Tensor, layout: language.Layout,
              basis: torch.Tensor) -> None:
    """Set the linear ``projector`` (``linear_1`` then ``linear_2``) to the open_clip ``visual``'s image head in the
    coordinates of ``basis`` [D, r] (orthonormal columns, or zero), written to ``layout.S``: ``x ↦ (γ ⊙ (x − mean(x)) / σ̄ +
    β) · proj · basis`` — ``ln_post`` with the per-token scale σ(x) replaced by its mean σ̄ over the class ``tokens``
    [M, W] of clean renders — scaled so that those tokens' images have unit norm on average; and ``layout.IMG`` to
    the image flag. For a class token this is the encoder's image embedding (up to the small shift of β when σ(x)
    differs from σ̄) seen in the span of the class names' weights, where every comparison with them happens."""
    norm, proj = visual.ln_post, visual.proj  # proj [W, D]
    width = tokens.shape[1]
    centre = torch.eye(width) - 1 / width
    sigma = tokens.std(-1, unbiased=False).mean()
    weight = (centre * norm.weight / sigma).T @ proj @ basis  # [W, r]: x @ weight
    bias = norm.bias @ proj @ basis
    scale = 1 / (tokens @ weight + bias).norm(dim=-1).mean()
    first, second = projector.linear_1, projector.linear_2
    first.weight.zero_(), first.bias.zero_()
    first.weight[layout.S] = scale * weight.T
    first.bias[layout.S] = scale * bias
    first.bias[layout.IMG] = language.IMAGE_FLAG
    second.weight.copy_(torch.eye(*second.weight.shape)), second.bias.zero_()


def span(rows: torch.Tensor, size: int = language.SEMANTIC) -> torch.Tensor:
    """An orthonormal basis of the span of ``rows`` [K, D] (singular values above 1e-5 of the largest), padded with
    zero columns to ``size``: [D, size]."""
    _, values, vh = torch.linalg.svd(rows, full_matrices=False)
    basis = vh[values > 1e-5 * values[0]].T
    if basis.shape[1] > size:
        raise VLMError(f"the mini VLM compares in {size} coordinates; the class names' weights span {basis.shape[1]}")
    return torch.cat([basis, basis.new_zeros(basis.shape[0], size - basis.shape[1])], dim=1)


@torch.no_grad()
def concept_weights(backbone) -> torch.Tensor:
    """[K, D]: every :func:`concepts` name's zero-shot classifier weight (the normalised mean of its templates'
    normalised text embeddings), centred on their mean and scaled to unit norm on average. Centring keeps every
    comparison of one image with several names (a common shift adds the same to each score)."""
    from benchmark.evaluation import ZeroShotEvaluator

    evaluator = ZeroShotEvaluator(backbone)
    weights = torch.cat([evaluator.class_embeddings(name, [name], templates) for name, templates in concepts().items()])
    centred = weights - weights.mean(0)
    return centred / centred.norm(dim=-1).mean()


def build_model(cfg: VLMConfig, progress: bool = True):
    """The mini VLM (eval mode) and its processor: the tower, the projector set to the encoder's image head
    (:func:`clip_head`), the language model set to compare (:func:`streams.mini.language.set_language_model`), both
    in the span of the class names' weights (:func:`span`: the comparisons are the same there, and the language
    model narrower)."""
    model, processor, backbone = new_model(cfg, progress)
    weights = concept_weights(backbone)
    basis = span(weights)
    layout = language.Layout()
    inner = getattr(model, "model", model)
    clip_head(inner.multi_modal_projector, backbone.visual, class_tokens(model, processor, cfg.pool), layout, basis)
    tok = tokenizer()
    vocab = language.Vocabulary(
        concept_ids=[token_id(name) for name in concepts()], concepts=weights @ basis,
        markers={token_id(m): letter for m, letter in MARKERS.items()},
        answers={token_id(a): letter for a, letter in ANSWERS.items()},
        bos=tok.bos_token_id, colon=token_id(":"), period=token_id("."), eos=tok.eos_token_id)
    language.set_language_model(model, layout, vocab, float(backbone.logit_scale.exp()))
    return model.eval(), processor


def vqa_accuracies(model, processor, batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """VQA accuracy (in [0, 1]) of the model on every mini stream's full test set, as a run's VQA evaluation scores
    it: the class streams' lettered questions (random distractors, question seed 0), then the question kinds'
    own questions (:data:`QUESTION_STREAMS`)."""
    from benchmark.vqa.build import build_question_set
    from benchmark.vqa.evaluate import VQASet, score_set

    result, loaded = {}, LoadedLlava(MiniVLM(VLMSpec("mini", "")), model, processor)
    for stream_cls in tqdm((*STREAMS, *QUESTION_STREAMS), desc="scoring the mini VLM", unit="set", disable=not progress):
        stream = stream_cls(".")
        test = stream.dataset("test")
        qset = VQASet(stream.spec.name, build_question_set(stream, test=test), test.with_transform(None))
        counts = score_set(loaded, qset, batch_size)
        result[stream.spec.name] = round(counts["correct"] / counts["total"], 4)
    return result


def weights_digest(model) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@one_thread()
def build(folder: Path, cfg: VLMConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (``cfg``, default :class:`VLMConfig`), score the mini streams and save into ``folder``
    (replaced atomically), in one thread (:func:`~streams.mini.pretrain.one_thread`: the same weights for any
    thread count); returns the manifest."""
    folder, cfg = Path(folder), cfg or VLMConfig()
    start = time.perf_counter()
    model, processor = build_model(cfg, progress)
    train_seconds = time.perf_counter() - start
    accuracies = vqa_accuracies(model, processor, progress=progress)
    controls = [accuracies[c.spec.name] for c in STREAMS[:3]]
    targets = [accuracies[c.spec.name] for c in STREAMS[3:]]
    manifest = {
        "what": "the mini world's small LLaVA-shaped VLM (NOT LLaVA; its numbers never stand in for the paper's)",
        "seed": cfg.seed,
        "data_version": world().version,
        "backbone_recipe": BACKBONE_RECIPE,
        "recipe": RECIPE,
        "config": asdict(cfg),
        "vqa_acc": accuracies,
        "vqa_acc_controls_mean": round(float(np.mean(controls)), 4),
        "vqa_acc_targets_mean": round(float(np.mean(targets)), 4),
        "weights_sha256": weights_digest(model),
        **build_facts(start, train_seconds),
    }
    with atomic_folder(folder) as tmp:
        save_llava(tmp, model, processor)
        write_json(tmp / "manifest.json", manifest)
    log.info("mini VLM saved to %s: VQA accuracy %s", folder, accuracies)
    return manifest


def ensure_vlm(folder: Path, cfg: VLMConfig | None = None, progress: bool = True) -> Path:
    """``folder`` holding a built mini VLM, building it (``cfg``) when missing."""
    return ensure_built(folder, WEIGHTS, "mini VLM", lambda path: build(path, cfg, progress=progress))


class MiniVLM(LlavaFamily):
    """The ``mini`` VLM family (:data:`benchmark.registry.VLMS`), a :class:`~benchmark.vlm.llava.LlavaFamily` whose
    folder is built here: ``mini`` is the cached VLM of seed 0, ``mini:/path/to/folder`` loads (or builds into)
    that folder."""

    example = "mini"
    takes = "the mini world's encoder (backbone: mini)"

    def check_rest(self, rest: str) -> None:
        if rest.startswith(("llava:", "local-dir:")) or (rest and not ("/" in rest or rest.startswith(("~", ".")))):
            raise VLMError(f"vqa.model 'mini:{rest}': expected 'mini' (the cached mini VLM) or 'mini:/path/to/folder'")

    @property
    def folder(self) -> Path:
        """The VLM's folder (maybe not built yet)."""
        return Path(self.spec.rest).expanduser() if self.spec.rest else default_vlm_dir()

    def source(self) -> tuple[str, bool]:
        """The VLM's folder, built first when missing."""
        return str(ensure_vlm(self.folder)), True

    def prepare(self) -> None:
        self.source()

    @cached_property
    def _config(self):
        """The ``LlavaConfig`` of the folder, or of the VLM the build would make there (nothing is built); read
        once (the VLM loss asks for its feature layer every batch)."""
        from transformers import AutoConfig

        if (self.folder / WEIGHTS).is_file():
            return AutoConfig.from_pretrained(self.folder, local_files_only=True)
        return planned_config()

    def check_loadable(self) -> None:
        """Nothing to look at: the folder is built on first use."""
