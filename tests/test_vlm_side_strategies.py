"""The VLM-side baselines (``lora-llm``, ``lora-llm-last``, ``lora-vlm``) on a tiny random LLaVA with a 3-layer
language model, on CPU: exactly the named modules get adapters, only their factors learn, the loss falls on a fixed
batch, the process's VLM is as loaded after the run, a run's VQA scores the adapted VLM while its zero-shot rows
stay the pretrained ones, resume, and the grid check's refusals."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_vqa_runs import _interrupt_in_session_2
from torch import nn

from benchmark.cli import main
from benchmark.vlm.llava import save_tiny_llava, vision_tower
from benchmark.vlm.spec import resolve_vlm
from benchmark.vqa.pairs import AnswerPairs
from strategies.llm import LLMLastLoRA, LLMLoRA, LoRAVLM
from strategies.options import LLMLastLoRAOptions, LoRAVLMOptions

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

LAYERS = 3
RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"
SETTINGS = ("seed=0", "sessions=2", "train.epochs=2", "train.lr=0.05", "train.warmup_steps=0", "--no-progress")
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llava3(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava3") / "tiny", text={"num_hidden_layers": LAYERS})


@pytest.fixture
def vlm(llava3):
    """The process's loaded tiny LLaVA; each test must leave it as loaded (checked)."""
    loaded = resolve_vlm(f"llava:{llava3}").loaded(torch.device("cpu"))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    yield loaded
    assert not [m for m in loaded.model.modules() if isinstance(m, LoraLayer)]
    after = loaded.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def _adapted(vlm) -> list[str]:
    names = {id(m): n for n, m in vlm.model.named_modules()}
    return sorted(names[id(m)] for m in vlm.model.modules() if isinstance(m, LoraLayer))


def _llm_linear_names(layers) -> list[str]:
    return sorted(f"model.language_model.layers.{i}.{part}.{name}" for i in layers for part, names in
                  (("self_attn", LLM_LINEARS[:4]), ("mlp", LLM_LINEARS[4:])) for name in names)


@pytest.mark.parametrize("strategy, layers", [(LLMLoRA(None), range(LAYERS)),
                                              (LLMLastLoRA(None, LLMLastLoRAOptions(last_layers=1)), [2]),
                                              (LLMLastLoRA(None, LLMLastLoRAOptions(last_layers=2)), [1, 2])])
def test_llm_strategies_adapt_exactly_the_linears_of_their_layers(strategy, layers, vlm):
    try:
        strategy.setup(SimpleNamespace(vlm=vlm))
        assert _adapted(vlm) == _llm_linear_names(layers)
        trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    finally:
        strategy.release()


def test_lora_vlm_adapts_projector_language_model_head_and_encoder(vlm, tiny_backbone):
    from copy import deepcopy

    backbone = deepcopy(tiny_backbone)
    strategy = LoRAVLM(backbone, LoRAVLMOptions(skip_last_blocks=1))
    try:
        strategy.setup(SimpleNamespace(vlm=vlm))
        names = {id(m): n for n, m in vlm.model.named_modules()}
        projector = [names[id(m)] for m in vlm.projector.modules() if isinstance(m, LoraLayer)]
        assert len(projector) == 2
        assert _adapted(vlm) == sorted([*projector, *_llm_linear_names(range(LAYERS)), "lm_head"])
        assert any(p.requires_grad for p in backbone.visual.parameters())  # the encoder's LoRA
        assert not any(isinstance(m, LoraLayer) for m in vision_tower(vlm.model).modules())  # the tower is swapped in
    finally:
        strategy.release()


def test_only_the_factors_learn_and_the_loss_falls_on_a_fixed_batch(vlm, tiny_backbone):
    strategy = LLMLoRA(None)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=gen)
    pairs = AnswerPairs(vlm, [("What is it?", f"It is {c}.") for c in ("a", "b", "c", "d")])
    try:
        strategy.setup(SimpleNamespace(vlm=vlm))
        params = [p for p in vlm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.05)
        with torch.no_grad():
            tokens = vlm.family.encoder_tokens(tiny_backbone, images)
        losses = []
        for _ in range(5):
            loss = vlm(tokens, pairs.batch(torch.arange(4)))
            optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is None for p in vlm.parameters() if not p.requires_grad)
            optimizer.step()
            losses.append(float(loss))
        assert losses[-1] < losses[0]
        strategy.finish(SimpleNamespace(vlm=vlm))
        assert not any(p.requires_grad for p in vlm.parameters())
        assert any(float(v.abs().sum()) > 0 for k, v in strategy.state_dict()["factors"].items() if "lora_B" in k)
    finally:
        strategy.release()


@pytest.fixture(scope="module")
def runs(llava3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "quick", "strategy=[lora-llm,lora-vlm]", f"vqa.model=llava:{llava3}", f"out={out}",
                 "keep_checkpoints=all", *SETTINGS]) == 0
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_scores_the_adapted_vlm_and_keeps_the_pretrained_zero_shot_rows(runs, llava3):
    run = runs / RUN.format("lora-llm")
    mass = {r["session"]: r["value"] for r in _rows(run) if r["metric"] == "vqa_letter_mass"}
    assert mass[2] != mass[0]  # the VQA after the last session answers through the adapter
    top1 = [r for r in _rows(run) if r["metric"].startswith("top1")]
    first = {(r["dataset"], r["metric"]): r["value"] for r in top1 if r["session"] == 0}
    assert all(r["value"] == first.get((r["dataset"], r["metric"]), r["value"]) for r in top1)  # encoder unchanged
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["updates"] == ["vlm"]
    assert json.loads((runs / RUN.format("lora-vlm") / "manifest.json").read_text())["updates"] == ["encoder", "vlm"]
    loaded = resolve_vlm(f"llava:{llava3}").loaded(torch.device("cpu"))
    assert not [m for m in loaded.model.modules() if isinstance(m, LoraLayer)]  # released after each run


def test_an_interrupted_run_resumes_to_the_same_records(runs, llava3, tmp_path):
    for strategy in ("lora-llm", "lora-vlm"):
        _interrupt_in_session_2(runs / RUN.format(strategy), tmp_path / RUN.format(strategy))
    assert main(["run", "quick", "strategy=[lora-llm,lora-vlm]", f"vqa.model=llava:{llava3}", f"out={tmp_path}",
                 "keep_checkpoints=all", *SETTINGS]) == 0
    for strategy in ("lora-llm", "lora-vlm"):
        reference, run = runs / RUN.format(strategy), tmp_path / RUN.format(strategy)
        assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
        assert (run / "vqa_matrix.csv").read_text() == (reference / "vqa_matrix.csv").read_text()
        assert _rows(run) == _rows(reference)


@pytest.mark.parametrize("overrides, message", [
    (["strategy=lora-llm"], "lora-llm trains with a VLM's answer loss and needs vqa.model"),
    (["strategy=lora-llm-last", "lora-llm-last.last_layers=4", "VQA"],
     "lora-llm-last.last_layers: invalid value 4; allowed: an integer in [1, 3]"),
    (["strategy=lora-llm", "lora-llm.rank=64", "VQA"], "lora-llm.rank: invalid value 64; allowed: an integer in [1, 32]"),
])
def test_the_grid_check_refuses_what_the_vlm_cannot_take(overrides, message, llava3, tmp_path, capsys):
    args = [o if o != "VQA" else f"vqa.model=llava:{llava3}" for o in overrides]
    assert main(["run", "quick", f"out={tmp_path}", *args, *SETTINGS, "--dry-run"]) != 0
    assert message in capsys.readouterr().err


def test_a_new_adapter_starts_as_the_identity(vlm, tiny_backbone):
    """B = 0: the adapted VLM answers exactly as the loaded one before any step."""
    gen = torch.Generator().manual_seed(1)
    tokens = vlm.family.encoder_tokens(tiny_backbone, torch.rand(2, 3, 32, 32, generator=gen)).detach()
    pairs = AnswerPairs(vlm, [("What?", "A."), ("Which?", "B.")]).batch([0, 1])
    with torch.no_grad():
        before = vlm(tokens, pairs)
    strategy = LLMLoRA(None)
    try:
        strategy.setup(SimpleNamespace(vlm=vlm))
        with torch.no_grad():
            assert torch.equal(vlm(tokens, pairs), before)
        assert isinstance(vlm.model.lm_head, nn.Linear)  # lora-llm leaves the head alone
    finally:
        strategy.release()


def test_the_report_says_an_llm_only_strategy_left_the_encoder_unchanged(runs, tmp_path):
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**Encoder unchanged:** `lora-llm` trains only the VLM's own modules" in report
    vqa, zeroshot = report.split("### Zero-shot classification", 1)
    assert "| lora-llm |" in vqa and "| lora-vlm |" in vqa
    assert "| lora-llm |" not in zeroshot.split("## ", 1)[0] and "| lora-vlm |" in zeroshot.split("## ", 1)[0]


def test_projector_lr_adds_the_released_projector_lora_at_its_own_learning_rate(vlm):
    from strategies.options import LLMLoRAOptions

    strategy = LLMLoRA(None, LLMLoRAOptions(projector_lr=2e-5))
    try:
        strategy.setup(SimpleNamespace(vlm=vlm))
        names = {id(m): n for n, m in vlm.model.named_modules()}
        projector = [names[id(m)] for m in vlm.projector.modules() if isinstance(m, LoraLayer)]
        assert len(projector) == 2 and set(projector) < set(_adapted(vlm))
        factors = strategy.adapter.parameters()
        assert {tuple(factors[f"{n}.lora_A.default.weight"].shape)[0] for n in projector} == {64}
        assert factors["model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape[0] == 8
        rates = strategy.learning_rates()
        assert len(rates) == 4 and set(rates.values()) == {2e-5}  # A and B of the two projector linears
    finally:
        strategy.release()


def test_the_optimizer_gives_the_projector_its_own_learning_rate(vlm, tiny_backbone):
    """Its own AdamW groups, at projector_lr / train.lr of the schedule's rate (the released separate group)."""
    from benchmark.vlm_template import VLMTemplate
    from strategies.options import LLMLoRAOptions

    strategy = LLMLoRA(None, LLMLoRAOptions(projector_lr=2e-5))
    template = SimpleNamespace(model=tiny_backbone, vlm=vlm, strategies=[strategy], recipe=strategy.options,
                               train_cfg=SimpleNamespace(lr=1e-4, warmup_steps=0), dataloader=[None] * 3,
                               train_epochs=1, _carried=None, session_steps=lambda: 3)
    try:
        strategy.setup(SimpleNamespace(vlm=vlm))
        VLMTemplate.make_optimizer(template)
        scales = sorted((g["lr_scale"], len(g["params"])) for g in template.optimizer.param_groups)
        assert scales == [(0.2, 4), (1.0, 42)]  # the projector's A and B; 3 layers × 7 linears × (A, B)
    finally:
        strategy.release()


@pytest.mark.slow
def test_a_lora_llm_run_killed_in_session_2_resumes_to_the_same_numbers(llava3, tmp_path):
    """SIGKILL in the middle of session 2, then the same command: the VQA and zero-shot records and the adapter of the
    uninterrupted run (lora-llm; pauses in session 2 when told to)."""
    import fscl_test_strategies

    strategy = "test-lora-llm-pause"
    args = ["run", "quick", f"strategy={strategy}", f"vqa.model=llava:{llava3}", "keep_checkpoints=last", *SETTINGS]
    assert main([*args, f"out={tmp_path / 'reference'}"]) == 0
    resumed = [*args, f"out={tmp_path / 'resumed'}"]
    fscl_test_strategies.kill_in_session_2(resumed, tmp_path / "in-session-2", threads="1")  # as this process
    assert main(resumed) == 0
    run, reference = (tmp_path / where / RUN.format(strategy) for where in ("resumed", "reference"))
    for name in ("matrix.csv", "vqa_matrix.csv"):
        assert (run / name).read_text() == (reference / name).read_text()
    assert _rows(run) == _rows(reference)
    factors = [torch.load(r / "checkpoints/session-2.pt", weights_only=False)["strategy"]["factors"]
               for r in (run, reference)]
    assert factors[0].keys() == factors[1].keys() and all(torch.equal(factors[0][k], factors[1][k]) for k in factors[1])
