"""The worked example of docs/adding-a-strategy.md: ``examples/fscl_l2sp``, an outside package
that adds the ``l2sp`` strategy through the ``fscl.plugins`` entry point, run as a user runs it.

The package is not installed: a ``*.dist-info`` folder holding its entry point, on PYTHONPATH
beside its package, makes ``importlib.metadata`` see it in subprocesses only, so this test
process's registry never holds ``l2sp``. No network: the tiny offline model and the digits stream.
"""
from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "fscl_l2sp"
MODULES = (EXAMPLE / "fscl_l2sp" / "__init__.py", EXAMPLE / "fscl_l2sp" / "strategy.py")
PYPROJECT = EXAMPLE / "pyproject.toml"
DOC = ROOT / "docs/adding-a-strategy.md"
RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"
# one batch per session, three epochs, no warm-up: three Adam steps per session at a learning rate
# that moves the weights; an alpha large enough that the penalty dominates once they moved
SETTINGS = ("quick", "--no-progress", "seed=0", "sessions=2", "train.epochs=3", "train.warmup_steps=0",
            "l2sp.alpha=10000", "keep_checkpoints=all")
COST_FIELDS_THAT_VARY = {"train_seconds", "peak_memory_mb", "setup_seconds"}  # wall time and memory
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def _entry_points() -> dict[str, str]:
    """The ``fscl.plugins`` entries of the example's pyproject.toml (name → module)."""
    section = PYPROJECT.read_text().split('[project.entry-points."fscl.plugins"]\n', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"$', section, re.M))


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a user who installed the example package (its dist-info on PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    info = site / "fscl_l2sp-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fscl-l2sp\nVersion: 0.1.0\n")
    entries = _entry_points()
    assert entries == {"l2sp": "fscl_l2sp"}
    (info / "entry_points.txt").write_text("[fscl.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    path = [str(site), str(EXAMPLE), *filter(None, [os.environ.get("PYTHONPATH")])]
    # a tiny model gains nothing from more threads, and on a shared machine they spin idle
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def fscl(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m benchmark ARGS`` in a subprocess (the ``fscl`` command)."""
    return subprocess.run([sys.executable, "-m", "benchmark", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(user_env, tmp_path_factory) -> Path:
    """``full-ft`` and ``l2sp`` on the same data, seed and recipe, every session's checkpoint kept."""
    out = tmp_path_factory.mktemp("user") / "runs"
    done = fscl(user_env, "run", *SETTINGS, "strategy=[full-ft,l2sp]", f"out={out}", cwd=out.parent)
    assert done.returncode == 0, done.stderr
    assert "2 finished" in done.stdout
    return out


def _encoder(run: Path, session: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"session-{session}.pt", weights_only=False)["encoder"]


def _comparable_summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    for session in summary["costs"]["sessions"]:
        for key in COST_FIELDS_THAT_VARY:
            session.pop(key)
    return summary


def test_the_doc_shows_the_example_files_as_they_are():
    modules, pyproject = [m.read_text() for m in MODULES], PYPROJECT.read_text()
    blocks = FENCE.findall(DOC.read_text())
    python = [code for lang, code in blocks if lang == "python"]
    assert all(python.count(module) == 1 for module in modules)  # each whole module, once
    for code in python:  # and the steps that build them: excerpts of them, as they are
        assert any(code in module for module in modules), f"this block of {DOC.name} is in no module:\n{code}"
    assert [code for lang, code in blocks if lang == "toml"] == [pyproject]


def test_the_example_uses_only_public_names_and_is_not_part_of_the_distribution():
    trees = [ast.parse(m.read_text()) for m in MODULES]
    imported = [(node.module, alias.name) for tree in trees for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names]
    assert ("benchmark.registry", "STRATEGIES") in imported and ("benchmark.plugins", "StrategyPlugin") in imported
    private = [name for module, name in imported if name.startswith("_") and module != "__future__"]
    private += [node.attr for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not private
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = setup["options"]["packages"].split()
    assert not [p for p in packages if p.split(".")[0] in ("examples", "fscl_l2sp")]
    assert "find:" not in packages


def test_fscl_ls_lists_the_strategy_of_the_installed_package(user_env, tmp_path):
    done = fscl(user_env, "ls", "strategies", "-v", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "could not load" not in done.stderr
    assert re.search(r"^l2sp +L2-SP: every vision-encoder parameter", done.stdout, re.M)
    assert "l2sp.alpha" in done.stdout and "weight α of the penalty" in done.stdout  # the options' help


def test_the_installed_package_keeps_fscl_ls_free_of_torch(user_env, tmp_path):
    """Its entry module declares the strategy: listing it imports no torch (the class's module is not imported)."""
    code = ("import sys\nfrom benchmark.cli import main\nassert main(['ls', 'strategies']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fscl_l2sp', 'torch', 'avalanche')))\n")
    done = subprocess.run([sys.executable, "-c", code], env=user_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and re.search(r"^l2sp +L2-SP", done.stdout, re.M), done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "['fscl_l2sp']"


def test_an_invalid_option_is_refused_before_any_work(user_env, tmp_path):
    done = fscl(user_env, "run", "quick", "strategy=l2sp", "l2sp.alpha=-1", f"out={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert "l2sp.alpha: invalid value -1" in done.stderr and "a float >= 0" in done.stderr
    assert not any(tmp_path.iterdir())


def test_l2sp_runs_and_holds_the_encoder_near_its_start(runs, tiny_backbone):
    for strategy in ("full-ft", "l2sp"):
        run = runs / RUN.format(strategy)
        assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
        matrix = (run / "matrix.csv").read_text().splitlines()
        assert matrix[0].startswith("session,digits") and len(matrix) == 1 + 3  # before training, 2 sessions
    summary = json.loads((runs / RUN.format("l2sp") / "summary.json").read_text())
    assert summary["sessions"] == 2
    assert all(s["trainable"] == summary["costs"]["visual_parameters"] for s in summary["costs"]["sessions"])

    start = dict(tiny_backbone.visual.named_parameters())  # the pretrained encoder (seeded)

    def drift(strategy: str) -> float:
        final = _encoder(runs / RUN.format(strategy), 2)
        return sum(float((final[n].float() - p.detach().float()).square().sum()) for n, p in start.items()) ** 0.5

    assert drift("full-ft") > 0
    assert drift("l2sp") < 0.25 * drift("full-ft")  # measured: about 0.12

    # θ⁰ is saved with every session, and it is the pretrained encoder, not the weights after session 1
    saved = torch.load(runs / RUN.format("l2sp") / "checkpoints" / "session-1.pt", weights_only=False)
    anchor = saved["strategy"]["start"]
    assert len(anchor) == len(start)
    assert all(torch.equal(a, p.detach().float()) for a, p in zip(anchor, start.values()))
    assert not all(torch.equal(saved["encoder"][n], p) for n, p in start.items())


def test_an_interrupted_l2sp_run_resumes_to_the_numbers_of_an_uninterrupted_run(runs, user_env, tmp_path):
    reference = runs / RUN.format("l2sp")
    run = tmp_path / "runs" / RUN.format("l2sp")
    shutil.copytree(reference, run)
    # what a process stopped during session 2 leaves: session 1's checkpoint, no summary, status running
    (run / "checkpoints" / "session-2.pt").unlink()
    (run / "summary.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))

    done = fscl(user_env, "run", *SETTINGS, "strategy=l2sp", f"out={tmp_path / 'runs'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 finished" in done.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and [r["after_session"] for r in manifest["resumed"]] == [1]
    assert (run / "matrix.csv").read_text() == (reference / "matrix.csv").read_text()
    assert _comparable_summary(run) == _comparable_summary(reference)
    resumed, uninterrupted = _encoder(run, 2), _encoder(reference, 2)
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())  # bit for bit
