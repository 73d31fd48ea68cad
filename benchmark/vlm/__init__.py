"""The VLM seam: ``vqa.model`` families behind one protocol (:mod:`benchmark.vlm.base`).

A family is a module with a :class:`~benchmark.vlm.base.VLMFamily` and a :class:`~benchmark.vlm.base.LoadedVLM`
subclass, declared in :data:`~benchmark.registry.VLMS` under its ``vqa.model`` prefix (``docs/adding-a-vlm.md``).
Our families are declared here (this package is in the ``fscl.plugins`` entry-point group); importing it
imports no torch. ``vqa.model`` is parsed and resolved by :mod:`benchmark.vlm.spec`.
"""
from benchmark.registry import VLMS

VLMS.declare(
    "llava", "benchmark.vlm.llava:LlavaFamily",
    summary="LLaVA-1.5 (LlavaForConditionalGeneration): a CLIP ViT tower read at its penultimate layer; the paper's VLM.",
    load_forms=("llava:/path/to/folder  (save_pretrained of the model and its processor, e.g. llava-hf/llava-1.5-7b-hf)",
                "llava:org/hub-id  (needs the hub, or HF_HUB_OFFLINE=1 and the local cache)"))
VLMS.declare(
    "paligemma", "benchmark.vlm.paligemma:PaliGemmaFamily",
    summary="PaliGemma (PaliGemmaForConditionalGeneration): a SigLIP tower trained with its Gemma, prefix-LM prompt.",
    load_forms=("paligemma:/path/to/folder  (save_pretrained of the model and its processor, e.g. "
                "google/paligemma-3b-mix-224)",
                "paligemma:org/hub-id  (needs the hub, or HF_HUB_OFFLINE=1 and the local cache)"))
PAPER_VLM = "llava:/path/to/llava-1.5-7b-hf"  # the paper's VLM, saved where there is internet
PAPER_VLM_HUB = "llava:llava-hf/llava-1.5-7b-hf"
