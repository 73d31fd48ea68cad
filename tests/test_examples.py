"""The worked examples of docs/adding-a-strategy.md and docs/adding-a-vlm.md: ``examples/fscl_l2sp``, an
outside package that adds the ``l2sp`` strategy, and ``examples/fscl_llava_plain``, one that adds the
``llava-plain`` VLM family, each through the ``fscl.plugins`` entry point, run as a user runs them.

A package is not installed: a ``*.dist-info`` folder holding its entry point, on PYTHONPATH beside its
package, makes ``importlib.metadata`` see it in subprocesses only, so this test process's registries never
hold ``l2sp`` or ``llava-plain``. No network: the tiny offline models and the digits stream.
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
from test_streams_layouts import write_image

ROOT = Path(__file__).parents[1]
# each example package: its modules, the page that walks through them, public names it must build on
EXAMPLES = {
    "fscl_l2sp": (("__init__.py", "strategy.py"), "docs/adding-a-strategy.md",
                  {("benchmark.registry", "STRATEGIES"), ("benchmark.plugins", "StrategyPlugin")}),
    "fscl_llava_plain": (("__init__.py", "family.py"), "docs/adding-a-vlm.md",
                         {("benchmark.registry", "VLMS"), ("benchmark.vlm.llava", "LlavaFamily")}),
}
RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"
# one batch per session, three epochs, no warm-up: three Adam steps per session at a learning rate
# that moves the weights; an alpha large enough that the penalty dominates once they moved
SETTINGS = ("quick", "--no-progress", "seed=0", "sessions=2", "train.epochs=3", "train.warmup_steps=0",
            "l2sp.alpha=10000", "keep_checkpoints=all")
COST_FIELDS_THAT_VARY = {"train_seconds", "peak_memory_mb", "setup_seconds"}  # wall time and memory
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def _modules(package: str) -> list[Path]:
    return [ROOT / "examples" / package / package / name for name in EXAMPLES[package][0]]


def _pyproject(package: str) -> Path:
    return ROOT / "examples" / package / "pyproject.toml"


def _entry_points(package: str) -> dict[str, str]:
    """The ``fscl.plugins`` entries of the example's pyproject.toml (name → module)."""
    return _plugins(_pyproject(package).read_text())


def _plugins(toml: str) -> dict[str, str]:
    """The ``fscl.plugins`` entries of a pyproject.toml's text (name → module)."""
    section = toml.split('[project.entry-points."fscl.plugins"]\n', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"$', section, re.M))


def installed(package: str, site: Path, folder: Path | None = None, entries: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user who installed ``package`` (default: the example of that name, with its entry points):
    its dist-info in ``site`` and its ``folder`` on PYTHONPATH."""
    folder = folder or ROOT / "examples" / package
    info = site / f"{package}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in (entries or _entry_points(package)).items())
    (info / "entry_points.txt").write_text("[fscl.plugins]\n" + lines)
    path = [str(site), str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    # a tiny model gains nothing from more threads, and on a shared machine they spin idle
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a user who installed ``fscl_l2sp``."""
    assert _entry_points("fscl_l2sp") == {"l2sp": "fscl_l2sp"}
    return installed("fscl_l2sp", tmp_path_factory.mktemp("site"))


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


@pytest.mark.parametrize("package", sorted(EXAMPLES))
def test_the_doc_shows_the_example_files_as_they_are(package):
    modules, pyproject = [m.read_text() for m in _modules(package)], _pyproject(package).read_text()
    doc = ROOT / EXAMPLES[package][1]
    blocks = FENCE.findall(doc.read_text())
    python = [code for lang, code in blocks if lang == "python"]
    assert all(python.count(module) == 1 for module in modules)  # each whole module, once
    for code in python:  # and the steps that build them: excerpts of them, as they are
        assert any(code in module for module in modules), f"this block of {doc.name} is in no module:\n{code}"
    assert [code for lang, code in blocks if lang == "toml"] == [pyproject]


@pytest.mark.parametrize("package", sorted(EXAMPLES))
def test_the_example_uses_only_public_names_and_is_not_part_of_the_distribution(package):
    trees = [ast.parse(m.read_text()) for m in _modules(package)]
    imported = [(node.module, alias.name) for tree in trees for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names]
    assert EXAMPLES[package][2] <= set(imported)
    private = [name for module, name in imported if name.startswith("_") and module != "__future__"]
    private += [node.attr for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not private
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = setup["options"]["packages"].split()
    assert not [p for p in packages if p.split(".")[0] in ("examples", package)]
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


# --------------------------------------------------------------------------- the VLM family: llava-plain
TEST_FRACTION = 0.05  # 90 test images, 90 questions: the scores are written out again below
PLAIN_SETTINGS = ("quick", "--no-progress", "seed=0", "sessions=1", "train.epochs=3", "train.warmup_steps=0",
                  "strategy=lora-ppl", "keep_checkpoints=all", f"digits.test_fraction={TEST_FRACTION}")


@pytest.fixture(scope="module")
def vlm_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a user who installed ``fscl_llava_plain``."""
    assert _entry_points("fscl_llava_plain") == {"llava-plain": "fscl_llava_plain"}
    return installed("fscl_llava_plain", tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from benchmark.vlm.llava import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def vlm_runs(vlm_env, tiny_llava, tmp_path_factory) -> dict[str, Path]:
    """``lora-ppl`` for one session, scored by letter, through ``llava-plain:`` and ``llava:`` on the same folder."""
    runs = {}
    for family in ("llava-plain", "llava"):
        out = tmp_path_factory.mktemp(family) / "runs"
        done = fscl(vlm_env, "run", *PLAIN_SETTINGS, f"vqa.model={family}:{tiny_llava}", f"out={out}", cwd=out.parent)
        assert done.returncode == 0, done.stderr
        assert "1 finished" in done.stdout
        runs[family] = out / RUN.format("lora-ppl")
    return runs


def test_fscl_ls_lists_the_vlm_family_of_the_installed_package_without_importing_it(vlm_env, tmp_path):
    code = ("import sys\nfrom benchmark.cli import main\nassert main(['ls', 'vlms']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fscl_llava_plain', 'torch')))\n")
    done = subprocess.run([sys.executable, "-c", code], env=vlm_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^llava-plain +LLaVA-1.5's weights asked in the plain template", done.stdout, re.M)
    assert "load: llava-plain:/path/to/folder" in done.stdout
    assert done.stdout.splitlines()[-1] == "['fscl_llava_plain']"  # not its family module, no torch


def test_a_missing_folder_is_refused_by_the_grid_check_before_any_work(vlm_env, tmp_path):
    done = fscl(vlm_env, "run", *PLAIN_SETTINGS, f"vqa.model=llava-plain:{tmp_path / 'nowhere'}",
                f"out={tmp_path / 'runs'}", cwd=tmp_path)
    assert done.returncode != 0
    assert f"vqa.model 'llava-plain:{tmp_path / 'nowhere'}': no such folder" in done.stderr
    assert not (tmp_path / "runs").exists()


def _letter_mass(vlm, prompt, batch_size: int = 16) -> tuple[str, float]:
    """(SHA-256, summed letter mass) of the digits question set of the runs (every test image, question seed 0)
    scored with ``prompt`` (user text → the model's whole prompt) and the letters read as the character
    tokenizer's tokens " A" to " E", written out here rather than taken from the family."""
    from benchmark.vqa.build import build_question_set
    from streams.digits import Digits
    from streams.options import DigitsOptions

    stream = Digits(".", DigitsOptions(test_fraction=TEST_FRACTION))
    test = stream.dataset("test")
    questions = build_question_set(stream, test=test)
    tokenizer = vlm.processor.tokenizer
    mass = 0.0
    with torch.no_grad():
        for start in range(0, len(questions.items), batch_size):
            items = questions.items[start:start + batch_size]
            images = [test[start + i][0] for i in range(len(items))]
            logits = vlm.answer_logits(vlm.inputs(images, [prompt(questions.prompt(item)) for item in items]))
            for row, item in zip(logits.log_softmax(-1), items):
                letters = tokenizer.convert_tokens_to_ids([f" {chr(65 + k)}" for k in range(len(item.choices))])
                mass += float(row[letters].exp().sum())
    return questions.sha256, mass


def _row(run: Path, session: int, metric: str) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["session"] == session and r["metric"] == metric and r["dataset"] == "digits")


def test_llava_plain_scores_and_trains_with_the_plain_prompt(vlm_runs, tiny_llava, tiny_backbone):
    """Each run's VQA scores are those of its own prompt, written out here: the plain template through
    ``llava-plain:``, the vicuna_v1 conversation through ``llava:``; the same weights, other numbers."""
    from benchmark.vlm.llava import LlavaFamily, conversation
    from benchmark.vlm.spec import VLMSpec

    vlm = LlavaFamily(VLMSpec("llava", str(tiny_llava))).load(torch.device("cpu"))
    vlm.swap_encoder(tiny_backbone)  # the runs' pretrained encoder, as at session 0
    expected = {"llava-plain": _letter_mass(vlm, lambda text: f"<image>\n{text}\nAnswer:"),
                "llava": _letter_mass(vlm, conversation)}
    for family, run in vlm_runs.items():
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished" and f"vqa.model={family}:{tiny_llava}" in manifest["command"]
        sha, mass = expected[family]
        assert manifest["vqa_sets"]["digits"]["sha256"] == sha  # the same questions, asked of every image
        row = _row(run, 0, "vqa_letter_mass")
        assert row["total"] == 90 and row["value"] * row["total"] == pytest.approx(mass, rel=1e-5)
    plain, vicuna = (_row(vlm_runs[f], 0, "vqa_letter_mass")["value"] for f in ("llava-plain", "llava"))
    assert abs(plain - vicuna) > 1e-4 * vicuna  # the prompts tell the runs apart (measured: about 3e-4)

    # lora-ppl trained through each family's own training pairs: the plain prompt is shorter (fewer language-model
    # FLOPs) and the trained encoders differ
    flops = {f: json.loads((run / "summary.json").read_text())["costs"]["sessions"][0]["lm_flops_per_sample"]
             for f, run in vlm_runs.items()}
    assert 0 < flops["llava-plain"] < flops["llava"]
    trained = {f: torch.load(run / "checkpoints" / "session-1.pt", weights_only=False)["encoder"]
               for f, run in vlm_runs.items()}
    assert trained["llava-plain"].keys() == trained["llava"].keys()
    assert not all(torch.equal(trained["llava-plain"][n], trained["llava"][n]) for n in trained["llava"])
    after = {f: _row(run, 1, "vqa_letter_mass")["value"] for f, run in vlm_runs.items()}
    assert after["llava-plain"] != plain and after["llava"] != vicuna  # each trained encoder went into the tower


# --------------------------------------------------------------------------- the stream guide's example
def test_the_stream_guide_s_package_checks_a_real_layout_and_names_an_empty_class(tmp_path):
    """The files of the stream guide, docs/adding-a-stream.md (the blocks opening with ``# my_streams/...``), and its
    entry point make a package whose ``leaves`` stream ``fscl data check`` reads on a real folder-per-class tree."""
    guide = ROOT / "docs/adding-a-stream.md"
    package = tmp_path / "package"
    blocks = FENCE.findall(guide.read_text())
    for _, code in blocks:
        first = code.split("\n", 1)[0]
        if first.startswith("# my_streams/"):
            (package / first[2:]).parent.mkdir(parents=True, exist_ok=True)
            (package / first[2:]).write_text(code)
    assert sorted(p.name for p in (package / "my_streams").iterdir()) == ["__init__.py", "leaves.py", "leaves.yaml"]
    entries = _plugins(next(code for lang, code in blocks if lang == "toml"))
    (tmp_path / "site").mkdir()
    env = installed("my_streams", tmp_path / "site", package, entries)
    for c, key in enumerate(("oak", "maple", "birch", "ginkgo")):
        for i in range(5):
            write_image(tmp_path / "data" / "leaves" / key / f"{i:04d}.jpg", 100 * c + i)
    check = ("data", "check", "leaves", "--root", str(tmp_path / "data"), "-o", "test_fraction=0.4", "--sessions", "2",
             "--no-progress")
    done = fscl(env, *check, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "images: train 12, test 8" in done.stdout and "OK: leaves is usable" in done.stdout
    assert re.search(r"^ +2  birch +3 +2  birch leaf$", done.stdout, re.M)
    for image in (tmp_path / "data" / "leaves" / "birch").iterdir():
        image.unlink()
    done = fscl(env, *check, cwd=tmp_path)
    assert done.returncode == 1
    assert "leaves: empty class folder (no .jpg" in done.stdout + done.stderr
    assert str(tmp_path / "data" / "leaves" / "birch") in done.stdout + done.stderr
