"""What one training step of each strategy costs, side by side in one process (a benchmark, not a test).

On a ViT-B/16-sized CLIP (random weights; nothing is downloaded) and one batch of random
images, every strategy is set up exactly as in a run (its plugin on the CLIP template, its
importance pass and masks, the template's Adam), then the strategies take turns: each round
runs one training iteration (forward, backward, optimizer step, all plugin hooks) of every
strategy, in a rotating order, so that machine-load drifts hit them alike. Reported per
strategy: median step time (wall clock, and the process's CPU time, which other processes on
a shared machine disturb far less) and its ratio to full fine-tuning, forward+backward FLOPs per
sample (torch's FLOP counter), step memory (CUDA: peak allocated during the step; CPU:
tensors saved for backward + gradients + optimizer state, weights excluded), optimizer-state
bytes, trainable parameters (LoRSU's masked count and the count with dense biases) and the
set-up time (importance and masks). ``lorsu-dense`` is the dense reference of
:mod:`strategies.lorsu.reference`. The goals of issue 3 are checked at the end.

A second table does the same for every registered strategy trained with the VLM's answer loss (objective
``vlm``: ``lorsu-ppl``, ``lora-ppl``, ...; one that cannot be built on the model is skipped with its reason)
against full fine-tuning of the encoder inside LLaVA (``full-ft`` on the VLM template), and adds the language
model's FLOPs per image: ``--vlm tiny`` with ``fscl-tiny`` inside the tiny random LLaVA of the tests, ``--vlm 7b``
with the ``--model`` encoder inside a random LLaVA-1.5-7B-shaped model (Llama-2-7B: 32 layers of width 4096, bf16;
GPU only, "skipped: no GPU" otherwise); default both, ``--vlm none`` to leave them out.

FLOPs per sample come two ways (as in a run's ``summary.json``): ``GFLOP/img`` is what a training step computes
(the CLIP loss's captions are encoded once and cached, so no text tower), ``paper GFLOP`` the paper's count (the
CLIP loss adds the text tower's forward on the batch's captions; the VLM loss passes the whole VLM either way).

Last, the paper's "over 25× less compute than full VLM updates" at the paper's shapes, from FLOPs counted on the
meta device (no weights, nothing downloaded; :func:`paper_shape_flops`): LoRSU with the CLIP loss on CLIP
ViT-L/14-336 (the vision tower's forward + backward, the text tower's forward on 77 tokens) against LoRA on the whole
LLaVA-1.5-7B (the released ``full_lora`` module set; tower, projector, language model and head, forward + backward
on 576 image + 60 prompt + 10 answer tokens).

    python benchmarks/strategy_cost.py                    # ViT-B-16, batch 8, 3 timed rounds
    python benchmarks/strategy_cost.py --rounds 5 --strategies full-ft lorsu lorsu-dense
    python benchmarks/strategy_cost.py --threads 1        # on a machine shared with other jobs
    python benchmarks/strategy_cost.py --device cuda --model ViT-L-14-336-quickgelu --vlm 7b
    python benchmarks/strategy_cost.py --strategies lorsu --vlm none   # the CLIP table and the paper-shape ratio

On a shared machine two intra-op threads spin while the other job holds a core, and wall
times swing by tens of percent; one thread and the CPU-time column give stable ratios.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import benchmark  # noqa: F401  (torchvision repair: before avalanche and open_clip)

# isort: split
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from benchmark.backbones import Backbone, load_backbone
from benchmark.config import TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.plugins import StrategyPlugin, optimizer_state_bytes, peak_memory_mb, text_forward_flops
from benchmark.registry import STRATEGIES
from benchmark.template import CLIPTemplate, clip_loss
from benchmark.vlm.base import LoadedVLM
from benchmark.vlm.llava import LoadedLlava, llava_processor, save_tiny_llava
from benchmark.vlm.recipe import VLMRecipe, with_vlm_defaults
from benchmark.vlm.spec import resolve_vlm
from benchmark.vlm_template import VLMTemplate
from benchmark.vqa.pairs import AnswerPairs
from strategies.lorsu.reference import DenseLoRSU

DEFAULT_STRATEGIES = ("full-ft", "ewc", "layernorm", "lora", "spu", "lorsu", "lorsu-dense")
VLM_REFERENCE = "full-ft"  # the encoder fully trained inside LLaVA, before every strategy whose objective is vlm
# The released full_lora set (train_utils.get_model) in transformers' LLaVA names: tower, projector, LLM and head.
FULL_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj",
                     "down_proj", "lm_head", "linear_1", "linear_2")
GOALS = (  # (name, strategy, reference, columns, bound): column(strategy) <= bound * column(reference)
    ("LoRSU step time <= 0.85x full-ft", "lorsu", "full-ft", ("step_s", "cpu_s"), 0.85),
    ("LoRSU optimizer state <= 0.15x full-ft", "lorsu", "full-ft", ("optimizer_bytes",), 0.15),
    ("LoRSU step time <= 0.8x dense reference", "lorsu", "lorsu-dense", ("step_s", "cpu_s"), 0.8),
    ("LoRSU optimizer state <= 0.3x dense reference", "lorsu", "lorsu-dense", ("optimizer_bytes",), 0.3),
)


class RandomImages(Dataset):
    """``n`` random images [3, S, S] of ``n`` classes (one each), with the ``targets`` Avalanche needs."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
        self.targets = list(range(n))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], self.targets[i]


@dataclass
class Entry:
    """One strategy under test: its encoder copy, plugin, template and measurements."""

    name: str
    plugin: StrategyPlugin
    template: CLIPTemplate
    setup_s: float
    times: list[float] = field(default_factory=list)  # wall-clock seconds per timed step
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads) per timed step
    stats: dict[str, float] = field(default_factory=dict)


def copy_vision_side(backbone: Backbone) -> Backbone:
    """A copy with its own vision encoder; the frozen text side is shared, not copied."""
    visual = {id(t) for t in (*backbone.visual.parameters(), *backbone.visual.buffers())}
    shared = {id(t): t for t in (*backbone.parameters(), *backbone.buffers()) if id(t) not in visual}
    return copy.deepcopy(backbone, memo=shared)


def make_plugin(name: str, backbone: Backbone, vlm: LoadedVLM | None = None) -> StrategyPlugin:
    """The strategy's plugin with its default options (a VLM-loss strategy's resolved for ``vlm``, as a run does)."""
    if name == "lorsu-dense":
        return DenseLoRSU(backbone)
    entry = STRATEGIES.get(name)
    options = entry.options() if entry.options else None
    if vlm is not None and options is not None:  # a VLM-side strategy's layer and head counts, within the VLM's
        text = vlm.family.text_config()
        fitted = {"last_layers": text.num_hidden_layers, "top_k_heads": text.num_attention_heads}
        options = dataclasses.replace(options, **{key: min(getattr(options, key), most)
                                                  for key, most in fitted.items() if hasattr(options, key)})
    return entry.obj(backbone, with_vlm_defaults(options, str(vlm.family.spec) if vlm is not None else None))


def template_parts(vlm: LoadedVLM, backbone: Backbone, classes: int) -> dict:
    """What the VLM template needs besides the CLIP template's: ``vlm`` (its tower checked against ``backbone``)
    and the tokenized pairs of ``classes`` classes."""
    vlm.family.check_encoder(backbone)
    pairs = AnswerPairs.for_classes(vlm, "What is in this image?", "This is a {}.", [f"class {i}" for i in range(classes)])
    return {"vlm": vlm, "pairs": pairs}


def llava_7b_config(vision_config, folder: Path):
    """A LLaVA-1.5-7B-shaped ``LlavaConfig``: ``vision_config`` as the tower, Llama-2-7B as the language model
    (32 layers, width 4096, 32 heads, MLP 11008, vocabulary 32064), a 2-layer MLP projector; the special
    tokens those of the tiny LLaVA written to ``folder`` (its tokenizer serves the random model)."""
    from transformers import AutoConfig, LlamaConfig

    config = AutoConfig.from_pretrained(save_tiny_llava(folder))
    config.vision_config = vision_config
    text = config.text_config
    config.text_config = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                     bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                     pad_token_id=text.pad_token_id)
    return config


def load_vlm(kind: str, backbone: Backbone, device: torch.device, folder: Path) -> LoadedVLM:
    """``tiny``: the tests' tiny random LLaVA (its tower: ``backbone``'s shape), loaded as ``vqa.model:
    llava:<folder>``; ``7b``: :func:`llava_7b_config` with its processor written to ``folder`` (so the ``llava``
    family reads and checks them as a run's), random weights in bf16 on ``device``."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from benchmark.export import hf_vision_config

    if kind == "tiny":
        return resolve_vlm(f"llava:{save_tiny_llava(folder, vision_config=hf_vision_config(backbone.visual))}").load(device)
    config = llava_7b_config(hf_vision_config(backbone.visual), folder)
    config.save_pretrained(folder)
    llava_processor(config.vision_config, AutoTokenizer.from_pretrained(folder)).save_pretrained(folder)
    family = resolve_vlm(f"llava:{folder}")
    processor = family.processor(str(folder), True)  # checked against the 7B-shaped config
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    return LoadedLlava(family, model, processor)


def set_up(name: str, backbone: Backbone, experience, batch: int, device: torch.device,
           vlm: LoadedVLM | None = None) -> Entry:
    """Build the strategy's template (the VLM one with ``vlm``) and run its session set-up (importance, masks,
    optimizer)."""
    plugin = make_plugin(name, backbone, vlm)
    common = dict(
        backbone=backbone, class_names=tuple(f"class {i}" for i in range(batch)), templates=("a photo of a {}.",),
        train=TrainConfig(epochs=1, batch_size=batch), zeroshot=ZeroShotEvaluator(backbone), seed=0, device=device,
        plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]),
    )
    if vlm is None:
        template = CLIPTemplate(**common)
    else:
        recipe = plugin.options if plugin.objective == "vlm" else VLMRecipe()
        template = VLMTemplate(recipe=recipe, **template_parts(vlm, backbone, batch), **common)
    template.experience, template.is_training = experience, True
    template.model.train()
    template.class_text_features()  # the frozen text side, encoded once outside every measurement
    start = time.perf_counter()
    template._before_training_exp()  # as in template.train(): dataloader, the plugin's set-up, Adam
    if name == "ewc":  # a previous session's anchor, so that the penalty is part of the step
        plugin.consolidate(template)
    return Entry(name, plugin, template, time.perf_counter() - start)


def instrumented_step(entry: Entry, device: torch.device) -> None:
    """The first (untimed) step: FLOPs per sample, step memory, optimizer state, trainable counts."""
    vlm = entry.template.vlm  # None under the CLIP template
    held = [*entry.template.model.parameters(), *(vlm.parameters() if vlm is not None else ())]
    weights = {p.untyped_storage().data_ptr() for p in held}  # the encoder's and (VLM) LLaVA's weights
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        entry.template.training_epoch()
    counts = flops.get_flop_counts()
    lm = sum(sum(counts[m].values()) for m in entry.template.flop_groups().get("lm", ()) if m in counts)
    optimizer = entry.template.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = optimizer_state_bytes(optimizer)
    memory = (torch.cuda.max_memory_allocated(device) - base if device.type == "cuda"
              else sum(saved.values()) + grads + state)
    batch = entry.template.train_mb_size
    text = 0  # the paper's count of the CLIP loss adds the text tower's forward on the captions (cached in training)
    if not isinstance(entry.template, VLMTemplate):
        backbone = entry.template.backbone
        text = text_forward_flops(backbone, backbone.tokenize([f"a photo of a class {i}." for i in range(batch)]))
    entry.stats.update(flops=flops.get_total_flops() / batch, paper_flops=(flops.get_total_flops() + text) / batch,
                       lm_flops=lm / batch, memory_bytes=memory, optimizer_bytes=state,
                       **entry.plugin.trainable_counts())


def timed_step(entry: Entry, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    entry.template.training_epoch()  # the one batch: forward, backward, optimizer step, every plugin hook
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    entry.times.append(time.perf_counter() - start)
    entry.cpu_times.append(time.process_time() - cpu_start)


def table(entries: list[Entry]) -> str:
    ref = next((e for e in entries if e.name == "full-ft"), entries[0])
    ref_step, ref_cpu, ref_state = ref.stats["step_s"], ref.stats["cpu_s"], ref.stats["optimizer_bytes"] or 1
    lm = any(e.stats["lm_flops"] for e in entries)  # the VLM table: the language model's share of the FLOPs
    head = (f"{'strategy':<14} {'step s':>7} {'x ' + ref.name:>10} {'cpu s':>7} {'x ' + ref.name:>10} "
            f"{'GFLOP/img':>9} " + (f"{'LM GFLOP':>9} " if lm else "") + f"{'memory MiB':>10} "
            f"{'Adam MiB':>9} {'x ' + ref.name:>10} {'trainable':>11} {'+ biases':>11} {'setup s':>8} {'paper GFLOP':>11}")
    lines = [head, "-" * len(head)]
    for e in entries:
        s = e.stats
        lines.append(
            f"{e.name:<14} {s['step_s']:>7.2f} {s['step_s'] / ref_step:>10.2f} {s['cpu_s']:>7.2f} "
            f"{s['cpu_s'] / ref_cpu:>10.2f} {s['flops'] / 1e9:>9.2f} " + (f"{s['lm_flops'] / 1e9:>9.2f} " if lm else "")
            + f"{s['memory_bytes'] / 2**20:>10.0f} {s['optimizer_bytes'] / 2**20:>9.1f} "
            f"{s['optimizer_bytes'] / ref_state:>10.3f} {s['trainable']:>11,} {s['trainable_with_biases']:>11,} "
            f"{e.setup_s:>8.2f} {s['paper_flops'] / 1e9:>11.2f}")
    return "\n".join(lines)


def goals(entries: list[Entry]) -> list[str]:
    stats = {e.name: e.stats for e in entries}
    lines = []
    for text, name, ref, columns, bound in GOALS:
        if name in stats and ref in stats:
            ratios = {c: stats[name][c] / stats[ref][c] for c in columns}
            verdict = "met    " if all(r <= bound for r in ratios.values()) else (
                "NOT met" if all(r > bound for r in ratios.values()) else "split  ")
            lines.append(f"{verdict}  {text}: " + ", ".join(f"{c} ratio {r:.3f}" for c, r in ratios.items()))
    return lines


def measure(names: list[str], backbone: Backbone, experience, batch: int, device: torch.device, rounds: int,
            vlm: LoadedVLM | None = None) -> list[Entry]:
    """Set every strategy up on its own copy of the encoder, take the instrumented step, then ``rounds`` timed
    rounds in rotating order; the entries with their medians."""
    entries, alone = [], []  # alone: the VLM-side strategies, each adapting the one VLM in turn (then released)
    for name in names:
        torch.manual_seed(0)
        if vlm is not None and name in STRATEGIES and "vlm" in STRATEGIES.get(name).obj.updates:
            alone.append(name)
            continue
        entry = _set_up_or_skip(name, backbone, experience, batch, device, vlm)
        entries += [entry] if entry else []
    _timed_rounds(entries, device, rounds)
    for name in alone:
        torch.manual_seed(0)
        entry = _set_up_or_skip(name, backbone, experience, batch, device, vlm)
        if entry:
            try:
                _timed_rounds([entry], device, rounds)
            finally:
                entry.plugin.release()
            entries.append(entry)
    return entries


def _set_up_or_skip(name: str, backbone: Backbone, experience, batch: int, device: torch.device,
                    vlm: LoadedVLM | None) -> Entry | None:
    """:func:`set_up` on a copy of the encoder, or None (named) for a strategy this model cannot take."""
    try:
        entry = set_up(name, copy_vision_side(backbone), experience, batch, device, vlm)
    except Exception as err:  # noqa: BLE001  (a strategy this model cannot take: named, the others go on)
        print(f"  skipped {name}: {type(err).__name__}: {err}", flush=True)
        return None
    print(f"  set up {name} ({entry.setup_s:.1f} s)", flush=True)
    return entry


def _timed_rounds(entries: list[Entry], device: torch.device, rounds: int) -> None:
    """The instrumented step of each entry, then ``rounds`` timed rounds in rotating order; their medians."""
    for entry in entries:
        instrumented_step(entry, device)
    for r in range(rounds):
        shift = r % len(entries) if entries else 0
        for entry in entries[shift:] + entries[:shift]:
            timed_step(entry, device)
        print(f"  round {r + 1}/{rounds}", flush=True)
    for entry in entries:
        entry.stats["step_s"] = statistics.median(entry.times)
        entry.stats["cpu_s"] = statistics.median(entry.cpu_times)


def vlm_strategies() -> list[str]:
    """:data:`VLM_REFERENCE`, then every registered strategy whose objective is ``vlm`` (one whose class cannot be
    imported is named and left out)."""
    names = [VLM_REFERENCE]
    for entry in STRATEGIES.entries():
        try:
            objective = entry.obj.objective
        except Exception as err:  # noqa: BLE001  (a broken outside plugin: named, the others go on)
            print(f"  skipped {entry.name}: {type(err).__name__}: {err}")
            continue
        if objective == "vlm":
            names.append(entry.name)
    return names


def vlm_table(kind: str, model: str, batch: int, device: torch.device, rounds: int) -> None:
    """The VLM-loss strategies against full fine-tuning of the encoder inside LLaVA (see the module docstring)."""
    if kind == "7b" and device.type != "cuda":
        print("\nVLM loss, LLaVA-1.5-7B-shaped: skipped: no GPU (--device cuda)")
        return
    backbone = load_backbone("openclip:fscl-tiny" if kind == "tiny" else f"openclip:{model}", str(device))
    size = backbone.preprocess(False)(Image.new("RGB", (8, 8))).shape[-1]
    experience = benchmark_from_datasets(train=[as_classification_dataset(RandomImages(batch, size))]).train_stream[0]
    with tempfile.TemporaryDirectory() as folder:
        vlm = load_vlm(kind, backbone, device, Path(folder))
        lm_params = sum(p.numel() for p in vlm.model.parameters()) - backbone.visual_parameter_count()
        print(f"\nVLM loss: {backbone.spec} inside a random {kind} LLaVA ({lm_params / 1e6:,.2f} M other parameters), "
              f"batch {batch}", flush=True)
        entries = measure(vlm_strategies(), backbone, experience, batch, device, rounds, vlm)
    print()
    print(table(entries))


def paper_configs():
    """The paper's shapes as transformers configs: ``CLIPConfig`` of CLIP ViT-L/14-336 (vision: 24 layers of width
    1024, 16 heads, 336 px, patch 14; text: 12 layers of width 768, 12 heads, 77 tokens; projection 768) and
    ``LlavaConfig`` of LLaVA-1.5-7B (that tower, read at its second-last layer, a 2-layer MLP projector, Llama-2-7B:
    32 layers of width 4096, 32 heads, MLP 11008, vocabulary 32000)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
    llama = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    clip = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768)
    return clip, LlavaConfig(vision_config=vision, text_config=llama, image_token_index=llama.vocab_size)


def _with_lora(model: nn.Module, targets: str | list[str], rank: int) -> nn.Module:
    """``model`` frozen, with peft's LoRA (rank ``rank``, α = ``rank``) on the ``targets`` modules (trainable)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)


def paper_shape_flops(clip_config, llava_config, prompt_tokens: int = 60, answer_tokens: int = 10,
                      lorsu_rank: int = 64, lora_rank: int = 8, device: str = "meta") -> dict[str, int]:
    """Training FLOPs per sample (one sample, ``FlopCounterMode``) of the paper's two ends of the comparison, on
    models built on ``device`` from the configs (``meta``: no weights, no memory; the tests compare it with the CPU):

    * ``lorsu_vision``: LoRSU with the CLIP loss, the vision tower's forward + backward with LoRSU's trainables (a
      rank-``lorsu_rank`` update of every block's q/k/v, the heads' selection being a mask on it, and every block's
      fc1 weight, whose sparse mask applies to its dense gradient); ``lorsu_text``: the text tower's forward on
      its context (``clip_config.text_config.max_position_embeddings`` tokens); ``lorsu`` their sum;
    * ``lora_vlm``: LoRA (rank ``lora_rank``) on the released ``full_lora`` modules (:data:`FULL_LORA_MODULES`) of
      the LLaVA, forward + backward of the answer loss on the tower's image tokens + ``prompt_tokens`` +
      ``answer_tokens``: tower (read at ``vision_feature_layer``), projector, language model, head over every
      position (as transformers computes it); ``lora_vlm_lm``: its language model and head.
    """
    from transformers import CLIPModel, LlavaForConditionalGeneration

    with torch.device(device):
        clip = CLIPModel(clip_config)
        llava = LlavaForConditionalGeneration(llava_config)
    vision = clip_config.vision_config
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device=device)
    context = clip_config.text_config.max_position_embeddings
    text_ids = torch.zeros(1, context, dtype=torch.long, device=device)
    flops: dict[str, int] = {}

    clip = _with_lora(clip, r"vision_model\..*\.(q_proj|k_proj|v_proj)", lorsu_rank)
    for layer in clip.vision_model.encoder.layers:
        layer.mlp.fc1.weight.requires_grad_(True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        clip.get_text_features(input_ids=text_ids)
    flops["lorsu_text"] = counter.get_total_flops()
    text_features = torch.zeros(1, clip_config.projection_dim, device=device)
    trainable = [p for p in clip.parameters() if p.requires_grad]

    with FlopCounterMode(display=False) as counter:
        with FlopCounterMode(display=False) as forward:
            image = clip.vision_model(pixel_values=pixels).pooler_output
            loss = clip_loss(clip.visual_projection(image), text_features, clip.logit_scale)
        torch.autograd.grad(loss, trainable)
    flops["lorsu_vision"], flops["lorsu_forward"] = counter.get_total_flops(), forward.get_total_flops()
    flops["lorsu"] = flops["lorsu_vision"] + flops["lorsu_text"]
    flops["lorsu_forward"] += flops["lorsu_text"]

    llava = _with_lora(llava, list(FULL_LORA_MODULES), lora_rank)
    trainable = [p for p in llava.parameters() if p.requires_grad]
    ids = torch.zeros(1, prompt_tokens + answer_tokens, dtype=torch.long, device=device)
    lm = llava.model.language_model

    def lora_loss() -> Tensor:
        # transformers' LLaVA forward places the image features by a data-dependent mask, which meta tensors cannot
        # run: the same modules are called here in its order (tower, projector, then the LLM on the joined sequence)
        image = llava.model.get_image_features(pixel_values=pixels, vision_feature_layer=llava_config.vision_feature_layer,
                                               vision_feature_select_strategy=llava_config.vision_feature_select_strategy)
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        image = torch.cat(list(image)) if isinstance(image, (list, tuple)) else image
        text = lm.embed_tokens(ids)
        joined = torch.cat([text[:, :1], image.reshape(1, -1, text.shape[-1]), text[:, 1:]], dim=1)
        logits = llava.lm_head(lm(inputs_embeds=joined).last_hidden_state)
        return F.cross_entropy(logits[0, -answer_tokens - 1:-1].float(), ids[0, -answer_tokens:])

    with FlopCounterMode(display=False) as counter:
        with FlopCounterMode(display=False) as forward:
            loss = lora_loss()
        torch.autograd.grad(loss, trainable, allow_unused=True)  # the tower's layers after the feature layer: unused
    flops["lora_vlm"], flops["lora_vlm_forward"] = counter.get_total_flops(), forward.get_total_flops()
    return flops


def paper_shape_text(flops: dict[str, int]) -> str:
    """The paper-shape counts of :func:`paper_shape_flops` and the ratios LoRA-F : LoRSU, in words."""
    tera = {k: v / 1e12 for k, v in flops.items()}
    return "\n".join([
        "Paper shapes, FLOPs counted by torch's FlopCounterMode on the meta device (no weights; every piece ran on "
        "meta, none counted analytically), training FLOPs per sample:",
        f"  LoRSU, CLIP loss, CLIP ViT-L/14-336: {tera['lorsu']:.3f} TFLOPs (vision tower forward + backward "
        f"{tera['lorsu_vision']:.3f}, text tower forward on 77 tokens {tera['lorsu_text']:.4f}); forward only "
        f"{tera['lorsu_forward']:.3f}",
        f"  LoRA-F (lora-vlm: the released full_lora set, r 8), LLaVA-1.5-7B answer loss on 576 image + 60 prompt + "
        f"10 answer tokens: {tera['lora_vlm']:.3f} TFLOPs; forward only {tera['lora_vlm_forward']:.3f}",
        f"  ratio LoRA-F : LoRSU = {flops['lora_vlm'] / flops['lorsu']:.1f}x forward + backward, "
        f"{flops['lora_vlm_forward'] / flops['lorsu_forward']:.1f}x forward only (the paper: \"over 25x\")"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each: one step of every strategy)")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help=f"any of {', '.join(DEFAULT_STRATEGIES)} or another registered strategy")
    parser.add_argument("--vlm", nargs="+", choices=("tiny", "7b", "none"), default=["tiny", "7b"],
                        help="the VLM-loss tables: fscl-tiny in a tiny LLaVA, --model in a 7B-shaped one (GPU), "
                             "or none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore", message="No loggers specified")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = load_backbone(f"openclip:{args.model}", str(device))
    size = backbone.preprocess(False)(Image.new("RGB", (8, 8))).shape[-1]
    experience = benchmark_from_datasets(
        train=[as_classification_dataset(RandomImages(args.batch, size))]).train_stream[0]
    print(f"{args.model}: {backbone.visual_parameter_count() / 1e6:.1f} M visual parameters, batch {args.batch}, "
          f"{size}px, {device}, {torch.get_num_threads()} threads, {args.rounds} timed rounds", flush=True)
    entries = measure(args.strategies, backbone, experience, args.batch, device, args.rounds)
    print()
    print(table(entries))
    print()
    print("\n".join(goals(entries)))
    print(f"\nprocess peak memory: {peak_memory_mb(device):.0f} MiB (all strategies' copies together)")
    del backbone, entries
    for kind in [k for k in args.vlm if k != "none"]:
        vlm_table(kind, args.model, args.batch, device, args.rounds)
    print()
    print(paper_shape_text(paper_shape_flops(*paper_configs())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
