"""Faults met while running (issue 22): file names that are not UTF-8, an unusable cache folder, a
damaged summary, a full disk, Ctrl-C, the stage a failure is met in.

Real image files in real layouts (the ``write_*`` builders of ``test_streams_layouts``), the real
``fscl`` command line, the tiny open_clip model; nothing touches the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_streams_layouts import write_eurosat

from benchmark.cli import main

RUN = ("run", "quick", "stream=eurosat", "strategy=full-ft", "seed=0", "sessions=2", "train.epochs=1",
       "--no-progress")


def _non_utf8_forest(root: Path) -> list[bytes]:
    """EuroSAT, 10 images a class, whose Forest images are renamed to names holding the byte 0xE9 (not UTF-8)."""
    write_eurosat(root, per_class=10)
    forest = os.fsencode(root / "eurosat" / "2750" / "Forest")
    for name in os.listdir(forest):
        os.rename(os.path.join(forest, name), os.path.join(forest, name[:-4] + b"\xe9.jpg"))
    return sorted(os.listdir(forest))


def test_file_names_that_are_not_utf8_are_checked_and_run(tmp_path, capsys):
    names = _non_utf8_forest(tmp_path / "data")
    assert main(["data", "check", "eurosat", "--root", str(tmp_path / "data"), "--no-progress"]) == 0
    assert "OK: eurosat is usable" in capsys.readouterr().out
    assert main([*RUN, f"data_root={tmp_path / 'data'}", f"out={tmp_path / 'runs'}"]) == 0, capsys.readouterr().err
    run = next((tmp_path / "runs").glob("quick/eurosat/*/full-ft/5-s0"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    drawn = [i for ids in json.loads((run / "samples.json").read_text()).values() for i in ids if "Forest" in i]
    # the undecodable byte is written as \xe9 in the sample ids (valid Unicode in every JSON file)
    assert drawn and all(i.endswith("\\xe9.jpg") for i in drawn)
    assert {f"2750/Forest/{n[:-5].decode()}\\xe9.jpg" for n in names} >= set(drawn)
    split = json.loads((run / "splits.json").read_text())["eurosat"]
    assert sum("Forest" in i for part in split.values() for i in part) == len(names)
