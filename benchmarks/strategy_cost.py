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

A second table does the same for the strategies trained with LLaVA's answer loss (``lorsu-ppl``,
``lora-ppl``) against full fine-tuning of the encoder inside LLaVA (``full-ft`` on the VLM
template), and adds the frozen language model's FLOPs per image: ``--vlm tiny`` (default) with
``fscl-tiny`` inside the tiny random LLaVA of the tests, ``--vlm 7b`` with the ``--model`` encoder
inside a random LLaVA-1.5-7B-shaped model (Llama-2-7B: 32 layers of width 4096, bf16; GPU only,
"skipped: no GPU" otherwise), ``--vlm none`` to leave it out.

    python benchmarks/strategy_cost.py                    # ViT-B-16, batch 8, 3 timed rounds
    python benchmarks/strategy_cost.py --rounds 5 --strategies full-ft lorsu lorsu-dense
    python benchmarks/strategy_cost.py --threads 1        # on a machine shared with other jobs
    python benchmarks/strategy_cost.py --device cuda --model ViT-L-14-336-quickgelu --vlm 7b

On a shared machine two intra-op threads spin while the other job holds a core, and wall
times swing by tens of percent; one thread and the CPU-time column give stable ratios.
"""
from __future__ import annotations

import argparse
import copy
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
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from benchmark.backbones import Backbone, load_backbone
from benchmark.config import TrainConfig
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.plugins import StrategyPlugin, optimizer_state_bytes, peak_memory_mb
from benchmark.registry import STRATEGIES
from benchmark.template import CLIPTemplate
from benchmark.vlm.base import LoadedVLM
from benchmark.vlm.llava import LoadedLlava, llava_processor, save_tiny_llava
from benchmark.vlm.recipe import VLMRecipe, with_vlm_defaults
from benchmark.vlm.spec import resolve_vlm
from benchmark.vlm_template import VLMTemplate
from benchmark.vqa.pairs import AnswerPairs
from strategies.lorsu.reference import DenseLoRSU

DEFAULT_STRATEGIES = ("full-ft", "ewc", "layernorm", "lora", "spu", "lorsu", "lorsu-dense")
VLM_STRATEGIES = ("full-ft", "lorsu-ppl", "lora-ppl")  # full-ft: the encoder fully trained inside LLaVA
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
    held = [*entry.template.model.parameters(), *getattr(entry.template, "vlm", torch.nn.Module()).parameters()]
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
    entry.stats.update(flops=flops.get_total_flops() / batch, lm_flops=lm / batch, memory_bytes=memory,
                       optimizer_bytes=state,
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
    head = (f"{'strategy':<12} {'step s':>7} {'x ' + ref.name:>10} {'cpu s':>7} {'x ' + ref.name:>10} "
            f"{'GFLOP/img':>9} " + (f"{'LM GFLOP':>9} " if lm else "") + f"{'memory MiB':>10} "
            f"{'Adam MiB':>9} {'x ' + ref.name:>10} {'trainable':>11} {'+ biases':>11} {'setup s':>8}")
    lines = [head, "-" * len(head)]
    for e in entries:
        s = e.stats
        lines.append(
            f"{e.name:<12} {s['step_s']:>7.2f} {s['step_s'] / ref_step:>10.2f} {s['cpu_s']:>7.2f} "
            f"{s['cpu_s'] / ref_cpu:>10.2f} {s['flops'] / 1e9:>9.2f} " + (f"{s['lm_flops'] / 1e9:>9.2f} " if lm else "")
            + f"{s['memory_bytes'] / 2**20:>10.0f} {s['optimizer_bytes'] / 2**20:>9.1f} "
            f"{s['optimizer_bytes'] / ref_state:>10.3f} {s['trainable']:>11,} {s['trainable_with_biases']:>11,} "
            f"{e.setup_s:>8.2f}")
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
    entries = []
    for name in names:
        torch.manual_seed(0)
        entries.append(set_up(name, copy_vision_side(backbone), experience, batch, device, vlm))
        print(f"  set up {name} ({entries[-1].setup_s:.1f} s)", flush=True)
    for entry in entries:
        instrumented_step(entry, device)
    for r in range(rounds):
        shift = r % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            timed_step(entry, device)
        print(f"  round {r + 1}/{rounds}", flush=True)
    for entry in entries:
        entry.stats["step_s"] = statistics.median(entry.times)
        entry.stats["cpu_s"] = statistics.median(entry.cpu_times)
    return entries


def vlm_table(kind: str, model: str, batch: int, device: torch.device, rounds: int) -> None:
    """The Ppl strategies against full fine-tuning of the encoder inside LLaVA (see the module docstring)."""
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
        entries = measure(list(VLM_STRATEGIES), backbone, experience, batch, device, rounds, vlm)
    print()
    print(table(entries))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each: one step of every strategy)")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help=f"any of {', '.join(DEFAULT_STRATEGIES)} or another registered strategy")
    parser.add_argument("--vlm", choices=("tiny", "7b", "none"), default="tiny",
                        help="the VLM-loss table: fscl-tiny in a tiny LLaVA, --model in a 7B-shaped one (GPU), or none")
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
    if args.vlm != "none":
        vlm_table(args.vlm, args.model, args.batch, device, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
