"""The VLM seam's bad input (issue 24), each refused before any model is built, in one line naming the value and
what is allowed: an unknown ``vqa.model`` family, a folder of another ``model_type``, a backbone whose layout the
tower cannot take, a ``*-ppl`` strategy with a family that has no answer loss; and what the seam promises: LLaVA
named only in its own family module, ``skip_last_blocks`` of the VLM-loss strategies from the family's feature
layer. Tiny random models saved offline, on CPU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import benchmark
from benchmark.backbones.hf import save_tiny_clip, save_tiny_siglip
from benchmark.cli import main
from benchmark.config import load_config
from benchmark.grid import GridCheckError, run_grid, vqa_problems
from benchmark.registry import VLMS
from benchmark.vlm.llava import LlavaFamily, save_tiny_llava
from benchmark.vlm.recipe import with_vlm_defaults
from benchmark.vlm.spec import allowed_vlms
from strategies.options import LoRAPplOptions, LoRSUOptions, LoRSUPplOptions

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

NO_LOSS = "test-no-answer-loss"
EXPECTED_LLAVA = "expected a LlavaForConditionalGeneration (model_type 'llava')"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    """A tiny LLaVA whose tower takes ``openclip:fscl-tiny``."""
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


def edited(folder: Path, to: Path, **config) -> Path:
    """A copy of the saved model ``folder`` at ``to`` whose config.json has the fields ``config``."""
    shutil.copytree(folder, to)
    (to / "config.json").write_text(json.dumps({**json.loads((to / "config.json").read_text()), **config}))
    return to


def refusal(tmp_path: Path, *overrides: str) -> str:
    """The grid check's message for the ``quick`` preset with ``overrides``; nothing may have been written."""
    cfg = load_config("quick", ["seed=0", f"out={tmp_path / 'runs'}", *overrides])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    assert not (tmp_path / "runs").exists()
    return str(err.value)


class NoAnswerLoss(LlavaFamily):
    """A LLaVA family that cannot train through its answer loss (the VLM-loss strategies must refuse it)."""

    example = f"{NO_LOSS}:/path/to/folder"
    has_answer_loss = False


@pytest.fixture()
def no_loss_family():
    """:class:`NoAnswerLoss` registered as ``test-no-answer-loss`` for the test, then removed again."""
    VLMS.register(NO_LOSS)(NoAnswerLoss)
    yield NO_LOSS
    del VLMS._entries[NO_LOSS]  # the registry has no public removal; other tests must not see the family


# --------------------------------------------------------------------------- bad input
def test_an_unknown_family_is_refused_with_a_did_you_mean_and_the_registered_forms(tmp_path, capsys):
    assert main(["run", "quick", "vqa.model=lava:/models/llava-1.5-7b", f"out={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "vqa.model" in line]
    assert "vqa.model: invalid value 'lava:/models/llava-1.5-7b'" in line and "did you mean 'llava'?" in line
    for form in ("llava:/path/to/folder", "llava:org/hub-id", "mini", "mini:/path/to/folder"):
        assert form in line
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_a_folder_of_another_model_type_is_refused_by_the_grid_check(llava, tmp_path, capsys):
    clip = save_tiny_clip(tmp_path / "clip")  # a CLIP folder given as a LLaVA
    message = refusal(tmp_path, "strategy=zeroshot", f"vqa.model=llava:{clip}")
    assert f"vqa.model 'llava:{clip}' is a 'clip' model; {EXPECTED_LLAVA}" in message
    next_ = edited(llava, tmp_path / "next", model_type="llava_next")  # a LLaVA-NeXT config, LLaVA's files
    message = refusal(tmp_path, "strategy=lorsu-ppl", f"vqa.model=llava:{next_}")
    assert f"vqa.model 'llava:{next_}' is a 'llava_next' model; {EXPECTED_LLAVA}" in message
    assert main(["run", "quick", "seed=0", "strategy=zeroshot", f"vqa.model=llava:{clip}", f"out={tmp_path / 'cli'}",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"is a 'clip' model; {EXPECTED_LLAVA}" in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize("model_type", ["paligemma", "a-model-transformers-does-not-know"])
def test_any_other_model_type_is_refused_in_one_line(llava, tmp_path, model_type):
    folder = edited(llava, tmp_path / "other", model_type=model_type)
    runs = load_config("quick", ["seed=0", "strategy=zeroshot", f"vqa.model=llava:{folder}"]).expand()
    assert vqa_problems(runs) == [f"vqa.model 'llava:{folder}' is a '{model_type}' model; {EXPECTED_LLAVA}, "
                                  f"e.g. llava-hf/llava-1.5-7b-hf"]


def test_a_backbone_whose_layout_the_tower_cannot_take_is_refused(llava, tmp_path):
    siglip = save_tiny_siglip(tmp_path / "siglip")
    message = refusal(tmp_path, "strategy=zeroshot", f"backbone=hf:{siglip}", f"vqa.model=llava:{llava}")
    assert (f"vqa: the encoder of 'hf:{siglip}' cannot go into LLaVA's CLIP vision tower: it has a SiglipModel "
            f"(not a CLIP ViT). VQA needs an OpenAI-layout CLIP ViT") in message


def test_a_ppl_strategy_with_a_family_without_answer_loss_is_refused(no_loss_family, llava, tmp_path):
    spec = f"{no_loss_family}:{llava}"
    message = refusal(tmp_path, "strategy=[lorsu-ppl,lora-ppl,zeroshot]", f"vqa.model={spec}")
    for strategy in ("lorsu-ppl", "lora-ppl"):
        assert (f"{strategy} on openclip:fscl-tiny: vqa.model '{spec}': its family has no answer loss to train "
                f"through; {strategy} needs one (families with one: llava, mini, paligemma)") in message
    assert "zeroshot" not in message  # VQA through the family is fine: only training through it is refused
    assert main(["run", "quick", "seed=0", "strategy=zeroshot", f"vqa.model={spec}", f"out={tmp_path / 'runs'}",
                 "--dry-run"]) == 0


def test_a_family_registered_with_the_decorator_is_among_the_allowed_forms(no_loss_family):
    assert no_loss_family in allowed_vlms("lava").split("form: ")[1]


def test_fscl_ls_vlms_lists_the_families_with_their_load_forms(capsys):
    assert main(["ls", "vlms"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("llava", "mini")) and "load: llava:/path/to/folder" in out


# --------------------------------------------------------------------------- the seam
def test_llava_is_named_only_in_its_family_module_and_the_registry_line():
    root = Path(benchmark.__file__).parent
    naming = {path.relative_to(root).as_posix() for path in root.rglob("*.py") if "llava" in path.read_text()}
    assert naming == {"vlm/llava.py", "vlm/__init__.py"}


def test_skip_last_blocks_defaults_to_the_blocks_past_the_families_feature_layer(llava, tmp_path):
    for options in (LoRSUPplOptions(), LoRAPplOptions()):
        assert options.skip_last_blocks is None
        assert with_vlm_defaults(options, f"llava:{llava}").skip_last_blocks == 1  # LLaVA-1.5 reads layer -2
    last = edited(llava, tmp_path / "last", vision_feature_layer=-1)  # a VLM reading the tower's last layer
    assert with_vlm_defaults(LoRSUPplOptions(), f"llava:{last}").skip_last_blocks == 0
    first = edited(llava, tmp_path / "first", vision_feature_layer=1)  # the output of block 1 of 2
    assert with_vlm_defaults(LoRAPplOptions(), f"llava:{first}").skip_last_blocks == 1
    assert with_vlm_defaults(LoRSUPplOptions(skip_last_blocks=0), f"llava:{llava}").skip_last_blocks == 0  # as set
    assert with_vlm_defaults(LoRSUPplOptions(), None).skip_last_blocks == 0  # no VLM (the grid check says so)
    clip_loss = LoRSUOptions()
    assert with_vlm_defaults(clip_loss, f"llava:{llava}") is clip_loss  # not a VLM-loss strategy's options


@pytest.mark.parametrize("evaluate, produces, vqa, images", [
    ("[vqa]", "produces: no zero-shot accuracy (evaluate: [vqa])", "VQA: llava:", " 0 evaluated images"),
    ("[zeroshot]", "produces: zero-shot accuracy of the target", "VQA: off (evaluate has no vqa;", " evaluated images ("),
])
def test_the_dry_run_says_what_evaluate_keeps(llava, tmp_path, capsys, evaluate, produces, vqa, images):
    assert main(["run", "quick", "seed=0", "strategy=lorsu-ppl", f"vqa.model=llava:{llava}", f"evaluate={evaluate}",
                 f"out={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert produces in out and vqa in out and images in out


def test_a_record_holding_the_value_a_null_skip_last_blocks_resolves_to_is_the_same_configuration(llava):
    """Records written before the *-ppl default became the VLM's hold ``skip_last_blocks: 1`` for LLaVA: a run (or
    its resume) with today's null default compares equal to them; another value still differs."""
    from benchmark.checkpoints import config_differences

    (run,) = load_config("quick", ["seed=0", "strategy=lorsu-ppl", f"vqa.model=llava:{llava}"]).expand()
    old = run.to_dict()
    assert old["lorsu-ppl"]["skip_last_blocks"] is None
    assert config_differences({**old, "lorsu-ppl": {**old["lorsu-ppl"], "skip_last_blocks": 1}}, old) == []
    assert config_differences({**old, "lorsu-ppl": {**old["lorsu-ppl"], "skip_last_blocks": 0}}, old) == [
        "lorsu-ppl.skip_last_blocks: 0 -> 1"]


def test_an_encoder_no_vlm_reads_refuses_its_hidden_states_in_one_line():
    """A ResNet tower's skeleton: asked for the tokens a VLM reads, a clear FsclError, not a placeholder."""
    import torch

    from benchmark.backbones import backbone_skeleton
    from benchmark.backbones.base import NoHiddenStatesError

    with pytest.raises(NoHiddenStatesError, match="'openclip:RN50': a VLM reads the hidden states of an OpenAI-layout"):
        backbone_skeleton("openclip:RN50").hidden_states(torch.empty(1, 3, 224, 224, device="meta"), -2)
