"""``fscl data check STREAM --root DIR``: is a stream's data usable, before any GPU hour is spent?

Builds the stream on the root (layout checks), every split (class checks), reports the
images per split, class and session (a stream with its own questions: rows per split and per released
session), decodes every image and lists the first unreadable
ones and the first symbolic links that point to nothing (a run does not see them). The
stream is usable only when no problem was found; each problem is reported once.
A run decodes only the images it uses, so this is the way to find every unreadable file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.registry import STREAMS
from streams.base import LabelledImages, Stream, StreamDataError, unreadable
from streams.files import hidden
from streams.sequence import SequenceSpec


@dataclass
class DataReport:
    """What a check found: report lines, and the problems that make the stream unusable."""

    stream: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        """Add a problem, unless the same one is already reported (e.g. by the other split)."""
        if message not in self.problems:
            self.problems.append(message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        verdict = (f"OK: {self.stream} is usable" if self.ok
                   else f"NOT USABLE: {len(self.problems)} problem(s) with {self.stream}")
        problems = [f"problem: {p}" for p in self.problems]
        return "\n".join([*self.lines, *problems, verdict])


def resolve_data_root(stream: type[Stream], root: Path) -> Path:
    """The data root for ``--root``, which may name the data root or the stream's own folder,
    under our name for it or the released code's (``Stream.released_folders``)."""
    folder = getattr(stream, "folder", None)
    if not isinstance(folder, str):
        return root
    names = [Path(name).parts for name in (folder, *getattr(stream, "released_folders", ()))]
    if any((root.joinpath(*parts)).is_dir() for parts in names):
        return root
    for parts in names:
        if len(root.parts) > len(parts) and root.parts[-len(parts):] == parts:
            return root.parents[len(parts) - 1]
    return root


def check_stream(name: str, root: Path, options: Any = None, sessions: int | None = None, shots: int | None = None,
                 listed: int = 5, progress: bool = False) -> DataReport:
    """Check stream ``name`` on ``root`` (see the module docstring)."""
    entry = STREAMS.get(name)
    report = DataReport(name)
    data_root = resolve_data_root(entry.obj, Path(root))
    try:
        stream = entry.obj(data_root, options)
    except StreamDataError as err:
        report.problem(str(err))
        return report
    report.lines.append(f"stream {name} (data file v{stream.spec.version}) at {stream.root or '(built in)'}")
    try:
        report.lines += [f"{what.replace('_', ' ')} from {path}" for what, path in stream.text_sources().items()]
    except StreamDataError as err:
        report.problem(str(err))
    data: dict[str, LabelledImages] = {}
    for split in stream.splits:
        try:
            data[split] = stream.dataset(split)
        except StreamDataError as err:
            report.problem(str(err))
    links = dangling_links(stream.root) if stream.root is not None else []
    if links:
        shown = "\n  ".join(map(str, links[:listed]))
        report.problem(f"{len(links)} symbolic link(s) under {stream.root} point to nothing (first "
                       f"{min(listed, len(links))}):\n  {shown}\n  (a run leaves them out without a word: restore "
                       "their targets, or remove the links)")
    if not data:
        return report
    groups = stream.spec.session_groups
    sessions = sessions or (len(groups) if groups is not None else 5)  # the fixed groups (a sequence's datasets)
    if stream.spec.own_questions:
        _own_question_sessions(report, stream, data, sessions, shots)
    else:
        _class_table(report, stream, data)
        if "train" in data:
            _sessions(report, stream, data["train"], sessions, shots)
    for split, images in data.items():
        bad = unreadable(images, progress=f"decoding {split}" if progress else "")
        if bad:
            shown = "\n  ".join(message for _, message in bad[:listed])
            report.problem(f"{len(bad)} of {len(images)} {split} images cannot be read (first {min(listed, len(bad))}"
                           f"):\n  {shown}\n  (a run fails when it meets one; with 'skip_bad_images: true' it replaces "
                           "a drawn training image by the next of its class's seeded order and leaves test images "
                           "out, warning and recording both)")
    return report


def dangling_links(root: Path) -> list[Path]:
    """The symbolic links under ``root`` whose target does not exist (hidden entries skipped, as runs do), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not hidden(d)]
        for name in (*dirs, *files):
            path = Path(folder, name)
            if not hidden(name) and path.is_symlink() and not path.exists():
                found.append(path)
    return sorted(found)


def _class_table(report: DataReport, stream: Stream, data: dict[str, LabelledImages]) -> None:
    splits = list(data)
    counts = {split: _per_class(images, len(stream.spec.class_names)) for split, images in data.items()}
    report.lines.append("images: " + ", ".join(f"{split} {len(images)}" for split, images in data.items()))
    report.lines.append(f"{'label':>5}  {'key':<24} " + " ".join(f"{s:>6}" for s in splits) + "  name")
    for label, (key, class_name) in enumerate(zip(stream.spec.keys, stream.spec.class_names)):
        row = " ".join(f"{counts[s][label]:>6}" for s in splits)
        report.lines.append(f"{label:>5}  {key!s:<24} {row}  {class_name}")


def _sessions(report: DataReport, stream: Stream, train: LabelledImages, sessions: int, shots: int | None) -> None:
    try:
        groups = stream.spec.session_classes(sessions)
    except ValueError as err:
        report.problem(str(err))
        return
    per_class = _per_class(train, len(stream.spec.class_names))
    spec = stream.spec
    for i, classes in enumerate(groups, start=1):
        dataset = f" ({spec.datasets[spec.member_of(classes[0])]})" if isinstance(spec, SequenceSpec) else ""
        line = f"session {i}{dataset}: {len(classes)} classes, {sum(per_class[c] for c in classes)} train images"
        short = [c for c in classes if shots is not None and per_class[c] < shots]
        if short:
            line += f"; fewer than {shots} images (all kept): " + ", ".join(stream.spec.class_names[c] for c in short)
        report.lines.append(line)


def _own_question_sessions(report: DataReport, stream: Stream, data: dict[str, LabelledImages], sessions: int,
                           shots: int | None) -> None:
    """Rows per split, and the rows of each released session (for ``shots``, else CL-5's 5, and seed 0)."""
    report.lines.append("rows (one question each): " + ", ".join(f"{split} {len(rows)}" for split, rows in data.items()))
    if "train" not in data:
        return
    try:
        drawn = stream.sessions(sessions, shots or 5, 0)
    except (StreamDataError, ValueError) as err:
        report.problem(str(err))
        return
    for session in drawn:
        groups = ", ".join(stream.spec.class_names[c] for c in session.classes)
        report.lines.append(f"session {session.index} ({groups}): {len(session.ids)} training rows "
                            f"(shots {shots or 5}, seed 0)")


def _per_class(images: LabelledImages, n_classes: int) -> list[int]:
    counts = [0] * n_classes
    for label in images.targets:
        counts[label] += 1
    return counts
