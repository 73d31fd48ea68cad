"""``zeroshot``: no update; the pretrained model, the reference row of every table."""
from benchmark.plugins import StrategyPlugin


class ZeroShot(StrategyPlugin[None]):
    """No training: the pretrained encoder evaluated after every session."""

    trains = False
    supports_ddp = True
