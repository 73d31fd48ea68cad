"""Resume: a run killed (SIGKILL) in the middle of session 2 ends, when run again, with the
numbers of an uninterrupted run; run locks; checkpoint pruning; metric rows on resume."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import fscl_test_strategies
import pytest
import torch

from benchmark import checkpoints
from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.records import RunInUseError, RunLock, RunRecord

TESTS = Path(__file__).parent
RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"
COST_FIELDS_THAT_VARY = {"train_seconds", "peak_memory_mb", "setup_seconds"}  # wall time and memory


# one batch per session (the last partial one dropped), two epochs, no warm-up: two steps that change the model
OVERRIDES = ("seed=0", "sessions=2", "train.epochs=2", "train.warmup_steps=0")


def _args(out: Path, *overrides: str) -> list[str]:
    return ["run", "quick", f"out={out}", "--no-progress", *OVERRIDES, *overrides]


def _comparable_summary(path: Path) -> dict:
    summary = json.loads((path / "summary.json").read_text())
    for session in summary["costs"]["sessions"]:
        for key in COST_FIELDS_THAT_VARY:
            session.pop(key)
    return summary


def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    strategy = "test-ewc-pause"  # EWC: its Fisher/anchor must survive the kill; ewc_lambda large enough to matter
    overrides = (f"strategy={strategy}", f"{strategy}.ewc_lambda=10000.0", "keep_checkpoints=last")
    assert main(_args(tmp_path / "reference", *overrides)) == 0

    pid = fscl_test_strategies.kill_in_session_2(_args(tmp_path / "resumed", *overrides), tmp_path / "in-session-2")

    run = tmp_path / "resumed" / RUN.format(strategy)
    assert checkpoints.saved_sessions(run) == [1]
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert not (run / "summary.json").exists()
    assert RunLock(run).owner()["pid"] == pid  # left behind by the killed process: stale, taken over

    (run / "checkpoints" / ".session-2.pt.x1y2").write_bytes(b"half")  # as if killed while saving
    with open(run / "metrics.jsonl", "a") as f:  # as if killed while appending a row
        f.write('{"session": 2, "dataset": "dig')
    assert main(_args(tmp_path / "resumed", *overrides)) == 0  # the same command again
    reference = tmp_path / "reference" / RUN.format(strategy)
    matrix = (reference / "matrix.csv").read_text()
    assert matrix.splitlines()[3].split(",")[1] != matrix.splitlines()[2].split(",")[1]  # session 2 changed it
    assert (run / "matrix.csv").read_text() == matrix
    assert _comparable_summary(run) == _comparable_summary(reference)
    rows = RunRecord(run).metrics()
    keys = [(r["session"], r["dataset"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) and rows == RunRecord(reference).metrics()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and [r["after_session"] for r in manifest["resumed"]] == [1]
    assert not (run / "run.lock").exists() and checkpoints.saved_sessions(run) == [2]  # keep_checkpoints: last
    final = [torch.load(r / "checkpoints/session-2.pt", weights_only=False)["encoder"] for r in (run, reference)]
    assert all(torch.equal(final[0][name], value) for name, value in final[1].items())  # bit for bit


def test_resume_keeps_only_the_metric_rows_of_finished_sessions(tmp_path):
    record = RunRecord(tmp_path)
    record.start({"seed": 0}, {"seed": 0, "shot_seed": 0}, {"session_1": ["a"]})
    rows = [{"session": s, "dataset": "d", "metric": "top1", "value": 0.5, "correct": 1, "total": 2} for s in (0, 1, 2)]
    record.append_metrics(rows)
    record.update_manifest(status="failed", reason="killed")
    record.resume(1)
    assert record.metrics() == rows[:2]
    manifest = record.manifest()
    assert manifest["status"] == "running" and "reason" not in manifest and manifest["resumed"][0]["after_session"] == 1


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_named(tmp_path):
    record = RunRecord(tmp_path)
    record.start({"seed": 0}, {"seed": 0, "shot_seed": 0}, {"session_1": ["a"]})
    rows = [{"session": s, "dataset": "d", "metric": "top1", "value": 0.5, "correct": 1, "total": 2} for s in (0, 1)]
    record.append_metrics(rows)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"session": 2, "data')
    assert record.metrics() == rows
    record.resume(1)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)  # rewritten without the torn tail
    path.write_text(path.read_text().replace('"session": 0', '"session": 0,,'))
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON object"):
        record.metrics()


def _take_lock(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        RunLock(Path(folder)).acquire()
        results.put(os.getpid())
    except RunInUseError:
        results.put(None)


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_processes(tmp_path):
    """Processes that all find the lock of a dead pid at once: one takes it over, the others are refused."""
    context = multiprocessing.get_context("fork")  # the test process's imports, no start-up cost
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(12):
        folder = tmp_path / str(trial)
        folder.mkdir()
        (folder / RunLock.NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        barrier, results = context.Barrier(6), context.Queue()
        procs = [context.Process(target=_take_lock, args=(str(folder), barrier, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        holders = [pid for pid in (results.get(timeout=60) for _ in procs) if pid is not None]
        for proc in procs:
            proc.join()
        assert len(holders) == 1, f"trial {trial}: {len(holders)} holders"
        assert RunLock(folder).owner()["pid"] == holders[0]


def test_a_run_folder_used_by_a_live_process_is_refused(tmp_path, capsys):
    run = tmp_path / RUN.format("zeroshot")
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / RunLock.NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert main(_args(tmp_path, "strategy=zeroshot")) == 1
        err = capsys.readouterr().err
        assert "BUSY" in err and f"in use by pid {holder.pid}" in err and str(run / RunLock.NAME) in err
        assert not (run / "manifest.json").exists()  # nothing written into the other process's folder
    finally:
        holder.kill()
        holder.wait()
    assert main(_args(tmp_path, "strategy=zeroshot")) == 0  # its owner is gone: the stale lock is taken over


def test_under_a_launcher_a_busy_run_leaves_the_exit_status_0(tmp_path, capsys, monkeypatch):
    run = tmp_path / RUN.format("zeroshot")
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / RunLock.NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        monkeypatch.setenv("WORLD_SIZE", "2")  # process 0 of 2 (torchrun): its shard is seed 0 only
        monkeypatch.setenv("RANK", "0")
        assert main(_args(tmp_path, "strategy=zeroshot", "seed=[0,1]")) == 0
    finally:
        holder.kill()
        holder.wait()
    captured = capsys.readouterr()
    assert "0 finished, 0 skipped (already done), 0 failed, 1 busy" in captured.out
    assert "BUSY" in captured.err and "exit status 0 under a multi-process launcher" in captured.err


def test_lock_from_another_host_expires_without_heartbeat(tmp_path):
    lock = RunLock(tmp_path, stale_after=60)
    (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": 1, "host": "some-other-node"}))
    with pytest.raises(RunInUseError, match="some-other-node"):
        lock.acquire()
    old = time.time() - 120
    os.utime(tmp_path / RunLock.NAME, (old, old))
    with lock:
        assert lock.owner()["pid"] == os.getpid()
    assert not (tmp_path / RunLock.NAME).exists()


def test_lock_of_an_earlier_incarnation_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": 1, "host": "node-a", "slurm_job": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunInUseError, match="node-a"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # requeued after pre-emption, now on another node
    with RunLock(tmp_path) as lock:
        assert lock.owner()["slurm_job"] == "4242" and lock.owner()["pid"] == os.getpid()


@pytest.mark.parametrize("keep, left", [("all", [1, 2]), ("last", [2]), ("none", [])])
def test_keep_checkpoints(tmp_path, keep, left):
    assert main(_args(tmp_path, "strategy=zeroshot", f"keep_checkpoints={keep}")) == 0
    run = tmp_path / RUN.format("zeroshot")
    assert checkpoints.saved_sessions(run) == left
    if left:
        config = load_config("quick", [f"out={tmp_path}", *OVERRIDES, "strategy=zeroshot"]).expand()[0].to_dict()
        state = checkpoints.load_latest(run, config)
        assert state.session == 2 and torch.isfinite(state.encoder["proj"]).all()
        assert checkpoints.load_latest(run, {**config, "device": "cuda"}).session == 2  # not a number-changing key
        assert checkpoints.load_latest(run, {**config, "seed": 1}) is None  # another run's checkpoints
    if keep == "all":  # a truncated newest file (e.g. a full disk): the session before it
        newest = checkpoints.checkpoint_dir(run) / "session-2.pt"
        newest.write_bytes(newest.read_bytes()[:100])
        assert checkpoints.load_latest(run, config).session == 1


def test_keep_checkpoints_is_validated():
    with pytest.raises(ConfigError, match=re.escape("keep_checkpoints: invalid value 'some'; allowed: last | all | none")):
        load_config("quick", ["keep_checkpoints=some"])
