"""Registries: decorator registration, unknown names, entry-point plugins."""
import argparse
from collections import OrderedDict
from dataclasses import fields

import pytest

from benchmark.config import TrainConfig
from benchmark.registry import BACKBONES, STRATEGIES, STREAMS, Registry, UnknownNameError


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(UnknownNameError) as err:
        STRATEGIES.get("zero-shot")
    message = str(err.value)
    assert "Did you mean 'zeroshot'?" in message and "full-ft" in message


def test_register_and_reject_a_second_object_under_one_name():
    registry: Registry = Registry("widget")

    @registry.register("a")
    class A:
        """An A."""

    assert registry.get("a").obj is A and registry.get("a").summary == "An A."
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(type("B", (), {}))


def test_our_packages_register_through_the_entry_point_group():
    from importlib.metadata import entry_points

    # missing entries: the installed metadata is older than setup.cfg; run `pip install -e .` again
    assert {ep.value for ep in entry_points(group="fscl.plugins")} >= {"benchmark.backbones", "streams", "strategies"}
    assert {ep.name for ep in entry_points(group="fscl.commands")} >= {"report", "demo", "data", "pretrain-mini"}
    assert "digits" in STREAMS.names() and "mini" in BACKBONES.names()


def test_a_declared_entry_imports_its_implementation_on_first_access():
    registry: Registry = Registry("widget")
    registry.declare("od", "collections:OrderedDict", options="argparse:Namespace", summary="Ordered.")
    entry = registry.get("od")
    assert (entry.summary, entry.ref) == ("Ordered.", "collections:OrderedDict")
    assert entry.obj is OrderedDict and entry.options is argparse.Namespace
    registry.declare("od", "collections:OrderedDict", summary="Ordered.")  # the same again: no conflict
    with pytest.raises(ValueError, match="registered twice"):
        registry.declare("od", "collections:Counter", summary="Counts.")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("od")(dict)


@pytest.mark.parametrize("registry", [STRATEGIES, STREAMS, BACKBONES], ids=lambda r: r.kind)
def test_declarations_agree_with_the_implementations(registry):
    """Each declared summary is its class's first docstring line; every option has a help text."""
    for entry in registry.entries():
        doc = (entry.obj.__doc__ or "").strip().splitlines()
        assert doc and entry.summary == doc[0], entry.name
        if entry.options is not None:
            for f in fields(entry.options):
                assert f.metadata.get("help"), f"{entry.name}.{f.name} has no help text"


def test_train_keys_have_help_texts():
    assert all(f.metadata.get("help") for f in fields(TrainConfig))
