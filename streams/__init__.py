"""Data streams: one module per stream (spec data + on-disk loader), sampling, the mini world."""
from streams import digits  # noqa: F401  (registers the stream)
from streams import mini  # noqa: F401  (the mini world's streams and the `mini` backbone family)
from streams import aircraft, controls, counteranimal, dalle, eurosat, gtsrb, tsi  # noqa: F401  (the paper's data)
from streams.base import LabelledImages, Stream, StreamDataError, StreamSpec
from streams.sampling import FewShotSampler, Session

__all__ = ["FewShotSampler", "LabelledImages", "Session", "Stream", "StreamDataError", "StreamSpec"]
