"""Name → implementation registries for streams, strategies, backbone families and VLM families.

An entry names its implementation, its options dataclass (the config section ``name:``) and a
one-line summary. A package *declares* its entries by ``"module:attr"`` references, so that
names, summaries and option schemas (``fscl ls -v``) are known without importing the
implementations, which need torch; :attr:`Entry.obj` imports on first access::

    # my_pkg/__init__.py (keep it light: nothing at module level imports torch)
    from benchmark.registry import STRATEGIES

    STRATEGIES.declare("my-method", "my_pkg.method:MyMethod", options="my_pkg.options:MyOptions",
                       summary="One line for `fscl ls strategies`.")

A module may instead register a class with the decorator, which imports it when the registry
is first used::

    # my_pkg/method.py
    @STRATEGIES.register("my-method", options=MyOptions)
    class MyMethod(StrategyPlugin):
        \"\"\"One line for `fscl ls strategies`.\"\"\"

Either way, name that module in your package's ``fscl.plugins`` entry-point group; the
registry imports the group on first use. Our own ``benchmark.backbones``, ``benchmark.vlm``, ``strategies`` and
``streams`` are in it too (setup.cfg), so the core never imports them by name::

    # my_pkg's setup.cfg
    [options.entry_points]
    fscl.plugins =
        my_pkg = my_pkg
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from benchmark.errors import FsclError
from benchmark.lazy import resolve

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fscl.plugins"
T = TypeVar("T")


class UnknownNameError(FsclError, KeyError):
    """An unregistered name was asked for; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Entry(Generic[T]):
    """One registered implementation; :attr:`obj` and :attr:`options` are imported on first access."""

    name: str
    target: str | T  # the implementation (a class), or its "module:attr"
    options_target: str | type | None = None  # its options dataclass, or that class's "module:attr"
    summary: str = ""  # one line, for `fscl ls`
    load_forms: tuple[str, ...] = ()  # backbone families: the forms of their load strings
    known_tags: tuple[str, ...] = ()  # backbone families: load strings of known pretrained weights

    @cached_property
    def obj(self) -> T:
        """The implementation."""
        return resolve(self.target) if isinstance(self.target, str) else self.target

    @cached_property
    def options(self) -> type | None:
        """The dataclass of the options it accepts (config section ``name:``), or None."""
        target = self.options_target
        return resolve(target) if isinstance(target, str) else target

    @property
    def ref(self) -> str:
        """``"module:attr"`` of the implementation: two entries of one name must agree on it."""
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"


class Registry(Generic[T]):
    """A named collection filled by declarations, decorators and the ``fscl.plugins`` entry points."""

    _plugins_loaded = False

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def declare(self, name: str, target: str, *, options: str | None = None, summary: str,
                load_forms: tuple[str, ...] = (), known_tags: tuple[str, ...] = ()) -> None:
        """Register the implementation at ``target`` (``"module:attr"``) without importing it."""
        self._add(Entry(name, target, options, summary, load_forms, known_tags))

    def register(self, name: str, *, options: type | None = None) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` with an optional options dataclass."""

        def decorate(obj: T) -> T:
            doc = (getattr(obj, "__doc__", None) or "").strip()
            self._add(Entry(name, obj, options, doc.splitlines()[0] if doc else ""))
            return obj

        return decorate

    def _add(self, entry: Entry[T]) -> None:
        old = self._entries.get(entry.name)
        if old is not None and old.ref != entry.ref:
            raise ValueError(f"{self.kind} '{entry.name}' is registered twice ({old.ref}, {entry.ref})")
        self._entries[entry.name] = entry

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name``; unknown names raise with the known names and a suggestion."""
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(known) or '(none)'}."

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]


def load_plugins() -> None:
    """Import every module of the ``fscl.plugins`` entry-point group, once."""
    if Registry._plugins_loaded:
        return
    Registry._plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken third-party plugin must not hide the others
            log.warning("could not load fscl plugin %s (%s): %s", ep.name, ep.value, err)


STREAMS: Registry[Any] = Registry("stream")
STRATEGIES: Registry[Any] = Registry("strategy")
BACKBONES: Registry[Any] = Registry("backbone family")
# vqa.model families (benchmark.vlm, streams.mini's `mini`): each a benchmark.vlm.base.VLMFamily subclass
VLMS: Registry[Any] = Registry("VLM family")
