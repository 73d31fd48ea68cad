"""Configuration: YAML + overrides, grid expansion, validation messages."""
import re

import pytest

from benchmark.config import ConfigError, TrainConfig, apply_override, load_config, parse_config


def test_overrides_and_grid_expansion():
    cfg = load_config("quick", ["seed=0,1,2", "strategy=[zeroshot,full-ft]", "shots=[1,5]", "train.epochs=3"])
    runs = cfg.expand()
    assert len(runs) == 3 * 2 * 2
    assert {(r.strategy, r.shots, r.seed) for r in runs} == {
        (s, k, seed) for s in ("zeroshot", "full-ft") for k in (1, 5) for seed in (0, 1, 2)}
    assert all(r.train.epochs == 3 for r in runs)
    assert runs[0].name == "quick"


def test_strategy_and_stream_sections_are_options():
    cfg = load_config("quick", ["digits.test_fraction=0.5"])
    assert cfg.options == {"digits": {"test_fraction": 0.5}}
    opts = cfg.options_for("digits", __import__("streams.digits", fromlist=["x"]).DigitsOptions)
    assert opts.test_fraction == 0.5


def test_a_run_s_options_are_parsed_once_into_their_dataclasses_beside_the_recorded_sections():
    """Config.expand parses each run's strategy, target and control options once (options_of); config.yaml keeps
    the plain sections (to_dict), every option resolved."""
    import dataclasses

    from strategies.options import LoRSUOptions
    from streams.digits import DigitsOptions

    runs = load_config("quick", ["strategy=[zeroshot,lorsu]", "seed=0", "digits.test_fraction=0.5",
                                 "lorsu.top_k_heads=3", "controls=[eurosat]"]).expand()
    zeroshot, lorsu = runs
    assert zeroshot.options_of("zeroshot") is None and "zeroshot" not in zeroshot.to_dict()
    assert isinstance(lorsu.options_of("lorsu"), LoRSUOptions) and lorsu.options_of("lorsu").top_k_heads == 3
    assert lorsu.options_of("digits") == DigitsOptions(test_fraction=0.5)
    for name in ("lorsu", "digits", "eurosat"):
        assert lorsu.to_dict()[name] == dataclasses.asdict(lorsu.options_of(name))
    assert lorsu.options_of("lorsu") is lorsu.options_of("lorsu")  # parsed once, not per call


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("shots=0", "shots: invalid value 0; allowed: an integer >= 1"),
        ("seed=-1", "seed: invalid value -1"),
        ("train.lr=fast", "train.lr: invalid value 'fast'; allowed: a finite number"),
        ("train.epochs=0", "train.epochs: invalid value 0"),
        ("train.scheduler_step=batch", "train.scheduler_step: invalid value 'batch'; allowed: step | epoch"),
        ("device=tpu", "device: invalid value 'tpu'"),
        ("strategy=ful-ft", "did you mean 'full-ft'"),
        ("stream=digitz", "did you mean 'digits'"),
        ("controls=[nope]", "unknown stream 'nope'"),
        ("backbone=clip:ViT", "unknown backbone family 'clip'"),
        ("backbone=openclip:ViT-Q-99", "unknown open_clip model 'ViT-Q-99'"),
        ("sesions=3", "sesions: unknown key. Did you mean 'sessions'?"),
        ("train.epoch=3", "train.epoch: unknown key. Did you mean 'epochs'?"),
        ("digits.test_fraction=2", "digits.test_fraction: invalid value 2"),
        ("digits.nope=1", "digits.nope: unknown key"),
        ("loggers=[text,slack]", "loggers[1]: invalid value 'slack'"),
        ("train.drop_last=sometimes", "train.drop_last: invalid value 'sometimes'; allowed: true or false or auto"),
        ("train.augment=timm", "train.augment: invalid value 'timm'; allowed: released | openclip"),
        ("shot_seed=-1", "shot_seed: invalid value -1"),
        ("lorsu.scheduler_step=epoch", "lorsu.scheduler_step: unknown key"),  # one schedule: train.scheduler_step
        ("evaluate=[zeroshot,clip]", "evaluate[1]: invalid value 'clip'; allowed: zeroshot | vqa"),
        ("evaluate=[]", "evaluate: invalid value []; allowed: a non-empty list of zeroshot, vqa, each once"),
        ("evaluate=[vqa,vqa]", "evaluate: invalid value ['vqa', 'vqa']; allowed: a non-empty list"),
        ("evaluate=[vqa]", "evaluate: invalid value ['vqa']; allowed: zeroshot, or vqa with a vqa.model"),
        ("vqa.model=lava:/x", "vqa.model: invalid value 'lava:/x'; allowed: (did you mean 'llava'?) a registered VLM"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("quick", [override])
    assert fragment.lower() in str(err.value).lower()


def test_unknown_preset_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'quick'"):
        load_config("quik")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "seed")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(bad))


def test_config_file_round_trip(tmp_path):
    cfg = load_config("quick", ["seed=3"])
    again = parse_config(cfg.to_dict())
    assert again == cfg


def test_exponent_floats_without_a_dot_are_numbers():
    cfg = load_config("quick", ["train.lr=1e-2", "train.min_lr=5E-4"])
    assert cfg.train.lr == 0.01 and cfg.train.min_lr == 0.0005


def test_shot_seed_follows_the_run_seed_unless_pinned():
    runs = load_config("quick", ["seed=[0,1,2]", "strategy=zeroshot"]).expand()
    assert [(r.seed, r.shot_seed) for r in runs] == [(0, 0), (1, 1), (2, 2)]
    pinned = load_config("quick", ["seed=[0,1,2]", "strategy=zeroshot", "shot_seed=7"]).expand()
    assert [r.shot_seed for r in pinned] == [7, 7, 7]


def test_paper_presets_use_the_released_recipe():
    for preset in ("paper-cl5", "paper-cl20", "paper-cl50", "paper-offline"):
        cfg = load_config(preset)
        assert cfg.backbone == "openclip:ViT-L-14-336-quickgelu@openai"
        assert (cfg.train.drop_last, cfg.train.augment, cfg.shot_seed) == ("auto", "released", None)
        assert all(r.shot_seed == r.seed for r in cfg.expand()) and {r.seed for r in cfg.expand()} == {0, 1, 2}


def test_without_a_preset_a_run_starts_from_the_documented_defaults():
    cfg = load_config(None, ["stream=gtsrb", "strategy=lorsu", "data_root=/data"])
    assert cfg.name == "gtsrb" and cfg.controls == [] and cfg.options == {}  # not the mini world's
    assert cfg.train == TrainConfig() and cfg.seed == 0
    assert load_config(None, ["stream=[gtsrb,eurosat]"]).name == "gtsrb+eurosat"
    assert load_config(None, ["stream=gtsrb", "name=mine"]).name == "mine"
    assert load_config("mini").name == "mini" and load_config("mini").controls  # the offline benchmark: its preset


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").mkdir()
    assert load_config("quick").name == "quick"


@pytest.mark.parametrize("text, fragment", [
    ("stream: [digits\nseed: 0\n", "not valid YAML"),
    ("train:\n  lr: .inf\n", "train.lr: invalid value inf; allowed: a finite number"),
    ("train:\n  lr: .nan\n", "train.lr: invalid value nan; allowed: a finite number"),
    ("seed: [0, 1, 0]\n", "seed: invalid value [0, 1, 0]; allowed: each value once (repeated: 0)"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(str(path))


def test_an_override_that_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match=r"override 'seed=\[0,': the value is not valid YAML"):
        load_config("quick", ["seed=[0,"])


# --------------------------------------------------------------------------- sweeps of any key
def test_a_list_value_of_any_option_is_a_grid_axis_in_its_strategys_runs():
    cfg = load_config("quick", ["seed=0", "strategy=[full-ft,lorsu]", "train.lr=[1e-5,1e-4]",
                                "lorsu.top_k_heads=[1,2]", "lorsu.head_selection=[importance,random]"])
    assert cfg.sweeps == {"train.lr": [1e-5, 1e-4], "lorsu.top_k_heads": [1, 2],
                          "lorsu.head_selection": ["importance", "random"]}
    runs = cfg.expand()
    full_ft = [r for r in runs if r.strategy == "full-ft"]
    lorsu = [r for r in runs if r.strategy == "lorsu"]
    assert len(full_ft) == 2 and len(lorsu) == 2 * 2 * 2  # lorsu's keys sweep lorsu's runs only
    assert [r.train.lr for r in full_ft] == [1e-5, 1e-4] and all("lorsu" not in r.options or
                                                                 "top_k_heads" not in r.options["lorsu"] for r in full_ft)
    combos = {(r.train.lr, r.options["lorsu"]["top_k_heads"], r.options["lorsu"]["head_selection"]) for r in lorsu}
    assert combos == {(lr, k, h) for lr in (1e-5, 1e-4) for k in (1, 2) for h in ("importance", "random")}
    for run in lorsu:  # resolved: the values in place, and which were swept
        data = run.to_dict()
        assert data["swept"] == {"train.lr": data["train"]["lr"], "lorsu.top_k_heads": data["lorsu"]["top_k_heads"],
                                 "lorsu.head_selection": data["lorsu"]["head_selection"]}
        assert parse_config(data).expand() == [run]


def test_keys_whose_type_is_a_list_never_expand():
    runs = load_config("mini", ["seed=0", "stream=mini-signs", "strategy=zeroshot",
                                "controls=[mini-shapes,mini-digits]", "loggers=[text,csv]"]).expand()
    assert len(runs) == 1 and runs[0].controls == ["mini-shapes", "mini-digits"] and runs[0].loggers == ["text", "csv"]
    assert runs[0].swept == {}


def test_a_strategys_own_train_keys_win_over_train_in_its_runs_only():
    cfg = load_config("quick", ["seed=0", "strategy=[zeroshot,full-ft,lorsu]", "lorsu.train.lr=5e-4",
                                "lorsu.train.epochs=2", "full-ft.train.lr=2e-4", "train.lr=[1e-5,1e-4]"])
    runs = {(r.strategy, r.train.lr): r for r in cfg.expand()}
    # the global train.lr sweep does not expand lorsu and full-ft, which set their own lr
    assert sorted(runs) == [("full-ft", 2e-4), ("lorsu", 5e-4), ("zeroshot", 1e-5), ("zeroshot", 1e-4)]
    assert runs["lorsu", 5e-4].train.epochs == 2 and runs["full-ft", 2e-4].train.epochs == 5
    for run in runs.values():  # resolved into train: no strategy section keeps train keys
        assert all("train" not in section for section in run.options.values())
        assert "full-ft" not in run.options  # a section that only held train keys is gone
    assert runs["lorsu", 5e-4].swept == {} and runs["zeroshot", 1e-4].swept == {"train.lr": 1e-4}


@pytest.mark.parametrize("override, fragment", [
    ("lorsu.train.lr=fast", "lorsu.train.lr: invalid value 'fast'"),
    ("lorsu.train.lr=1e-7", "lorsu: train.min_lr: invalid value 1e-06; allowed: a float in [0, lr=1e-07]"),  # own lr
    ("lorsu.train.epoch=2", "lorsu.train.epoch: unknown key"),
    ("full-ft.rank=2", "full-ft: invalid value {'rank': 2}; allowed: nothing: strategy 'full-ft' takes no options"),
    ("train.lr=[1e-5,fast]", "train.lr[1]: invalid value 'fast'"),
    ("train.lr=[1e-5,1e-5]", "train.lr: invalid value [1e-05, 1e-05]; allowed: each value once"),
    ("lorsu.top_k_heads=[]", "lorsu.top_k_heads: invalid value []"),
    ("lorsu.head_selection=[importance,best]", "lorsu.head_selection[1]: invalid value 'best'; allowed: importance | random"),
    ("lorsu.nope=[1,2]", "lorsu.nope: unknown key"),
])
def test_bad_swept_values_and_strategy_train_keys_are_named(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("quick", ["strategy=[full-ft,lorsu]", override])
    assert fragment.lower() in str(err.value).lower()


def test_swept_grids_round_trip_through_their_plain_form():
    cfg = load_config("quick", ["train.lr=[1e-5,1e-4]", "lorsu.rank=[4,8]", "strategy=lorsu"])
    assert cfg.to_dict()["train"]["lr"] == [1e-5, 1e-4] and parse_config(cfg.to_dict()) == cfg


def test_run_folders_name_the_swept_values_stably_and_uniquely(tmp_path):
    from benchmark.runs import run_dir

    cfg = load_config("quick", [f"out={tmp_path}", "seed=0", "strategy=[zeroshot,lorsu]", "train.lr=[1e-5,0.0005]",
                                "lorsu.top_k_heads=[1,4]"])
    folders = [run_dir(r).relative_to(tmp_path).as_posix() for r in cfg.expand()]
    assert folders == [
        "quick/digits/openclip-fscl-tiny/zeroshot/lr=1e-05/5-s0",
        "quick/digits/openclip-fscl-tiny/zeroshot/lr=0.0005/5-s0",
        "quick/digits/openclip-fscl-tiny/lorsu/top_k_heads=1,lr=1e-05/5-s0",
        "quick/digits/openclip-fscl-tiny/lorsu/top_k_heads=4,lr=1e-05/5-s0",
        "quick/digits/openclip-fscl-tiny/lorsu/top_k_heads=1,lr=0.0005/5-s0",
        "quick/digits/openclip-fscl-tiny/lorsu/top_k_heads=4,lr=0.0005/5-s0",
    ]
    # without swept keys the folders are those of before (old runs resume)
    plain = load_config("quick", [f"out={tmp_path}", "seed=0", "strategy=lorsu"]).expand()[0]
    assert run_dir(plain).relative_to(tmp_path).as_posix() == "quick/digits/openclip-fscl-tiny/lorsu/5-s0"


def test_long_sweeps_keep_short_unique_folder_names():
    from benchmark.config import sweep_tag

    lrs = [1e-5 + i * 1e-9 for i in range(50)]
    swept = [{"train.lr": lr, "train.min_lr": 1e-6, "lorsu.importance_samples": 1000, "lorsu.head_selection": "random",
              "lorsu.importance_min_abs": 1e-10} for lr in lrs]
    tags = [sweep_tag(s) for s in swept]
    assert len(set(tags)) == len(tags) and all(len(t) <= 60 for t in tags)
    assert tags == [sweep_tag(s) for s in swept]  # stable
    assert sweep_tag({"train.lr": 1e-4, "lorsu.train.lr": 1e-3}) == "lorsu.train.lr=0.001,train.lr=0.0001"  # same last part
    assert sweep_tag({"x.name": "a/b"}).startswith("name=a-b-")  # a character a folder must not hold: hashed


def test_ablation_presets_sweep_one_lorsu_option_around_the_papers_value():
    from benchmark.config import declared_default, list_presets

    presets = [p for p in list_presets() if p.startswith("paper-ablation-")]
    swept = {}
    for preset in presets:
        cfg = load_config(preset)
        assert cfg.strategy == "lorsu" and cfg.train == load_config("paper-cl5").train and len(cfg.sweeps) == 1
        ((key, values),) = cfg.sweeps.items()
        assert declared_default(key) in values  # the paper's value: the ablation tables' reference
        assert len(cfg.expand()) == 5 * 3 * len(values)
        swept[key] = values
    assert set(swept) == {"lorsu.head_selection", "lorsu.top_k_heads", "lorsu.fc1_mask", "lorsu.sparsity", "lorsu.rank"}


def test_the_mini_preset_runs_every_strategy_that_trains_at_its_own_tuned_rate():
    from benchmark.config import PRESET_DIR, read_source

    data, cfg = read_source("mini"), load_config("mini")
    trainers = [s for s in cfg.strategy if s != "zeroshot"]
    assert all("lr" in data[s]["train"] for s in trainers)  # the rate fscl tune chose, per strategy
    runs = {r.strategy: r for r in cfg.expand() if r.seed == 0 and r.stream == "mini-signs"}
    assert all(runs[s].train.lr == data[s]["train"]["lr"] for s in trainers)
    assert "fscl tune mini" in (PRESET_DIR / "mini.yaml").read_text()  # its provenance, as comments
