"""What a VLM family answers: the protocol every ``vqa.model`` family implements, and the helpers of the
families that load a transformers model saved with ``save_pretrained``.

A family is two classes (the families of :mod:`benchmark.vlm` are examples; ``docs/adding-a-vlm.md`` walks through one):

* :class:`VLMFamily`, bound to one parsed ``vqa.model`` (:class:`~benchmark.vlm.spec.VLMSpec`) and registered in
  :data:`~benchmark.registry.VLMS`: everything the grid check asks before any weights load (the model's config,
  whether a backbone's encoder fits its vision tower, the tokens its language model reads, its identity for
  cache keys) and :meth:`VLMFamily.load`;
* :class:`LoadedVLM`, the loaded model (frozen, eval mode): its prompt format, model inputs, the tokens of
  an answer, the logits of an answer's first tokens and greedy generation (for :mod:`benchmark.vqa.scorer`), the
  tokenized training pairs and the answer loss (for :class:`benchmark.vlm_template.VLMTemplate`), the swap of a
  backbone's encoder into its tower, and its language model's modules (FLOP accounting, LLM-side strategies).

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
from benchmark.backbones.hf import is_path
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

    def text_config(self) -> Any:
        """The language model's config (``num_hidden_layers``, ``hidden_size``, ...), read without weights; a
        VLM-side strategy checks its options against it (default: ``config().text_config``)."""
        return self.config().text_config

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
        device = torch.device(device)
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
    def continuation_logits(self, batch: dict[str, Tensor], continuations: Sequence[Sequence[int]]) -> Tensor:
        """Float logits [B, C + 1, V] of :meth:`inputs`' left-padded ``batch`` with row ``b``'s tokens
        ``continuations[b]`` appended after its prompt as the start of the answer (right-padded to the longest, C;
        masked), one forward pass: position ``j`` holds the logits of the answer's token ``j`` (0: each prompt's last
        position). A batched row equals the row scored alone; C = 0 is :meth:`answer_logits`."""

    def answer_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Float logits [B, V] of the first answer token (each prompt's last position), one forward pass; a batched
        row equals the row scored alone."""
        return self.continuation_logits(batch, [[]] * len(batch["input_ids"]))[:, 0]

    @abstractmethod
    def answer_tokens(self, answers: Sequence[str]) -> list[list[int]]:
        """The tokens each of ``answers`` adds after the prompt's end, as the model reads an answer
        (:class:`VLMError` unless each is some tokens that decode to the answer)."""

    def letter_token_ids(self, letters: Sequence[str]) -> list[int]:
        """The answer token of each option letter of ``letters`` (:class:`VLMError` unless each letter is one
        token)."""
        return single_tokens(letters, self.answer_tokens(letters))

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

    @property
    @abstractmethod
    def projector(self) -> nn.Module:
        """The module that maps the tower's features into the language model's embeddings."""

    @abstractmethod
    def language_modules(self) -> list[nn.Module]:
        """The language model and its output head (frozen; the FLOPs of its forward and of the backward to its
        inputs are the VLM loss's ``lm`` part)."""

    @abstractmethod
    def llm_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, first to last."""


# --------------------------------------------------------------------------- saved transformers models
class SavedVLMFamily(VLMFamily):
    """A family of transformers VLMs saved with ``save_pretrained`` beside their processor: ``FAMILY:/folder`` or
    ``FAMILY:org/hub-id``. A subclass names ``model_class`` (the transformers class), ``model_type`` (its
    config.json's) and ``hub_example`` (a hub id, for messages), checks its processor (:meth:`check_processor`) and
    wraps :meth:`pretrained` in :meth:`~VLMFamily.load`."""

    model_class: ClassVar[str]
    model_type: ClassVar[str]
    hub_example: ClassVar[str]
    cuda_dtype: ClassVar[torch.dtype] = torch.float16  # the weights' type on CUDA (as released)

    def __init__(self, spec: VLMSpec) -> None:
        super().__init__(spec)
        self.check_rest(spec.rest)

    def check_rest(self, rest: str) -> None:
        """Raise :class:`VLMError` unless ``rest`` names a folder or a hub id."""
        if not rest:
            family = self.spec.family
            raise VLMError(f"vqa.model '{self.spec}': expected '{family}:/path/to/folder' (a {self.model_class} "
                           f"folder with its processor) or '{family}:org/hub-id', e.g. {family}:{self.hub_example}")

    @property
    def save_hint(self) -> str:
        """How to write the folder where there is internet (``ID``: the hub id, ``DIR``: the folder)."""
        return (f"{self.model_class}.from_pretrained(ID).save_pretrained(DIR) and "
                f"AutoProcessor.from_pretrained(ID).save_pretrained(DIR)")

    def source(self) -> tuple[str, bool]:
        """(folder or hub id, local_files_only); :class:`VLMError` for a folder without a model or an unreachable hub."""
        from benchmark.backbones.openclip import _hub_reachable

        rest, spec = self.spec.rest, self.spec
        if is_path(rest):
            folder = Path(rest).expanduser()
            if not (folder / "config.json").is_file():
                what = "no config.json in that folder" if folder.is_dir() else "no such folder"
                raise VLMError(f"vqa.model '{spec}': {what}. Put a {self.model_class} there, written where there is "
                               f"internet with {self.save_hint} (ID such as {self.hub_example}).")
            return str(folder), True
        if not _hub_reachable():
            raise VLMError(f"vqa.model '{spec}': '{rest}' is a hub id and the hub cannot be reached from this "
                           f"machine. Where there is internet run {self.save_hint.replace('ID', repr(rest))}, copy "
                           f"DIR here and pass '{spec.family}:/path/to/DIR'; or set HF_HUB_OFFLINE=1 to read the local "
                           f"cache.")
        return rest, False

    def identity(self) -> dict[str, Any]:
        source, local = self.source()
        return folder_identity(self.spec, Path(source)) if local else super().identity()

    @cached_property
    def _config(self):
        from transformers import AutoConfig, PretrainedConfig

        source, local = self.source()
        try:  # the model_type first: another family's config may not even build as this one
            model_type = PretrainedConfig.get_config_dict(source, local_files_only=local)[0].get("model_type")
            config = AutoConfig.from_pretrained(source, local_files_only=local) if model_type == self.model_type \
                else None
        except (OSError, ValueError) as err:
            raise VLMError(f"vqa.model '{self.spec}': could not read its config.json ({' '.join(str(err).split())}); "
                           f"the folder needs what {self.save_hint} writes") from err
        if config is None:
            raise VLMError(f"vqa.model '{self.spec}' is a '{model_type}' model; expected a {self.model_class} "
                           f"(model_type '{self.model_type}'), e.g. {self.hub_example}")
        return config

    def config(self):
        """The model's config, read without weights."""
        return self._config

    def tower_config(self):
        return self.config().vision_config

    def check_loadable(self) -> None:
        """A local folder's weights files are all there (not loaded) and its processor loads and fits; hub ids are
        not looked at."""
        if not is_path(self.spec.rest):
            return
        source, local = self.source()
        problem = weights_problem(Path(source))
        if problem is not None:
            raise VLMError(f"vqa.model '{self.spec}': {problem}; the folder needs what {self.save_hint} writes")
        self.processor(source, local)

    def processor(self, source: str, local: bool):
        """The processor saved at ``source``, checked (:meth:`check_processor`); :class:`VLMError` when it cannot be
        loaded or does not fit."""
        from transformers import AutoProcessor

        if local and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
            raise VLMError(f"vqa.model '{self.spec}': no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); "
                           f"the folder needs what {self.save_hint} writes")
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError) as err:
            raise VLMError(f"vqa.model '{self.spec}': could not load its processor (tokenizer and image processor: "
                           f"{' '.join(str(err).split())}); the folder needs what {self.save_hint} writes") from err
        self.check_processor(processor)
        return processor

    def check_processor(self, processor) -> None:
        """Raise :class:`VLMError` unless ``processor`` can feed the model of :meth:`config`."""

    def pretrained(self, device: torch.device, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        """The model (on ``device``, ``dtype`` default :attr:`cuda_dtype` on CUDA, float32 elsewhere) and its checked
        processor."""
        import transformers

        source, local = self.source()
        device = torch.device(device)
        if dtype is None:
            dtype = self.cuda_dtype if device.type == "cuda" else torch.float32
        processor = self.processor(source, local)
        try:
            model = getattr(transformers, self.model_class).from_pretrained(source, dtype=dtype, local_files_only=local)
        except OSError as err:
            raise VLMError(f"vqa.model '{self.spec}': could not read the model ({err}); the folder needs what "
                           f"{self.save_hint} writes") from err
        return model.to(device), processor


TOWER_FIELDS = {"hidden_size": "width", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                "intermediate_size": "MLP width", "patch_size": "patch size", "image_size": "image size",
                "hidden_act": "activation"}  # what an encoder must share with a VLM's tower, in words


def tower_differences(ours: Any, tower_config: Any) -> list[str]:
    """Where the vision config ``ours`` (a backbone encoder's) differs from a VLM's ``tower_config`` in
    :data:`TOWER_FIELDS`, in words (``"layers 3 (tower: 2)"``); empty: the encoder fits."""
    return [f"{label} {getattr(ours, key)} (tower: {getattr(tower_config, key)})"
            for key, label in TOWER_FIELDS.items() if getattr(ours, key) != getattr(tower_config, key)]


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


def with_continuations(batch: dict[str, Tensor], continuations: Sequence[Sequence[int]],
                       pad_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """``batch`` (left-padded prompts) with row ``b``'s tokens ``continuations[b]`` appended, right-padded with
    ``pad_id`` to the longest (C): its ``input_ids`` and ``attention_mask`` [B, L + C] (0 on the padding), and the
    continuation's mask [B, C] (``batch`` itself when C = 0)."""
    ids = batch["input_ids"]
    width = max(map(len, continuations), default=0)
    mask = torch.zeros(len(ids), width, dtype=batch["attention_mask"].dtype, device=ids.device)
    if width == 0:
        return batch, mask
    tokens = torch.full((len(ids), width), pad_id, dtype=ids.dtype, device=ids.device)
    for row, continuation in enumerate(continuations):
        tokens[row, :len(continuation)] = torch.tensor(list(continuation), dtype=ids.dtype)
        mask[row, :len(continuation)] = 1
    return {**batch, "input_ids": torch.cat([ids, tokens], 1),
            "attention_mask": torch.cat([batch["attention_mask"], mask], 1)}, mask


def answer_token_sequences(tokenizer, prefix: str, answers: Sequence[str]) -> list[list[int]]:
    """The tokens that each of ``answers`` adds after ``prefix`` (the prompt's end), found tokenizer-agnostically:
    those of ``prefix + answer`` beyond ``prefix``'s own; they must decode to the answer, whitespace aside (Llama:
    ``"ASSISTANT: A"`` adds ``▁A``, ``"ASSISTANT: (a)"`` adds ``▁(``, ``a``, ``)``)."""
    base = tokenizer(prefix, add_special_tokens=False).input_ids
    sequences = []
    for answer in answers:
        full = tokenizer(prefix + answer, add_special_tokens=False).input_ids
        new = full[len(base):]
        if full[:len(base)] != base or not new or "".join(tokenizer.decode(new).split()) != "".join(answer.split()):
            raise VLMError(f"the tokenizer cannot read the answer {answer.strip()!r} after {prefix!r} as tokens of its own "
                           f"(it gives {tokenizer.convert_ids_to_tokens(new)}); option scoring needs them")
        sequences.append(new)
    return sequences


def single_tokens(answers: Sequence[str], sequences: Sequence[Sequence[int]]) -> list[int]:
    """The one token of each of ``answers`` (its ``sequences``, :func:`answer_token_sequences`); :class:`VLMError`
    for an answer of several tokens."""
    for answer, tokens in zip(answers, sequences):
        if len(tokens) != 1:
            raise VLMError(f"the tokenizer has no single token for the answer {answer!r} (it gives {len(tokens)} "
                           f"tokens); letter scoring needs one")
    return [tokens[0] for tokens in sequences]
