"""A grid in several local processes (--jobs): the records one process writes, every outcome reported, the value's rules."""
import json
import os
import signal
import threading
import time

import fscl_test_strategies
import pytest
import torch
from test_grid_check import _write_folder_stream

from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.grid import run_grid
from benchmark.image_cache import CORES_ENV, loader_workers
from benchmark.jobs import resolve_jobs, start_method
from benchmark.records import RunLock, RunRecord
from benchmark.runs import run_dir

GRID = ["strategy=[zeroshot,full-ft,layernorm]", "seed=[0,1]", "sessions=2", "train.epochs=2",
        "controls=[mini-shapes]", "control_subset=40"]
TIMED = {"train_seconds", "setup_seconds", "peak_memory_mb"}  # what differs between two runs of the same config


def _summary(path) -> dict:
    summary = json.loads((path / "summary.json").read_text())
    summary["costs"]["sessions"] = [{k: v for k, v in s.items() if k not in TIMED}
                                    for s in summary["costs"]["sessions"]]
    return summary


def test_jobs_write_the_records_one_process_writes_and_skip_finished_runs(tmp_path):
    one = run_grid(load_config("quick", [f"out={tmp_path / 'one'}", *GRID]), progress=False)
    assert [o.status for o in one] == ["finished"] * 6
    # one run finished already: the two processes share the other five
    run_grid(load_config("quick", [f"out={tmp_path / 'jobs'}", *GRID[1:], "strategy=full-ft", "seed=1"]),
             progress=False)
    jobs = run_grid(load_config("quick", [f"out={tmp_path / 'jobs'}", *GRID]), progress=False, jobs=2)
    assert [o.status for o in jobs] == ["finished"] * 3 + ["skipped"] + ["finished"] * 2
    for a, b in zip(one, jobs):
        assert b.path == tmp_path / "jobs" / a.path.relative_to(tmp_path / "one")
        assert RunRecord(b.path).metrics() == RunRecord(a.path).metrics()
        assert (b.path / "matrix.csv").read_text() == (a.path / "matrix.csv").read_text()
        assert _summary(b.path) == _summary(a.path)
        assert not (b.path / "run.lock").exists()
    # a run's timings were taken beside the other process's: its manifest says so (the reports note it)
    recorded = [RunRecord(o.path).manifest().get("jobs") for o in jobs]
    assert recorded == [2] * 3 + [None] + [2] * 2 and RunRecord(one[0].path).manifest().get("jobs") is None
    assert RunRecord(one[0].path).manifest()["classes"]["digits"] == 10  # the chance line's class counts


def test_a_run_that_fails_in_a_job_process_is_reported_and_the_others_go_on(tmp_path, capsys):
    _write_folder_stream(tmp_path / "data" / "pets-bad", bad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # two threads per process: spawned, not forked (the other test forks on small machines)
    args = ["run", "quick", f"out={tmp_path / 'runs'}", f"data_root={tmp_path / 'data'}", "seed=0", "--no-progress",
            "strategy=[zeroshot,full-ft]", "sessions=1", "train.epochs=1", "controls=[imagefolder]",
            "imagefolder.root=pets-bad", "--jobs", "2"]
    try:
        assert main(args) == 1
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "0 finished, 0 skipped (already done), 2 failed" in captured.out
    assert captured.err.count("broken.jpg") >= 2  # each failure named, with its run folder
    for manifest in (tmp_path / "runs").rglob("manifest.json"):
        assert json.loads(manifest.read_text())["status"] == "failed"


def test_a_killed_job_process_leaves_its_run_to_resume_and_the_others_finish(tmp_path, monkeypatch):
    marker = tmp_path / "in-session-2"
    monkeypatch.setenv(fscl_test_strategies.PAUSE_ENV, str(marker))  # the EWC run sleeps in session 2
    cfg = load_config("quick", [f"out={tmp_path}", "strategy=[test-ewc-pause,full-ft]", "seed=0", "sessions=2",
                                "train.epochs=2"])
    paused = run_dir(cfg.expand()[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread per process: forked, with this process's test strategies
    found: dict = {}
    grid = threading.Thread(target=lambda: found.update(outcomes=run_grid(cfg, progress=False, jobs=2)))
    try:
        grid.start()
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert grid.is_alive() and time.monotonic() < deadline, "the run never reached session 2"
            time.sleep(0.2)
        os.kill(RunLock(paused).owner()["pid"], signal.SIGKILL)  # as the OOM killer would
        grid.join(timeout=300)
    finally:
        torch.set_num_threads(threads)
    killed, other = found["outcomes"]
    assert killed.status == "failed" and "its job process exited before finishing it" in killed.reason
    assert "-9" in killed.reason and "'fscl run' again resumes it" in killed.reason
    assert other.status == "finished"
    monkeypatch.delenv(fscl_test_strategies.PAUSE_ENV)
    assert [o.status for o in run_grid(cfg, progress=False, jobs=2)] == ["finished", "skipped"]  # resumed
    assert json.loads((paused / "manifest.json").read_text())["resumed"][0]["after_session"] == 1


def test_the_number_of_jobs(tmp_path, capsys, monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_jobs("auto", cpu, 100) == torch.get_num_threads()  # one per core (or OMP_NUM_THREADS thread)
    assert resolve_jobs("auto", cpu, 1) == 1 and resolve_jobs(8, cpu, 3) == 3 and resolve_jobs(2, cpu, 0) == 1
    assert resolve_jobs("auto", torch.device("cuda", 0), 10) == 1  # a GPU: one process unless told otherwise
    assert start_method([cpu], 1) == "fork" and start_method([cpu], 2) == "spawn"  # OpenMP threads hang when forked
    assert start_method([cpu, torch.device("cuda", 0)], 1) == "spawn"  # CUDA cannot be used in a forked child
    for bad in (0, -1, "two", True):
        with pytest.raises(ConfigError, match="--jobs: invalid value"):
            resolve_jobs(bad, cpu, 4)
    with pytest.raises(SystemExit):
        main(["run", "quick", "--jobs", "0"])
    assert "argument --jobs: invalid value '0': a whole number >= 1, or auto" in capsys.readouterr().err
    monkeypatch.setenv(CORES_ENV, "1")  # a job process's share of the cores: its loaders load in the process
    assert loader_workers("auto", 10) == 0 and loader_workers(2, 10) == 2
    monkeypatch.setenv(CORES_ENV, "4")
    assert loader_workers("auto", 10) == 3 and loader_workers("auto", 1) == 0
    ddp = load_config("quick", [f"out={tmp_path}", "strategy=full-ft", "ddp=true", "sessions=1"])
    with pytest.raises(ConfigError, match="with ddp: true the launched processes share each run"):
        run_grid(ddp, progress=False, jobs=2)
