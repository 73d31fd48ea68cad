"""Data streams: one module per stream (spec data + on-disk loader), sampling, the mini world."""
from streams import (  # noqa: F401  (the paper's data)
    aircraft,
    controls,
    counteranimal,
    dalle,
    digits,  # noqa: F401  (registers the stream)
    eurosat,
    gtsrb,
    mini,  # noqa: F401  (the mini world's streams and the `mini` backbone family)
    tsi,
)
from streams.base import LabelledImages, Stream, StreamDataError, StreamSpec
from streams.sampling import FewShotSampler, Session

__all__ = ["FewShotSampler", "LabelledImages", "Session", "Stream", "StreamDataError", "StreamSpec"]
