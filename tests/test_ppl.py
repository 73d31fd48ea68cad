"""Training through LLaVA's answer loss (``lorsu-ppl``, ``lora-ppl``) with a tiny random LLaVA whose tower takes
``openclip:fscl-tiny`` (2 blocks of 4 heads, width 64), on CPU: the training pairs and their labels, the loss
against LLaVA's own forward, where gradients go, what a session changes, the efficient LoRSU-Ppl update against
its dense reference, the recipe (AdamW groups, schedule, carried state), the grid check, and ``fscl run`` end to
end with a resume (after SIGKILL: marked slow)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import fscl_test_strategies
import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from torch.nn.utils import parametrize

from benchmark import checkpoints
from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_tiny_clip
from benchmark.cli import main
from benchmark.config import TrainConfig, load_config
from benchmark.evaluation import ZeroShotEvaluator
from benchmark.export import hf_vision_config
from benchmark.grid import GridCheckError, run_grid
from benchmark.plugins import session_gradients
from benchmark.vlm.base import IGNORE, LoadedVLM
from benchmark.vlm.llava import save_tiny_llava
from benchmark.vlm.recipe import VLMRecipe, with_vlm_defaults
from benchmark.vlm.spec import resolve_vlm
from benchmark.vlm_template import VLMTemplate, decay_groups, warmup_cosine_lr
from benchmark.vqa.pairs import AnswerPairs
from strategies.lora import LoRAPpl
from strategies.lorsu import BlockScores, LoRSUPpl
from strategies.lorsu.reference import DenseLoRSU
from strategies.options import LoRAPplOptions, LoRSUPplOptions
from streams.digits import Digits

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

TESTS = Path(__file__).parent
RUN = "quick/digits/openclip-fscl-tiny/{}/5-s0"
HEADS, HEAD_DIM = 4, 16


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture()
def llava(llava_dir) -> LoadedVLM:
    return resolve_vlm(f"llava:{llava_dir}").load("cpu")


@pytest.fixture(scope="module")
def hf_parts(tmp_path_factory) -> tuple[str, Path]:
    """An ``hf:`` tiny CLIP (QuickGELU) and a tiny LLaVA whose tower takes it."""
    folder = save_tiny_clip(tmp_path_factory.mktemp("hf-tiny"))
    spec = f"hf:{folder}"
    vision = load_backbone(spec).model.config.vision_config
    return spec, save_tiny_llava(tmp_path_factory.mktemp("llava-hf") / "tiny", vision_config=vision)


@pytest.fixture(params=["openclip", "hf"])
def family(request, llava_dir, hf_parts) -> tuple[str, Path]:
    """(backbone spec, LLaVA folder) of each encoder family the VLM loss trains."""
    return ("openclip:fscl-tiny", llava_dir) if request.param == "openclip" else hf_parts


def digit_pairs(vlm: LoadedVLM) -> AnswerPairs:
    spec = Digits("unused").spec
    return AnswerPairs.for_classes(vlm, spec.vqa_question, spec.ppl_answer, spec.class_names)


def for_vlm(options: VLMRecipe, vlm: LoadedVLM) -> VLMRecipe:
    """``options`` with ``skip_last_blocks`` resolved from ``vlm``'s family, as a run resolves them (LLaVA: 1)."""
    return with_vlm_defaults(options, str(vlm.family.spec))


def fixed_batch(n: int = 4, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(10, (n,), generator=gen)


def answer_loss(vlm: LoadedVLM, pairs: AnswerPairs, backbone, images, labels) -> torch.Tensor:
    device = images.device
    return vlm.answer_loss(vlm.family.encoder_tokens(backbone, images), pairs.batch(labels.cpu()).to(device))


def vlm_session(backbone, llava: LoadedVLM, plugin, epochs: int = 2, lr: float = 1e-3,
                device: torch.device | None = None):
    """The VLM template on two 2-shot digits sessions (10 images each), evaluation transform."""
    llava.family.check_encoder(backbone)
    stream = Digits("unused")
    tf = backbone.preprocess(False)
    scenario = stream.benchmark(stream.sessions(2, 2, shot_seed=0), tf, tf)
    template = VLMTemplate(
        vlm=llava, pairs=digit_pairs(llava), recipe=plugin.options, backbone=backbone,
        class_names=stream.spec.class_names, templates=stream.spec.templates[:1],
        train=TrainConfig(epochs=epochs, batch_size=16, lr=lr, min_lr=lr / 10), zeroshot=ZeroShotEvaluator(backbone),
        seed=0, device=device or torch.device("cpu"), plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    return template, scenario.train_stream


def snapshot(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module) -> set[str]:
    return {name for name, p in module.state_dict().items() if not torch.equal(p, before[name])}


# --------------------------------------------------------------------------- pairs and the loss
def test_labels_keep_only_the_answer_tokens_and_eos(llava):
    model, tok = llava.model, llava.processor.tokenizer
    pairs = digit_pairs(llava)
    batch = pairs.batch(torch.tensor([1, 7]))
    for row, label in zip(range(2), (1, 7)):
        ids, labels, mask = batch.input_ids[row], batch.labels[row], batch.attention_mask[row]
        kept = labels[labels != IGNORE]
        assert tok.decode(kept[:-1]) == f" This is the digit {Digits('unused').spec.class_names[label]}."
        assert kept[-1] == tok.eos_token_id and kept.tolist() == pairs.answer_ids(label)
        real = ids[mask.bool()]
        assert torch.equal(labels[mask.bool()][-len(kept):], real[-len(kept):])  # the answer closes the sequence
        assert (real == model.config.image_token_id).sum() == llava.image_tokens == 16
        assert (labels[~mask.bool()] == IGNORE).all() and (ids[~mask.bool()] == tok.pad_token_id).all()
        prompt = tok.decode(real[real != model.config.image_token_id][:-len(kept)])
        assert prompt.endswith("USER: \nBased on the image, respond to this question with a short answer: "
                               "What digit is this? ASSISTANT:") and prompt.startswith("<s>A chat between")
    assert batch.attention_mask[0].sum() != batch.attention_mask[1].sum()  # "one" and "seven": right padding


def test_vlm_loss_is_llavas_own_loss_with_the_encoder_in_its_tower(family):
    spec, folder = family
    vlm = resolve_vlm(f"llava:{folder}").load("cpu")
    backbone = load_backbone(spec)
    vlm.family.check_encoder(backbone)
    pairs = digit_pairs(vlm)
    images, labels = fixed_batch()
    ours = answer_loss(vlm, pairs, backbone, images, labels)
    vlm.swap_encoder(backbone)
    batch = pairs.batch(labels)
    theirs = vlm.model(input_ids=batch.input_ids, pixel_values=images, attention_mask=batch.attention_mask,
                   labels=batch.labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


def test_gradients_reach_only_the_encoder_below_the_feature_layer(llava):
    backbone = load_backbone("openclip:fscl-tiny")
    backbone.visual.requires_grad_(True)
    answer_loss(llava, digit_pairs(llava), backbone, *fixed_batch()).backward()
    assert all(p.grad is None and not p.requires_grad for p in llava.model.parameters())
    last = {id(p) for p in backbone.blocks()[-1].module.parameters()}
    for name, p in backbone.visual.named_parameters():
        unread = id(p) in last or name.startswith(("ln_post", "proj"))  # LLaVA reads the input of the last block
        assert (p.grad is None) == unread, name
        assert unread or p.grad.abs().sum() > 0, name
    visual = {id(p) for p in backbone.visual.parameters()}
    assert all(p.grad is None for p in backbone.parameters() if id(p) not in visual)  # the text side


# --------------------------------------------------------------------------- a LoRSU-Ppl session
@pytest.mark.gpu
def test_lorsu_ppl_session_moves_only_chosen_rows_and_masked_entries(llava_dir, device):
    llava = resolve_vlm(f"llava:{llava_dir}").load(device, torch.float32)
    model = llava.model
    backbone = load_backbone("openclip:fscl-tiny", str(device))
    plugin = LoRSUPpl(backbone, for_vlm(LoRSUPplOptions(rank=4, alpha=8.0), llava))
    template, stream = vlm_session(backbone, llava, plugin, device=device)
    before, llava_before = snapshot(backbone.visual), snapshot(model)
    template.train(stream[0])
    assert changed(llava_before, model) == set()  # LLM, projector and tower bit for bit
    assert not any(parametrize.is_parametrized(m) for m in backbone.modules()) and len(backbone.adapters) == 0
    prefix = "transformer.resblocks.0."
    assert changed(before, backbone.visual) == {prefix + "attn.in_proj_weight", prefix + "mlp.c_fc.weight",
                                         prefix + "mlp.c_fc.bias"}  # block 1 (the last) untouched
    block, (sel,) = backbone.blocks()[0], plugin.selection
    assert len(sel.heads) == 2 and len(sel.fc1_index) == int(0.1 * 256 * 64)
    old_fc1, new_fc1 = before[prefix + "mlp.c_fc.weight"].flatten(), block.fc1.weight.detach().flatten()
    outside = torch.ones_like(old_fc1, dtype=torch.bool).index_fill_(0, sel.fc1_index, False)
    assert torch.equal(new_fc1[outside], old_fc1[outside])
    assert (new_fc1[sel.fc1_index] != old_fc1[sel.fc1_index]).float().mean() > 0.5
    old_qkv, new_qkv = before[prefix + "attn.in_proj_weight"], block.module.attn.in_proj_weight.detach()
    for j in range(3):  # q, k and v each: the chosen heads' rows move, the others are bit-identical
        for h in range(HEADS):
            rows = slice(j * 64 + h * HEAD_DIM, j * 64 + (h + 1) * HEAD_DIM)
            assert torch.equal(old_qkv[rows], new_qkv[rows]) == (h not in sel.heads), (j, h)
    # separate updates: per projection r·(2·16 + 64) free parameters; 1638 fc1 entries; biases: fc1's 256
    counts = plugin.trainable_counts()
    assert counts == {"trainable": 1638 + 3 * 4 * (32 + 64), "trainable_with_biases": 1638 + 3 * 4 * 96 + 256,
                      "trainable_released": 1638 + 3 * min(32 * 64, 4 * 2 * 64)}
    params = {id(p) for g in template.optimizer.param_groups for p in g["params"]}
    assert not params & {id(p) for p in model.parameters()}


@pytest.mark.gpu
def test_efficient_lorsu_ppl_equals_the_dense_reference_after_adam_steps(family, device):
    spec, folder = family
    vlm = resolve_vlm(f"llava:{folder}").load(device, torch.float32)
    torch.manual_seed(0)
    fast_backbone, dense_backbone = load_backbone(spec, str(device)), load_backbone(spec, str(device))
    options = for_vlm(LoRSUPplOptions(rank=8, alpha=16.0), vlm)
    fast, dense = LoRSUPpl(fast_backbone, options), DenseLoRSU(dense_backbone, options)
    start = snapshot(fast_backbone)
    gen = torch.Generator().manual_seed(5)
    blocks = fast.trained_blocks()
    scores = [BlockScores(*(torch.randn(64, 64, generator=gen).to(device) for _ in range(3)),
                          torch.randn(256, 64, generator=gen).to(device)) for _ in blocks]
    selection = fast.select(blocks, scores)
    fast.install(blocks, selection)
    dense.install(dense.trained_blocks(), selection)
    dense.copy_factors_from(fast)
    images, labels = fixed_batch(seed=6)
    images = images.to(device)
    runs = []
    for backbone in (fast_backbone, dense_backbone):
        vlm.family.check_encoder(backbone)
        pairs = digit_pairs(vlm)
        optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            value = answer_loss(vlm, pairs, backbone, images, labels)
            value.backward()
            optimizer.step()
            losses.append(value.item())
        runs.append((optimizer, losses))
    (fast_opt, fast_losses), (dense_opt, dense_losses) = runs
    assert fast_losses == pytest.approx(dense_losses, rel=1e-5)

    def state(opt):
        return sum(v.numel() for s in opt.state.values() for v in s.values())

    assert state(fast_opt) < 0.5 * state(dense_opt)
    fast.merge()
    dense.merge()
    dense_params = dict(dense_backbone.named_parameters())
    for name, p in fast_backbone.named_parameters():
        assert (p - dense_params[name]).abs().max() <= 1e-5, name
    assert max((p - start[n]).abs().max() for n, p in fast_backbone.named_parameters()) > 1e-3  # they did move


@pytest.mark.parametrize("kind", ["lorsu-ppl", "lora-ppl"])
def test_the_answer_loss_falls_on_a_fixed_batch(llava, kind):
    torch.manual_seed(0)
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = LoRSUPpl(backbone, for_vlm(LoRSUPplOptions(rank=8, alpha=16.0), llava)) if kind == "lorsu-ppl" \
        else LoRAPpl(backbone, for_vlm(LoRAPplOptions(rank=8, alpha=16.0), llava))
    template, stream = vlm_session(backbone, llava, plugin, lr=3e-3)
    template.experience, template.is_training = stream[0], True
    template._before_training_exp()  # the dataloader, the strategy's set-up (importance, masks), AdamW
    images, labels = fixed_batch(8, seed=7)
    losses = []
    for _ in range(15):
        template.optimizer.zero_grad()
        value = template.training_loss([images, labels])
        value.backward()
        template.optimizer.step()
        losses.append(value.item())
    # a random tiny LM's answer depends little on the image (≈ ln V whatever it sees): every step lowers the loss
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[0] - losses[-1] > 5e-4, losses


def test_lora_ppl_session_leaves_the_last_block_and_llava_unchanged(llava):
    model = llava.model
    torch.manual_seed(0)
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = LoRAPpl(backbone, for_vlm(LoRAPplOptions(), llava))
    assert plugin.options.proj_lora is False and plugin.options.init == "peft" and plugin.options.skip_last_blocks == 1
    template, stream = vlm_session(backbone, llava, plugin, epochs=3)
    before, llava_before = snapshot(backbone.visual), snapshot(model)
    template.train(stream[0])
    assert changed(llava_before, model) == set()
    prefix = "transformer.resblocks.0."
    assert changed(before, backbone.visual) == {prefix + name for name in (
        "attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}


# --------------------------------------------------------------------------- the recipe
def test_adamw_groups_and_the_released_schedule(llava):
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = LoRSUPpl(backbone, for_vlm(LoRSUPplOptions(rank=4, alpha=8.0), llava))
    template, stream = vlm_session(backbone, llava, plugin)
    template.experience, template.is_training = stream[0], True
    template._before_training_exp()
    decay, plain = template.optimizer.param_groups
    names = {id(p): n for n, p in backbone.named_parameters()}
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} == {"model.visual.transformer.resblocks.0.mlp.c_fc.bias"}
    assert all("bias" not in names[id(p)] for p in decay["params"]) and len(decay["params"]) == 7  # 6 factors, fc1
    assert type(template.optimizer) is torch.optim.AdamW
    layer_norm = torch.nn.LayerNorm(4)
    assert decay_groups(torch.nn.Sequential(torch.nn.Linear(4, 4), layer_norm))[1][1] is layer_norm.weight
    # warm-up over the first epoch (here 1 step per epoch: 2 epochs, 2 steps), then the cosine of the step count
    assert template._warmup == 1 and template._total_steps == 2
    lr, low = 1e-3, 1e-4
    assert warmup_cosine_lr(0, 10, lr, low, 5) == low and warmup_cosine_lr(4, 10, lr, low, 5) == pytest.approx(
        low + (lr - low) * 4 / 5)
    assert warmup_cosine_lr(5, 10, lr, low, 5) == pytest.approx(low + (lr - low) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert warmup_cosine_lr(10, 10, lr, low, 5) == pytest.approx(low)


def test_carried_optimizer_state_is_the_previous_sessions(llava):
    backbone = load_backbone("openclip:fscl-tiny")
    plugin = LoRSUPpl(backbone, for_vlm(LoRSUPplOptions(rank=4, alpha=8.0, carry_optimizer_state=True), llava))
    template, stream = vlm_session(backbone, llava, plugin, epochs=1)
    template.train(stream[0])
    carried = template.carried_state()["optimizer"]
    assert [s["step"].item() for s in carried["optimizer"]["state"].values()] == [1.0] * 8
    template.train(stream[1])  # its AdamW started from session 1's moments: 2 steps counted
    assert all(s["step"].item() == 2.0 for s in template.optimizer.state.values())
    fresh = LoRSUPpl(backbone, for_vlm(LoRSUPplOptions(rank=4, alpha=8.0), llava))
    template, stream = vlm_session(backbone, llava, fresh, epochs=1)
    template.train(stream[0])
    assert template.carried_state() == {} and all(s["step"].item() == 1.0 for s in template.optimizer.state.values())


def test_running_importance_sums_gradients_never_zeroed():
    """``importance_sum: running``: batch b adds n_b times the running sum of the gradients of batches 1..b."""
    grads = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    sizes = [2, 2, 1]
    param = torch.nn.Parameter(torch.zeros(1))
    batches = [[torch.zeros(n, 1), g] for n, g in zip(sizes, grads)]

    class Session:
        backbone = torch.nn.Module()

        def training_loss(self, batch):
            return (param * batch[1]).sum()

    (result,) = session_gradients(Session(), [param], reduce="running_mean", batches=batches)
    assert result.item() == pytest.approx((2 * 1 + 2 * 3 + 1 * 7) / 5)


# --------------------------------------------------------------------------- runs
def test_grid_check_refuses_ppl_without_a_fitting_llava(tmp_path):
    cfg = load_config("quick", ["strategy=[lorsu-ppl,lora-ppl]", f"out={tmp_path}"])
    with pytest.raises(GridCheckError) as err:
        run_grid(cfg, progress=False)
    assert "lorsu-ppl trains with a VLM's answer loss and needs vqa.model" in str(err.value)
    assert "lora-ppl trains" in str(err.value)
    other = hf_vision_config(load_backbone("openclip:fscl-tiny").visual)
    other.num_hidden_layers = 3
    wrong = save_tiny_llava(tmp_path / "three-layers", vision_config=other)
    cfg = load_config("quick", ["strategy=lorsu-ppl", f"vqa.model=llava:{wrong}", f"out={tmp_path}"])
    with pytest.raises(GridCheckError, match=r"does not fit LLaVA's vision tower: layers 2 \(tower: 3\)"):
        run_grid(cfg, progress=False)
    assert not (tmp_path / "quick").exists()


OVERRIDES = ("seed=0", "sessions=2", "train.epochs=2", "keep_checkpoints=all", "--no-progress")


@pytest.fixture(scope="module")
def runs(llava_dir, tmp_path_factory) -> Path:
    """lorsu-ppl and lora-ppl (the latter carrying its AdamW state across sessions) through ``fscl run``."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "quick", "strategy=[lorsu-ppl,lora-ppl]", f"vqa.model=llava:{llava_dir}", f"out={out}",
                 "lora-ppl.carry_optimizer_state=true", *OVERRIDES]) == 0
    return out


def test_ppl_runs_fill_both_matrices_and_report_the_language_models_flops(runs):
    start = load_backbone("openclip:fscl-tiny").visual.state_dict()
    for strategy in ("lorsu-ppl", "lora-ppl"):
        run = runs / RUN.format(strategy)
        summary = json.loads((run / "summary.json").read_text())
        costs = summary["costs"]["sessions"]
        assert [c["session"] for c in costs] == [1, 2]
        assert all(0 < c["lm_flops_per_sample"] < c["flops_per_sample"] for c in costs)
        # the VLM loss passes the whole VLM: the paper's count is ours; 25 samples a session, batches of 16 with the
        # partial one dropped, 2 epochs: 32 samples processed
        assert all("text_flops_per_sample" not in c and c["paper_flops_per_sample"] == c["flops_per_sample"]
                   and c["train_samples"] == 25 and c["train_flops"] == c["paper_train_flops"] == 32 * c["flops_per_sample"]
                   for c in costs)
        assert summary["vqa"]["evaluated"] == [0, 2] and len((run / "matrix.csv").read_text().splitlines()) == 4
        final = torch.load(run / "checkpoints/session-2.pt", weights_only=False)
        moved = {name for name, value in final["encoder"].items() if not torch.equal(value, start[name])}
        assert moved and all(name.startswith("transformer.resblocks.0.") for name in moved)  # block 1 never trains
        assert ("optimizer" in (final["template"] or {})) == (strategy == "lora-ppl")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        mass = {r["session"]: r["value"] for r in rows if r["metric"] == "vqa_letter_mass"}
        assert set(mass) == {0, 2} and mass[2] != mass[0]  # the trained encoder went into LLaVA's tower
    moved = {n for n, v in torch.load(runs / RUN.format("lorsu-ppl") / "checkpoints/session-2.pt",
                                      weights_only=False)["encoder"].items() if not torch.equal(v, start[n])}
    assert moved == {f"transformer.resblocks.0.{n}" for n in ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_fc.bias")}


def test_the_report_of_ppl_runs_shows_their_training_tflops_and_the_compute_figure(runs, tmp_path):
    from reports import write_report

    report = write_report(runs, tmp_path / "report", reference="lora-ppl")
    markdown = report.markdown.read_text()
    assert "Train TFLOPs / session |" in markdown and "× lora-vlm" not in markdown  # no lora-vlm run: no ratio
    assert any(p.name.endswith("-vqa-compute.png") for p in report.figures)  # VQA TI, as the runs have VQA


@pytest.mark.parametrize("strategy", ["lorsu-ppl", "lora-ppl"])
def test_an_interrupted_ppl_run_resumes_to_the_same_numbers(runs, llava_dir, tmp_path, strategy):
    reference = runs / RUN.format(strategy)
    run = tmp_path / RUN.format(strategy)
    shutil.copytree(reference, run)
    # what a process stopped during session 2 leaves: session 1's checkpoint, no results, status running
    (run / "checkpoints" / "session-2.pt").unlink()
    for name in ("summary.json", "matrix.csv", "vqa_matrix.csv"):
        (run / name).unlink()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["session"] < 2))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert main(["run", "quick", f"strategy={strategy}", f"vqa.model=llava:{llava_dir}", f"out={tmp_path}",
                 "lora-ppl.carry_optimizer_state=true", *OVERRIDES]) == 0
    assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
    for name in ("matrix.csv", "vqa_matrix.csv"):
        assert (run / name).read_text() == (reference / name).read_text()
    encoders = [torch.load(r / "checkpoints/session-2.pt", weights_only=False)["encoder"] for r in (run, reference)]
    assert all(torch.equal(encoders[0][name], value) for name, value in encoders[1].items())


@pytest.mark.slow
def test_a_ppl_run_killed_in_session_2_resumes_to_the_same_numbers(llava_dir, tmp_path):
    strategy = "test-lorsu-ppl-pause"  # lorsu-ppl; pauses in session 2 when told to
    args = ["run", "quick", f"strategy={strategy}", f"vqa.model=llava:{llava_dir}", *OVERRIDES]
    assert main([*args, f"out={tmp_path / 'reference'}"]) == 0
    resumed = [*args, f"out={tmp_path / 'resumed'}"]
    fscl_test_strategies.kill_in_session_2(resumed, tmp_path / "in-session-2")
    run = tmp_path / "resumed" / RUN.format(strategy)
    assert checkpoints.saved_sessions(run) == [1]
    assert main(resumed) == 0
    reference = tmp_path / "reference" / RUN.format(strategy)
    for name in ("matrix.csv", "vqa_matrix.csv"):
        assert (run / name).read_text() == (reference / name).read_text()
    encoders = [torch.load(r / "checkpoints/session-2.pt", weights_only=False)["encoder"] for r in (run, reference)]
    assert all(torch.equal(encoders[0][name], value) for name, value in encoders[1].items())
