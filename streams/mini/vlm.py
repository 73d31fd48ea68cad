"""The mini world's VLM: a small LLaVA-shaped model trained here, so the offline demo scores VQA.

It is a real transformers ``LlavaForConditionalGeneration`` of the ``llava`` VLM family (:mod:`benchmark.vlm.llava`;
NOT LLaVA's weights): its vision tower is the
``mini`` encoder (mapped with :mod:`benchmark.export`'s open_clip → HF mapping, frozen), read at
``hidden_states[-2]`` without the class token; a two-layer projector and a small Llama over a
word-level tokenizer of the mini world's vocabulary are trained from scratch on multiple-choice
questions about clean renders of the pretraining distribution (never a held-out (shape, colour)
pair, never a stream's image), in two stages (:func:`train`): the projector is first aligned so an
image's tokens look like its class word, then projector and Llama learn each mini stream's
``vqa_question`` with options made like the real sets (:class:`~benchmark.vqa.questions.LabelQuestions`,
random distractors, uniform answer position; 2 options at first, up to 5) in the released
``vicuna_v1`` prompt. The tower is frozen, so its features are computed once for a pool of renders.
Deterministic from (seed, world version, recipe). The folder::

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
from benchmark.vlm.llava import (
    SYSTEM,
    LlavaFamily,
    LoadedLlava,
    conversation,
    letter_tokens,
    llava_processor,
    new_llava,
    new_llava_config,
    save_llava,
    swap_into_tower,
    vision_tower,
)
from benchmark.vlm.spec import VLMError, VLMSpec
from benchmark.vlm.tokenizers import word_tokenizer
from benchmark.vqa.questions import LETTERS, MC_SUFFIX, LabelQuestions
from streams.mini.backbone import cache_root, default_model_dir, ensure_built, ensure_model
from streams.mini.datasets import MiniColours, MiniDigits, MiniHandwritten, MiniShapes, MiniSigns, ProceduralStream
from streams.mini.pretrain import RECIPE as BACKBONE_RECIPE
from streams.mini.pretrain import build_facts, one_thread
from streams.mini.render import render
from streams.mini.world import Composition, World, rng_for, world

log = logging.getLogger(__name__)

RECIPE = 2  # bump when the training recipe changes: part of the cache key
WEIGHTS = "model.safetensors"
STREAMS = (MiniShapes, MiniColours, MiniDigits, MiniHandwritten, MiniSigns)


@dataclass
class VLMConfig:
    """The recipe: ``align_steps`` full-batch steps aligning the projector (:func:`align_projector`), then
    ``steps`` × ``batch_size`` fresh questions with AdamW (warm-up, cosine decay) about images drawn from a
    pool of ``pool`` renders per class (:func:`feature_pool`); the options grow from 2 to 5 over the first
    ``curriculum`` of the steps (:func:`options_at`).

    ``backbone``: the folder of the mini encoder that goes into the tower (default: the cached ``mini``).
    The Llama has ``layers`` blocks of width ``width`` (``heads`` heads, MLP 2 × width). ``dense`` and
    ``option``: the weights of the answer loss at the positions where the answer is already determined and
    of the per-option match loss (:func:`train`).
    """

    seed: int = 0
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    width: int = 64
    layers: int = 2
    heads: int = 4
    dense: float = 0.3
    option: float = 3.0
    curriculum: float = 0.3
    pool: int = 64
    align_steps: int = 300
    backbone: str | None = None


def default_vlm_dir(seed: int = 0) -> Path:
    """Where the mini VLM of seed ``seed`` is cached (versioned by world, backbone recipe and VLM recipe)."""
    return cache_root() / f"mini-llava-v{world().version}.{BACKBONE_RECIPE}.{RECIPE}-s{seed}"


# --------------------------------------------------------------------------- questions
def vocabulary() -> list[str]:
    """Every text a mini question can hold: the prompt's fixed parts, the streams' questions and class
    names, the option letters and the world's words (the word tokenizer's vocabulary)."""
    w = world()
    texts = [SYSTEM, "USER: ASSISTANT:", MC_SUFFIX, *LETTERS, *(f"{letter}." for letter in LETTERS),
             *w.shapes, *w.colours, *w.glyphs]
    for stream in STREAMS:
        texts += [stream.spec.vqa_question, *stream.spec.class_names]
    return texts


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


Question = tuple[int, int, str, int]  # (stream index in STREAMS, class, prompt, right option index)


def question_batch(seed: int, step: int, batch_size: int, image_token: str, options: int = len(LETTERS)) -> list[Question]:
    """Step ``step``'s training questions: ``batch_size`` spread over the mini streams (round robin), each about a
    uniformly drawn class with that stream's question and random options (:class:`LabelQuestions`), cut to
    ``options`` (the first ``options`` − 1 distractors and the right one at a uniform position)."""
    rng = rng_for(RECIPE, "mini-vlm", seed, step)
    batch = []
    for i in range(batch_size):
        index = i % len(STREAMS)
        spec = STREAMS[index].spec
        label = int(rng.integers(len(spec.class_names)))
        questions = LabelQuestions(spec.name, spec.class_names, spec.vqa_question, seed=seed)
        qset = questions.build([f"mini-vlm/{seed}/{step}/{i}"], [label])
        item = qset.items[0]
        if options < len(item.choices):  # the right option at a uniform position among the first distractors
            others = [c for j, c in enumerate(item.choices) if j != item.answer][:options - 1]
            answer = int(rng.integers(options))
            item = replace(item, choices=(*others[:answer], item.choices[item.answer], *others[answer:]), answer=answer)
        batch.append((index, label, conversation(qset.prompt(item), image_token), item.answer))
    return batch


# --------------------------------------------------------------------------- the model and its training
@lru_cache(maxsize=1)
def tokenizer():
    """The word-level tokenizer of :func:`vocabulary` (letters A–E and ``<image>`` are single tokens)."""
    return word_tokenizer(vocabulary(), whole=[f"{letter}." for letter in LETTERS])


def llava_config(cfg: VLMConfig, vision_config):
    """The ``LlavaConfig`` of recipe ``cfg`` with tower ``vision_config``."""
    text = {"hidden_size": cfg.width, "intermediate_size": 2 * cfg.width, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads}
    return new_llava_config(vision_config, tokenizer(), text)


def planned_config(cfg: VLMConfig):
    """The ``LlavaConfig`` the recipe ``cfg`` gives with the ``mini`` encoder, without building anything."""
    from benchmark.backbones import backbone_skeleton
    from benchmark.export import hf_vision_config

    return llava_config(cfg, hf_vision_config(backbone_skeleton("mini").visual))


def new_model(cfg: VLMConfig, progress: bool = True):
    """(random-weight ``LlavaForConditionalGeneration`` with the mini encoder in its frozen tower, processor)."""
    from benchmark.backbones import load_backbone
    from benchmark.export import hf_vision_config
    folder = ensure_model(Path(cfg.backbone) if cfg.backbone else default_model_dir(), progress=progress)
    backbone = load_backbone(f"mini:{folder}")
    vision = hf_vision_config(backbone.visual)
    model = new_llava(llava_config(cfg, vision), cfg.seed)
    swap_into_tower(model, backbone)
    return model, llava_processor(vision, tokenizer())


@torch.no_grad()
def feature_pool(model, processor, seed: int, per_class: int) -> list[torch.Tensor]:
    """The frozen tower's image features (``hidden_states[-2]`` without the class token, what the projector
    reads) of ``per_class`` clean renders (:func:`scene`) of every class of every mini stream: one
    [C, per_class, N, W] tensor per stream of :data:`STREAMS` (N patches of width W). The tower is frozen, so
    training draws its images from this pool instead of running it every step."""
    w, tower, pool = world(), vision_tower(model), []
    for stream in STREAMS:
        rng = rng_for(RECIPE, "mini-vlm-pool", seed, stream.spec.name)
        classes = len(stream.spec.class_names)
        images = [Image.fromarray(render(w, scene(stream, w, c, rng))) for c in range(classes) for _ in range(per_class)]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        pool.append(features.reshape(classes, per_class, *features.shape[1:]))
    return pool


def first_token(name: str) -> int:
    """The id of the first word of a class name."""
    return tokenizer().convert_tokens_to_ids(tokenizer().tokenize(name))[0]


def align_projector(projector: nn.Module, embeddings: torch.Tensor, pool: list[torch.Tensor], steps: int, lr: float) -> None:
    """Stage 1: train ``projector`` (on standardised features) so that the mean of an image's projected tokens
    points at its class name's (first word's) input embedding among all of ``embeddings`` [V, H] (cosine
    logits × 20, full batch of the pool): the image tokens then look like the word of their class, and
    matching them with an option becomes a copy task for the language model (without this stage the
    recipe stays at chance)."""
    features = torch.cat([p.flatten(0, 1) for p in pool])  # [M, N, W]
    targets = torch.tensor([first_token(name) for stream, p in zip(STREAMS, pool)
                            for name in stream.spec.class_names for _ in range(p.shape[1])])
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    table = F.normalize(embeddings.detach(), dim=-1)
    for _ in range(steps):
        logits = F.normalize(projector(features).mean(1), dim=-1) @ table.T * 20  # [M, V]
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class Standardised(nn.Module):
    """``projector((x − mean) / std)``, folded back into the projector's first linear layer by :meth:`fold`."""

    def __init__(self, projector: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.projector, self.mean, self.std = projector, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector((x - self.mean) / self.std)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The projector computing the same function on raw features: W' = W / std, b' = b − W' · mean."""
        linear = self.projector.linear_1
        linear.weight.div_(self.std)
        linear.bias.sub_(linear.weight @ self.mean)
        return self.projector


def answer_positions(input_ids: torch.Tensor, answers: list[int], marker_ids: list[int], suffix_id: int) -> torch.Tensor:
    """[B, L] bool: in each left-padded prompt, the positions from the last token of the right option's text
    to the end, where the answer is already determined. An option starts at its marker token ("A." to "E.",
    ``marker_ids``); the last option ends before the answer instruction (``suffix_id``, its first token)."""
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, answer in enumerate(answers):
        ends = option_ends(input_ids[row].tolist(), marker_ids, suffix_id)
        mask[row, ends[answer]:] = True
    return mask


def option_ends(ids: list[int], marker_ids: list[int], suffix_id: int) -> list[int]:
    """The position of the last token of every option's text in prompt ``ids`` (see :func:`answer_positions`)."""
    markers = set(marker_ids)
    starts = [j for j, token in enumerate(ids) if token in markers]
    suffix = len(ids) - 1 - ids[::-1].index(suffix_id)
    return [end - 1 for end in [*starts[1:], suffix]]


def options_at(cfg: VLMConfig, step: int) -> int:
    """The curriculum: 2 options at first, one more every ``curriculum`` / 4 of the steps, up to 5."""
    if cfg.curriculum <= 0:
        return len(LETTERS)
    return min(len(LETTERS), 2 + int(4 * step / (cfg.curriculum * cfg.steps)))


def train(cfg: VLMConfig, progress: bool = True):
    """Train a new mini VLM (recipe ``cfg``); returns (model in eval mode, processor, loss of every step).

    The tower is frozen, so its features are computed once for a pool of renders (:func:`feature_pool`) and
    standardised; stage 1 aligns the projector with the class words (:func:`align_projector`); then the
    projector and the Llama learn the questions (:func:`question_batch`, 2 → 5 options, :func:`options_at`)
    with their image tokens scattered into the prompt's ``<image>`` slots. The loss of a question is the
    cross-entropy of its answer letter at the first answer token (what letter scoring reads), plus, weighted
    ``dense``, its mean over the positions where the answer is already determined (:func:`answer_positions`),
    plus, weighted ``option``, at the last token of every option: its letter for the right option, the real
    next token for the others (a match / no-match signal per option). The standardisation is folded into the
    projector at the end: the saved model reads raw tower features.
    """
    model, processor = new_model(cfg, progress)
    vision_tower(model).requires_grad_(False)
    pool = feature_pool(model, processor, cfg.seed, cfg.pool)
    flat = torch.cat([p.flatten(0, 2) for p in pool])  # [M·N, W]
    inner = getattr(model, "model", model)
    projector = Standardised(inner.multi_modal_projector, flat.mean(0), flat.std(0) + 1e-6)
    embed = model.get_input_embeddings()
    align_projector(projector, embed.weight, pool, cfg.align_steps, cfg.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98))
    tok = processor.tokenizer
    letter_ids = torch.tensor(letter_tokens(tok, LETTERS))
    markers = tok.convert_tokens_to_ids([f"{letter}." for letter in LETTERS])
    suffix_id = tok.convert_tokens_to_ids(MC_SUFFIX.split()[0])
    image_id, patches = model.config.image_token_id, pool[0].shape[2]
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="training the mini VLM", unit="step", disable=not progress)
    for step in bar:
        questions = question_batch(cfg.seed, step, cfg.batch_size, processor.image_token, options_at(cfg, step))
        draw = rng_for(RECIPE, "mini-vlm-draw", cfg.seed, step).integers(cfg.pool, size=len(questions))
        features = torch.stack([pool[s][label, j] for (s, label, _, _), j in zip(questions, draw)])  # [B, N, W]
        prompts = [prompt.replace(processor.image_token, processor.image_token * patches) for _, _, prompt, _ in questions]
        batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        embeds = embed(ids).masked_scatter((ids == image_id).unsqueeze(-1), projector(features).to(model.dtype))
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits.float()  # [B, L, V]
        answers = [answer for *_, answer in questions]
        targets = letter_ids[answers]  # [B]
        determined = answer_positions(ids, answers, markers, suffix_id)  # [B, L]
        rows, cols, option_targets = [], [], []
        for row, answer in enumerate(answers):
            line = ids[row].tolist()
            for j, end in enumerate(option_ends(line, markers, suffix_id)):
                rows.append(row), cols.append(end), option_targets.append(int(letter_ids[j]) if j == answer else line[end + 1])
        loss = (F.cross_entropy(logits[:, -1], targets)
                + cfg.dense * F.cross_entropy(logits[determined], targets[:, None].expand_as(determined)[determined])
                + cfg.option * F.cross_entropy(logits[rows, cols], torch.tensor(option_targets)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    projector.fold()
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
