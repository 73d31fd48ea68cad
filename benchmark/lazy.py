"""Imports deferred to first use, so that ``fscl --help`` and ``fscl ls`` never load torch.

Packages whose modules need torch keep their public names importable from the package
(``from streams import Stream``) through :func:`lazy_exports`, and the registry names its
implementations by ``"module:attr"`` references that :func:`resolve` imports on first use.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def resolve(ref: str) -> Any:
    """The object named by ``"package.module:attr"`` (``attr`` may be dotted), imported now."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r} is not a 'package.module:attr' reference")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: ``exports`` maps each public name to
    the module that defines it, imported when the name is first looked up."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
