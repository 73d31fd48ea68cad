"""Sequence streams: a stream whose sessions are whole datasets, MTIL's protocol (ZSCL, ICCV 2023).

Session ``i`` trains dataset ``i`` of the sequence (every class of it, ``shots`` per class or ``shots: all``), and
after every session each dataset of the sequence is evaluated task-incrementally: its test images among its own
classes, in its own templates (the run's accuracy matrix ``R[t, i]``, :mod:`benchmark.metrics`, from which
Transfer, Avg and Last are computed). A sequence is one registered stream to the rest of the suite:

- labels are global: dataset ``i``'s local label ``y`` is ``offsets[i] + y`` (:class:`SequenceSpec`); training
  ids are ``<dataset>/<its id>``;
- its sessions are fixed (one per dataset: ``sessions`` must be the number of datasets), drawn by the suite's
  few-shot sampler from each dataset's training split; ``session_order: seed`` permutes them per run;
- a training image's captions are its dataset's training template (the first of its templates, as ZSCL trains)
  with its class name (:meth:`SequenceSpec.captions`).

``sequence`` takes its datasets from its options (any registered streams with a training split, built with their
default options); ``mini-mtil`` is the mini world's five datasets; ``mtil`` (:mod:`streams.mtil`) the eleven of
MTIL in ZSCL's orders with ZSCL's texts.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from benchmark.registry import STREAMS
from benchmark.stream import SessionTest
from streams.base import LabelledImages, Split, Stream, StreamDataError, StreamSpec
from streams.sampling import Session


@dataclass(frozen=True)
class SequenceSpec(StreamSpec):
    """The spec of a sequence: every dataset's classes one after the other (``class_names``), one session group per
    dataset (``session_groups``), and each dataset's own spec (``members``, in the sequence's order)."""

    datasets: tuple[str, ...] = ()
    members: tuple[StreamSpec, ...] = ()
    offsets: tuple[int, ...] = ()  # the first global label of each dataset

    @classmethod
    def of(cls, name: str, datasets: Sequence[str], members: Sequence[StreamSpec]) -> SequenceSpec:
        offsets, names = [], []
        for spec in members:
            offsets.append(len(names))
            names += spec.class_names
        groups = tuple(tuple(range(o, o + len(s.class_names))) for o, s in zip(offsets, members))
        return cls(name=name, version=1, class_names=tuple(names), templates=("{}",),
                   class_order=tuple(range(len(names))), session_groups=groups, datasets=tuple(datasets),
                   members=tuple(members), offsets=tuple(offsets))

    def member_of(self, label: int) -> int:
        """The position in the sequence of the dataset of global ``label``."""
        return bisect.bisect_right(self.offsets, label) - 1

    def captions(self, label: int) -> list[str]:
        """One training caption: the class name in its dataset's first template (ZSCL's training template)."""
        member = self.members[self.member_of(label)]
        return [member.templates[0].format(self.class_names[label])]


class _MemberLoad:
    """Decodes ``(dataset position, item)`` with that dataset's own loader (picklable for loader workers)."""

    def __init__(self, loads: Sequence[Any]) -> None:
        self.loads = tuple(loads)

    def __call__(self, item: tuple[int, Any]):
        return self.loads[item[0]](item[1])


class SequenceStream(Stream):
    """A stream whose sessions are whole datasets (see the module docstring). Subclasses name the datasets
    (:meth:`dataset_names`) and may give a dataset other texts than its own stream's (:meth:`member_spec`)."""

    name: ClassVar[str] = "sequence"  # its registered name (messages, its spec's name, evaluation keys)
    layout: ClassVar[str] = "the layouts of its datasets (fscl ls streams -v)"

    def __init__(self, data_root: str | Path, options: Any = None, *, skip_bad_images: bool = False) -> None:
        super().__init__(data_root, options, skip_bad_images=skip_bad_images)
        names = self.dataset_names()  # at least two distinct registered streams (SequenceOptions checks a user's)
        self.members: list[Stream] = []
        for name in names:
            entry = STREAMS.get(name)
            if issubclass(entry.obj, SequenceStream):
                raise StreamDataError(f"{self.name}: dataset {name!r} is itself a sequence; allowed: datasets")
            self._check_session(name, entry.obj)
            try:
                member = entry.obj(data_root, self.member_options(name), skip_bad_images=skip_bad_images)
            except StreamDataError as err:
                raise StreamDataError(f"{self.name}: its dataset {name!r} cannot be read: {err}") from err
            self._check_session(name, member)
            self.members.append(member)
        self.spec = SequenceSpec.of(self.name, names, [self.member_spec(n, m) for n, m in zip(names, self.members)])
        self._splits: dict[Split, LabelledImages] = {}

    def _check_session(self, name: str, stream: Any) -> None:
        """Refuse a dataset (its stream class, or the stream built) that cannot be a session: one without a
        training split (a control-only stream) or with its own questions (no classes to evaluate among)."""
        splits, spec = getattr(stream, "splits", ()), getattr(stream, "spec", None)
        if (isinstance(splits, tuple) and "train" not in splits) or getattr(spec, "own_questions", False):
            raise StreamDataError(f"{self.name}: dataset {name!r} cannot be a session (a control-only stream or one "
                                  "with its own questions); allowed: streams of labelled classes with a training split")

    def dataset_names(self) -> list[str]:
        """The datasets of the sequence, in their released order (session 1 trains the first)."""
        return list(self.options.datasets)

    def member_options(self, name: str) -> Any:
        """The options dataset ``name`` is built with: its stream's defaults, with the sequence's
        ``dataset_options`` of it."""
        options = STREAMS.get(name).options
        default = self.default_options(options() if options is not None else None)
        return default if self.options is None else self.options.of(name, default)

    def default_options(self, options: Any) -> Any:
        """A dataset's options before the user's ``dataset_options``: ``options``, its stream's defaults."""
        return options

    def member_spec(self, name: str, member: Stream) -> StreamSpec:
        """The class names and templates of dataset ``name`` in the sequence: its own stream's."""
        return member.spec

    def listed(self, split: Split) -> LabelledImages:
        """Every dataset's ``split`` one after the other: global labels, ids ``<dataset>/<id>``."""
        if split not in self._splits:
            parts = [self._member_split(name, member, split) for name, member in zip(self.spec.datasets, self.members)]
            items, targets, ids = [], [], []
            for i, (name, part, offset) in enumerate(zip(self.spec.datasets, parts, self.spec.offsets)):
                items += [(i, item) for item in part.items]
                targets += [offset + t for t in part.targets]
                ids += [f"{name}/{sid}" for sid in part.ids]
            self._splits[split] = LabelledImages(items, targets, ids, _MemberLoad([p.load for p in parts]))
        return self._splits[split]

    def _member_split(self, name: str, member: Stream, split: Split) -> LabelledImages:
        """Dataset ``name``'s listed ``split``; a problem reading it names the dataset and where its options go."""
        try:
            return member.listed(split)
        except (StreamDataError, RuntimeError) as err:
            raise StreamDataError(f"{self.name}: its dataset {name!r}: {err}\n(the options of a sequence's dataset go "
                                  f"under {self.name}.dataset_options, e.g. {self.name}.dataset_options="
                                  f"{{{name}: {{key: value}}}})") from err

    def dataset(self, split: Split) -> LabelledImages:
        return self.usable(split)

    def session_eval_of(self, test: LabelledImages, session: Session) -> SessionTest:
        """The session's dataset: its test images among its own classes (local labels), in its own templates."""
        member = self.spec.member_of(session.classes[0])
        spec, offset = self.spec.members[member], self.spec.offsets[member]
        images = self.session_test(test, session)
        return SessionTest(f"{self.name}:{self.spec.datasets[member]}", spec.class_names, spec.templates,
                           images.with_targets([t - offset for t in images.targets]))

    def session_datasets(self, sessions: Sequence[Session]) -> list[str] | None:
        return [self.spec.datasets[self.spec.member_of(s.classes[0])] for s in sessions]

    def data_record(self, sessions: Sequence[Session] | None = None) -> dict[str, Any]:
        """The sequence's record (:meth:`Stream.data_record`: the unreadable images it left out or replaced, it
        being what decodes them), its texts those of its datasets, each under its name."""
        record = super().data_record(sessions)
        record["texts"] = {"version": self.spec.version, "datasets": list(self.spec.datasets),
                           **{name: member.data_record().get("texts", {})
                              for name, member in zip(self.spec.datasets, self.members)}}
        return record


class Datasets(SequenceStream):
    """Any datasets as a sequence, one per session, each evaluated among its own classes (MTIL's protocol).

    Its datasets come from its options (``sequence: {datasets: [...]}``), in that order."""


class MiniMTIL(SequenceStream):
    """The mini world's five datasets as a sequence (shapes, colours, digits, handwritten, signs).

    Its datasets take their default options (no ``dataset_options``)."""

    name = "mini-mtil"
    DATASETS: ClassVar[tuple[str, ...]] = ("mini-shapes", "mini-colours", "mini-digits", "mini-handwritten",
                                           "mini-signs")

    def dataset_names(self) -> list[str]:
        return list(self.DATASETS)
