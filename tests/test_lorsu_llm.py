"""``lorsu-llm`` (LoRSU on the last language-model layers) on a tiny random LLaVA whose Llama has 3 layers of 2 heads
(width 32, head dim 16, MLP 64), on CPU: the heads and up_proj entries it chooses and the weights it reaches equal a
dense reference written here (the released ``MaskedLoRALinear`` and masked up_proj gradient), only those change, the
loss falls, the VLM is bit-identical after ``release()``, a run resumes to the same records, and the grid check's
refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_vqa_runs import _interrupt_in_session_2, _rows
from torch import nn
from torch.nn.utils import parametrize

from benchmark.backbones import load_backbone
from benchmark.cli import main
from benchmark.vlm.llava import save_tiny_llava
from benchmark.vlm.spec import resolve_vlm
from benchmark.vqa.pairs import AnswerPairs
from strategies.lorsu_llm import LoRSULLM, projections
from strategies.options import LoRSULLMOptions

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]

LAYERS, HEADS, HEAD_DIM = 3, 2, 16
RUN = "quick/digits/openclip-fscl-tiny/lorsu-llm/5-s0"
SETTINGS = ("strategy=lorsu-llm", "lorsu-llm.top_k_heads=1", "lorsu-llm.last_layers=2", "lorsu-llm.rank=4",
            "lorsu-llm.sparsity=0.1", "seed=0", "sessions=2", "train.epochs=2", "train.lr=0.05",
            "train.warmup_steps=0", "--no-progress")


@pytest.fixture(scope="module")
def llava3(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava3") / "tiny", text={"num_hidden_layers": LAYERS})


class Session:
    """One session of one fixed batch (4 images, 4 answers): the training-session protocol that the importance pass
    reads (``benchmark.plugins.TrainingSession``)."""

    def __init__(self, vlm, backbone) -> None:
        gen = torch.Generator().manual_seed(0)
        self.vlm, self.backbone = vlm, backbone
        self.batch = (torch.rand(4, 3, 32, 32, generator=gen).to(vlm.device), torch.arange(4))
        self.pairs = AnswerPairs(vlm, [("What is it?", f"It is {c}.") for c in "abcd"])

    def session_batches(self, ordered: bool = False) -> list:
        return [self.batch]

    def training_loss(self, batch) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.vlm.family.encoder_tokens(self.backbone, batch[0])
        return self.vlm(tokens, self.pairs.batch(batch[1]).to(self.vlm.device))


def _weights(vlm, layer: int) -> list[torch.Tensor]:
    """The q, k, v and up_proj weights of ``layer`` as the VLM uses them (through any parametrization)."""
    return [m.weight.detach().clone() for m in projections(vlm.llm_layers()[layer])]


def _adam(session: Session, params: list[nn.Parameter], steps: int = 5) -> list[float]:
    optimizer = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(steps):
        loss = session.training_loss(session.batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _importance(vlm, backbone, layers) -> list[torch.Tensor]:
    """The answer loss's gradient of the q, k, v, up_proj weights of ``layers`` of a plain (unparametrized) VLM."""
    weights = [m.weight for i in layers for m in projections(vlm.llm_layers()[i])]
    for w in weights:
        w.requires_grad_(True)
    session = Session(vlm, backbone)
    grads = torch.autograd.grad(session.training_loss(session.batch), weights)
    for w in weights:
        w.requires_grad_(False)
    return list(grads)


def _head_scores(gq, gk, gv) -> torch.Tensor:
    return sum(g.reshape(HEADS, HEAD_DIM, -1).square().sum((1, 2)) for g in (gq, gk, gv))


def _top(g: torch.Tensor, fraction: float) -> set[int]:
    return set(g.abs().flatten().argsort(descending=True)[:int(fraction * g.numel())].tolist())


class MaskedRows(nn.Module):
    """The released ``MaskedLoRALinear``'s weight: W + M ⊙ (α/r)·B·A, A [r, in], B [out, r] zero, M the ``rows``."""

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(down.clone())
        self.B = nn.Parameter(torch.zeros(weight.shape[0], down.shape[0], device=weight.device))
        self.register_buffer("mask", torch.zeros(weight.shape[0], 1, device=weight.device).index_fill_(0, rows, 1.0))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.mask * (self.scale * self.B @ self.A)


@pytest.mark.gpu
@pytest.mark.parametrize("last", [1, 2])
def test_chosen_heads_and_up_proj_entries_equal_a_dense_reference_and_nothing_else_changes(last, llava3, device):
    vlm, dense = (resolve_vlm(f"llava:{llava3}").load(device, torch.float32) for _ in range(2))
    tiny_backbone = load_backbone("openclip:fscl-tiny", str(device))
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    start = [_weights(vlm, i) for i in range(LAYERS)]
    session, reference = Session(vlm, tiny_backbone), Session(dense, tiny_backbone)
    updated = range(LAYERS - last, LAYERS)
    grads = _importance(dense, tiny_backbone, updated)  # the reference's choice, from the plain weights
    strategy = LoRSULLM(None, LoRSULLMOptions(last_layers=last, top_k_heads=1, sparsity=0.1, rank=4, alpha=8.0))
    try:
        strategy.setup(session)
        trainable = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
        assert trainable == {f"model.language_model.layers.{i}.{part}.parametrizations.weight.0.{p}" for i in updated
                             for part, ps in (("self_attn.q_proj", ("up", "down")), ("self_attn.k_proj", ("up", "down")),
                                              ("self_attn.v_proj", ("up", "down")), ("mlp.up_proj", ("values",)))
                             for p in ps}
        for j, sel in enumerate(strategy.selection):
            gq, gk, gv, gup = grads[4 * j:4 * j + 4]
            assert sel.heads == (int(_head_scores(gq, gk, gv).argmax()),)
            assert set(sel.fc1_index.tolist()) == _top(gup, 0.1)
        # the dense reference, from the same factors: masked LoRA on whole q, k, v; up_proj whole, gradient masked
        params = []
        for j, i in enumerate(updated):
            sel, layer = strategy.selection[j], projections(dense.llm_layers()[i])
            rows = torch.arange(HEAD_DIM, device=device) + sel.heads[0] * HEAD_DIM
            for proj, mine in zip(layer[:3], projections(vlm.llm_layers()[i])[:3]):
                down = mine.parametrizations.weight[0].down.detach()
                parametrize.register_parametrization(proj, "weight", MaskedRows(proj.weight, rows, down, 2.0))
                params += [proj.parametrizations.weight[0].A, proj.parametrizations.weight[0].B]
            up = layer[3].weight
            mask = torch.zeros(up.numel(), device=device).index_fill_(0, sel.fc1_index, 1.0).view_as(up)
            up.requires_grad_(True)
            up.register_hook(lambda g, m=mask: g * m)
            params.append(up)
        losses = _adam(session, [p for p in vlm.model.parameters() if p.requires_grad])
        dense_losses = _adam(reference, params)
        assert losses[-1] < losses[0] and losses == pytest.approx(dense_losses, rel=1e-5)
        for i in range(LAYERS):
            mine, theirs = _weights(vlm, i), _weights(dense, i)
            for w, d, s in zip(mine, theirs, start[i]):
                assert torch.allclose(w, d, atol=1e-6)
                if i not in updated:
                    assert torch.equal(w, s)
            if i in updated:
                sel = strategy.selection[i - updated[0]]
                rows = torch.zeros(HEADS * HEAD_DIM, dtype=torch.bool, device=device)
                rows[sel.heads[0] * HEAD_DIM:(sel.heads[0] + 1) * HEAD_DIM] = True
                for w, s in zip(mine[:3], start[i][:3]):
                    assert torch.equal(w[~rows], s[~rows]) and (w[rows] != s[rows]).float().mean() > 0.9
                outside = torch.ones(mine[3].numel(), dtype=torch.bool, device=device).index_fill_(0, sel.fc1_index,
                                                                                                    False)
                assert torch.equal(mine[3].flatten()[outside], start[i][3].flatten()[outside])
                assert (mine[3].flatten()[~outside] != start[i][3].flatten()[~outside]).float().mean() > 0.9
        strategy.finish(session)
        assert not any(p.requires_grad for p in vlm.model.parameters())
        counts = strategy.trainable_counts()  # per layer: 3 × r·(16 rows + 32 wide) + ⌊0.1 · 64 · 32⌋ entries
        assert counts["trainable"] == last * (3 * 4 * (16 + 32) + 204)
        assert counts["trainable_released"] == last * (3 * min(16 * 32, 2 * 4 * 32) + 204)
    finally:
        strategy.release()
    assert not any(parametrize.is_parametrized(m) for m in vlm.model.modules())
    after = vlm.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_second_session_scores_the_updated_weights_over_the_first_sessions_update(llava3, tiny_backbone):
    """The first session's update stays (frozen) under the second's, whose importance is the gradient of the weights
    as updated (the released code scores the merged weights); release() takes both out."""
    vlm, plain = (resolve_vlm(f"llava:{llava3}").load("cpu", torch.float32) for _ in range(2))
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    session = Session(vlm, tiny_backbone)
    strategy = LoRSULLM(None, LoRSULLMOptions(last_layers=1, top_k_heads=1, sparsity=0.1, rank=4, alpha=8.0))
    try:
        strategy.setup(session)
        _adam(session, [p for p in vlm.model.parameters() if p.requires_grad])
        strategy.finish(session)
        first, first_entries = _weights(vlm, LAYERS - 1), strategy.selection[0].fc1_index
        with torch.no_grad():
            for proj, w in zip(projections(plain.llm_layers()[-1]), first):
                proj.weight.copy_(w)
        gq, gk, gv, gup = _importance(plain, tiny_backbone, [LAYERS - 1])
        strategy.setup(session)
        sel = strategy.selection[0]
        assert torch.allclose(sel.head_scores, _head_scores(gq, gk, gv), rtol=1e-5)
        assert set(sel.fc1_index.tolist()) == _top(gup, 0.1)
        assert set(sel.fc1_index.tolist()) & set(first_entries.tolist())  # updated entries are scored too
        assert all(torch.equal(w, s) for w, s in zip(_weights(vlm, LAYERS - 1), first))  # starts from session 1's
        assert all(len(m.parametrizations.weight) == 2 for m in projections(vlm.llm_layers()[-1]))
    finally:
        strategy.release()
    after = vlm.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def runs(llava3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "quick", f"vqa.model=llava:{llava3}", f"out={out}", "keep_checkpoints=all", *SETTINGS]) == 0
    return out


def test_a_run_scores_the_adapted_vlm_and_leaves_the_loaded_one_as_loaded(runs, llava3):
    run = runs / RUN
    mass = {r["session"]: r["value"] for r in _rows(run) if r["metric"] == "vqa_letter_mass"}
    assert mass[2] != mass[0]  # the VQA after the last session answers through the updates
    assert json.loads((run / "manifest.json").read_text())["updates"] == ["vlm"]
    for costs in json.loads((run / "summary.json").read_text())["costs"]["sessions"]:  # 2 layers: see the count above
        assert (costs["trainable"], costs["trainable_released"]) == (2 * (3 * 4 * (16 + 32) + 204),
                                                                     2 * (3 * min(16 * 32, 2 * 4 * 32) + 204))
    family = resolve_vlm(f"llava:{llava3}")
    loaded, fresh = family.loaded(torch.device("cpu")).model, family.load("cpu").model
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    state = fresh.state_dict()
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, state[k])]
    assert changed and all("vision_tower" in k for k in changed)  # the run's encoder is in the tower; the rest as loaded


def test_an_interrupted_run_resumes_to_the_same_records(runs, llava3, tmp_path):
    reference, run = runs / RUN, tmp_path / RUN
    _interrupt_in_session_2(reference, run)
    assert main(["run", "quick", f"vqa.model=llava:{llava3}", f"out={tmp_path}", "keep_checkpoints=all",
                 *SETTINGS]) == 0
    assert json.loads((run / "manifest.json").read_text())["resumed"][0]["after_session"] == 1
    assert (run / "vqa_matrix.csv").read_text() == (reference / "vqa_matrix.csv").read_text()
    assert _rows(run) == _rows(reference)


@pytest.fixture(scope="module")
def gqa_llava(llava3, tmp_path_factory) -> Path:
    """The tiny LLaVA's files with a config of grouped-query attention (1 key/value head for 2 heads)."""
    folder = tmp_path_factory.mktemp("gqa") / "tiny"
    shutil.copytree(llava3, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_key_value_heads"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("overrides, message", [
    ([], "lorsu-llm trains with a VLM's answer loss and needs vqa.model"),
    (["lorsu-llm.top_k_heads=1", "lorsu-llm.last_layers=4", "VQA"],
     "lorsu-llm.last_layers: invalid value 4; allowed: an integer in [1, 3]"),
    (["lorsu-llm.last_layers=2", "VQA"], "lorsu-llm.top_k_heads: invalid value 8; allowed: an integer in [1, 2]"),
    (["lorsu-llm.last_layers=2", "lorsu-llm.top_k_heads=1", "lorsu-llm.rank=17", "VQA"],
     "lorsu-llm.rank: invalid value 17; allowed: an integer in [1, 16]"),
    (["lorsu-llm.last_layers=2", "lorsu-llm.top_k_heads=1", "GQA"], "grouped-query attention (1 key/value heads for 2 heads)"),
    (["lorsu-llm.sparsity=0", "VQA"], "lorsu-llm.sparsity: invalid value 0"),
])
def test_the_grid_check_refuses_what_the_vlm_cannot_take(overrides, message, llava3, gqa_llava, tmp_path, capsys):
    vlms = {"VQA": f"vqa.model=llava:{llava3}", "GQA": f"vqa.model=llava:{gqa_llava}"}
    args = [vlms.get(o, o) for o in overrides]
    assert main(["run", "quick", "strategy=lorsu-llm", f"out={tmp_path}", *args, "--no-progress", "--dry-run"]) != 0
    assert message in capsys.readouterr().err


def test_projector_lr_adds_the_released_projector_lora_which_export_merges_and_release_removes(llava3, tmp_path):
    """lorsu-llm with projector_lr: the projector's LoRA (rank 64) at its own rate; the run's VLM comes back as
    loaded, and the merged export holds the projector's update."""
    from peft.tuners.lora import LoraLayer

    args = ["run", "quick", "strategy=lorsu-llm", f"vqa.model=llava:{llava3}", f"out={tmp_path}",
            "lorsu-llm.top_k_heads=1", "lorsu-llm.last_layers=1", "lorsu-llm.rank=4", "lorsu-llm.sparsity=0.1",
            "lorsu-llm.projector_lr=0.01", "keep_checkpoints=last", "seed=0", "sessions=2", "train.epochs=1",
            "train.warmup_steps=0", "--no-progress"]
    assert main(args) == 0
    run = tmp_path / "quick/digits/openclip-fscl-tiny/lorsu-llm/5-s0"
    state = torch.load(run / "checkpoints" / "session-2.pt", map_location="cpu", weights_only=False)["strategy"]
    projector = state["projector"]
    assert len(projector) == 4 and {t.shape[0] for k, t in projector.items() if "lora_A" in k} == {64}
    assert any(float(t.abs().sum()) > 0 for k, t in projector.items() if "lora_B" in k)  # it trained
    loaded = resolve_vlm(f"llava:{llava3}").loaded(torch.device("cpu"))
    assert not [m for m in loaded.model.modules() if isinstance(m, LoraLayer)]
    assert main(["export", str(run), "--session", "2", "--format", "vlm", "--merge", "--out", str(tmp_path / "m")]) == 0
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").state_dict()
    base = resolve_vlm(f"llava:{llava3}").load(torch.device("cpu")).model.state_dict()
    changed = {name for name in base if not torch.equal(merged[name], base[name])}
    assert any("multi_modal_projector" in name for name in changed)
