"""Several processes on CPU: grid sharding (no process group) and ``ddp: true`` (gloo, 2 ranks)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import fscl_test_strategies
import open_clip
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from benchmark import checkpoints
from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.distributed import Shard, batch_slice_for, grid_shard, local_device
from benchmark.plugins import StrategyPlugin
from benchmark.records import RunRecord
from benchmark.registry import STRATEGIES


@STRATEGIES.register("test-no-ddp")
class NoDataParallel(StrategyPlugin):
    """Test strategy that does not declare ``supports_ddp``."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], env: dict[str, str], report: str) -> None:
    """One launched process, as torchrun / accelerate launch would start it: env vars, then the grid."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", **env)
    torch.set_num_threads(1)
    from benchmark.grid import run_grid

    outcomes = run_grid(load_config("quick", overrides), progress=False)
    Path(report, f"rank{rank}.json").write_text(json.dumps([[str(o.path), o.status, o.reason] for o in outcomes]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch(tmp_path: Path, overrides: list[str], env: dict[str, str] | None = None, world: int = 2) -> list[list]:
    """Start ``world`` processes on the grid; returns each rank's outcomes."""
    report = tmp_path / "report"
    report.mkdir()
    mp.spawn(_worker, args=(world, _free_port(), overrides, env or {}, str(report)), nprocs=world, join=True)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(world)]


def test_grid_shard_from_launcher_slurm_and_explicit_env():
    assert grid_shard({}) == Shard(0, 1)
    assert grid_shard({"WORLD_SIZE": "4", "RANK": "3"}) == Shard(3, 4)
    slurm = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10"}
    assert grid_shard(slurm) == Shard(2, 3)
    assert grid_shard({**slurm, "WORLD_SIZE": "2", "RANK": "1"}) == Shard(5, 6)  # task 2's second process
    assert grid_shard({**slurm, "WORLD_SIZE": "2", "RANK": "1"}, launcher=False) == Shard(2, 3)  # ddp: true
    assert grid_shard({"FSCL_SHARD_COUNT": "5", "FSCL_SHARD_INDEX": "4", "RANK": "1", "WORLD_SIZE": "2"}) == Shard(4, 5)
    with pytest.raises(ValueError, match="invalid shard 5/5"):
        grid_shard({"FSCL_SHARD_COUNT": "5", "FSCL_SHARD_INDEX": "5"})


@pytest.mark.parametrize("count", range(1, 8))
def test_shards_partition_the_grid(count):
    runs = list(range(10))
    picked = [r for i in range(count) for r in Shard(i, count).select(runs)]
    assert sorted(picked) == runs


@pytest.mark.parametrize("size, world", [(16, 2), (9, 2), (7, 3), (1, 2)])
def test_batch_slices_cover_a_batch_once(size, world):
    rows = [i for r in range(world) for i in range(size)[batch_slice_for(size, r, world)]]
    assert rows == list(range(size))


def test_two_processes_shard_the_grid_each_run_once(tmp_path):
    overrides = [f"out={tmp_path / 'runs'}", "strategy=zeroshot", "seed=[0,1,2]", "sessions=1"]
    ranks = _launch(tmp_path, overrides)
    done = [{path for path, status, _ in outcomes if status == "finished"} for outcomes in ranks]
    assert all(status == "finished" for outcomes in ranks for _, status, _ in outcomes)
    assert [len(d) for d in done] == [2, 1] and not done[0] & done[1]
    expected = {str(tmp_path / "runs/quick/digits/openclip-fscl-tiny/zeroshot" / f"5-s{s}") for s in range(3)}
    assert done[0] | done[1] == expected
    assert all(RunRecord(Path(p)).is_finished() for p in expected)


def _config(record: RunRecord) -> dict:
    return yaml.safe_load((record.path / "config.yaml").read_text())


def _masks(folder: Path, rank: int) -> list:
    return [json.loads((folder / f"rank{rank}-session{s}.json").read_text()) for s in (1, 2)]


def test_ddp_lorsu_builds_the_same_masks_on_both_ranks_and_matches_one_process(tmp_path):
    """The global batch of 16 is split 8/8 (the last batch of 9: 5/4) between the ranks, the
    features gathered for the CLIP loss and the gradients averaged: training, LoRSU's importance
    scores and so its masks, and the accuracy matrix equal those of one process on the whole batch."""
    # lr high enough that session 2 changes the accuracies of the untrained tiny model
    # and the last partial batch kept, so that the ranks also split an odd batch
    overrides = ["strategy=test-lorsu-record", "sessions=2", "train.epochs=1", "train.lr=0.03", "seed=0", "ddp=true",
                 "keep_checkpoints=last", "train.drop_last=false"]
    single_masks, ddp_masks = tmp_path / "single-masks", tmp_path / "ddp-masks"
    single_masks.mkdir(), ddp_masks.mkdir()
    os.environ[fscl_test_strategies.MASKS_ENV] = str(single_masks)
    try:
        assert main(["run", "quick", f"out={tmp_path / 'single'}", "--no-progress", *overrides]) == 0
    finally:
        del os.environ[fscl_test_strategies.MASKS_ENV]
    (outcomes, _) = _launch(tmp_path, [f"out={tmp_path / 'ddp'}", *overrides],
                            {fscl_test_strategies.MASKS_ENV: str(ddp_masks)})
    assert [status for _, status, _ in outcomes] == ["finished"]

    assert _masks(ddp_masks, 0) == _masks(ddp_masks, 1) == _masks(single_masks, 0)
    run = "quick/digits/openclip-fscl-tiny/test-lorsu-record/5-s0"
    single, ddp = RunRecord(tmp_path / "single" / run), RunRecord(tmp_path / "ddp" / run)
    weights = [checkpoints.load_latest(r.path, _config(r)).encoder for r in (single, ddp)]
    for name, value in weights[0].items():  # the trained encoders agree up to float summation order
        other = weights[1][name]
        if name.endswith("attn.in_proj_bias"):
            # except the key bias: softmax ignores it, its exact gradient is 0, and Adam scales the
            # float noise of that 0 up to lr-sized steps in either run (with no effect on any output)
            width = len(value) // 3
            value, other = torch.cat([value[:width], value[2 * width:]]), torch.cat([other[:width], other[2 * width:]])
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=name)
    # sharded evaluation gathered: every test image counted once, the same predictions
    assert ddp.metrics() == single.metrics()
    matrix = pd.read_csv(ddp.path / "matrix.csv")
    assert (ddp.path / "matrix.csv").read_text() == (single.path / "matrix.csv").read_text()
    assert matrix["digits"].iloc[2] != matrix["digits"].iloc[0]  # training changed the accuracy
    assert not (ddp.path / "run.lock").exists()


def test_ddp_refuses_a_strategy_that_does_not_support_it(tmp_path, capsys):
    with pytest.raises(ConfigError, match="ddp: strategy 'test-no-ddp' does not support data-parallel"):
        load_config("quick", ["strategy=test-no-ddp", "ddp=true"])
    assert main(["run", "quick", "strategy=[zeroshot,test-no-ddp]", "ddp=true", f"out={tmp_path}"]) == 2
    assert "does not support data-parallel training" in capsys.readouterr().err


def test_dry_run_prints_this_shard(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FSCL_SHARD_COUNT", "3")
    monkeypatch.setenv("FSCL_SHARD_INDEX", "1")
    assert main(["run", "quick", f"out={tmp_path}", "seed=0,1,2", "--dry-run", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "6 run(s) of 'quick' from preset 'quick', 2 in shard 1/3: 2 strategies"
    listed = [line for line in lines if line.startswith("    to run ")]
    assert [line.split("/")[-2:] for line in listed] == [["zeroshot", "5-s1"], ["full-ft", "5-s1"]]
    assert "cost of the 2 run(s) to do of this shard:" in lines


def test_ddp_refuses_a_backbone_with_batch_norm(tmp_path, capsys):
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fscl-tiny-rn-bn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fscl-tiny-rn-bn.json")
    args = ["run", "quick", f"out={tmp_path / 'runs'}", "--no-progress", "seed=0", "strategy=full-ft",
            "backbone=openclip:fscl-tiny-rn-bn", "sessions=1"]
    assert main([*args, "ddp=true"]) == 2
    assert "ddp: backbone 'openclip:fscl-tiny-rn-bn' has batch-norm layers" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("manifest.json")) and not list((tmp_path / "runs").rglob("run.lock"))


def test_devices_resolve_with_an_index_or_say_what_the_machine_has(monkeypatch):
    assert local_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert local_device("cuda") == local_device("auto") == torch.device("cuda", 0)
        assert local_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(ConfigError, match=r"allowed: cuda:0 \.\. cuda:"):
            local_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert local_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match=f"device: '{name}' asks for CUDA, which this machine lacks"):
                local_device(name)
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="'mps' is not available"):
            local_device("mps")
    with pytest.raises(ConfigError, match="device: invalid value 'tpu'"):
        local_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_run_on_a_device_the_machine_lacks_is_refused_before_any_work(tmp_path, capsys):
    assert main(["run", "quick", f"out={tmp_path}", "device=cuda", "strategy=zeroshot", "seed=0"]) == 2
    assert "asks for CUDA, which this machine lacks" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
