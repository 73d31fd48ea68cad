"""``full-ft`` (F-FT): every vision-encoder parameter trains."""
from benchmark.plugins import StrategyPlugin


class FullFineTuning(StrategyPlugin[None]):
    """Full fine-tuning of the vision encoder (text side and logit scale frozen)."""

    supports_ddp = True

    def setup(self, session) -> None:
        self.backbone.visual.requires_grad_(True)
