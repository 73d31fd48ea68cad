"""Strategies: one module (or small package) per method, each an Avalanche plugin."""
from strategies import ewc, full_ft, layernorm, lora, lorsu, spu, zeroshot  # noqa: F401  (registers the strategies)
