"""``fscl export --format vlm``: the VLM a VLM-side strategy adapted, as a PEFT adapter folder or merged.

Real runs of ``lora-llm`` (the language model's LoRA) and ``lora-vlm`` (also the encoder, in the tower) on a tiny
random LLaVA with a 3-layer Llama; the exports load with transformers / peft alone and answer as the run's adapted
VLM, recomputed here from the checkpoint's factors through the strategies' own :class:`strategies.llm.VLMAdapter`.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from benchmark.backbones import load_backbone
from benchmark.cli import main
from benchmark.vlm.llava import save_tiny_llava
from benchmark.vlm.spec import resolve_vlm
from strategies.llm import VLMAdapter

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

RUN = "quick/digits/openclip-fscl-tiny/{}/2-s0"
SETTINGS = ("seed=0", "sessions=2", "shots=2", "train.epochs=1", "train.lr=0.05", "train.warmup_steps=0",
            "lora-llm.warmup=steps", "lora-vlm.warmup=steps", "lora-llm.rank=4", "lora-vlm.rank=4", "lora-llm.alpha=16",
            "lora-vlm.alpha=16", "digits.test_fraction=0.05", "keep_checkpoints=last",
            "--no-progress")


@pytest.fixture(scope="module")
def llava3(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava3") / "tiny", text={"num_hidden_layers": 3})


@pytest.fixture(scope="module")
def runs(llava3, tmp_path_factory) -> Path:
    """Two-session runs of lora-llm, lora-vlm and zeroshot that keep the last session's checkpoint only."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "quick", "strategy=[lora-llm,lora-vlm,zeroshot]", f"vqa.model=llava:{llava3}", f"out={out}",
                 *SETTINGS]) == 0
    return out


def export(run: Path, out: Path, *extra: str, session: int = 2) -> tuple[int, str]:
    """``fscl export RUN --format vlm``: its exit status, and what it printed (stderr, then stdout: the snippet last)."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["export", str(run), "--session", str(session), "--format", "vlm", "--out", str(out), *extra])
    return status, stderr.getvalue() + stdout.getvalue()


def adapted(run: Path, session: int = 2):
    """The run's VLM after ``session``, rebuilt as the run has it: its VLM loaded afresh, the
    checkpoint's encoder in its tower when the run trained it, the factors attached through the strategies' adapter."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    state = torch.load(run / "checkpoints" / f"session-{session}.pt", map_location="cpu", weights_only=False)
    vlm = resolve_vlm(config["vqa"]["model"]).load(torch.device("cpu"))
    if "encoder" in json.loads((run / "manifest.json").read_text())["updates"]:
        backbone = load_backbone(config["backbone"])
        backbone.visual.load_state_dict(state["encoder"])
        vlm.swap_encoder(backbone)
    factors = state["strategy"].get("vlm", state["strategy"])["factors"]
    options = config[config["strategy"]]
    VLMAdapter(options["rank"], options["alpha"]).attach(
        vlm.model, sorted({n.split(".lora_")[0] for n in factors}), factors)
    return vlm, factors


def batch(vlm) -> dict[str, torch.Tensor]:
    """Two real questions about two images, as the VQA evaluation builds them."""
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 32, 3, generator=gen) * 255).byte().numpy()) for _ in range(2)]
    return vlm.inputs(images, [vlm.prompt("Which digit is it? A. 3 B. 7"), vlm.prompt("Is it red?")])


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def snippet_names(printed: str) -> dict:
    """What the loading snippet that ``fscl export`` printed (after "load it in a script:") defines."""
    names: dict = {}
    exec(textwrap.dedent(printed.split("load it in a script:\n", 1)[1]), names)
    return names


@pytest.mark.parametrize("strategy", ["lora-llm", "lora-vlm"])
def test_merged_export_loads_in_transformers_and_answers_as_the_adapted_vlm(strategy, runs, llava3, tmp_path):
    from transformers import LlavaForConditionalGeneration

    run = runs / RUN.format(strategy)
    status, printed = export(run, tmp_path / "merged", "--merge")
    assert status == 0, printed
    vlm, factors = adapted(run)
    inputs = batch(vlm)
    expected = logits(vlm.model, inputs)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    base = LlavaForConditionalGeneration.from_pretrained(llava3)
    assert not torch.allclose(logits(base, inputs), expected, atol=0.1)  # the adapter changed the answers (by > 0.5)
    # W + ΔW against W·x + ΔW·x: fp32 roundings only (logits up to ~2)
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(snippet_names(printed)["model"], inputs), expected, rtol=0, atol=1e-4)
    assert f"vqa.model=llava:{(tmp_path / 'merged').resolve()}" in printed
    adapted_weights = {f"{n.split('.lora_')[0]}.weight" for n in factors}
    tower = {k for k in base.state_dict() if k.startswith("model.vision_tower.")}
    ours, theirs = merged.state_dict(), base.state_dict()
    assert list(ours) == list(theirs)
    changed = {k for k in theirs if not torch.equal(ours[k], theirs[k])}
    assert adapted_weights <= changed  # every adapted weight holds its delta ...
    assert changed - adapted_weights == (changed & tower if strategy == "lora-vlm" else set())  # ... the rest is base
    assert (strategy == "lora-vlm") == bool(changed & tower)
    for key in tower:  # the tower holds the session's encoder (lora-vlm) or the pretrained one (lora-llm)
        assert torch.equal(ours[key], vlm.model.state_dict()[key])


@pytest.mark.parametrize("strategy", ["lora-llm", "lora-vlm"])
def test_adapter_export_loads_with_peft_over_the_base_and_answers_as_the_adapted_vlm(strategy, runs, llava3, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = runs / RUN.format(strategy)
    out = tmp_path / "adapter"
    status, printed = export(run, out)
    assert status == 0, printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 16.0, str(llava3))
    assert config["modules_to_save"] == (["model.vision_tower"] if strategy == "lora-vlm" else None)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()
    with safe_open(out / "adapter_model.safetensors", "pt") as saved:  # the factors (and a trained tower), no more
        assert all(".lora_" in key or ".vision_tower." in key for key in saved.keys())
    vlm, _ = adapted(run)
    inputs = batch(vlm)
    expected = logits(vlm.model, inputs)
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(llava3), out)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-6)
    names = snippet_names(printed)
    torch.testing.assert_close(logits(names["model"], inputs), expected, rtol=0, atol=1e-6)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.get_vocab() == vlm.processor.tokenizer.get_vocab()


def test_a_moved_base_vlm_is_named_with_vlm_and_a_different_one_is_refused(runs, llava3, tmp_path):
    run = runs / RUN.format("lora-llm")
    moved = shutil.copytree(llava3, tmp_path / "moved")
    assert export(run, tmp_path / "a", "--vlm", f"llava:{moved}")[0] == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(moved)
    other = save_tiny_llava(tmp_path / "one-layer")  # a 1-layer Llama: the run's layers 1 and 2 are not there
    status, printed = export(run, tmp_path / "b", "--vlm", f"llava:{other}")
    assert status == 2 and f"the run's adapter does not fit the VLM 'llava:{other}'" in printed
    assert "pass the VLM the run trained with --vlm" in printed


def test_what_the_vlm_export_refuses(runs, tmp_path, capsys):
    status, printed = export(runs / RUN.format("zeroshot"), tmp_path / "x")
    assert status == 2 and "strategy 'zeroshot' adapted nothing in the VLM" in printed
    assert "--format hf-clip-vision" in printed
    run = runs / RUN.format("lora-llm")
    status, printed = export(run, tmp_path / "x", session=0)
    assert status == 2 and "--session 0: before session 1 the VLM is the pretrained one" in printed
    status, printed = export(run, tmp_path / "x", session=1)
    assert status == 2 and "the adapted VLM after session 1 is not stored" in printed
    assert "keep_checkpoints: last" in printed and "keep_checkpoints=all --force" in printed
    status, printed = export(run, tmp_path / "x", session=3)
    assert status == 2 and "--session 3: the run has sessions 1..2" in printed
    assert not (tmp_path / "x").exists()
    status = main(["export", str(run), "--session", "2", "--format", "openclip", "--merge", "--out", str(tmp_path / "x")])
    assert status == 2 and "--vlm and --merge go with --format vlm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_strategy_whose_vlm_state_the_export_does_not_know_is_named(runs, tmp_path, capsys):
    """A run record of a VLM-side strategy the export has no reader for (its state's layout is the strategy's own)."""
    run = shutil.copytree(runs / RUN.format("lora-llm"), tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "strategy": "someone-elses-vlm-method"}))
    status, printed = export(run, tmp_path / "x")
    assert status == 2
    assert "--format vlm does not know where strategy 'someone-elses-vlm-method' keeps its VLM update (it knows " \
           "lora-llm, lora-llm-last, " in printed  # every registered strategy naming its factors (tests' own too)
    assert "lora-vlm, " in printed and "and strategies that merge their own)" in printed


def test_lorsu_llm_exports_merged_as_base_plus_its_saved_deltas(llava3, tmp_path):
    """lorsu-llm's masked deltas (no peft adapter form): the merged VLM's weights are the base's plus every session's
    saved update, computed here from the checkpoint; the adapter form is refused."""
    from transformers import LlavaForConditionalGeneration

    assert main(["run", "quick", "strategy=lorsu-llm", f"vqa.model=llava:{llava3}", f"out={tmp_path}",
                 "lorsu-llm.top_k_heads=1", "lorsu-llm.last_layers=2", "lorsu-llm.rank=4", "lorsu-llm.sparsity=0.1",
                 *SETTINGS]) == 0
    run = tmp_path / RUN.format("lorsu-llm")
    status, printed = export(run, tmp_path / "adapter")
    assert status == 2 and "lorsu-llm's update is no peft LoRA adapter (e.g. masked deltas); export it merged" in printed
    status, printed = export(run, tmp_path / "merged", "--merge")
    assert status == 0, printed
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").state_dict()
    base = resolve_vlm(f"llava:{llava3}").load(torch.device("cpu")).model.state_dict()
    state = torch.load(run / "checkpoints" / "session-2.pt", map_location="cpu", weights_only=False)["strategy"]
    expected = {name: weight.clone() for name, weight in base.items()}
    for session in state["sessions"]:
        for module, update in session.items():
            weight = expected[f"{module}.weight"]
            if "index" in update:
                weight.view(-1).index_add_(0, update["index"], update["values"])
            else:
                weight.index_add_(0, update["rows"], 8 / 4 * update["up"] @ update["down"])  # alpha 8 / rank 4
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    assert changed and all(".layers.1." in n or ".layers.2." in n for n in changed)
    for name in changed:
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name


@pytest.fixture(scope="module")
def paligemma_run(tmp_path_factory) -> Path:
    """A one-session lora-vlm run through a tiny PaliGemma, whose output head is tied to its input embeddings."""
    from benchmark.backbones.hf import save_tiny_siglip
    from benchmark.vlm.paligemma import save_tiny_paligemma

    root = tmp_path_factory.mktemp("paligemma")
    siglip, paligemma = save_tiny_siglip(root / "siglip"), save_tiny_paligemma(root / "paligemma")
    settings = [s.replace("sessions=2", "sessions=1") for s in SETTINGS]
    assert main(["run", "quick", "strategy=lora-vlm", f"backbone=hf:{siglip}", f"vqa.model=paligemma:{paligemma}",
                 f"out={root / 'runs'}", *settings]) == 0
    (run,) = (root / "runs").glob("quick/digits/*/lora-vlm/2-s0")
    return run


def test_a_tied_output_head_exports_as_an_adapter_and_refuses_to_merge(paligemma_run, tmp_path):
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration

    status, printed = export(paligemma_run, tmp_path / "merged", "--merge", session=1)
    assert status == 2 and not (tmp_path / "merged").exists()
    assert ("--merge: the VLM ties model.language_model.embed_tokens.weight and lm_head.weight (one tensor), so "
            "merging the LoRA of 'lm_head' would change both; export the PEFT adapter instead") in printed
    assert export(paligemma_run, tmp_path / "adapter", session=1)[0] == 0
    vlm, _ = adapted(paligemma_run, session=1)
    inputs = batch(vlm)
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(PaliGemmaForConditionalGeneration.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(model, inputs), logits(vlm.model, inputs), rtol=0, atol=1e-6)
