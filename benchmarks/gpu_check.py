"""The prepared GPU check (issue 13): the suite on one GPU, a PASS / FAIL / SKIP table at the end.

    bash benchmarks/gpu_check.sh          # on a GPU machine (a few minutes on one H200)
    bash benchmarks/gpu_check.sh --cpu    # the same checks with tiny models on the CPU: the script's self-test

Checks, one table row each (every one in its own subprocesses, logs under OUT/logs/):

    environment           torch, its CUDA and the GPUs a subprocess sees
    pytest -m gpu         the tests marked ``gpu`` on FSCL_TEST_DEVICE=cuda (their ``device`` fixture)
    runs <backbone>       every strategy through ``python -m benchmark run`` on generated images in EuroSAT's
                          layout (2 sessions of 2 shots, 1 epoch, bf16): OpenAI-layout ViT-B/16 and
                          ViT-L/14-336, random weights, with VQA through a tiny random LLaVA whose tower
                          takes the encoder (the *-ppl strategies train through it); every run finished,
                          train seconds and peak memory
    device=<d>            auto, cuda, cuda:0: a tiny run each, which must allocate on cuda:0
    resume after kill -9  a run killed in session 2 and run again ends with the uninterrupted run's matrix.csv
    ddp, 2 processes      torchrun, ``ddp=true`` (needs 2+ GPUs; SKIP otherwise)
    strategy_cost         benchmarks/strategy_cost.py (its table is printed); the throughput benchmarks of
                          THROUGHPUT run once their files exist (eval_throughput: the warm evaluation's
                          images/s as a multiple of the raw forward's, per model)

The exit status is 1 when a check fails. ``--cpu`` swaps the ViTs for ``openclip:fscl-tiny``, runs the
tests on the CPU and SKIPs what needs CUDA (device=cuda, device=cuda:0, ddp).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("zeroshot", "full-ft", "ewc", "layernorm", "lora", "spu", "lorsu", "lorsu-ppl", "lora-ppl", "lwf",
              "wise-ft", "zscl", "replay", "moe-adapters")
# A tiny random LLaVA whose tower takes a backbone's encoder: the *-ppl strategies' VLM (and every run's VQA)
TINY_LLAVA = ("import sys, benchmark; from benchmark.backbones import backbone_skeleton; "
              "from benchmark.export import hf_vision_config; from benchmark.vlm.llava import save_tiny_llava; "
              "save_tiny_llava(sys.argv[2], vision_config=hf_vision_config(backbone_skeleton(sys.argv[1]).visual))")
THROUGHPUT = ("eval_throughput", "vqa_throughput")  # benchmarks/<name>.py, run with Mode.throughput_args once they exist
TINY_RUN = ("run", "quick", "strategy=full-ft", "sessions=1", "seed=0", "shots=2", "train.epochs=1",
            "digits.test_fraction=0.05", "--no-progress")
# The killed run of tests/test_resume.py: EWC (its Fisher must survive), two steps per session that change the model;
# test-ewc-pause (tests/fscl_test_strategies.py) creates $FSCL_TEST_PAUSE in session 2 and then sleeps.
RESUME_RUN = ("run", "quick", "--no-progress", "seed=0", "sessions=2", "train.epochs=2", "train.warmup_steps=0",
              "strategy=test-ewc-pause", "test-ewc-pause.ewc_lambda=10000.0", "keep_checkpoints=last")
RESUME_FOLDER = "quick/digits/openclip-fscl-tiny/test-ewc-pause/5-s0"
# `fscl` with a report of the CUDA memory each GPU allocated (the run record does not name its device)
CLI_REPORTING_CUDA = (
    "import json, sys, torch; from benchmark.cli import main; code = main(sys.argv[1:]); "
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
    "print('cuda bytes:', json.dumps([torch.cuda.max_memory_allocated(i) for i in range(n)])); sys.exit(code)")
# `fscl` with the test strategies and deterministic kernels: a resumed run differs only if resume lost something
CLI_DETERMINISTIC = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "torch.backends.cudnn.benchmark = False; "
    "import fscl_test_strategies; from benchmark.cli import main; sys.exit(main(sys.argv[1:]))")


@dataclass(frozen=True)
class Mode:
    """What the checks run on: the GPU (the real check) or the CPU with a tiny model (the self-test)."""

    device: str  # of the tests and the runs
    backbones: tuple[str, ...]  # of the strategy runs
    cost_args: tuple[str, ...]  # of benchmarks/strategy_cost.py
    throughput_args: tuple[str, ...]  # of the THROUGHPUT benchmarks


GPU = Mode("cuda", ("openclip:ViT-B-16-quickgelu", "openclip:ViT-L-14-336-quickgelu"),
           ("--device", "cuda", "--model", "ViT-B-16", "--rounds", "3", "--vlm", "7b"), ("--device", "cuda"))
CPU = Mode("cpu", ("openclip:fscl-tiny",),
           ("--device", "cpu", "--model", "fscl-tiny", "--rounds", "1", "--threads", "1"),
           ("--device", "cpu", "--model", "fscl-tiny"))


@dataclass
class Row:
    name: str
    status: str  # PASS | FAIL | SKIP
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Proc:
    rc: int  # 124: killed at its timeout
    output: str  # stdout and stderr together (also in the log file)
    seconds: float


class Check:
    """The state the checks share: the mode, the output folder, the GPUs, and the subprocess runner."""

    def __init__(self, mode: Mode, out: Path) -> None:
        self.mode, self.out, self.gpus = mode, out, 0
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        """This checkout first on the path (whatever the venv's editable install points at); on the CPU one
        thread unless told otherwise (the tiny model gains nothing from more, and they spin on a busy machine)."""
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        threads = {"OMP_NUM_THREADS": "1"} if self.mode.device == "cpu" else {}
        return {**threads, **os.environ, "PYTHONPATH": path, **extra}

    def start(self, log: str, args: list[str], **env: str) -> subprocess.Popen:
        """Start ``args`` in the repository, output to ``OUT/logs/<log>.log``, in its own process group."""
        path = self.out / "logs" / f"{log}.log"
        with open(path, "w") as f:
            f.write(f"$ {shlex.join(args)}\n")
            f.flush()
            return subprocess.Popen(args, cwd=REPO, env=self.env(**env), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def finish(self, proc: subprocess.Popen, log: str, started: float, timeout: float) -> Proc:
        """Wait for ``proc`` (its whole process group is killed at ``timeout``) and read its log."""
        try:
            rc = proc.wait(timeout=max(0.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            kill(proc)
            rc = 124
        output = (self.out / "logs" / f"{log}.log").read_text(errors="replace")
        return Proc(rc, output, time.perf_counter() - started)

    def run(self, log: str, args: list[str], timeout: float, **env: str) -> Proc:
        started = time.perf_counter()
        return self.finish(self.start(log, args, **env), log, started, timeout)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (a launcher's workers with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def failure(proc: Proc) -> str:
    """Why a subprocess failed, in a line: its timeout, or its last line of output."""
    if proc.rc == 124:
        return f"timed out after {proc.seconds:.0f} s"
    lines = [line for line in proc.output.splitlines() if line.strip()]
    return f"exit {proc.rc}: {lines[-1].strip()[:150] if lines else 'no output'}"


def manifest_status(run: Path) -> str:
    try:
        return json.loads((run / "manifest.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "missing"


# --------------------------------------------------------------------------- the checks
def environment(check: Check) -> list[Row]:
    code = ("import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'gpus': [torch.cuda.get_device_name(i) for i in range(n)]}))")
    proc = check.run("environment", [sys.executable, "-c", code], timeout=120)
    if proc.rc:
        return [Row("environment", "FAIL", proc.seconds, failure(proc))]
    info = json.loads(proc.output.strip().splitlines()[-1])
    check.gpus = len(info["gpus"])
    where = (f"CUDA {info['cuda']}, " + ", ".join(f"{info['gpus'].count(g)} x {g}" for g in dict.fromkeys(info["gpus"]))
             if info["gpus"] else "no GPU")
    ok = check.mode.device == "cpu" or check.gpus > 0
    return [Row("environment", "PASS" if ok else "FAIL", proc.seconds, f"torch {info['torch']}, {where}")]


def gpu_tests(check: Check) -> list[Row]:
    device = check.mode.device
    proc = check.run("pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                     timeout=300, FSCL_TEST_DEVICE=device)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", proc.output[-600:])}
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or failure(proc)
    failed = [line.split()[1].split("::", 1)[-1] for line in proc.output.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    ok = proc.rc == 0 and counts.get("passed", 0) > 0
    detail = f"{summary} on {device}" + (f": {', '.join(failed[:3])}" if failed else "")
    return [Row("pytest -m gpu", "PASS" if ok else "FAIL", proc.seconds, detail)]


def write_eurosat(root: Path, per_class: int = 6, size: int = 64) -> None:
    """EuroSAT's torchvision layout, ``eurosat/2750/<Class>/<Class>_<n>.jpg``, random pixels, one generator per image."""
    keys = yaml.safe_load((REPO / "streams" / "data" / "eurosat.yaml").read_text())["class_keys"]
    for c, key in enumerate(keys):
        folder = root / "eurosat" / "2750" / key
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.random.default_rng(100 * c + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{key}_{i + 1}.jpg")


class RunCosts(NamedTuple):
    status: str  # the manifest's
    train_seconds: float  # over the sessions
    peak_mb: float  # the largest session's


def run_costs(run: Path) -> RunCosts:
    status = manifest_status(run)
    if status != "finished":
        return RunCosts(status, 0.0, float("nan"))
    sessions = json.loads((run / "summary.json").read_text())["costs"]["sessions"]
    return RunCosts(status, sum(s["train_seconds"] for s in sessions), max(s["peak_memory_mb"] for s in sessions))


def strategy_runs(check: Check) -> list[Row]:
    """Every strategy on each backbone of the mode, one ``python -m benchmark run`` per backbone."""
    data = check.out / "data"
    write_eurosat(data)
    rows = []
    for i, backbone in enumerate(check.mode.backbones):
        out = check.out / "runs" / f"strategies-{i}"
        llava = check.out / f"llava-{i}"
        check.run(f"llava-{i}", [sys.executable, "-c", TINY_LLAVA, backbone, str(llava)], timeout=300)
        config = {"name": "gpu-check", "stream": "eurosat", "strategy": list(STRATEGIES), "backbone": backbone,
                  "shots": 2, "sessions": 2, "seed": 0, "data_root": str(data), "out": str(out),
                  "device": check.mode.device, "eurosat": {"test_fraction": 0.5},  # 3 train, 3 test images a class
                  "train": {"epochs": 1, "precision": "bf16"}, "vqa": {"model": f"llava:{llava}"},
                  "zscl": {"reference": "mini", "reference_batch": 8}}
        path = check.out / f"strategies-{i}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = check.run(f"strategies-{i}", [sys.executable, "-m", "benchmark", "run", str(path), "--no-progress"],
                         timeout=300)
        costs = {strategy: run_costs(next(out.glob(f"gpu-check/eurosat/*/{strategy}/2-s0"), out / "missing"))
                 for strategy in STRATEGIES}
        print(f"\n{backbone} on {check.mode.device}, bf16 (summary.json: train seconds over both sessions, peak memory)")
        print(f"  {'strategy':<12} {'status':<9} {'train s':>8} {'peak MiB':>9}")
        for strategy, (status, seconds, peak) in costs.items():
            print(f"  {strategy:<12} {status:<9} {seconds:>8.2f} {peak:>9,.0f}")
        finished = [c for c in costs.values() if c.status == "finished"]
        detail = f"{len(finished)}/{len(STRATEGIES)} finished, train {sum(c.train_seconds for c in finished):.1f} s in all"
        if finished:
            detail += f", peak {max(c.peak_mb for c in finished):,.0f} MiB"
        ok = proc.rc == 0 and len(finished) == len(STRATEGIES)
        if not ok:
            detail += f"; not finished: {', '.join(s for s, c in costs.items() if c.status != 'finished') or '-'}"
            detail += f"; {failure(proc)}" if proc.rc else ""
        rows.append(Row(f"runs {backbone.removeprefix('openclip:')}", "PASS" if ok else "FAIL", proc.seconds, detail))
    return rows


def devices(check: Check) -> list[Row]:
    """``device=auto``, ``cuda``, ``cuda:0``: a tiny run each; the CUDA ones must allocate on cuda:0."""
    rows = []
    for name in ("auto", "cuda", "cuda:0"):
        row = f"device={name}"
        if name != "auto" and check.mode.device == "cpu":
            rows.append(Row(row, "SKIP", detail="--cpu"))
            continue
        out = check.out / "runs" / f"device-{name.replace(':', '')}"
        proc = check.run(f"device-{name.replace(':', '')}",
                         [sys.executable, "-c", CLI_REPORTING_CUDA, *TINY_RUN, f"out={out}", f"device={name}"],
                         timeout=180)
        status = manifest_status(out / "quick/digits/openclip-fscl-tiny/full-ft/2-s0")
        found = re.search(r"^cuda bytes: (.*)$", proc.output, re.MULTILINE)
        used = json.loads(found.group(1)) if found else []
        on_gpu = [i for i, n in enumerate(used) if n > 0]
        expected = [0] if check.gpus else []  # auto and cuda are cuda:LOCAL_RANK, LOCAL_RANK unset: 0
        where = ", ".join(f"cuda:{i} ({used[i] / 2**20:.0f} MiB allocated)" for i in on_gpu) or "the CPU"
        ok = proc.rc == 0 and status == "finished" and on_gpu == expected
        detail = f"{status} on {where}" + ("" if proc.rc == 0 else f"; {failure(proc)}")
        rows.append(Row(row, "PASS" if ok else "FAIL", proc.seconds, detail))
    return rows


def resume(check: Check) -> list[Row]:
    """tests/test_resume.py's kill test on the mode's device: kill -9 in session 2, the same command again."""
    started = time.perf_counter()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), check.env()["PYTHONPATH"]]),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS needs it for deterministic results
    base = "runs/resume"

    def args(folder: str) -> list[str]:
        return [sys.executable, "-c", CLI_DETERMINISTIC, *RESUME_RUN, f"device={check.mode.device}",
                f"out={check.out / base / folder}"]

    marker = check.out / base / "in-session-2"
    marker.parent.mkdir(parents=True, exist_ok=True)
    reference = check.start("resume-reference", args("reference"), **env)
    killed = check.start("resume-killed", args("resumed"), **env, FSCL_TEST_PAUSE=str(marker))
    deadline = time.perf_counter() + 240
    while not marker.exists() and killed.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.2)
    reached = marker.exists()
    kill(killed)
    ref = check.finish(reference, "resume-reference", started, timeout=300)
    if not reached:
        return [Row("resume after kill -9", "FAIL", time.perf_counter() - started,
                    "the run never reached session 2 (logs/resume-killed.log)")]
    again = check.run("resume-again", args("resumed"), timeout=240, **env)
    runs = [check.out / base / folder / RESUME_FOLDER for folder in ("reference", "resumed")]
    seconds = time.perf_counter() - started
    if ref.rc or again.rc or any(manifest_status(r) != "finished" for r in runs):
        return [Row("resume after kill -9", "FAIL", seconds, f"reference {failure(ref) if ref.rc else 'ok'}; "
                    f"resumed {failure(again) if again.rc else manifest_status(runs[1])}")]
    resumed = json.loads((runs[1] / "manifest.json").read_text()).get("resumed", [])
    same = (runs[0] / "matrix.csv").read_text() == (runs[1] / "matrix.csv").read_text()
    ok = same and [r["after_session"] for r in resumed] == [1]
    detail = (f"resumed after session {', '.join(str(r['after_session']) for r in resumed) or '(none)'}; "
              f"matrix.csv {'equals' if same else 'DIFFERS from'} the uninterrupted run's; {encoder_difference(runs)}")
    return [Row("resume after kill -9", "PASS" if ok else "FAIL", seconds, detail)]


def encoder_difference(runs: list[Path]) -> str:
    """The final encoders of two runs (their kept last checkpoints), bit for bit or by their largest difference."""
    import torch

    final = [torch.load(r / "checkpoints" / "session-2.pt", map_location="cpu", weights_only=False)["encoder"]
             for r in runs]
    largest = max((a - final[1][n]).abs().max().item() if a.is_floating_point() else float(not torch.equal(a, final[1][n]))
                  for n, a in final[0].items())
    return "encoder bit for bit" if largest == 0 else f"encoder differs by up to {largest:.2g}"


def ddp(check: Check) -> list[Row]:
    """Two processes train each run together (``ddp=true``) under torchrun: needs two GPUs."""
    if check.mode.device == "cpu" or check.gpus < 2:
        return [Row("ddp, 2 processes", "SKIP", detail="--cpu" if check.mode.device == "cpu" else f"{check.gpus} GPU")]
    out = check.out / "runs" / "ddp"
    proc = check.run("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "benchmark", "run", "quick", "strategy=lorsu", "sessions=2", "seed=0", "shots=2",
                             "train.epochs=1", "ddp=true", "device=cuda", f"out={out}", "--no-progress"], timeout=300)
    status = manifest_status(out / "quick/digits/openclip-fscl-tiny/lorsu/2-s0")
    ok = proc.rc == 0 and status == "finished"
    return [Row("ddp, 2 processes", "PASS" if ok else "FAIL", proc.seconds,
                f"lorsu run {status}" + ("" if proc.rc == 0 else f"; {failure(proc)}"))]


def costs(check: Check) -> list[Row]:
    """benchmarks/strategy_cost.py (its table printed), then each THROUGHPUT benchmark that exists."""
    proc = check.run("strategy_cost", [sys.executable, "benchmarks/strategy_cost.py", *check.mode.cost_args], timeout=300)
    lines = proc.output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("strategy ")), len(lines))
    print(f"\nbenchmarks/strategy_cost.py {shlex.join(check.mode.cost_args)}")
    print("\n".join(f"  {line}" for line in lines[start:]))
    lorsu = next((line.split() for line in lines[start:] if line.startswith("lorsu ")), None)
    detail = f"lorsu step {lorsu[2]}x, Adam state {lorsu[8]}x full-ft" if proc.rc == 0 and lorsu else failure(proc)
    rows = [Row("strategy_cost", "PASS" if proc.rc == 0 else "FAIL", proc.seconds, detail)]
    for name in THROUGHPUT:
        script = Path("benchmarks") / f"{name}.py"
        if not (REPO / script).exists():
            rows.append(Row(name, "SKIP", detail=f"{script} does not exist yet"))
            continue
        proc = check.run(name, [sys.executable, str(script), *check.mode.throughput_args], timeout=300)
        print(f"\n{script} {shlex.join(check.mode.throughput_args)}\n" + proc.output)
        # a benchmark's goal lines ("met      <what> (<ratio>x)") summed up in the row
        goals = [f"{m[2]} {m[3]}x{'' if m[1] == 'met' else f' (goal {m[1]})'}" for m in re.finditer(
            r"^(met|NOT met|split) +(.+?) evaluation >= .*\(([\d.]+)x[;)]", proc.output, re.MULTILINE)]
        rows.append(Row(name, "PASS" if proc.rc == 0 else "FAIL", proc.seconds,
                        ("; ".join(goals) or "output above") if proc.rc == 0 else failure(proc)))
    return rows


CHECKS: tuple[Callable[[Check], list[Row]], ...] = (gpu_tests, strategy_runs, devices, resume, ddp, costs)


def table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  status  seconds  detail"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.seconds:>7.1f}  {r.detail}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the same checks on the CPU with tiny models (self-test)")
    parser.add_argument("--out", type=Path, help="folder for the logs, data and runs (default: a new temporary one)")
    args = parser.parse_args(argv)
    mode = CPU if args.cpu else GPU
    out = args.out or Path(tempfile.mkdtemp(prefix="fscl-gpu-check-"))
    check = Check(mode, out.absolute())
    started = time.perf_counter()
    print(f"GPU check{' (--cpu)' if args.cpu else ''}: {sys.executable}, logs and runs in {check.out}", flush=True)
    rows = environment(check)
    print(f"[{rows[0].status}] environment: {rows[0].detail}", flush=True)
    if rows[0].status == "PASS":
        for run_check in CHECKS:
            check_started = time.perf_counter()
            try:
                new = run_check(check)
            except Exception as err:  # a broken check is a failed row; the others still run
                new = [Row(run_check.__name__, "FAIL", time.perf_counter() - check_started, f"{type(err).__name__}: {err}")]
            rows += new
            for row in new:
                print(f"[{row.status}] {row.name} ({row.seconds:.0f} s): {row.detail}", flush=True)
    else:
        print("no CUDA device: nothing else was run (--cpu runs the checks on the CPU)")
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\nGPU check{' (--cpu)' if args.cpu else ''}: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped in {time.perf_counter() - started:.0f} s; logs in {check.out / 'logs'}\n")
    print(table(rows), flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
