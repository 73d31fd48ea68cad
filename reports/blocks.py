"""The blocks a report is made of (a heading, a paragraph, a table, a figure), rendered to Markdown and HTML by
:mod:`reports.report`; the report's sections (:mod:`reports.ablation` among them) build lists of them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reports.tables import TextTable


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph in the Markdown subset both renderers share: **bold**, *italic* and `code`."""

    text: str


@dataclass(frozen=True)
class Table:
    table: TextTable


@dataclass(frozen=True)
class Image:
    png: Path
    caption: str


Block = Heading | Text | Table | Image
