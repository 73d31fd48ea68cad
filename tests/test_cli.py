"""The command line: verbs from the entry points, help and listings without torch, option listings."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import EXPORT_FORMATS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "avalanche", "open_clip", "transformers", "peft"}
VERBS = ["run", "tune", "ls", "export", "data", "demo", "pretrain-mini", "report", "vqa"]


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if a.dest == "verb"]
    return action.choices


def test_the_verbs_are_the_core_ones_then_those_of_the_entry_points():
    assert list(_verb_parsers()) == VERBS


@pytest.mark.parametrize("argv", [
    ["--help"], *([verb, "--help"] for verb in VERBS), ["data", "check", "--help"], ["vqa", "build", "--help"],
    ["ls", "strategies", "-v"], ["ls", "streams", "-v"], ["ls", "backbones"], ["ls", "train", "-v"], ["ls", "presets"],
    ["ls", "presets", "-v"],
], ids=" ".join)
def test_help_and_listings_import_no_torch(argv):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "benchmark", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not heavy, f"fscl {' '.join(argv)} imported {heavy[:5]}"
    assert done.stdout.strip()


def test_ls_verbose_prints_every_option_with_type_default_and_help(capsys):
    assert main(["ls", "strategies", "-v"]) == 0
    out = capsys.readouterr().out
    assert "    lorsu.top_k_heads: int = 2\n        attention heads updated per block" in out
    assert '    lora.init: released | peft = "released"\n' in out
    assert main(["ls", "streams", "-v"]) == 0
    out = capsys.readouterr().out
    assert '    tsi.captions: bool | str = "auto"\n' in out and "    imagefolder.split_seed: int = 0\n" in out
    assert main(["ls", "strategies"]) == 0
    assert "lorsu.top_k_heads" not in capsys.readouterr().out


def test_ls_presets_verbose_gives_each_presets_one_line_summary(capsys):
    from benchmark.config import list_presets

    assert main(["ls", "presets", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert re.search(r"^quick +The small offline smoke benchmark: real handwritten digits, an untrained tiny open_clip "
                     r"model, 2 sessions, 2 seeds\.$", "\n".join(lines), re.M)
    assert any(line.startswith("paper-cl5 ") and line.endswith("with OpenAI's ViT-L/14-336.") for line in lines)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every preset has one
    assert main(["ls", "presets"]) == 0
    assert capsys.readouterr().out.split() == list_presets()


def test_ls_train_lists_the_training_keys():
    from dataclasses import fields

    from benchmark.config import TrainConfig

    done = subprocess.run([sys.executable, "-m", "benchmark", "ls", "train", "-v"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True)
    assert "    train.epochs: int = 5\n        passes over each session's training data\n" in done.stdout
    assert re.findall(r"^    train\.(\w+):", done.stdout, re.M) == [f.name for f in fields(TrainConfig)]


def test_export_formats_are_the_writers():
    from benchmark.export import FORMATS

    assert EXPORT_FORMATS == FORMATS


def test_readme_lists_every_verb_and_ls_target():
    using = REPO.joinpath("README.md").read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    for verb in VERBS:
        assert f"fscl {verb}" in using, verb
    (ls,) = [a for a in _verb_parsers()["ls"]._actions if a.dest == "what"]
    assert f"fscl ls {{{','.join(ls.choices)}}} [-v]" in using
