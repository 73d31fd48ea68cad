"""What a VLM family answers: the protocol every ``vqa.model`` family implements, and the helpers of the
families that load a transformers model saved with ``save_pretrained``.

A family is two classes (the families of :mod:`benchmark.vlm` are examples; ``docs/adding-a-vlm.md`` walks through one):

* :class:`VLMFamily`, bound to one parsed ``vqa.model`` (:class:`~benchmark.vlm.spec.VLMSpec`) and registered in
  :data:`~benchmark.registry.VLMS`: everything the grid check asks before any weights load (the model's config,
  whether a backbone's encoder fits its vision tower, the tokens its language model reads, its identity for
  cache keys) and :meth:`VLMFamily.load`;
* :class:`LoadedVLM`, the loaded model (frozen, eval mode): its prompt format, model inputs, the logits of the
  first answer token and greedy generation (for :mod:`benchmark.vqa.scorer`), the tokenized training pairs and
  the answer loss (for :class:`benchmark.vlm_template.VLMTemplate`), the swap of a backbone's encoder into its
  tower, and its language model's modules (FLOP accounting, LLM-side strategies).

The run's encoder is trained where it lives, in the run's backbone: :meth:`VLMFamily.encoder_tokens` computes
the tokens the language model reads through the backbone's own modules, and :meth:`LoadedVLM.answer_loss`
takes them in place of the tower's, so every strategy works on the backbone's modules and both evaluations read
the updated weights.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from benchmark.backbones import Backbone
from benchmark.vlm.spec import VLMError, VLMSpec

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # save_pretrained's, each maybe sharded with an index
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a fast, a SentencePiece or a BPE tokenizer's
IGNORE = -100  # label of the positions without loss (transformers')


@dataclass(frozen=True)
class PairBatch:
    """Right-padded token tensors of a batch of training pairs: ``input_ids``, ``labels`` (:data:`IGNORE` off the
    answers) and ``attention_mask``, each [B, L]."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.labels, self.attention_mask)))


class VLMFamily(ABC):
    """One ``vqa.model`` value's family, bound to its spec; constructing it checks the spec and loads nothing.

    Class attributes: ``example`` (a ``vqa.model`` value, for messages), ``takes`` (which backbones its tower takes,
    for messages), ``has_answer_loss`` (whether the VLM-loss strategies can train through it).
    """

    example: ClassVar[str]
    takes: ClassVar[str]
    has_answer_loss: ClassVar[bool] = True

    def __init__(self, spec: VLMSpec) -> None:
        self.spec = spec

    # -- without weights (the grid check) ----------------------------------------------------------
    @abstractmethod
    def config(self) -> Any:
        """The model's transformers config, read without its weights; :class:`VLMError` when it is missing or
        of another family."""

    @abstractmethod
    def tower_config(self) -> Any:
        """The vision tower's config (``image_size``, ``patch_size``, ``num_hidden_layers``, ...)."""

    @abstractmethod
    def check_encoder(self, backbone: Backbone) -> None:
        """Raise :class:`VLMError` unless ``backbone``'s encoder (its skeleton is enough) goes into the tower."""

    def check_loadable(self) -> None:
        """Raise :class:`VLMError` unless the model would load (files present, processor fits); nothing is loaded.
        Default: nothing to look at."""
        return None

    def prepare(self) -> None:
        """Make what the family builds on first use (the mini world's VLM); nothing for saved models."""
        return None

    def identity(self) -> dict[str, Any]:
        """What identifies the model (the key of its shared counts): the spec, and each file of a local folder."""
        return {"spec": str(self.spec), "files": []}

    @abstractmethod
    def encoder_tokens(self, backbone: Backbone, images: Tensor) -> Tensor:
        """The tokens the language model reads of ``images`` [B, 3, S, S] (the backbone's preprocessing), computed
        through ``backbone``'s own modules: [B, N, W]. Runs on a skeleton too (meta tensors)."""

    @abstractmethod
    def unread_blocks(self) -> int:
        """How many of the encoder's last blocks the language model never reads (past its feature layer): the
        default of the VLM-loss strategies' ``skip_last_blocks``."""

    @abstractmethod
    def load(self, device: torch.device, dtype: torch.dtype | None = None) -> LoadedVLM:
        """The model and its processor, frozen, in eval mode on ``device``; ``dtype`` default: float16 on CUDA
        (as released), float32 elsewhere."""

    def loaded(self, device: torch.device) -> LoadedVLM:
        """:meth:`load` on ``device``, once per process (the global RNGs untouched)."""
        key = str(device)
        if key not in self._loaded:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self._loaded[key] = self.load(device)
        return self._loaded[key]

    @cached_property
    def _loaded(self) -> dict[str, LoadedVLM]:
        return {}


class LoadedVLM(nn.Module, ABC):
    """A loaded VLM: ``model`` (frozen, eval mode) and its ``processor``. Its ``forward`` is :meth:`answer_loss`,
    so the cost meter counts the language model's FLOPs under this module (:meth:`language_modules`)."""

    def __init__(self, family: VLMFamily, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.family = family
        self.model = model.requires_grad_(False).eval()
        self.processor = processor

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- questions ----------------------------------------------------------------------------------
    @abstractmethod
    def prompt(self, user_text: str) -> str:
        """The model's prompt around a question's text (its conversation format, with the image's place)."""

    @abstractmethod
    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Tensor]:
        """Model inputs of a batch on the model's device, left-padded (``input_ids``, ``attention_mask`` [B, L], the
        images as the model takes them, in its dtype)."""

    @abstractmethod
    def answer_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Float logits [B, V] of the first answer token (each prompt's last position), one forward pass; a batched
        row equals the row scored alone."""

    @abstractmethod
    def letter_token_ids(self, letters: Sequence[str]) -> list[int]:
        """The first answer token of each option letter of ``letters`` (:class:`VLMError` unless each letter is one
        token)."""

    @abstractmethod
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int) -> list[str]:
        """Greedy answers of :meth:`inputs`' ``batch``, special tokens skipped, stripped."""

    # -- training -------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @abstractmethod
    def pair_tokens(self, user_text: str, answer: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one training pair: the prompt of ``user_text`` (image tokens expanded) and
        ``answer`` with the end-of-sequence token; labels :data:`IGNORE` except on the answer and its end."""

    @abstractmethod
    def answer_loss(self, tokens: Tensor, pairs: PairBatch) -> Tensor:
        """Mean next-token cross-entropy over the labelled positions of ``pairs`` (fp32 scalar) with ``tokens``
        [B, N, W] (:meth:`VLMFamily.encoder_tokens`) in its image positions; gradients reach the tokens only."""

    def forward(self, tokens: Tensor, pairs: PairBatch) -> Tensor:
        return self.answer_loss(tokens, pairs)

    # -- the tower and the language model -------------------------------------------------------------
    @abstractmethod
    def swap_encoder(self, backbone: Backbone) -> None:
        """Load ``backbone``'s current encoder into the tower, in memory, strictly (in the tower's dtype)."""

    @abstractmethod
    def language_modules(self) -> list[nn.Module]:
        """The language model and its output head (frozen; the FLOPs of its forward and of the backward to its
        inputs are the VLM loss's ``lm`` part)."""

    @abstractmethod
    def llm_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, first to last."""


# --------------------------------------------------------------------------- saved transformers models
def is_path(rest: str) -> bool:
    """Whether a spec's rest is a local path (else a hub id)."""
    return rest.startswith(("/", "./", "../", "~")) or Path(rest).expanduser().exists()


def folder_identity(spec: VLMSpec, folder: Path) -> dict[str, Any]:
    """:meth:`VLMFamily.identity` of a model in ``folder``: each file's name, size and modification time."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()) \
        if folder.is_dir() else []
    return {"spec": str(spec), "files": files}


def weights_problem(folder: Path) -> str | None:
    """Why the weights of the model saved in ``folder`` are not all there (no weights file, or shards that its
    index lists missing), or None when they are; nothing is loaded."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return None
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                return f"its weights index {index.name} cannot be read ({err!r})"
            missing = sorted(shard for shard in shards if not (folder / shard).is_file())
            return f"{len(missing)} weight file(s) that {index.name} lists are missing: {', '.join(missing[:3])}" \
                if missing else None
    return f"no weights in the folder (none of {', '.join(WEIGHT_FILES)}, nor their sharded .index.json)"


def answer_token_ids(tokenizer, prefix: str, answers: Sequence[str]) -> list[int]:
    """The first token that each of ``answers`` adds after ``prefix`` (the prompt's end), found
    tokenizer-agnostically: the first token of ``prefix + answer`` beyond ``prefix``'s own; it must decode to the
    answer alone (Llama: ``"ASSISTANT: A"`` adds ``▁A``)."""
    base = tokenizer(prefix, add_special_tokens=False).input_ids
    ids = []
    for answer in answers:
        full = tokenizer(prefix + answer, add_special_tokens=False).input_ids
        new = full[len(base):]
        if full[:len(base)] != base or not new or tokenizer.decode(new[:1]).strip() != answer.strip():
            raise VLMError(f"the tokenizer has no single first token for the answer {answer!r} after {prefix!r} "
                           f"(it gives {tokenizer.convert_ids_to_tokens(new)}); letter scoring needs one")
        ids.append(new[0])
    return ids

