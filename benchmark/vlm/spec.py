"""``vqa.model`` parsed once: the family and the rest of ``family:rest``, and the family resolved once per process.

Importing this module imports no torch: the config checks a ``vqa.model`` string here
(:func:`parse_vlm`, like :func:`benchmark.backbones.check_backbone_string` for backbones); the
family's module is imported by :func:`resolve_vlm`, the first time a run or the grid check needs it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmark.errors import FsclError
from benchmark.registry import VLMS

if TYPE_CHECKING:
    from benchmark.vlm.base import VLMFamily


class VLMError(FsclError, ValueError):
    """The VLM cannot be loaded, or cannot take the run's encoder; the message says what to change."""


@dataclass(frozen=True)
class VLMSpec:
    """A parsed ``vqa.model``: ``family`` (a :data:`~benchmark.registry.VLMS` name) and ``rest`` (after the colon;
    ``""`` for a bare family name such as ``mini``)."""

    family: str
    rest: str

    def __str__(self) -> str:
        return f"{self.family}:{self.rest}" if self.rest else self.family


def parse_vlm(text: str) -> VLMSpec:
    """``text`` (``family:rest`` or a bare family name) as a :class:`VLMSpec`; :class:`VLMError` for a string that
    names no registered family (:func:`allowed_vlms`). Imports no family module."""
    family, _, rest = text.partition(":") if isinstance(text, str) else ("", "", "")
    if family not in VLMS:
        raise VLMError(f"vqa.model: invalid value {text!r}; allowed: {allowed_vlms(family)}")
    return VLMSpec(family, rest)


def allowed_vlms(family: str = "") -> str:
    """What ``vqa.model`` may be: each registered family's load forms, after a did-you-mean for ``family``."""
    close = difflib.get_close_matches(family, VLMS.names(), n=1) if family else []
    forms = ", ".join(form.split("  ")[0] for entry in VLMS.entries()
                      for form in entry.load_forms or (getattr(entry.obj, "example", entry.name),))
    return (f"(did you mean '{close[0]}'?) " if close else "") + f"a registered VLM family's form: {forms}"


_RESOLVED: dict[VLMSpec, VLMFamily] = {}


def resolve_vlm(spec: VLMSpec | str) -> VLMFamily:
    """The family object of ``spec`` (its class from the registry, bound to ``spec``), made once per process;
    it checks ``spec``'s rest (:class:`VLMError`) and loads nothing."""
    spec = parse_vlm(spec) if isinstance(spec, str) else spec
    if spec not in _RESOLVED:
        _RESOLVED[spec] = VLMS.get(spec.family).obj(spec)
    return _RESOLVED[spec]
