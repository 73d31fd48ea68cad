"""``benchmarks/strategy_cost.py``'s count of the paper's compute ratio (LoRSU with the CLIP loss against LoRA on
the whole LLaVA) on small configs: meta-device counts equal real ones, and the parts add up."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import benchmark.plugins  # noqa: F401  (the CPU attention kernel's FLOP formulas)

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "strategy_cost.py"


@pytest.fixture(scope="module")
def strategy_cost():
    spec = importlib.util.spec_from_file_location("strategy_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def small_configs():
    """A CLIP (vision 2 layers of width 32 on 28 px, patch 14: 4 tokens; text 2 layers, 16 tokens) and a LLaVA of
    that tower and a 2-layer Llama of width 64."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=16, vocab_size=100, projection_dim=16)
    llama = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4)
    return (CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16),
            LlavaConfig(vision_config=vision, text_config=llama, image_token_index=100))


def test_meta_counts_equal_real_ones_and_lora_on_the_vlm_costs_more(strategy_cost):
    clip, llava = small_configs()
    meta = strategy_cost.paper_shape_flops(clip, llava, prompt_tokens=6, answer_tokens=3, lorsu_rank=4, lora_rank=2)
    with sdpa_kernel(SDPBackend.MATH):  # the attention meta tensors run (the CPU kernel's backward recomputes more)
        real = strategy_cost.paper_shape_flops(clip, llava, prompt_tokens=6, answer_tokens=3, lorsu_rank=4,
                                               lora_rank=2, device="cpu")
    assert meta == real
    assert meta["lorsu"] == meta["lorsu_vision"] + meta["lorsu_text"] and meta["lorsu_text"] > 0
    assert meta["lorsu_text"] < meta["lorsu_forward"] < meta["lorsu"] and meta["lora_vlm_forward"] < meta["lora_vlm"]
    assert meta["lora_vlm"] / meta["lorsu"] > 1
    text = strategy_cost.paper_shape_text(meta)
    assert f"ratio LoRA-F : LoRSU = {meta['lora_vlm'] / meta['lorsu']:.1f}x forward + backward" in text


def test_a_longer_answer_costs_the_vlm_more_and_leaves_lorsu_alone(strategy_cost):
    clip, llava = small_configs()
    short, long = (strategy_cost.paper_shape_flops(clip, llava, prompt_tokens=6, answer_tokens=n, lorsu_rank=4,
                                                   lora_rank=2) for n in (3, 12))
    assert long["lora_vlm"] > short["lora_vlm"] and long["lorsu"] == short["lorsu"]


def test_attention_counts_on_the_cpu_as_its_products_do():
    """torch registers the attention FLOPs of its CUDA kernels only: a CPU count used to leave attention out."""
    q, k, v = (torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    counts = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):  # the CPU's kernel, and the plain products
        with sdpa_kernel(backend), FlopCounterMode(display=False) as counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * (2 * 2 * 3 * 5 * 5 * 8)  # QKᵀ and AV, 2 FLOPs a multiply-add
