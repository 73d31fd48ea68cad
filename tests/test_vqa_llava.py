"""VQA through LLaVA: the prompt, loading, the encoder swap and letter/generate scoring, on a tiny random
LLaVA (the vision side of ``openclip:fscl-tiny``, a 1-layer Llama, a character tokenizer) saved and
loaded through ``from_pretrained``, on CPU, no network."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from benchmark.backbones import load_backbone
from benchmark.backbones.hf import save_char_tokenizer, save_tiny_siglip
from benchmark.export import to_hf_clip_vision
from benchmark.vlm.llava import LoadedLlava, check_encoder_fits, conversation, pad_to_square, save_tiny_llava, vision_tower
from benchmark.vlm.spec import VLMError, resolve_vlm
from benchmark.vqa.questions import LETTERS, MultipleChoiceSet, QuestionItem
from benchmark.vqa.scorer import generate_answers, option_scores

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:No pretrained weights")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")


def load(spec: str) -> LoadedLlava:
    """A fresh load of ``spec`` on CPU (float32), as a run's VQA evaluation loads it."""
    return resolve_vlm(spec).load("cpu")


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB image of ``size`` (width, height)."""
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def items(vlm: LoadedLlava, ks=(2, 5, 3, 4)):
    """Questions of different prompt lengths and option counts on non-square images, in ``vlm``'s prompt."""
    questions = MultipleChoiceSet("test", tuple(
        QuestionItem(str(i), f"Question {i}{'?' * 9 * i}", tuple(f"option {j}" for j in range(k)), 0)
        for i, k in enumerate(ks)))
    return [(image(i, (40 + 7 * i, 30)), vlm.prompt(questions.prompt(item)), questions.answers(item))
            for i, item in enumerate(questions.items)]


def test_the_prompt_is_the_released_vicuna_v1_one():
    item = QuestionItem("0", "What kind of traffic sign is this?", ("stop", "yield", "speed limit 30"), 1)
    assert conversation(MultipleChoiceSet("gtsrb", (item,)).prompt(item)) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat kind of traffic sign is this?\n"
        "A. stop\nB. yield\nC. speed limit 30\nAnswer with the option's letter from the given choices directly. "
        "ASSISTANT:")
    (square,) = pad_to_square([Image.new("RGB", (4, 2), (0, 0, 0))], SimpleNamespace(image_mean=[0.481, 0.458, 0.408]))
    assert square.size == (4, 4) and square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((0, 1)) == (0, 0, 0)


def test_the_tiny_llava_loads_through_from_pretrained_offline(folder, monkeypatch):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vlm = load(f"llava:{folder}")
    model, processor = vlm.model, vlm.processor
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(vision_tower(model), CLIPVisionModel)
    assert vision_tower(model).config.hidden_size == 64 and model.dtype == torch.float32 and not model.training
    ids = processor(images=[image(0, (32, 32))], text=["<image>hi"], return_tensors="pt").input_ids[0]
    assert (ids == model.config.image_token_id).sum() == 16  # (32 / 8)² patches, the class token dropped
    assert processor.tokenizer.convert_ids_to_tokens(vlm.letter_token_ids(LETTERS)) == [f" {c}" for c in LETTERS]


def test_a_missing_folder_or_image_token_is_refused_with_what_to_put_where(folder, tmp_path):
    with pytest.raises(VLMError, match=r"'llava:/nowhere/x': no such folder.*save_pretrained"):
        load("llava:/nowhere/x")
    with pytest.raises(VLMError, match="no config.json"):
        load(f"llava:{tmp_path}")
    with pytest.raises(VLMError, match=r"invalid value 'hf:.*allowed: .*llava:/path/to/folder"):
        load(f"hf:{folder}")
    with pytest.raises(VLMError, match="expected 'llava:/path/to/folder'"):
        load("llava:")
    broken = save_tiny_llava(tmp_path / "broken")
    save_char_tokenizer(broken)  # a tokenizer without '<image>'
    with pytest.raises(VLMError, match="tokenizer has no image token '<image>' with the id 4"):
        load(f"llava:{broken}")


def test_the_swapped_tower_gives_the_exported_encoder_s_features_and_new_scores(folder):
    backbone = load_backbone("openclip:fscl-tiny")
    vlm = load(f"llava:{folder}")
    questions = items(vlm)
    before = option_scores(vlm, questions)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(2):
        vlm.swap_encoder(backbone)
        with torch.no_grad():
            ours = vision_tower(vlm.model)(pixel_values=x, output_hidden_states=True).hidden_states[-2]
            exported = to_hf_clip_vision(backbone).vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(ours, exported, rtol=0, atol=1e-5)
        swapped = option_scores(vlm, questions)
        assert all(a.logprobs != b.logprobs for a, b in zip(before, swapped))
        before = swapped
        with torch.no_grad():  # "training": move the first block, which hidden_states[-2] sees
            fc1 = backbone.visual.transformer.resblocks[0].mlp.c_fc.weight
            fc1.add_(0.5 * torch.randn(fc1.shape, generator=torch.Generator().manual_seed(2 + step)))


def test_batched_letter_scores_equal_unbatched(folder):
    vlm = load(f"llava:{folder}")
    questions = items(vlm)
    batched = option_scores(vlm, questions)
    for question, score in zip(questions, batched):
        (alone,) = option_scores(vlm, [question])
        torch.testing.assert_close(torch.tensor(score.logprobs), torch.tensor(alone.logprobs),
                                   rtol=0, atol=1e-5)
        assert (score.choice, score.top_token) == (alone.choice, alone.top_token)


def rig_letters(vlm: LoadedLlava, preferred: list[int], boost: float) -> None:
    """Add ``boost`` to the logit of letter ``preferred[i]`` of batch row ``i`` at every step (rows in item order)."""
    letters = vlm.letter_token_ids(LETTERS)
    rig = torch.zeros(len(preferred), vlm.model.lm_head.out_features)
    rig[range(len(preferred)), [letters[p] for p in preferred]] = boost
    vlm.model.lm_head.register_forward_hook(lambda module, args, out: out + rig[:, None, :])


def test_the_letter_argmax_is_the_first_generated_token(folder):
    vlm = load(f"llava:{folder}")
    rig_letters(vlm, [2, 0, 3, 1], boost=6.0)  # a letter wins over the vocabulary
    questions = items(vlm, (5, 5, 5, 5))
    scores = option_scores(vlm, questions)
    answers = generate_answers(vlm, questions)
    assert [s.top_option for s in scores] == [s.choice for s in scores] == [2, 0, 3, 1]
    assert [a[0] for a in answers] == [LETTERS[s.choice] for s in scores]


def test_a_model_that_prefers_the_right_letter_scores_100_percent(folder):
    vlm = load(f"llava:{folder}")
    questions, right = items(vlm), [1, 4, 0, 2]
    rig_letters(vlm, right, boost=50.0)
    scores = option_scores(vlm, questions)
    assert [s.choice for s in scores] == [s.top_option for s in scores] == right
    assert min(s.mass for s in scores) > 0.999


def test_the_fit_check_refuses_encoders_the_tower_cannot_take(folder, tmp_path):
    from transformers import AutoConfig

    tower = AutoConfig.from_pretrained(folder).vision_config
    backbone = load_backbone("openclip:fscl-tiny")
    check_encoder_fits(tower, backbone)  # the tiny LLaVA's tower is fscl-tiny's vision side
    siglip = load_backbone(f"hf:{save_tiny_siglip(tmp_path / 'siglip')}")
    with pytest.raises(VLMError, match="'hf:.*siglip'.*a SiglipModel.*OpenAI-layout CLIP ViT"):
        check_encoder_fits(tower, siglip)
    narrow = AutoConfig.from_pretrained(folder).vision_config
    narrow.hidden_size, narrow.num_hidden_layers = 32, 3
    with pytest.raises(VLMError, match=r"'openclip:fscl-tiny' does not fit.*width 64 \(tower: 32\), layers 2 \(tower: 3\)"):
        check_encoder_fits(narrow, backbone)
    backbone.visual.ln_pre = torch.nn.Identity()  # not expressible as a CLIPVisionModel (as EVA's timm trunks)
    with pytest.raises(VLMError, match="cannot go into LLaVA's CLIP vision tower: it has no ln_pre"):
        check_encoder_fits(tower, backbone)


def test_the_grid_check_names_a_folder_without_weights_or_processor_files_without_loading_it(folder, tmp_path):
    import shutil

    from benchmark.config import load_config
    from benchmark.grid import vqa_problems

    def problems(broken: Path) -> list[str]:
        return vqa_problems(load_config("quick", ["seed=0", "strategy=zeroshot", f"vqa.model=llava:{broken}"]).expand())

    assert problems(folder) == []
    cases = {  # files removed -> what the grid check says
        ("model.safetensors",): "no weights in the folder (none of model.safetensors, pytorch_model.bin",
        ("tokenizer.json", "tokenizer_config.json"): "no tokenizer in the folder (none of tokenizer.json, ",
        ("processor_config.json",): "could not load its processor",
    }
    for removed, message in cases.items():
        broken = tmp_path / "-".join(removed)
        shutil.copytree(folder, broken)
        for name in removed:
            (broken / name).unlink()
        (found,) = problems(broken)
        assert found.startswith(f"vqa.model 'llava:{broken}': {message}") and "save_pretrained(DIR)" in found
    sharded = tmp_path / "sharded"  # a sharded save: every shard its index lists must be there
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (found,) = problems(sharded)
    assert "1 weight file(s) that model.safetensors.index.json lists are missing: model-00002-of-00002" in found
