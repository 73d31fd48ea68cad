"""``layernorm`` (LN): only the vision encoder's normalisation layers train."""
from benchmark.plugins import StrategyPlugin


class LayerNormTuning(StrategyPlugin[None]):
    """LayerNorm weights and biases of the vision encoder (blocks, pre/post norms)."""

    supports_ddp = True

    def setup(self, session) -> None:
        for norm in self.backbone.norm_layers():
            norm.requires_grad_(True)
