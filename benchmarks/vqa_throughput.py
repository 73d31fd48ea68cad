"""Questions per second of VQA letter scoring vs greedy generation, side by side in one process (a benchmark,
not a test).

Two LLaVAs with random weights (nothing is downloaded):

* ``fscl-tiny``: the tests' tiny LLaVA (:func:`benchmark.vlm.llava.save_tiny_llava`: the vision side of
  ``openclip:fscl-tiny``, a 1-layer Llama of width 32, a character tokenizer), saved and loaded through
  ``from_pretrained`` as a run loads ``vqa.model``; float32 on the CPU, the GPU's default dtype there.
* ``llava-1.5-7b``: LLaVA-1.5-7B's shapes (``llava-hf/llava-1.5-7b-hf``'s config): a CLIP ViT-L/14-336 tower
  (24 layers, width 1024, 577 tokens, features of layer -2 without the class token: 576 image tokens), the
  2-layer MLP projector and a Llama-7B language model (32 layers, width 4096, MLP 11008, vocabulary 32064),
  built in bf16 on the GPU and scored through the ``llava`` family's :class:`~benchmark.vlm.llava.LoadedLlava`;
  a BPE tokenizer trained in memory on the prompts (words and punctuation as
  tokens) stands in for Llama's, so a prompt is about as long (576 image tokens + about 100). GPU only:
  elsewhere it prints "skipped: no GPU".

The same batch of multiple-choice questions (the released LLaVA-1.5 prompt, 5 options, random images) is
scored, after one untimed warm-up of each, in rotating order for ``--rounds`` rounds by

* ``letter``: :func:`benchmark.vqa.scorer.option_scores`, one forward pass per batch (``vqa.scoring: letter``);
* ``generate``: :func:`benchmark.vqa.scorer.generate_answers`, greedy, 20 new tokens, batched
  (``vqa.scoring: generate``). Random weights rarely stop early, so this is its worst case; a trained
  LLaVA answers "A</s>" in about 2 tokens;
* ``generate, batch 1``: the same one question at a time, as the released harness does.

Reported per mode: the median questions per second, its ratio to letter scoring, the forward passes per batch
(generate: one per new token) and on CUDA the peak memory.

    python benchmarks/vqa_throughput.py --device cuda                 # both models (a GPU machine)
    python benchmarks/vqa_throughput.py --device cpu --model fscl-tiny --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import benchmark  # noqa: F401  (torchvision repair: before open_clip)

# isort: split
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from benchmark.vlm.llava import ASSISTANT, LlavaFamily, LoadedLlava, conversation, save_tiny_llava
from benchmark.vlm.spec import VLMSpec, resolve_vlm
from benchmark.vlm.tokenizers import IMAGE_TOKEN
from benchmark.vqa.questions import LETTERS, LabelQuestions
from benchmark.vqa.scorer import Item, generate_answers, option_scores

MODELS = ("fscl-tiny", "llava-1.5-7b")
CLASSES = ("speed limit (30km/h)", "speed limit (50km/h)", "no passing", "priority road", "yield", "stop",
           "no entry", "general caution", "dangerous curve to the left", "road work", "pedestrians",
           "children crossing", "bicycles crossing", "turn right ahead", "keep right", "roundabout mandatory")
QUESTION = "What kind of traffic sign is this?"


@dataclass
class Mode:
    """One way of scoring: a call on the whole batch, its timings and forward passes."""

    name: str
    run: Callable[[], list]
    questions: int
    seconds: list[float] = field(default_factory=list)
    forwards: int = 0
    peak_mib: float = float("nan")


def questions(n: int, seed: int = 0) -> list[Item]:
    """``n`` questions (5 options among :data:`CLASSES`) about random 256×192 images, as the runner asks them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=generator).tolist()
    qset = LabelQuestions("bench", CLASSES, QUESTION, seed=seed).build([str(i) for i in range(n)], labels)
    images = [Image.fromarray(torch.randint(0, 256, (192, 256, 3), dtype=torch.uint8, generator=generator).numpy())
              for _ in range(n)]
    return [(image, conversation(qset.prompt(item), IMAGE_TOKEN), qset.answers(item))
            for image, item in zip(images, qset.items)]


def tiny_llava(device: torch.device, folder: str) -> LoadedLlava:
    """The tests' tiny LLaVA, written to ``folder`` and loaded as ``vqa.model: llava:<folder>``."""
    return resolve_vlm(f"llava:{save_tiny_llava(folder)}").load(device)


def _word_tokenizer(texts: list[str]):
    """A Llama-like BPE tokenizer trained in memory on ``texts`` (words, punctuation and newlines as tokens),
    ``<unk> <s> </s> <pad> <image>`` as special tokens, ``<s>`` prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[\n.,:?()'/]"), behavior="isolated"),
                                                 pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    corpus = [*texts, *(f"{ASSISTANT} {c}" for c in LETTERS)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def llava_7b(device: torch.device, prompts: list[str]) -> LoadedLlava:
    """A LLaVA-1.5-7B-shaped model with random weights in bf16 on ``device``, and its processor (its tokenizer
    trained on ``prompts``)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _word_tokenizer([p.replace(IMAGE_TOKEN, "") for p in prompts])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", IMAGE_TOKEN)}
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids[IMAGE_TOKEN],
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    with torch.device(device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.update(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    return LoadedLlava(LlavaFamily(VLMSpec("llava", "random-weights/llava-1.5-7b-shaped")), model, processor)


def measure(llava: LoadedLlava, items: list[Item], rounds: int, device: torch.device) -> list[Mode]:
    """Time every mode on ``items``: a warm-up each, then ``rounds`` rounds in rotating order."""
    model = llava.model
    modes = [Mode("letter", lambda: option_scores(llava, items), len(items)),
             Mode("generate", lambda: generate_answers(llava, items), len(items)),
             Mode("generate, batch 1", lambda: generate_answers(llava, items[:1]), 1)]
    for mode in modes:  # warm-up; also the forward passes and the peak memory
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        counter = model.register_forward_pre_hook(
            lambda module, args, mode=mode: setattr(mode, "forwards", mode.forwards + 1))
        mode.run()
        counter.remove()
        if device.type == "cuda":
            mode.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            mode.run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            mode.seconds.append(time.perf_counter() - start)
    return modes


def table(name: str, llava: LoadedLlava, items: list[Item], modes: list[Mode]) -> str:
    """One model's rates, letter scoring's speed-up over each generate mode."""
    tokens = statistics.mean(len(llava.processor(images=[image], text=[prompt]).input_ids[0])
                             for image, prompt, _ in items)
    params = sum(p.numel() for p in llava.model.parameters())
    letter = modes[0].questions / statistics.median(modes[0].seconds)
    lines = [f"{name}: {params / 1e6:,.1f} M parameters, {llava.model.dtype}, {tokens:.0f} tokens per prompt "
             f"(image tokens included), batch {len(items)}",
             f"  {'mode':<18} {'questions/s':>11} {'letter x':>9} {'forwards':>8} {'peak MiB':>9}"]
    for mode in modes:
        rate = mode.questions / statistics.median(mode.seconds)
        lines.append(f"  {mode.name:<18} {rate:>11.2f} {letter / rate:>9.2f} {mode.forwards:>8} {mode.peak_mib:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all", help="which LLaVA (default: both)")
    parser.add_argument("--batch", type=int, default=16, help="questions per batch (vqa.batch_size)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each: every mode once)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = MODELS if args.model == "all" else (args.model,)
    items = questions(args.batch)
    print(f"VQA throughput on {device} ({torch.get_num_threads()} CPU threads), {args.rounds} timed rounds, "
          f"generate: greedy, 20 new tokens", flush=True)
    for name in names:
        if (device.type == "cuda" or name == "llava-1.5-7b") and not torch.cuda.is_available():
            print(f"\n{name}: skipped: no GPU", flush=True)
            continue
        if name == "llava-1.5-7b" and device.type != "cuda":
            print(f"\n{name}: skipped: no GPU (--device {device}; it runs with --device cuda)", flush=True)
            continue
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            llava = tiny_llava(device, folder) if name == "fscl-tiny" else llava_7b(device, [p for _, p, _ in items])
            built = time.perf_counter() - start
            modes = measure(llava, items, args.rounds, device)
            print(f"\n{table(name, llava, items, modes)}\n  (built in {built:.1f} s)", flush=True)
        del llava
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
