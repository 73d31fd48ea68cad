"""The PaliGemma family on a tiny random PaliGemma built offline (SigLIP tower of width 64, a 1-layer Gemma over a
character tokenizer): the processor's prompt format, the swap of an ``hf:`` / ``hf-vision:`` SigLIP into its tower,
batched = unbatched letter scores, generation, the answer loss, and the refusals of the grid check."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmark.backbones import backbone_skeleton, load_backbone
from benchmark.backbones.hf import save_tiny_clip, save_tiny_siglip
from benchmark.vlm.base import IGNORE, PairBatch
from benchmark.vlm.paligemma import save_tiny_paligemma, vision_tower
from benchmark.vlm.spec import VLMError, resolve_vlm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("paligemma")
    return {"paligemma": save_tiny_paligemma(root / "paligemma"), "siglip": save_tiny_siglip(root / "siglip")}


@pytest.fixture(scope="module")
def family(folders):
    return resolve_vlm(f"paligemma:{folders['paligemma']}")


@pytest.fixture(scope="module")
def vlm(family):
    return family.load(torch.device("cpu"))


@pytest.fixture(scope="module")
def siglip(folders):
    return load_backbone(f"hf:{folders['siglip']}").eval()


def images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(24 + 8 * i, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for i in range(n)]


def test_the_family_reads_its_config_without_weights(family, folders):
    assert family.config().model_type == "paligemma" and family.tower_config().num_hidden_layers == 2
    assert family.unread_blocks() == 0
    family.check_loadable()
    assert any(name == "model.safetensors" for name, *_ in family.identity()["files"])


def test_pair_tokens_are_what_the_processor_makes_of_prompt_and_suffix(vlm):
    ids, labels = vlm.pair_tokens("what is it?", "a red car")
    image = images(1)
    made = vlm.processor(images=image, text=[vlm.prompt("what is it?")], suffix=["a red car"], return_tensors="pt")
    assert ids == made["input_ids"][0].tolist() and labels == made["labels"][0].tolist()
    tokenizer = vlm.processor.tokenizer
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == "a red car<eos>"
    assert tokenizer.decode(ids[16:]).startswith("<bos>answer en what is it?\n")  # 16 image tokens first


def test_the_swapped_tower_gives_the_backbone_s_tokens(vlm, family, siglip, folders):
    tower = load_backbone(f"hf-vision:{folders['paligemma']}").eval()  # the VLM's own tower, alone
    for backbone in (siglip, tower):
        vlm.swap_encoder(backbone)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = vlm.projector(family.encoder_tokens(backbone, pixels))
            theirs = vlm.model.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert "head" not in dict(vision_tower(vlm.model).named_children())


def test_batched_letter_scores_equal_each_row_scored_alone(vlm):
    prompts = [vlm.prompt(text) for text in ("which? A. cat B. dog", "is it a very long question, really? A. yes B. no")]
    pictures = images(2)
    letters = vlm.letter_token_ids(["A", "B"])
    with torch.no_grad():
        batched = vlm.answer_logits(vlm.inputs(pictures, prompts))[:, letters]
        alone = torch.cat([vlm.answer_logits(vlm.inputs([p], [q]))[:, letters] for p, q in zip(pictures, prompts)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    assert vlm.inputs(pictures, prompts)["attention_mask"][0, 0] == 0  # left-padded


def test_generate_answers_each_question(vlm):
    batch = vlm.inputs(images(2), [vlm.prompt("what?"), vlm.prompt("and this one?")])
    answers = vlm.generate(batch, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    alone = vlm.generate(vlm.inputs(images(2)[1:], [vlm.prompt("and this one?")]), max_new_tokens=3)
    assert answers[1] == alone[0]


def test_the_answer_loss_is_the_model_s_own_and_reaches_only_the_tokens(vlm, family, siglip):
    vlm.swap_encoder(siglip)
    pairs = [vlm.pair_tokens("what is it?", "a car"), vlm.pair_tokens("and that?", "no")]
    width = max(len(ids) for ids, _ in pairs)
    pad = vlm.pad_id
    batch = PairBatch(torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs]),
                      torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in pairs]),
                      torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = family.encoder_tokens(siglip, pixels).detach().requires_grad_(True)
    loss = vlm.answer_loss(tokens, batch)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert tokens.grad.abs().sum() > 0 and not any(p.grad is not None for p in vlm.model.parameters())
    # the same loss as the model computes from the pixels, with the processor's own token types
    made = vlm.processor(images=images(1), text=[vlm.prompt("what is it?")], suffix=["a car"], return_tensors="pt")
    with torch.no_grad():
        theirs = vlm.model(input_ids=made["input_ids"], attention_mask=made["attention_mask"],
                           token_type_ids=made["token_type_ids"], pixel_values=pixels[:1], labels=made["labels"]).loss
        ours = vlm.answer_loss(family.encoder_tokens(siglip, pixels[:1]),
                               PairBatch(made["input_ids"], made["labels"], made["attention_mask"]))
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


def test_the_answer_is_read_causally(vlm, family, siglip):
    """Changing a later answer token leaves the logits of the earlier answer positions as they were."""
    ids, labels = vlm.pair_tokens("what?", "abc")
    other = ids[:-2] + [vlm.processor.tokenizer.convert_tokens_to_ids("z")] + ids[-1:]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits = []
    for row in (ids, other):
        with torch.no_grad():
            out = vlm.model(input_ids=torch.tensor([row]), pixel_values=pixels,
                            token_type_ids=torch.tensor([[int(label != IGNORE) for label in labels]]))
        logits.append(out.logits[0])
    answer_start = labels.index(next(label for label in labels if label != IGNORE))
    torch.testing.assert_close(logits[0][: len(ids) - 2], logits[1][: len(ids) - 2], rtol=0, atol=0)
    assert answer_start < len(ids) - 2


def test_encoders_the_tower_cannot_take_are_refused_on_their_skeleton(family, tmp_path):
    with pytest.raises(VLMError, match=r"cannot go into PaliGemma's SigLIP vision tower.*hf: SiglipModel"):
        family.check_encoder(backbone_skeleton("openclip:fscl-tiny"))
    with pytest.raises(VLMError, match="not a transformers SigLIP tower"):
        family.check_encoder(backbone_skeleton(f"hf:{save_tiny_clip(tmp_path / 'clip')}"))
    with pytest.raises(VLMError, match=r"does not fit PaliGemma's vision tower: layers 3 \(tower: 2\)"):
        family.check_encoder(backbone_skeleton(f"hf:{save_tiny_siglip(tmp_path / 'deeper', layers=3)}"))


def test_bad_model_folders_are_refused(folders, tmp_path):
    with pytest.raises(VLMError, match="expected 'paligemma:/path/to/folder'"):
        resolve_vlm("paligemma:")
    with pytest.raises(VLMError, match="no config.json in that folder.*PaliGemmaForConditionalGeneration"):
        resolve_vlm(f"paligemma:{tmp_path}").config()
    with pytest.raises(VLMError, match="is a 'siglip' model; expected a PaliGemmaForConditionalGeneration"):
        resolve_vlm(f"paligemma:{folders['siglip']}").config()
