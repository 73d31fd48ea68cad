"""Issue 22's configuration defects: resolved records compared on the keys that reach a run, every value and
every folder name checked before any work (all problems at once), and ``--dry-run`` making the run's checks."""
from __future__ import annotations

import shutil

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import ConfigError, load_config
from benchmark.grid import GridCheckError, run_grid, strategy_problems
from benchmark.runs import run_dir

GRID = ("seed=0", "sessions=1", "train.epochs=1", "strategy=[zeroshot,full-ft,lorsu]")


def _statuses(out, *overrides: str, force: bool = False) -> dict[str, str]:
    outcomes = run_grid(load_config("quick", [f"out={out}", *GRID, *overrides]), progress=False, force=force)
    return {o.path.parent.name: o.status for o in outcomes}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The runs folder of GRID, run once for the module (tests take a copy)."""
    out = tmp_path_factory.mktemp("finished")
    assert set(_statuses(out).values()) == {"finished"}
    return out


def test_one_strategys_option_refuses_only_its_own_finished_runs_and_defaults_are_no_change(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    with pytest.raises(GridCheckError) as err:
        _statuses(tmp_path, "lorsu.top_k_heads=4")
    message = str(err.value)
    assert "1 problem(s)" in message and "lorsu/5-s0 finished with another configuration: lorsu.top_k_heads: 2 -> 4" \
        in message and "zeroshot/5-s0" not in message and "full-ft/5-s0" not in message
    # a default written out, another stream's option, a moved data root (digits ships with scikit-learn): no change
    for same in ("lorsu.rank=64", "mini-signs.seed=3", f"data_root={tmp_path / 'moved'}"):
        assert _statuses(tmp_path, same) == {"zeroshot": "skipped", "full-ft": "skipped", "lorsu": "skipped"}
    assert _statuses(tmp_path, "lorsu.top_k_heads=4", force=True) == {
        "zeroshot": "skipped", "full-ft": "skipped", "lorsu": "finished"}


def test_config_yaml_holds_every_resolved_option_of_its_strategy_and_streams(tmp_path):
    runs = {r.strategy: r for r in load_config("quick", [f"out={tmp_path}", *GRID, "lorsu.top_k_heads=4",
                                                         "controls=[mini-signs]"]).expand()}
    lorsu, zeroshot = runs["lorsu"].to_dict(), runs["zeroshot"].to_dict()
    assert lorsu["lorsu"]["top_k_heads"] == 4 and lorsu["lorsu"]["rank"] == 64 and lorsu["lorsu"]["sparsity"] == 0.1
    assert lorsu["digits"] == {"test_fraction": 0.3, "split_seed": 0}  # the target's options, at their defaults
    assert lorsu["mini-signs"] == {"train_per_class": 50, "test_per_class": 30, "seed": 0}  # a control's
    assert "lorsu" not in zeroshot and "digits" in zeroshot  # another strategy's section never reaches the run


def test_records_written_before_they_held_every_option_still_match(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    for strategy, section in (("lorsu", None), ("zeroshot", {"rank": 64})):  # as an older version wrote them:
        path = run_dir(load_config("quick", [f"out={tmp_path}", *GRID, f"strategy={strategy}"]).expand()[0])
        config = yaml.safe_load((path / "config.yaml").read_text())
        config.pop("lorsu", None), config.pop("digits")  # only the keys given, every strategy's section in every run
        if section:
            config["lorsu"] = section
        (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert set(_statuses(tmp_path).values()) == {"skipped"}
    with pytest.raises(GridCheckError, match=r"lorsu/5-s0 finished with another configuration: lorsu.rank: 64 -> 8"):
        _statuses(tmp_path, "lorsu.rank=8")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "/abs"])
def test_a_name_that_is_not_one_folder_name_is_refused(name):
    with pytest.raises(ConfigError, match=r"name: invalid value .*; allowed: one folder name"):
        load_config("quick", [f"name={name}"])


@pytest.mark.parametrize("override", ["seed=4294967296", "seed=[0,4294967296]", "seed=-1", "shot_seed=4294967296",
                                      "vqa.seed=4294967296", "vqa.seed=-1"])
def test_seeds_outside_the_range_numpy_takes_are_refused(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: invalid value .*an integer in \[0, 4294967295\]"):
        load_config("quick", [override])


def test_a_folder_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path, capsys):
    cfg = load_config("quick", [f"out={tmp_path / 'runs'}", "seed=0", "strategy=zeroshot", "name=" + "n" * 300])
    with pytest.raises(GridCheckError, match=r"name: the folder name 'n{20}\.\.\.' is 300 bytes long; at most 255"):
        run_grid(cfg, progress=False)
    assert not (tmp_path / "runs").exists()
    assert main(["run", "quick", f"out={tmp_path / 'runs'}", "seed=0", "strategy=zeroshot", "name=" + "é" * 130,
                 "--dry-run"]) == 2  # 260 bytes in UTF-8
    assert "is 260 bytes long" in capsys.readouterr().err


def test_every_invalid_value_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("quick", ["strategy=[full-ft,lora,spu]", "spu.sparsity=5", "lora.rank=0", "train.lr=-1",
                              "train.epochs=0", "lorsuu.rank=3"])
    message = str(err.value)
    assert message.startswith("5 invalid values:\n")
    for part in ("spu.sparsity: invalid value 5.0", "lora.rank: invalid value 0", "train.lr: invalid value -1.0",
                 "train.epochs: invalid value 0", "lorsuu: unknown key. Did you mean 'lorsu'?"):
        assert f"\n- {part}" in message


def test_dry_run_makes_every_check_of_the_run(tmp_path, capsys):
    args = ["run", "quick", f"out={tmp_path}", "seed=0", "strategy=full-ft", "ddp=true", "--jobs", "2"]
    assert main([*args, "--dry-run"]) == 2
    assert "with ddp: true the launched processes share each run" in capsys.readouterr().err
    assert main(args) == 2
    assert "with ddp: true the launched processes share each run" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["strategy=[]", "stream=[]", "seed=[]", "shots=[]", "backbone=[]"])
def test_an_empty_grid_is_refused(override):
    with pytest.raises(ConfigError, match=rf"{override.partition('=')[0]}: invalid value \[\]; allowed: .*non-empty"):
        load_config("quick", [override])


def test_vqa_subset_without_sessions_in_between_is_refused():
    with pytest.raises(ConfigError, match=r"vqa.subset: invalid value 40; allowed: null with vqa.sessions: ends"):
        load_config("quick", ["vqa.subset=40"])
    assert load_config("quick", ["vqa.subset=40", "vqa.sessions=all"]).vqa.subset == 40


def test_a_vlm_loss_strategy_without_vqa_model_is_told_of_the_mini_vlm():
    (problem,) = strategy_problems(load_config("quick", ["strategy=lorsu-ppl", "seed=0"]).expand())
    assert "needs vqa.model" in problem and "vqa.model=mini" in problem
