"""Faults met while running (issue 22): file names that are not UTF-8, an unusable cache folder, a
damaged summary, a full disk, Ctrl-C, the stage a failure is met in.

Real image files in real layouts (the ``write_*`` builders of ``test_streams_layouts``), the real
``fscl`` command line, the tiny open_clip model; nothing touches the network.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fscl_test_strategies
import pytest
from test_streams_layouts import write_eurosat

from benchmark import checkpoints
from benchmark.cli import main
from benchmark.records import RunLock
from reports.frame import scan_runs

TESTS = Path(__file__).parent
DIGITS = "quick/digits/openclip-fscl-tiny/{}/2-s{}"
# the digits of the quick preset, small: two sessions of one batch (2 shots), two steps that change the model, a
# 5 % test split
QUICK = ("quick", "--no-progress", "sessions=2", "shots=2", "train.epochs=2", "train.warmup_steps=0",
         "digits.test_fraction=0.05")

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


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_a_full_disk_fails_the_run_with_its_reason_stops_the_grid_and_resumes_identically(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    strategy = "test-full-ft-disk-full"
    assert main(["run", *QUICK, "seed=0", f"strategy={strategy}", f"out={tmp_path / 'reference'}"]) == 0
    args = ["run", *QUICK, "seed=[0,1]", f"strategy={strategy}", f"out={tmp_path / 'runs'}"]
    run = tmp_path / "runs" / DIGITS.format(strategy, 0)
    os.environ[fscl_test_strategies.DISK_FULL_ENV] = str(run / "metrics.jsonl")
    try:  # the metric rows of session 2 are written to /dev/full: the kernel answers ENOSPC
        assert main(args) == 2
    finally:
        del os.environ[fscl_test_strategies.DISK_FULL_ENV]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("fscl: error:") == 1
    assert f"{run}: No space left on device (in evaluation after session 2; recorded as failed)" in err
    assert "The grid stops here" in err and "run the same command again to resume" in err
    manifest = _manifest(run)
    assert manifest["status"] == "failed" and manifest["reason"] == "evaluation after session 2: No space left on device"
    assert not (tmp_path / "runs" / DIGITS.format(strategy, 1)).exists()  # the grid stopped: seed 1 never started
    assert not (run / RunLock.NAME).exists() and checkpoints.saved_sessions(run) == [1]

    os.replace(run / "metrics.jsonl.kept", run / "metrics.jsonl")  # the disk is freed, the record is intact
    assert main(args) == 0
    assert [r["after_session"] for r in _manifest(run)["resumed"]] == [1] and _manifest(run)["status"] == "finished"
    reference = tmp_path / "reference" / DIGITS.format(strategy, 0)
    assert (run / "matrix.csv").read_text() == (reference / "matrix.csv").read_text()
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A folder on its own tmpfs (``mount -t tmpfs``: root where mounting is allowed, else the test is skipped);
    yields a function that (re)mounts it with a size in bytes, and unmounts it at the end."""
    folder = tmp_path / "small-disk"
    folder.mkdir()

    def mount(size: int) -> Path:
        options = f"size={size}" if not os.path.ismount(folder) else f"remount,size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return folder

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    if os.path.ismount(folder):
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazily: a file left open keeps it busy


def test_a_full_disk_met_by_torch_save_stops_the_grid_and_resumes_identically(tmp_path, capsys, small_tmpfs):
    """A real full file system (a tmpfs with room for one checkpoint): the checkpoint of session 2 fails in
    ``torch.save``, which raises a RuntimeError while handling the ENOSPC."""
    args = ["run", *QUICK, "strategy=full-ft", "keep_checkpoints=all"]
    assert main([*args, "seed=0", f"out={tmp_path / 'reference'}"]) == 0
    checkpoint = (tmp_path / "reference" / DIGITS.format("full-ft", 0) / "checkpoints" / "session-1.pt").stat().st_size
    disk = small_tmpfs(int(1.5 * checkpoint))
    capsys.readouterr()
    args += ["seed=[0,1]", f"out={disk}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    run = disk / DIGITS.format("full-ft", 0)
    assert "Traceback" not in err and err.count("fscl: error:") == 1
    assert f"{run}: No space left on device (in checkpoint after session 2; recorded as failed)" in err
    assert _manifest(run)["status"] == "failed" and not (disk / DIGITS.format("full-ft", 1)).exists()
    small_tmpfs(20 * checkpoint)  # space freed
    assert main(args) == 0
    run = DIGITS.format("full-ft", 0)
    assert (disk / run / "matrix.csv").read_text() == (tmp_path / "reference" / run / "matrix.csv").read_text()
    assert [r["after_session"] for r in _manifest(disk / run)["resumed"]] == [1]


def _interrupted(tmp_path: Path, *args: str, runs: int = 1) -> subprocess.CompletedProcess:
    """Run ``fscl`` with ``args`` in its own process group (with the pausing test strategy) and press Ctrl-C
    (SIGINT to the whole group, as a terminal does) once ``runs`` runs pause in session 2."""
    marker = tmp_path / "in-session-2"
    env = {**os.environ, fscl_test_strategies.PAUSE_ENV: str(marker), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # as a terminal starts a command: Ctrl-C at its default even when this process ignores it (`nohup make test &`)
    code = ("import signal, sys, fscl_test_strategies; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from benchmark.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (marker.exists() and len(list(tmp_path.rglob("checkpoints/session-1.pt"))) == runs):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the runs never reached session 2"
            time.sleep(0.2)
        time.sleep(1.0)  # every run is in its pause
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say what the process was doing, not only that it did not stop
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"fscl did not stop within 120 s of Ctrl-C; its stderr ends:\n{err[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_marks_the_run_interrupted_says_how_to_resume_and_the_same_command_resumes(tmp_path, capsys):
    strategy = "test-ewc-pause"
    args = ["run", *QUICK, "seed=0", f"strategy={strategy}", f"out={tmp_path / 'runs'}"]
    done = _interrupted(tmp_path, *args)
    run = tmp_path / "runs" / DIGITS.format(strategy, 0)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert (f"fscl: interrupted: {run} in training session 2 (recorded as interrupted); run the same command again "
            f"to resume: fscl {' '.join(args)}") in done.stderr
    assert _manifest(run)["status"] == "interrupted" and _manifest(run)["reason"] == "interrupted in training session 2"
    assert not (run / RunLock.NAME).exists()
    excluded = scan_runs(tmp_path / "runs").excluded
    assert excluded["status"].tolist() == ["interrupted"] and "resumes it" in excluded["reason"].iloc[0]

    assert main(args) == 0  # the same command
    assert _manifest(run)["status"] == "finished" and [r["after_session"] for r in _manifest(run)["resumed"]] == [1]


def test_ctrl_c_under_jobs_marks_every_run_in_progress_interrupted_in_one_message(tmp_path):
    strategy = "test-ewc-pause"
    args = ["run", *QUICK, "seed=[0,1]", f"strategy={strategy}", f"out={tmp_path / 'runs'}", "--jobs", "2"]
    done = _interrupted(tmp_path, *args, runs=2)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("fscl: interrupted: the runs in progress in 2 job processes (0 of 2 runs were done") == 1
    for seed in (0, 1):
        run = tmp_path / "runs" / DIGITS.format(strategy, seed)
        assert _manifest(run)["status"] == "interrupted" and not (run / RunLock.NAME).exists()


def test_a_finished_run_with_a_damaged_summary_is_named_and_rebuilt(tmp_path, capsys, caplog):
    args = ["run", *QUICK, "seed=0", "strategy=full-ft", f"out={tmp_path}", "keep_checkpoints=last"]
    assert main(args) == 0
    run = tmp_path / DIGITS.format("full-ft", 0)
    summary = (run / "summary.json").read_text()
    (run / "summary.json").write_text(summary[: len(summary) // 2])  # torn by a crash or a full disk
    capsys.readouterr()
    assert main(args) == 0
    assert f"{run} is marked finished but its summary.json is damaged (" in caplog.text
    assert "running it again to rebuild it" in caplog.text
    assert json.loads((run / "summary.json").read_text()) == json.loads(summary)  # rebuilt: the same numbers
    (run / "summary.json").write_text("[]")
    assert main([*args, "--force"]) == 0 and "0 finished, 1 skipped" not in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text()) == json.loads(summary)
    caplog.clear()  # a sound record rerun by --force (its configuration changed) is not called damaged
    assert main([*args, "train.epochs=1", "--force"]) == 0 and "is marked finished but" not in caplog.text


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_unusable_cache_folder_is_named_by_the_grid_check(tmp_path, capsys, monkeypatch, dry_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for cache in (blocker, blocker / "fscl"):  # FSCL_CACHE a file; a folder below a file (NotADirectoryError)
        monkeypatch.setenv("FSCL_CACHE", str(cache))
        args = ["run", *QUICK, "seed=0", "strategy=zeroshot", f"out={tmp_path / 'runs'}"]
        assert main([*args, *(["--dry-run"] if dry_run else [])]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert (f"FSCL_CACHE: the cache folder {cache} cannot be written ({blocker} is a file, not a folder; "
                f"FSCL_CACHE={cache}); set FSCL_CACHE to a writable folder") in err
        assert not (tmp_path / "runs").exists()  # refused before any work
    assert main([*args, "eval_cache=off", "--dry-run"]) == 0  # a grid that writes nothing there


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_home_is_named_as_the_cache_folder_s_problem(tmp_path, monkeypatch):
    from benchmark.cache import cache_problem

    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    monkeypatch.delenv("FSCL_CACHE")
    monkeypatch.setenv("HOME", str(home))
    assert cache_problem() == (
        f"FSCL_CACHE: the cache folder {home}/.cache/fscl cannot be written ({home}: Permission denied; FSCL_CACHE "
        f"unset, so {home}/.cache/fscl); set FSCL_CACHE to a writable folder (e.g. export "
        f"FSCL_CACHE=/scratch/$USER/fscl-cache)")
