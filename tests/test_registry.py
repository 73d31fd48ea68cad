"""Registries: decorator registration, unknown names, entry-point plugins."""
import pytest

from benchmark.registry import STRATEGIES, Registry, UnknownNameError


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

    assert {ep.value for ep in entry_points(group="fscl.plugins")} >= {"streams", "strategies"}
    assert "digits" in __import__("benchmark.registry", fromlist=["STREAMS"]).STREAMS.names()
