"""The prepared GPU check's own test: ``benchmarks/gpu_check.sh --cpu`` runs every check on the CPU with
the tiny model, SKIPs those that need CUDA, and ends with its table."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
STRATEGIES = ("zeroshot", "full-ft", "ewc", "layernorm", "lora", "spu", "lorsu", "lorsu-ppl", "lora-ppl", "lwf",
              "wise-ft", "zscl", "replay", "moe-adapters")


def _table(stdout: str) -> dict[str, tuple[str, str]]:
    """{check: (status, detail)} from the table that ends the output."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("check ") and "status" in line)
    rows = {}
    for line in lines[start + 1:]:
        name, status, seconds, detail = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        assert float(seconds) >= 0
        rows[name] = (status, detail)
    return rows


def test_the_gpu_check_passes_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--python", sys.executable,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = _table(proc.stdout)
    throughput = {name: "PASS" if (REPO / "benchmarks" / f"{name}.py").exists() else "SKIP"
                  for name in ("eval_throughput", "vqa_throughput")}
    assert {name: status for name, (status, _) in rows.items()} == {
        "environment": "PASS", "pytest -m gpu": "PASS", "runs fscl-tiny": "PASS", "device=auto": "PASS",
        "device=cuda": "SKIP", "device=cuda:0": "SKIP", "resume after kill -9": "PASS", "ddp, 2 processes": "SKIP",
        "strategy_cost": "PASS", **throughput}
    assert re.fullmatch(r"\d+ passed on cpu", rows["pytest -m gpu"][1])
    assert rows["runs fscl-tiny"][1].startswith(f"{len(STRATEGIES)}/{len(STRATEGIES)} finished")
    assert rows["device=auto"][1] == "finished on the CPU"
    assert rows["resume after kill -9"][1].startswith("resumed after session 1; matrix.csv equals")
    for strategy in STRATEGIES:  # the per-strategy costs of the runs, printed before the table
        assert re.search(rf"^  {re.escape(strategy)} +finished +\d+\.\d\d +\d", proc.stdout, re.MULTILINE), strategy
    assert re.search(r"^  lorsu-dense ", proc.stdout, re.MULTILINE)  # strategy_cost's table
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(
        ["environment.log", "pytest.log", "llava-0.log", "strategies-0.log", "device-auto.log", "resume-reference.log",
         "resume-killed.log", "resume-again.log", "strategy_cost.log"]
        + [f"{name}.log" for name, status in throughput.items() if status == "PASS"])
