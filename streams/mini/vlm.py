"""The mini world's VLM: a small LLaVA-shaped model trained here, so the offline demo scores VQA.

It is a real transformers ``LlavaForConditionalGeneration`` of the ``llava`` VLM family (:mod:`benchmark.vlm.llava`;
NOT LLaVA's weights) whose vision tower is the ``mini`` encoder (mapped with :mod:`benchmark.export`'s open_clip →
HF mapping, frozen). Its answers follow its encoder: when an update of the encoder raises its zero-shot accuracy on
some images, the VLM's VQA accuracy on them rises with it, as LLaVA's does with a better CLIP tower, because its
projector reads features that were contrastively aligned to text. Three choices make it so:

* **It reads what the CLIP head reads**: the tower's last hidden states with the class token
  (``vision_feature_layer`` −1, ``vision_feature_select_strategy`` ``full``), through a *linear* projector (LLaVA-1.0's
  form, ``projector_hidden_act`` ``linear``) set to the encoder's own image head — ``ln_post`` (its centring and
  gains, the per-token scale replaced by its mean over clean renders) and ``proj`` — scaled to unit norm on
  average: the class token's image token is the encoder's image embedding, a vector in the space where the text
  tower put the class names (:func:`clip_head`). The projector stays as set.
* **Its words for the classes are the text tower's**: every class name of the mini streams is one token (a
  multi-word name such as "red circle with the number 3" too: :func:`~benchmark.vlm.tokenizers.word_tokenizer`'s
  ``phrases``), whose input embedding and output row are the encoder's zero-shot classifier weight for that name
  (its normalised text embedding, averaged over the templates of the streams that name it; :func:`concept_rows`).
  The embeddings and the output layer stay as set (the other words': random unit vectors).
* **The language model only learns to compare**: the Llama's blocks and final norm are trained, on questions about
  clean renders of the pretraining distribution (never a held-out (shape, colour) pair, never a stream's image):
  each mini stream's lettered ``vqa_question`` (options as the real sets draw them,
  :class:`~benchmark.vqa.questions.LabelQuestions`; 2 options at first, up to 5) and the VLM-loss pair of the
  released LoRSU-Ppl instruction with the stream's ``ppl_answer``, in the released ``vicuna_v1`` prompt. With the
  image and the options already in one space, matching them is what it can learn; it cannot learn what a class
  looks like apart from the encoder.

The tower and the projector are frozen, so the image tokens are computed once for a pool of renders. Deterministic
from (seed, world version, recipe). The folder::

    <folder>/config.json, model.safetensors, generation_config.json     the LlavaForConditionalGeneration
    <folder>/processor_config.json, tokenizer.json, ...                  its LlavaProcessor
    <folder>/manifest.json     recipe, seed, wall time, loss, pretrained VQA accuracy per mini stream

is written to a temporary sibling folder and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from benchmark.records import atomic_folder, write_json
from benchmark.template import cosine_lr
from benchmark.vlm.base import IGNORE
from benchmark.vlm.llava import (
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
from benchmark.vqa.questions import LETTERS, MC_SUFFIX, MultipleChoiceSet, QuestionItem
from streams.mini.backbone import cache_root, default_model_dir, ensure_built, ensure_model
from streams.mini.datasets import MiniColours, MiniDigits, MiniHandwritten, MiniShapes, MiniSigns, ProceduralStream
from streams.mini.pretrain import RECIPE as BACKBONE_RECIPE
from streams.mini.pretrain import build_facts, one_thread
from streams.mini.render import render
from streams.mini.world import Composition, World, rng_for, world

log = logging.getLogger(__name__)

RECIPE = 3  # bump when the training recipe changes: part of the cache key
WEIGHTS = "model.safetensors"
STREAMS = (MiniShapes, MiniColours, MiniDigits, MiniHandwritten, MiniSigns)
SEEN = STREAMS[:3]  # the streams whose classes the VLM sees images of: the controls' (the targets' stay unseen)
READING = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "linear"}


@dataclass
class VLMConfig:
    """The recipe: ``steps`` × ``batch_size`` fresh examples with AdamW (warm-up, cosine decay) about images drawn
    from a pool of ``pool`` renders per class (:func:`feature_pool`); a share ``pairs`` of each batch are VLM-loss
    pairs, the rest lettered questions whose options grow from 2 to 5 over the first ``curriculum`` of the steps
    (:func:`options_at`).

    ``backbone``: the folder of the mini encoder that goes into the tower (default: the cached ``mini``).
    The Llama has ``layers`` blocks of width ``width`` (``heads`` heads, MLP 2 × width). ``option``: the weight of
    the per-option match loss of a lettered question (:func:`train`).
    """

    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    width: int = 64
    layers: int = 2
    heads: int = 4
    rope_theta: float = 10000.0
    option: float = 1.0
    pairs: float = 0.25
    curriculum: float = 0.3
    mix_ramp: float = 0.5
    noise: float = 1.0
    steer: float = 0.5
    pool: int = 64
    backbone: str | None = None


def default_vlm_dir(seed: int = 0) -> Path:
    """Where the mini VLM of seed ``seed`` is cached (versioned by world, backbone recipe and VLM recipe)."""
    return cache_root() / f"mini-llava-v{world().version}.{BACKBONE_RECIPE}.{RECIPE}-s{seed}"


# --------------------------------------------------------------------------- words and questions
def concepts() -> dict[str, list[str]]:
    """Every class name of the mini streams → the CLIP templates of the streams that name it (in order, once each):
    the words whose embeddings are the text tower's (:func:`concept_rows`)."""
    out: dict[str, list[str]] = {}
    for stream in STREAMS:
        for name in stream.spec.class_names:
            out.setdefault(name, [])
            out[name] += [t for t in stream.spec.templates if t not in out[name]]
    return out


def vocabulary() -> list[str]:
    """Every text the suite sends the mini VLM: the prompt's fixed parts, the option letters, the streams' questions
    and class names, the VLM-loss instruction and answers, and the world's words (the tokenizer's vocabulary)."""
    w = world()
    texts = [SYSTEM, "USER: ASSISTANT:", MC_SUFFIX, *LETTERS, *(f"{letter}." for letter in LETTERS),
             *w.shapes, *w.colours, *w.glyphs]
    for stream in STREAMS:
        spec = stream.spec
        texts += [spec.vqa_question, user_text(spec.vqa_question),
                  *spec.class_names, *(spec.ppl_answer.format(name) for name in spec.class_names)]
    return texts


@lru_cache(maxsize=1)
def tokenizer():
    """The word-level tokenizer of :func:`vocabulary`: letters A–E, ``<image>`` and every class name (multi-word
    ones too) are single tokens."""
    return word_tokenizer(vocabulary(), whole=[f"{letter}." for letter in LETTERS], phrases=list(concepts()))


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


@dataclass(frozen=True)
class Example:
    """One training example: an image of class ``label`` of ``STREAMS[stream]``, the user's text and the answer;
    ``option``: the right option of a lettered question (None for a VLM-loss pair)."""

    stream: int
    label: int
    text: str
    answer: str
    option: int | None = None
    choices: tuple[str, ...] = ()


def example_batch(cfg: VLMConfig, step: int, options: int = len(LETTERS)) -> list[Example]:
    """Step ``step``'s examples: ``cfg.batch_size`` images of uniformly drawn classes of the streams the VLM sees
    (:data:`SEEN`, round robin); the first ``cfg.pairs`` share are the stream's VLM-loss pair, the others a lettered
    question: a mini stream's ``vqa_question`` (any stream's, drawn) with the class's name and ``options`` − 1
    distractors drawn from every class name of every mini stream (the unseen targets' included), the right one at a
    uniform position."""
    rng = rng_for(RECIPE, "mini-vlm", cfg.seed, step)
    pairs, names, lettered = round(cfg.pairs * cfg.batch_size), list(concepts()), MultipleChoiceSet("mini-vlm", ())
    batch = []
    for i in range(cfg.batch_size):
        index = i % len(SEEN)
        spec = SEEN[index].spec
        label = int(rng.integers(len(spec.class_names)))
        name = spec.class_names[label]
        if i < pairs:
            batch.append(Example(index, label, user_text(spec.vqa_question), spec.ppl_answer.format(name)))
            continue
        question = STREAMS[int(rng.integers(len(STREAMS)))].spec.vqa_question
        others = [names[j] for j in rng.permutation(len(names)) if names[j] != name][:options - 1]
        answer = int(rng.integers(options))
        item = QuestionItem(f"mini-vlm/{step}/{i}", question, (*others[:answer], name, *others[answer:]), answer)
        batch.append(Example(index, label, lettered.prompt(item), LETTERS[answer], answer, item.choices))
    return batch


# --------------------------------------------------------------------------- the model
def llava_config(cfg: VLMConfig, vision_config):
    """The ``LlavaConfig`` of recipe ``cfg`` with tower ``vision_config`` (reading :data:`READING`)."""
    text = {"hidden_size": cfg.width, "intermediate_size": 2 * cfg.width, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "rope_theta": cfg.rope_theta}
    return new_llava_config(vision_config, tokenizer(), text, **READING)


def planned_config(cfg: VLMConfig):
    """The ``LlavaConfig`` the recipe ``cfg`` gives with the ``mini`` encoder, without building anything."""
    from benchmark.backbones import backbone_skeleton
    from benchmark.export import hf_vision_config

    return llava_config(cfg, hf_vision_config(backbone_skeleton("mini").visual))


def new_model(cfg: VLMConfig, progress: bool = True):
    """(random-weight ``LlavaForConditionalGeneration`` with the mini encoder in its frozen tower, processor, the
    encoder's backbone)."""
    from benchmark.backbones import load_backbone
    from benchmark.export import hf_vision_config
    folder = ensure_model(Path(cfg.backbone) if cfg.backbone else default_model_dir(), progress=progress)
    backbone = load_backbone(f"mini:{folder}").eval()
    vision = hf_vision_config(backbone.visual)
    model = new_llava(llava_config(cfg, vision), cfg.seed)
    swap_into_tower(model, backbone)
    return model, llava_processor(vision, tokenizer(), READING["vision_feature_select_strategy"]), backbone


@torch.no_grad()
def feature_pool(model, processor, seed: int, per_class: int) -> list[torch.Tensor]:
    """The frozen tower's last hidden states with the class token first (what the projector reads) of ``per_class``
    clean renders (:func:`scene`) of every class of every mini stream: one [C, per_class, N, W] tensor per stream of
    :data:`STREAMS` (N tokens of width W)."""
    w, tower, pool = world(), vision_tower(model), []
    for stream in SEEN:
        rng = rng_for(RECIPE, "mini-vlm-pool", seed, stream.spec.name)
        classes = len(stream.spec.class_names)
        images = [Image.fromarray(render(w, scene(stream, w, c, rng))) for c in range(classes) for _ in range(per_class)]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        pool.append(features.reshape(classes, per_class, *features.shape[1:]))
    return pool


@torch.no_grad()
def clip_head(projector: nn.Module, visual: nn.Module, class_tokens: torch.Tensor) -> None:
    """Set the linear ``projector`` (``linear_1`` then ``linear_2``) to the open_clip ``visual``'s image head:
    ``x ↦ (γ ⊙ (x − mean(x)) / σ̄ + β) · proj`` — ``ln_post`` with the per-token scale σ(x) replaced by its mean σ̄
    over ``class_tokens`` [M, W] (the last hidden states' class tokens of clean renders) — then scaled so that
    those tokens' images have unit norm on average. For a class token the direction is the encoder's image
    embedding up to that scale."""
    norm, proj = visual.ln_post, visual.proj  # proj [W, D]
    width = class_tokens.shape[1]
    centre = torch.eye(width) - 1 / width
    sigma = class_tokens.std(-1, unbiased=False).mean()
    weight = (centre * norm.weight / sigma).T @ proj  # [W, D]: x @ weight
    bias = norm.bias @ proj
    scale = 1 / (class_tokens @ weight + bias).norm(dim=-1).mean()
    projector.linear_1.weight.copy_(scale * weight.T)
    projector.linear_1.bias.copy_(scale * bias)
    projector.linear_2.weight.copy_(torch.eye(*projector.linear_2.weight.shape))
    projector.linear_2.bias.zero_()


@torch.no_grad()
def concept_rows(model, backbone, seed: int) -> None:
    """Set the input embeddings and output rows of every word: a class name's (:func:`concepts`) is the encoder's
    zero-shot classifier weight for it (the normalised mean of its templates' normalised text embeddings), any
    other word's a random unit vector (from ``seed``)."""
    from benchmark.evaluation import ZeroShotEvaluator

    tok, evaluator = tokenizer(), ZeroShotEvaluator(backbone)
    rows = F.normalize(torch.randn(model.get_input_embeddings().weight.shape,
                                   generator=torch.Generator().manual_seed(seed)), dim=-1)
    names = concepts()
    ids = [tok(name, add_special_tokens=False).input_ids[0] for name in names]
    weights = torch.cat([evaluator.class_embeddings(name, [name], templates) for name, templates in names.items()])
    centred = weights - weights.mean(0)
    rows[ids] = centred / centred.norm(dim=-1).mean()
    model.get_input_embeddings().weight.copy_(rows)
    model.get_output_embeddings().weight.copy_(rows)


def options_at(cfg: VLMConfig, step: int) -> int:
    """The curriculum: 2 options at first, one more every ``curriculum`` / 4 of the steps, up to 5."""
    if cfg.curriculum <= 0:
        return len(LETTERS)
    return min(len(LETTERS), 2 + int(4 * step / (cfg.curriculum * cfg.steps)))


def option_ends(ids: list[int], marker_ids: list[int], suffix_id: int) -> list[int]:
    """The position of the last token of every option's text in a lettered prompt's ``ids``: an option starts at
    its marker token ("A." to "E.", ``marker_ids``); the last one ends before the answer instruction (``suffix_id``,
    its first token)."""
    markers = set(marker_ids)
    starts = [j for j, token in enumerate(ids) if token in markers]
    suffix = len(ids) - 1 - ids[::-1].index(suffix_id)
    return [end - 1 for end in [*starts[1:], suffix]]


def steered(tokens: torch.Tensor, examples: list[Example], rows: torch.Tensor, rng: np.random.Generator,
            cfg: VLMConfig) -> tuple[torch.Tensor, list[Example]]:
    """The class tokens of ``examples``' lettered questions moved off their images' (``tokens`` [B, N, H]), and
    those questions answered by the zero-shot rule (:func:`judged`): with probability ``cfg.steer`` a step of length
    U(0, 1.5) (× the token's norm) toward one of the options' word embedding (a row of ``rows`` [V, H]), then
    Gaussian noise of norm U(0, ``cfg.noise``) × the token's norm. The language model thus learns the rule over the
    whole space the class tokens of shifted, or updated, images may reach, every class name's neighbourhood
    included (the unseen targets' too), not the seen classes' renders alone."""
    tokens = tokens.clone()
    tok = tokenizer()
    out = []
    for row, example in enumerate(examples):
        if example.option is None:
            out.append(example)
            continue
        cls = tokens[row, 0]
        size = cls.norm()
        if rng.random() < cfg.steer:
            name = example.choices[int(rng.integers(len(example.choices)))]
            toward = rows[tok(name, add_special_tokens=False).input_ids[0]]
            cls = cls + float(rng.uniform(0, 1.5)) * size * toward / toward.norm()
        noise = torch.as_tensor(rng.standard_normal(cls.shape), dtype=cls.dtype)
        cls = cls + float(rng.uniform(0, cfg.noise)) * size * noise / noise.norm()
        tokens[row, 0] = cls
        out.append(judged(example, cls, rows))
    return tokens, out


def judged(example: Example, cls: torch.Tensor, rows: torch.Tensor) -> Example:
    """A lettered ``example`` answered as the encoder's zero-shot rule answers it given the class token ``cls`` [H]:
    the option whose word's embedding (a row of ``rows`` [V, H]) is closest in angle."""
    if example.option is None:
        return example
    ids = [tokenizer()(name, add_special_tokens=False).input_ids[0] for name in example.choices]
    option = int((rows[ids] @ cls).argmax())
    return replace(example, answer=LETTERS[option], option=option)


def image_tokens(images: list[torch.Tensor], examples: list[Example], rng: np.random.Generator,
                 mixed: float = 1.0) -> torch.Tensor:
    """The image tokens [B, N, H] of ``examples``: the class token of a render of the example's class drawn from the
    pool ``images`` (one [C, per_class, N, H] tensor per stream), its N − 1 patch tokens those of another render
    drawn from the whole pool. A class question is thus answered from the class token, the encoder's image
    embedding, which is what the options' words were made to match; the patches of a render of the pretraining
    distribution would answer it too, apart from the encoder's alignment to text (and fail on a shifted image)."""
    flat = torch.cat([p.flatten(0, 1) for p in images])  # [M, N, H]
    own = [images[e.stream][e.label, int(rng.integers(images[e.stream].shape[1]))] for e in examples]
    own = torch.stack(own)
    other = flat[torch.as_tensor(rng.integers(len(flat), size=len(examples)))]
    swap = torch.as_tensor(rng.random(len(examples)) < mixed)[:, None, None]
    return torch.cat([own[:, :1], torch.where(swap, other[:, 1:], own[:, 1:])], dim=1)


def train(cfg: VLMConfig, progress: bool = True):
    """Train a new mini VLM (recipe ``cfg``); returns (model in eval mode, processor, loss of every step).

    The projector is set to the encoder's image head (:func:`clip_head`) and the words to the text tower's
    (:func:`concept_rows`); tower, projector, embeddings and output layer are frozen, so the image tokens are
    computed once for the pool (:func:`feature_pool`). The Llama's blocks and final norm then learn the examples
    (:func:`example_batch`), each tokenized as a VLM-loss pair is (the prompt, then `` {answer}</s>``,
    :meth:`~benchmark.vlm.llava.LoadedLlava.pair_tokens`). The loss is the mean cross-entropy of the answers' tokens
    and ``</s>`` (the VLM's own loss; a lettered question's first answer token is what letter scoring reads), plus,
    weighted ``option``, at the last token of every option of a lettered question: its letter for the right option,
    the next token for the others (a match / no-match signal per option).
    """
    model, processor, backbone = new_model(cfg, progress)
    pool = feature_pool(model, processor, cfg.seed, cfg.pool)
    inner = getattr(model, "model", model)
    clip_head(inner.multi_modal_projector, backbone.visual, torch.cat([p[:, :, 0].flatten(0, 1) for p in pool]))
    concept_rows(model, backbone, cfg.seed)
    model.requires_grad_(False)
    language = LoadedLlava(MiniVLM(VLMSpec("mini", "")), model, processor)
    language.language_model.layers.requires_grad_(True)
    language.language_model.norm.requires_grad_(True)
    with torch.no_grad():
        images = [inner.multi_modal_projector(p) for p in pool]  # [C, per_class, N, H] each
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98))
    tok = processor.tokenizer
    markers = tok.convert_tokens_to_ids([f"{letter}." for letter in LETTERS])
    suffix_id = tok.convert_tokens_to_ids(MC_SUFFIX.split()[0])
    image_id, embed = model.config.image_token_id, model.get_input_embeddings()
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="training the mini VLM", unit="step", disable=not progress)
    for step in bar:
        examples = example_batch(cfg, step, options_at(cfg, step))
        mixed = min(1.0, step / (cfg.mix_ramp * cfg.steps)) if cfg.mix_ramp > 0 else 1.0
        rng = rng_for(RECIPE, "mini-vlm-draw", cfg.seed, step)
        tokens = image_tokens(images, examples, rng, mixed)  # [B, N, H]
        tokens, examples = steered(tokens, examples, embed.weight, rng, cfg)
        rows = [language.pair_tokens(e.text, e.answer) for e in examples]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id)
        labels = torch.full((len(rows), length), IGNORE)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (line, labelled) in enumerate(rows):
            ids[row, :len(line)], labels[row, :len(line)], mask[row, :len(line)] = (
                torch.tensor(line), torch.tensor(labelled), 1)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        embeds = embed(ids).masked_scatter((ids == image_id).unsqueeze(-1), tokens.to(model.dtype))
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()  # [B, L, V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        at, option_targets = [], []
        for row, e in enumerate(examples):
            if e.option is None:
                continue
            line = rows[row][0]
            for j, end in enumerate(option_ends(line, markers, suffix_id)):
                at.append((row, end))
                option_targets.append(tok.convert_tokens_to_ids(f"{LETTERS[j]}") if j == e.option else line[end + 1])
        if at and cfg.option:
            where = torch.tensor(at)
            loss = loss + cfg.option * F.cross_entropy(logits[where[:, 0], where[:, 1]], torch.tensor(option_targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return model.eval(), processor, losses


def vqa_accuracies(model, processor, batch_size: int = 64) -> dict[str, float]:
    """Letter-scored VQA accuracy (in [0, 1]) of the model on every mini stream's full test set (random
    distractors, question seed 0), as a run's VQA evaluation scores it."""
    from benchmark.vqa.build import build_question_set
    from benchmark.vqa.evaluate import VQASet, score_set

    result = {}
    for stream_cls in STREAMS:
        stream = stream_cls(".")
        test = stream.dataset("test")
        qset = VQASet(stream.spec.name, build_question_set(stream, test=test), test.with_transform(None))
        counts = score_set(LoadedLlava(MiniVLM(VLMSpec("mini", "")), model, processor), qset, batch_size)
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
    """Train (recipe ``cfg``, default :class:`VLMConfig`), score the mini streams and save into ``folder``
    (replaced atomically), in one thread (:func:`~streams.mini.pretrain.one_thread`: the same weights for any
    thread count); returns the manifest."""
    folder, cfg = Path(folder), cfg or VLMConfig()
    start = time.perf_counter()
    model, processor, losses = train(cfg, progress)
    train_seconds = time.perf_counter() - start
    accuracies = vqa_accuracies(model, processor)
    controls = [accuracies[c.spec.name] for c in STREAMS[:3]]
    targets = [accuracies[c.spec.name] for c in STREAMS[3:]]
    manifest = {
        "what": "the mini world's small LLaVA-shaped VLM (NOT LLaVA; its numbers never stand in for the paper's)",
        "seed": cfg.seed,
        "steps": cfg.steps,
        "data_version": world().version,
        "backbone_recipe": BACKBONE_RECIPE,
        "recipe": RECIPE,
        "config": asdict(cfg),
        "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
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
    """``folder`` holding a trained mini VLM, training it (recipe ``cfg``) when missing."""
    return ensure_built(folder, WEIGHTS, "mini VLM", lambda path: build(path, cfg, progress=progress))


class MiniVLM(LlavaFamily):
    """The ``mini`` VLM family (:data:`benchmark.registry.VLMS`), a :class:`~benchmark.vlm.llava.LlavaFamily` whose
    folder is built here: ``mini`` is the cached VLM of seed 0, ``mini:/path/to/folder`` loads (or trains into)
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
        """The VLM's folder, trained first when missing (progress bar)."""
        return str(ensure_vlm(self.folder)), True

    def prepare(self) -> None:
        self.source()

    @cached_property
    def _config(self):
        """The ``LlavaConfig`` of the folder, or of the VLM the recipe would train there (nothing is built); read
        once (the VLM loss asks for its feature layer every batch)."""
        from transformers import AutoConfig

        if (self.folder / WEIGHTS).is_file():
            return AutoConfig.from_pretrained(self.folder, local_files_only=True)
        return planned_config(VLMConfig())

    def check_loadable(self) -> None:
        """Nothing to look at: the folder is built on first use."""
