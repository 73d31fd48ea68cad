"""HF transformers CLIP and SigLIP models: ``hf:/path/to/folder`` (a ``save_pretrained`` folder) or ``hf:org/hub-id``.

The folder holds the model (``config.json`` + weights of a ``CLIPModel`` or ``SiglipModel``) and
its tokenizer files, as written by ``model.save_pretrained(dir)`` and
``AutoTokenizer.save_pretrained(dir)``; an optional ``preprocessor_config.json`` gives the image
mean/std. Attention uses separate ``q_proj``,
``k_proj``, ``v_proj`` linears. Parameter names differ between transformers 4.x and 5.x, so
layers are found by name suffix (``encoder.layers``), never by absolute path.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from benchmark.backbones.base import Backbone, BlockView, ProjectionRows, WeightsSource
from benchmark.backbones.openclip import BackboneLoadError, _hub_reachable, hub_source
from benchmark.errors import FsclError


def is_path(rest: str) -> bool:
    """Whether ``rest`` (of ``family:rest``) is a local path, else a hub id."""
    return rest.startswith(("/", "./", "../", "~")) or Path(rest).expanduser().exists()


def resolve_source(rest: str, family: str, written_by: str) -> str:
    """``rest`` of ``family:rest`` → a local folder holding ``config.json``, or a hub id when the hub can be
    reached (or ``HF_HUB_OFFLINE`` asks for the local cache); :class:`BackboneLoadError` naming what writes
    such a folder (``written_by``) otherwise."""
    if is_path(rest):
        folder = Path(rest).expanduser()
        if not (folder / "config.json").is_file():
            raise BackboneLoadError(f"{family}:{rest}: no config.json in that folder; pass a folder written by "
                                    f"{written_by}")
        return str(folder)
    if not _hub_reachable():
        raise BackboneLoadError(
            f"'{rest}' is a Hugging Face hub id, and the hub cannot be reached from this machine. Download it "
            f"where there is internet (from_pretrained('{rest}') then {written_by.replace('dir', 'DIR')}), copy "
            f"DIR here and pass '{family}:/path/to/DIR'; or set HF_HUB_OFFLINE=1 to read it from the local "
            f"Hugging Face cache.")
    return rest


class _HFVisual(nn.Module):
    """The vision side of an HF CLIP/SigLIP model: tower + projection, images [B, 3, H, W] → [B, D].

    SigLIP has no projection (its tower's attention-pooling head gives the joint embedding):
    ``projection`` is then ``nn.Identity``.
    """

    def __init__(self, tower: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(self.tower(pixel_values=images).pooler_output)


class _HFTower:
    """What the HF backbones share: the block views, hidden states and projection of their ``_HFVisual`` tower."""

    visual: _HFVisual

    def hidden_states(self, images: Tensor, layer: int) -> Tensor:
        return self.visual.tower(pixel_values=images, output_hidden_states=True).hidden_states[layer]

    def image_projection(self) -> tuple[nn.Module, str] | None:
        return (self.visual.projection, "weight") if isinstance(self.visual.projection, nn.Linear) else None

    def blocks(self) -> list[BlockView]:
        return hf_block_views(self.visual.tower)


class HFCLIPBackbone(_HFTower, Backbone):
    """HF transformers CLIPModel / SiglipModel (separate q/k/v projections): hf:/local/folder or hf:org/hub-id."""

    def __init__(self, spec: str, rest: str, weights: bool = True) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = self._resolve(rest)
        try:
            if weights:
                model = AutoModel.from_pretrained(source)
                tokenizer = AutoTokenizer.from_pretrained(source)
            else:  # the architecture only (a skeleton): no weights, no tokenizer, nothing allocated
                with torch.device("meta"):
                    model, tokenizer = AutoModel.from_config(AutoConfig.from_pretrained(source)), None
        except (OSError, ValueError) as err:
            raise BackboneLoadError(
                f"could not load the HF model '{source}' (model and tokenizer files expected, as written by "
                f"CLIPModel.save_pretrained(dir) and AutoTokenizer.save_pretrained(dir)): {err}") from err
        for part in ("vision_model", "text_model", "logit_scale"):
            if not hasattr(model, part):
                raise BackboneLoadError(
                    f"hf:{rest} is a {type(model).__name__}; the hf: family needs a CLIPModel or SiglipModel "
                    f"(vision_model, text_model, logit_scale; projections optional)")
        projection = getattr(model, "visual_projection", None) or nn.Identity()
        size = model.config.vision_config.image_size
        mean, std = self._normalisation(source, model.config.model_type)
        transforms = tuple(open_clip.image_transform(size, is_train=t, mean=mean, std=std) for t in (True, False))
        super().__init__(spec, model, _HFVisual(model.vision_model, projection), transforms)
        self.image_normalisation = (mean, std)
        self._tokenizer = tokenizer
        self._context_length = model.config.text_config.max_position_embeddings

    @classmethod
    def weights_source(cls, rest: str) -> WeightsSource:
        if is_path(rest):
            return WeightsSource.folder(Path(rest).expanduser(), "config.json")
        return hub_source(rest, ("config.json",))

    @staticmethod
    def _resolve(rest: str) -> str:
        return resolve_source(rest, "hf", "CLIPModel.save_pretrained(dir) and AutoTokenizer.save_pretrained(dir)")

    @staticmethod
    def _normalisation(source: str, model_type: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """Image mean/std from the folder's preprocessor config; without one SigLIP's (0.5, 0.5, 0.5)
        or, for CLIP, None (open_clip's OpenAI defaults)."""
        path = Path(source) / "preprocessor_config.json"
        if not path.is_file():
            return ((0.5,) * 3, (0.5,) * 3) if model_type.startswith("siglip") else (None, None)
        cfg = json.loads(path.read_text())
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        return (tuple(mean) if mean else None), (tuple(std) if std else None)

    @classmethod
    def check_spec(cls, rest: str) -> None:
        if not rest:
            raise ValueError("hf: needs a local folder or a hub id, e.g. hf:/models/clip-vit-b16 "
                             "or hf:openai/clip-vit-base-patch16")

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        # CLIP: causal, pooled at the end-of-text token, so padding after it is harmless. SigLIP: pooled at
        # the last position, trained with max-length padding — which is what tokenize() gives.
        pooled = self.model.text_model(input_ids=tokens).pooler_output
        projection = getattr(self.model, "text_projection", None)
        return pooled if projection is None else projection(pooled)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts), padding="max_length", max_length=self._context_length,
                               truncation=True, return_tensors="pt").input_ids



VISION_TOWERS = ("siglip_vision_model", "clip_vision_model")  # model_type of the towers hf-vision: loads
TOWER_HINT = "SiglipVisionModel.save_pretrained(dir) or CLIPVisionModel.save_pretrained(dir) (fscl export)"


class HFVisionBackbone(_HFTower, Backbone):
    """An HF vision tower alone, no text tower: a SiglipVisionModel / CLIPVisionModel, or a PaliGemma / LLaVA's.

    ``hf-vision:/folder`` of a ``SiglipVisionModel`` or ``CLIPVisionModel[WithProjection]`` (as ``fscl export
    --format hf-siglip-vision`` / ``hf-clip-vision`` write), or the tower of a PaliGemma / LLaVA folder (only its
    ``vision_tower.*`` weights are read).

    It can be trained only through losses that need no text (the VLM-loss strategies, ``*-ppl``) and
    evaluated only by VQA: :attr:`has_text_tower` is False, and the text side raises
    :class:`NoTextTowerError`. :meth:`encode_image` [B, D] is the tower's pooled output (SigLIP's
    attention-pool head, CLIP's class token through the projection when there is one) or, for a tower
    without a head (PaliGemma's), the mean of its last hidden state over the patches.
    """

    has_text_tower = False

    def __init__(self, spec: str, rest: str, weights: bool = True) -> None:
        from transformers import AutoConfig

        source = resolve_source(rest, "hf-vision", TOWER_HINT)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise BackboneLoadError(f"hf-vision:{rest}: could not read its config.json ({err})") from err
        model_type = config.model_type
        # a VLM's config: a vision tower beside a language model, with an image token in its text
        in_vlm = hasattr(config, "image_token_id") and hasattr(config, "vision_config")
        vision_config = config.vision_config if in_vlm else config
        if vision_config.model_type not in VISION_TOWERS:
            raise BackboneLoadError(
                f"hf-vision:{rest} is a '{model_type}' model; hf-vision: takes a vision tower ("
                f"{', '.join(VISION_TOWERS)}) or a VLM holding one (a vision_config and a text_config, such as "
                f"PaliGemma's or LLaVA's); pass a CLIPModel / SiglipModel folder as hf:{rest}")
        with_projection = "CLIPVisionModelWithProjection" in (config.architectures or [])
        model = _tower_model(vision_config, with_projection) if weights else None
        if weights and in_vlm:
            _load_tower_of_vlm(model, source, rest)
        elif weights:
            try:
                model = type(model).from_pretrained(source)
            except (OSError, ValueError) as err:
                raise BackboneLoadError(f"hf-vision:{rest}: could not load the tower ({err}); pass a folder "
                                        f"written by {TOWER_HINT}") from err
        else:  # the architecture only (a skeleton): no weights, nothing allocated
            with torch.device("meta"):
                model = _tower_model(vision_config, with_projection)
        projection = getattr(model, "visual_projection", None) or nn.Identity()
        mean, std = HFCLIPBackbone._normalisation(source, vision_config.model_type)
        transforms = tuple(open_clip.image_transform(vision_config.image_size, is_train=t, mean=mean, std=std)
                           for t in (True, False))
        # transformers 4.x: SiglipVisionModel / CLIPVisionModel wrap a .vision_model; 5.x: the model is the tower
        super().__init__(spec, model, _HFVisual(getattr(model, "vision_model", model), projection), transforms)
        self.image_normalisation = (mean, std)

    @classmethod
    def check_spec(cls, rest: str) -> None:
        if not rest:
            raise ValueError("hf-vision: needs a local folder or a hub id, e.g. hf-vision:/models/siglip-tower "
                             "or hf-vision:google/paligemma-3b-pt-224")

    @classmethod
    def weights_source(cls, rest: str) -> WeightsSource:
        return HFCLIPBackbone.weights_source(rest)

    def _no_text(self, what: str) -> NoTextTowerError:
        return NoTextTowerError(f"'{self.spec}' is a vision tower alone (hf-vision:): it has no {what}; "
                                f"evaluate it by VQA and train it with a VLM-loss strategy (*-ppl), or load "
                                f"the whole CLIPModel / SiglipModel as hf:")

    @property
    def logit_scale(self) -> Tensor:
        raise self._no_text("text tower and no CLIP temperature")

    def encode_image(self, images: Tensor) -> Tensor:
        out = self.visual.tower(pixel_values=images)
        if out.pooler_output is None:  # a tower without a head (PaliGemma's): the mean over patches
            return out.last_hidden_state.mean(dim=1)
        return self.visual.projection(out.pooler_output)

    def encode_text(self, tokens: Tensor) -> Tensor:
        raise self._no_text("text tower")

    def tokenize(self, texts: list[str]) -> Tensor:
        raise self._no_text("tokenizer")


def _tower_model(vision_config, with_projection: bool) -> nn.Module:
    """A random-weight transformers tower of ``vision_config``: ``SiglipVisionModel``, ``CLIPVisionModel``,
    or ``CLIPVisionModelWithProjection`` when ``with_projection``."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel

    if vision_config.model_type == "siglip_vision_model":
        return SiglipVisionModel(vision_config)
    return (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(vision_config)


def _load_tower_of_vlm(tower: nn.Module, source: str, rest: str) -> None:
    """Load into ``tower`` the ``vision_tower.*`` tensors of the VLM saved in the folder (or hub id) ``source``,
    read from its safetensors files alone (the language model is never loaded), strictly. The names after
    ``vision_tower.`` start with ``vision_model.`` (transformers 4.x, hub checkpoints) or not (5.x)."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():  # a hub id: its safetensors files (the whole VLM's) into the local cache
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [folder / "model.safetensors"])
    state = {}
    for path in files:
        if not path.is_file():
            raise BackboneLoadError(f"hf-vision:{rest}: {path.name} is missing; hf-vision: reads a VLM's tower "
                                    f"from its safetensors files (save_pretrained's)")
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if "vision_tower." in key:
                    state[key.split("vision_tower.", 1)[1].removeprefix("vision_model.")] = f.get_tensor(key)
    try:
        getattr(tower, "vision_model", tower).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneLoadError(f"hf-vision:{rest}: its vision_tower weights do not fit the tower of its "
                                f"config.json: {' '.join(str(err).split())[:300]}") from err


class NoTextTowerError(FsclError, TypeError):
    """A text-side feature was asked of a backbone that has no text tower (a VLM's tower loaded alone)."""


def hf_block_views(tower: nn.Module) -> list[BlockView]:
    """One :class:`BlockView` per layer of an HF CLIP/SigLIP vision tower (separate q/k/v linears).

    ``tower`` is any module holding exactly one ``...encoder.layers`` list (``CLIPVisionModel``,
    its ``vision_model``, ``SiglipVisionTransformer``...), in transformers 4.x or 5.x naming.
    """
    layers = [m for name, m in tower.named_modules() if name.endswith("encoder.layers")]
    if len(layers) != 1:
        raise TypeError(f"expected one 'encoder.layers' list in the {type(tower).__name__} vision tower, "
                        f"found {len(layers)}")
    views = []
    for i, layer in enumerate(layers[0]):
        attn = layer.self_attn
        width = attn.q_proj.out_features
        q, k, v = (ProjectionRows(lin.weight, lin.bias, slice(0, width))
                   for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        views.append(BlockView(
            index=i, num_heads=attn.num_heads, head_dim=width // attn.num_heads, q=q, k=k, v=v,
            fc1=layer.mlp.fc1, norms=(layer.layer_norm1, layer.layer_norm2), module=layer,
        ))
    return views


__all__ = ["HFCLIPBackbone", "HFVisionBackbone", "NoTextTowerError", "hf_block_views", "save_char_tokenizer",
           "save_tiny_clip", "save_tiny_siglip"]


def save_char_tokenizer(folder: str | Path, *, eos: str = "</s>", pad: str = "<pad>") -> Path:
    """Write a character-level Hugging Face fast tokenizer (lower-case letters, digits, punctuation, space).

    For offline tests of models whose tokenizer normally comes from the hub (SigLIP): the folder
    loads with ``AutoTokenizer.from_pretrained(folder)``. Ids: pad 0, eos 1, unk 2, then characters.
    """
    import string

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {pad: 0, eos: 1, "<unk>": 2}
    for char in " " + string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def save_tiny_siglip(folder: str | Path, *, width: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32,
                     patch_size: int = 8, seed: int = 0) -> Path:
    """Write a tiny random-weight HF ``SiglipModel`` (joint width ``width``) and a character-level tokenizer."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    folder = save_char_tokenizer(folder)
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    config = SiglipConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "pad_token_id": 0, "bos_token_id": None, "eos_token_id": 1, "projection_size": width},
        vision_config={"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        SiglipModel(config).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str | Path, *, width: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32,
                   patch_size: int = 8, embed_dim: int = 32, seed: int = 0) -> Path:
    """Write a tiny random-weight HF ``CLIPModel`` and a character-level CLIP tokenizer to ``folder``.

    For offline tests and smoke runs (``hf:<folder>``), like open_clip's ``fscl-tiny`` config.
    The vision tower has ``layers`` blocks of ``heads`` heads, width ``width`` and MLP width 4W.
    """
    import string

    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    try:  # transformers 5: the vocabulary itself
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    except TypeError:  # transformers 4: files
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size},
        projection_dim=embed_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
