"""Strategies: one module (or small package) per method, each an Avalanche plugin."""
from strategies import full_ft, zeroshot  # noqa: F401  (registers the strategies)
