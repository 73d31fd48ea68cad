"""HF transformers CLIP models: ``hf:/path/to/folder`` (a ``save_pretrained`` folder) or ``hf:org/hub-id``.

The folder holds the model (``config.json`` + weights) and its tokenizer files, as written by
``CLIPModel.save_pretrained(dir)`` and ``AutoTokenizer.save_pretrained(dir)``; an optional
``preprocessor_config.json`` gives the image mean/std. Attention uses separate ``q_proj``,
``k_proj``, ``v_proj`` linears. Parameter names differ between transformers 4.x and 5.x, so
layers are found by name suffix (``encoder.layers``), never by absolute path.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import open_clip
from torch import Tensor, nn

from benchmark.backbones.base import Backbone, BlockView, ProjectionRows
from benchmark.backbones.openclip import BackboneLoadError, _hub_reachable
from benchmark.registry import BACKBONES


def _is_path(rest: str) -> bool:
    return rest.startswith(("/", "./", "../", "~")) or Path(rest).expanduser().exists()


class _HFVisual(nn.Module):
    """The vision side of an HF CLIP model: tower + projection, images [B, 3, H, W] → [B, D]."""

    def __init__(self, tower: nn.Module, projection: nn.Linear) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(self.tower(pixel_values=images).pooler_output)


@BACKBONES.register("hf")
class HFCLIPBackbone(Backbone):
    """HF transformers CLIP models (separate q/k/v projections): hf:/local/folder or hf:org/hub-id."""

    def __init__(self, spec: str, rest: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        source = self._resolve(rest)
        try:
            model = AutoModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise BackboneLoadError(
                f"could not load the HF model '{source}' (model and tokenizer files expected, as written by "
                f"CLIPModel.save_pretrained(dir) and AutoTokenizer.save_pretrained(dir)): {err}") from err
        for part in ("vision_model", "visual_projection", "text_model", "text_projection", "logit_scale"):
            if not hasattr(model, part):
                raise BackboneLoadError(
                    f"hf:{rest} is a {type(model).__name__}; the hf: family needs a CLIP-layout model "
                    f"(vision_model, visual_projection, text_model, text_projection, logit_scale)")
        super().__init__(spec, model, _HFVisual(model.vision_model, model.visual_projection))
        self._tokenizer = tokenizer
        self._context_length = model.config.text_config.max_position_embeddings
        size = model.config.vision_config.image_size
        mean, std = self._normalisation(source)
        self._train_tf = open_clip.image_transform(size, is_train=True, mean=mean, std=std)
        self._eval_tf = open_clip.image_transform(size, is_train=False, mean=mean, std=std)

    @staticmethod
    def _resolve(rest: str) -> str:
        if _is_path(rest):
            folder = Path(rest).expanduser()
            if not (folder / "config.json").is_file():
                raise BackboneLoadError(
                    f"hf:{rest}: no config.json in that folder; pass a folder written by "
                    f"CLIPModel.save_pretrained(dir) and AutoTokenizer.save_pretrained(dir)")
            return str(folder)
        if not _hub_reachable():
            raise BackboneLoadError(
                f"'{rest}' is a Hugging Face hub id, and the hub cannot be reached from this machine. Download it "
                f"where there is internet (CLIPModel.from_pretrained('{rest}').save_pretrained(DIR) and the same "
                f"with AutoTokenizer and AutoProcessor), copy DIR here and pass 'hf:/path/to/DIR'; or set "
                f"HF_HUB_OFFLINE=1 to read it from the local Hugging Face cache.")
        return rest

    @staticmethod
    def _normalisation(source: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """Image mean/std from the folder's preprocessor config (None: open_clip's OpenAI defaults)."""
        path = Path(source) / "preprocessor_config.json"
        if not path.is_file():
            return None, None
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
        # The text tower is causal and pools at the end-of-text token, so padding after it is harmless.
        return self.model.text_projection(self.model.text_model(input_ids=tokens).pooler_output)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts), padding="max_length", max_length=self._context_length,
                               truncation=True, return_tensors="pt").input_ids

    def preprocess(self, train: bool) -> Callable:
        return self._train_tf if train else self._eval_tf

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def image_projection(self) -> tuple[nn.Module, str] | None:
        return (self.visual.projection, "weight")

    def blocks(self) -> list[BlockView]:
        layers = [m for name, m in self.visual.tower.named_modules() if name.endswith("encoder.layers")]
        if len(layers) != 1:
            raise TypeError(f"{self.spec}: expected one 'encoder.layers' list in the vision tower, found {len(layers)}")
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


__all__ = ["HFCLIPBackbone", "save_tiny_clip"]


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
