"""The grid's data is checked before any model is built: one message for every problem."""
import pytest
import yaml

from benchmark.config import load_config
from benchmark.runner import GridCheckError, check_data, run_grid


def test_every_data_problem_of_the_grid_is_named_before_any_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FSCL_CACHE", str(tmp_path / "cache"))  # an empty model cache: building 'mini' would show
    cfg = load_config("quick", [f"out={tmp_path / 'runs'}", f"data_root={tmp_path / 'nowhere'}", "backbone=mini",
                                "stream=[digits,gtsrb,eurosat]", "strategy=[zeroshot,full-ft]", "seed=0",
                                "sessions=12"])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    message = str(err.value)
    assert "3 problem(s); nothing was run" in message
    assert "digits: 12 sessions but only 10 classes" in message  # a stream on no disk at all, too many sessions
    assert f"gtsrb: data folder not found: {tmp_path / 'nowhere' / 'gtsrb'}" in message
    assert f"eurosat: data folder not found: {tmp_path / 'nowhere' / 'eurosat'}" in message
    assert "(runs: gtsrb/zeroshot/5-s0, gtsrb/full-ft/5-s0)" in message  # each problem once, with its runs
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_checked_data_is_shared_by_the_runs_of_a_stream():
    runs = load_config("quick", ["strategy=[zeroshot,full-ft]", "seed=[0,1]", "controls=[digits]",
                                 "stream=digits"]).expand()
    data = check_data(runs)
    assert len(data) == 4 and len({id(d.stream) for d in data}) == 1  # one scan for the grid
    assert [s.ids for s in data[0].sessions] == [s.ids for s in data[2].sessions]  # same seed, other strategy
    assert [s.ids for s in data[0].sessions] != [s.ids for s in data[1].sessions]  # seed 1 draws its own shots


def test_a_finished_run_is_not_reused_for_another_configuration(tmp_path):
    base = [f"out={tmp_path}", "strategy=full-ft", "seed=0", "sessions=1", "train.epochs=1"]
    (outcome,) = run_grid(load_config("quick", base), progress=False)
    assert outcome.status == "finished"
    assert [o.status for o in run_grid(load_config("quick", [*base, "device=cpu"]), progress=False)] == ["skipped"]
    changed = load_config("quick", [*base, "train.lr=0.0007"])
    with pytest.raises(GridCheckError) as err:
        run_grid(changed, progress=False)
    assert f"{outcome.path} finished with another configuration: train.lr: 0.0005 -> 0.0007" in str(err.value)
    assert "--force runs it again" in str(err.value)
    (again,) = run_grid(changed, progress=False, force=True)
    assert again.status == "finished" and again.path == outcome.path
    assert yaml.safe_load((outcome.path / "config.yaml").read_text())["train"]["lr"] == 0.0007
    assert [o.status for o in run_grid(changed, progress=False, force=True)] == ["skipped"]  # nothing changed now
