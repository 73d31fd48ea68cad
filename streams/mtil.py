"""``mtil``: MTIL's eleven datasets as a sequence (ZSCL, ICCV 2023), in ZSCL's Order I or II, with ZSCL's class
names and templates (:func:`streams.mtil_texts.mtil_spec`) and, by default, ZSCL's splits (each dataset's option
``split: zscl`` where it has one). Few-shot MTIL is the same stream with ``shots``
(:data:`streams.mtil_texts.MTIL_FS_SHOTS`); full-shot MTIL is ``shots: all``. The presets ``mtil`` and ``mtil-fs``
run it; docs/protocol.md describes the protocol and docs/fidelity.md what differs from ZSCL's code.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from streams.base import Stream, StreamSpec
from streams.mtil_texts import MTIL_DIR, MTIL_ORDERS, mtil_spec
from streams.sampling import Session
from streams.sequence import SequenceStream


class MTIL(SequenceStream):
    """MTIL's eleven datasets as a sequence, ZSCL's orders I and II, texts and splits (Transfer/Avg/Last)."""

    name = "mtil"

    def dataset_names(self) -> list[str]:
        return list(MTIL_ORDERS[self.options.order])

    def default_options(self, options: Any) -> Any:
        """The dataset's default options, with ZSCL's split where it has a choice (unless ``split: suite``)."""
        if hasattr(options, "split"):  # None (a stream without options) has none
            options = dataclasses.replace(options, split=self.options.split)
        return options

    def member_spec(self, name: str, member: Stream) -> StreamSpec:
        """ZSCL's class names and templates of dataset ``name``, in our stream's label order."""
        return mtil_spec(name)

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """The sequence's record; its texts are ZSCL's (the data files of ``streams/data/mtil``)."""
        record = super().data_record(sessions)
        record["texts"]["source"] = f"ZSCL's texts, {MTIL_DIR.name}/<dataset>.yaml of the suite's data files"
        record["texts"]["order"] = self.options.order
        return record
