"""The four packages are ours (PyPI has unrelated 'benchmark', 'strategies', 'reports')."""
from pathlib import Path

import benchmark
import reports
import strategies
import streams

REPO = Path(__file__).resolve().parents[1]


def test_packages_come_from_this_repository():
    for module in (benchmark, strategies, streams, reports):
        assert Path(module.__file__).resolve().parent.parent == REPO, module.__file__


def test_torchvision_imports_after_benchmark():
    import torchvision
    from torchvision import transforms

    assert transforms.ToTensor() is not None and torchvision.__version__


def test_ensure_torchvision_is_idempotent():
    from benchmark.compat import ensure_torchvision

    ensure_torchvision()
    ensure_torchvision()


def _fresh_python(code: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_cli_module_loads_no_torch_and_the_repair_runs_at_the_first_torchvision_import():
    """The repair waits for the first import of torchvision, whoever makes it (here open_clip)."""
    _fresh_python(
        "import sys\n"
        "import benchmark.cli\n"
        "assert not {'torch', 'torchvision'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)\n"
        "import open_clip\n"
        "import torchvision\n"
        "from torchvision import transforms\n"
        "assert transforms.ToTensor() is not None\n"
        "assert type(torchvision.__spec__.loader).__name__ != 'TorchvisionRepair', torchvision.__spec__\n"
        "assert not any(type(f).__name__ == 'TorchvisionRepair' for f in sys.meta_path)\n")


def test_a_lookup_of_torchvision_before_its_import_keeps_the_repair():
    """transformers asks ``importlib.util.find_spec('torchvision')`` to see what is installed."""
    _fresh_python(
        "import importlib.util\n"
        "import benchmark\n"
        "assert importlib.util.find_spec('torchvision').origin.endswith('__init__.py')\n"
        "from torchvision import transforms\n"
        "assert transforms.ToTensor() is not None\n")


def test_plain_scripts_of_this_environment_import_open_clip_and_torchvision():
    """``import open_clip`` alone, in the environment the Makefile (or tox) builds: no ``import benchmark`` first."""
    _fresh_python("import open_clip, torchvision\nassert torchvision.transforms.ToTensor() is not None\n")


def test_the_startup_repair_is_installed_exactly_where_torchvision_needs_it(tmp_path):
    """Here torchvision is PyPI's CUDA build beside a CPU torch: the ``.pth`` file is written, and an interpreter
    that reads it imports open_clip and torchvision alone, torch imported only then; one that does not fails."""
    import subprocess
    import sys

    from benchmark.compat import MISMATCH, STARTUP_FILE, install_startup_repair

    def plain(site: Path) -> subprocess.CompletedProcess:
        code = (f"import site, sys; site.addsitedir({str(site)!r}); assert 'torch' not in sys.modules\n"
                "import open_clip, torchvision\n")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    bare = plain(empty).stderr
    if MISMATCH not in bare:  # a matched pair (a GPU user's environment): nothing to repair
        assert install_startup_repair(tmp_path) is False and not (tmp_path / STARTUP_FILE).exists()
        return
    assert install_startup_repair(tmp_path) is True and (tmp_path / STARTUP_FILE).is_file()
    done = plain(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def _setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_every_package_and_data_file_is_listed_in_setup_cfg():
    """A non-editable install ships exactly what setup.cfg lists: nothing may be forgotten."""
    cfg = _setup_cfg()
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts)
             for root in ("benchmark", "strategies", "streams", "reports") for p in (REPO / root).rglob("__init__.py")}
    assert listed == found
    globs = {pkg: [g.strip() for g in value.split(",")] for pkg, value in cfg["options.package_data"].items()}
    for pkg in found:
        folder = REPO / pkg.replace(".", "/")
        for f in folder.rglob("*"):
            owner = next(d for d in f.parents if (d / "__init__.py").exists())
            if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts and owner == folder:
                rel = f.relative_to(folder)
                assert any(rel.match(g) for g in globs.get(pkg, [])), f"{f} is not in [options.package_data] {pkg}"


def test_every_document_cited_lies_in_the_repository():
    """Code and docs cite only files of this repository (``docs/*.md``, ``README.md``); ``report.md`` is
    what ``fscl report`` writes."""
    import re

    cited = re.compile(r"[\w./-]*\b[\w-]+\.md\b")
    files = [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *(REPO / name for name in ("Makefile", "tox.ini",
                                                                                      "constraints.txt", "setup.cfg"))]
    files += [p for root in ("benchmark", "strategies", "streams", "reports", "tests", "benchmarks")
              for p in (REPO / root).rglob("*") if p.suffix in (".py", ".yaml", ".md")]
    for path in files:
        for name in cited.findall(path.read_text()):
            if "://" in name or name.startswith(".") or name == "report.md":
                continue
            assert (REPO / name).is_file() or (path.parent / name).is_file(), f"{path} cites {name}, not in the repository"
