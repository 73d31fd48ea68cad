"""Strategies: one module (or small package) per method, each a plugin on a training template (the CLIP one, or
the VLM one for the ``*-ppl`` strategies).

Declared here by name, so that ``fscl ls`` and config checks know them without importing
torch; a strategy's module is imported when a run first asks for it. Options: :mod:`strategies.options`.
"""
from benchmark.registry import STRATEGIES

STRATEGIES.declare("zeroshot", "strategies.zeroshot:ZeroShot",
                   summary="No training: the pretrained encoder evaluated after every session.")
STRATEGIES.declare("full-ft", "strategies.full_ft:FullFineTuning",
                   summary="Full fine-tuning of the vision encoder (text side and logit scale frozen).")
STRATEGIES.declare("ewc", "strategies.ewc:EWC", options="strategies.options:EWCOptions",
                   summary="F-EWC: every vision-encoder parameter + the EWC penalty of the previous sessions.")
STRATEGIES.declare("layernorm", "strategies.layernorm:LayerNormTuning",
                   summary="LayerNorm weights and biases of the vision encoder (blocks, pre/post norms).")
STRATEGIES.declare("lora", "strategies.lora:LoRA", options="strategies.options:LoRAOptions",
                   summary="LoRA on all vision linears, attention projections and the image projection; "
                           "one adapter or one per session.")
STRATEGIES.declare("spu", "strategies.spu:SPU", options="strategies.options:SPUOptions",
                   summary="SPU: sparse fc1 entries by score + dense fc1 biases (or all biases) + the image projection.")
STRATEGIES.declare("lorsu", "strategies.lorsu:LoRSU", options="strategies.options:LoRSUOptions",
                   summary="LoRSU: sparse fc1 + low-rank updates of the most important heads, merged after each session.")
STRATEGIES.declare("lorsu-ppl", "strategies.lorsu:LoRSUPpl", options="strategies.options:LoRSUPplOptions",
                   summary="LoRSU-Ppl: LoRSU trained with LLaVA's answer loss (needs vqa.model), blocks 0..L-2.")
STRATEGIES.declare("lora-ppl", "strategies.lora:LoRAPpl", options="strategies.options:LoRAPplOptions",
                   summary="LoRA-Ppl: LoRA trained with LLaVA's answer loss (needs vqa.model), blocks 0..L-2.")
STRATEGIES.declare("lora-llm", "strategies.llm:LLMLoRA", options="strategies.options:LLMLoRAOptions",
                   summary="LoRA on every linear of every language-model layer of the VLM (needs vqa.model); "
                           "encoder frozen.")
STRATEGIES.declare("lora-llm-last", "strategies.llm:LLMLastLoRA", options="strategies.options:LLMLastLoRAOptions",
                   summary="LoRA on every linear of the last last_layers language-model layers of the VLM "
                           "(needs vqa.model).")
STRATEGIES.declare("lora-vlm", "strategies.llm:LoRAVLM", options="strategies.options:LoRAVLMOptions",
                   summary="LoRA on the whole VLM (needs vqa.model): the encoder, the projector, every "
                           "language-model layer, the head.")
STRATEGIES.declare("lorsu-llm", "strategies.lorsu_llm:LoRSULLM", options="strategies.options:LoRSULLMOptions",
                   summary="LoRSU on the last last_layers language-model layers of the VLM (needs vqa.model): top "
                           "heads' q/k/v, sparse up_proj.")
STRATEGIES.declare("lwf", "strategies.lwf:LwF", options="strategies.options:LwFOptions",
                   summary="LwF: every vision parameter + distillation toward the encoder at the session's start.")
STRATEGIES.declare("wise-ft", "strategies.wise_ft:WiSEFT", options="strategies.options:WiSEFTOptions",
                   summary="WiSE-FT: full fine-tuning, the encoder interpolated with an anchor after each session.")
STRATEGIES.declare("zscl", "strategies.zscl:ZSCL", options="strategies.options:ZSCLOptions",
                   summary="ZSCL: full fine-tuning + reference distillation toward the pretrained encoder + l2 + "
                           "weight ensemble.")
STRATEGIES.declare("replay", "strategies.replay:Replay", options="strategies.options:ReplayOptions",
                   summary="Replay: full fine-tuning on the session's shots + Avalanche's buffer of earlier "
                           "sessions' shots.")
STRATEGIES.declare("moe-adapters", "strategies.moe_adapters:MoEAdapters", options="strategies.options:MoEAdaptersOptions",
                   summary="MoE-Adapters4CL: routed adapter experts in every vision block, activate-freeze, and DDAS "
                           "at evaluation.")
