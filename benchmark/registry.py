"""Name → implementation registries for streams, strategies and backbone families.

Our own packages and any outside package register the same way: a decorator in a module,
and that module named in the ``fscl.plugins`` entry-point group so the registry can import
it on first use::

    # my_pkg/my_strategy.py
    from benchmark.registry import STRATEGIES

    @STRATEGIES.register("my-method", options=MyOptions)
    class MyMethod(StrategyPlugin): ...

    # my_pkg's setup.cfg
    [options.entry_points]
    fscl.plugins =
        my_pkg = my_pkg.my_strategy
"""
from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fscl.plugins"
T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unregistered name was asked for; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation."""

    name: str
    obj: T
    options: type | None  # dataclass of the options it accepts (config section `name:`)

    @property
    def summary(self) -> str:
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry(Generic[T]):
    """A named collection filled by decorators and the ``fscl.plugins`` entry points."""

    _plugins_loaded = False

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, options: type | None = None) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` with an optional options dataclass."""

        def decorate(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old.obj is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({old.obj!r}, {obj!r})")
            self._entries[name] = Entry(name, obj, options)
            return obj

        return decorate

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
    """Import the core's backbones and every module of the ``fscl.plugins`` group, once.

    Our own ``streams`` and ``strategies`` packages are in that group too (setup.cfg), so the
    core never imports them by name.
    """
    if Registry._plugins_loaded:
        return
    Registry._plugins_loaded = True
    importlib.import_module("benchmark.backbones")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken third-party plugin must not hide the others
            log.warning("could not load fscl plugin %s (%s): %s", ep.name, ep.value, err)


STREAMS: Registry[Any] = Registry("stream")
STRATEGIES: Registry[Any] = Registry("strategy")
BACKBONES: Registry[Any] = Registry("backbone family")
