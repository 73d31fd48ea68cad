"""A run's adapted VLM after session N (``fscl export --format vlm``): the VLM-side strategies' LoRA, written as a
PEFT adapter folder over the base VLM, or merged into a whole ``save_pretrained`` model.

The VLM-side strategies (``lora-llm``, ``lora-llm-last``, ``lora-vlm``: :mod:`strategies.llm`) adapt the run's VLM
with one peft LoRA adapter, never merged during the run; a session's checkpoint holds its factors, named as the
parameters under the VLM's transformers model (``model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight``:
A [r, in], B [out, r], ΔW = (α/r)·B·A) under the keys of its state that the strategy names (``vlm_factors``), and
the run's config.yaml the rank and α; ``lorsu-llm``'s masked deltas are merged by the strategy itself
(``merge_into_vlm``, ``--merge`` only). The export loads the base VLM afresh (``--vlm``, default the run's
``vqa.model``; never the process's shared one), puts the session's encoder into its tower when the run trained
the encoder (the manifest's ``updates``),
attaches a peft adapter on the same modules holding the factors and writes either

* the adapter (default): ``adapter_config.json`` + ``adapter_model.safetensors`` (its ``base_model_name_or_path``
  the base VLM), loaded with ``peft.PeftModel.from_pretrained(base, DIR)``; an encoder trained by the run travels in
  it as a module saved whole (peft's ``modules_to_save``: the tower), so the base stays the untouched VLM;
* or, with ``merge``, the VLM with every ΔW added to its weights (peft's ``merge_and_unload``), saved in the dtype
  of the base's files, loaded with ``from_pretrained(DIR)`` alone (and as ``vqa.model: <family>:DIR``); refused for an
  adapted weight that the VLM ties to another module (PaliGemma's output head and input embeddings).

Both folders hold the VLM's processor. The base is loaded on the CPU in its files' dtype; peft merges fp16/bf16
weights on the CPU in fp32 and rounds once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.backbones import load_backbone
from benchmark.export import ExportError, run_config, session_checkpoint
from benchmark.records import RunRecord
from benchmark.registry import STRATEGIES
from benchmark.vlm.spec import resolve_vlm

ADAPTER = "default"  # peft's adapter name (the strategies' too)
# where each VLM-side strategy's state (its StrategyPlugin.state_dict) keeps the VLM adapter's factors
ENCODER_FORMATS = "--format hf-clip-vision (LLaVA's CLIP tower), hf-siglip-vision or openclip"


@dataclass(frozen=True)
class SessionAdapter:
    """What a run's session checkpoint holds of its VLM: the run's ``config``, the adapter's ``factors`` (names under
    the VLM's model; empty for a strategy that merges its own update, whose ``strategy_state`` is kept instead) and,
    when the run trained the encoder, the session's ``encoder`` (its state dict)."""

    config: dict[str, Any]
    factors: dict[str, torch.Tensor]
    encoder: dict[str, torch.Tensor] | None
    strategy_state: dict[str, Any] | None = None  # a strategy that merges its own update: its saved state


def unknown_update(strategy: str) -> ExportError:
    """The refusal of a strategy whose VLM update the export cannot read: neither a peft adapter whose factors it
    names (``vlm_factors``) nor one it merges itself (``merge_into_vlm``)."""
    known = [n for n in STRATEGIES.names() if STRATEGIES.get(n).obj.vlm_factors]
    return ExportError(f"--format vlm does not know where strategy '{strategy}' keeps its VLM update (it knows "
                       f"{', '.join(known)}, and strategies that merge their own)")


def session_adapter(run_dir: str | Path, session: int) -> SessionAdapter:
    """The VLM adapter of the run in ``run_dir`` after ``session``; an :class:`ExportError` for a run whose VLM has
    nothing to export."""
    config = run_config(run_dir, session)
    strategy = config["strategy"]
    updates = (RunRecord(Path(run_dir)).manifest() or {}).get("updates", ["encoder"])  # older runs: the encoder only
    if "vlm" not in updates:
        raise ExportError(f"--format vlm: the run's strategy '{strategy}' adapted nothing in the VLM (it updated "
                          f"{' and '.join(updates) or 'nothing'}); export its encoder with {ENCODER_FORMATS}")
    if session == 0:
        raise ExportError(f"--format vlm --session 0: before session 1 the VLM is the pretrained one "
                          f"({config['vqa']['model']}); export a session 1..{config['sessions']}")
    if strategy not in STRATEGIES:
        raise unknown_update(strategy)
    state = session_checkpoint(run_dir, config, session, what="adapted VLM")
    path = STRATEGIES.get(strategy).obj.vlm_factors
    if path is None:  # no peft adapter: the strategy may merge its update itself (merge_into_vlm)
        return SessionAdapter(config, {}, state["encoder"] if "encoder" in updates else None, state["strategy"])
    factors: Any = state["strategy"]
    for key in path:
        factors = factors.get(key, {})
    if not factors:
        raise ExportError(f"the checkpoint of session {session} in {run_dir} holds no VLM adapter factors")
    return SessionAdapter(config, factors, state["encoder"] if "encoder" in updates else None)


def tower_name(model: nn.Module) -> str:
    """The name of the vision tower in a transformers VLM: the outermost module built from its ``vision_config``."""
    vision = model.config.vision_config
    names = [name for name, module in model.named_modules() if getattr(module, "config", None) is vision]
    if not names:
        raise ExportError(f"cannot find the vision tower of the {type(model).__name__} (no module of its vision_config)")
    return min(names, key=len)


def stored_dtype(config: Any) -> torch.dtype:
    """The dtype of a transformers model's saved weights (its config's ``dtype``; float32 when it names none)."""
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype if isinstance(dtype, torch.dtype) else torch.float32


def refuse_tied(model: nn.Module, targets: list[str]) -> None:
    """Refuse to merge into a weight that the model shares between modules (an output head tied to the input
    embeddings, as PaliGemma's): its ΔW would change the other module too, which the run never changed."""
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(p.data_ptr(), []).append(name)
    for target in targets:
        names = shared[model.get_submodule(target).weight.data_ptr()]
        if len(names) > 1:
            raise ExportError(f"--merge: the VLM ties {' and '.join(names)} (one tensor), so merging the LoRA of "
                              f"'{target}' would change both; export the PEFT adapter instead (without --merge)")


def load_factors(model: nn.Module, factors: dict[str, torch.Tensor], spec: str) -> None:
    """Copy ``factors`` into the LoRA parameters of ``model`` (the wrapped VLM), strictly by name and shape."""
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    wrong = sorted(set(params) ^ set(factors)) or sorted(n for n in params if params[n].shape != factors[n].shape)
    if wrong:
        raise ExportError(f"the run's adapter does not fit the VLM '{spec}' ({wrong[0]} differs, of {len(wrong)}); "
                          f"pass the VLM the run trained with --vlm")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(factors[name])


def export_vlm(run_dir: str | Path, session: int, out: str | Path, vlm: str | None = None,
               merge: bool = False) -> Path:
    """Write the run's VLM after ``session`` to ``out``: a PEFT adapter folder, or the merged model (``merge``);
    ``vlm``: the base VLM's ``vqa.model`` string (default the run's)."""
    from peft import LoraConfig, get_peft_model

    saved = session_adapter(run_dir, session)
    if saved.strategy_state is not None and not merge:  # refused before any model loads
        raise ExportError(f"--format vlm: {saved.config['strategy']}'s update is no peft LoRA adapter (e.g. masked "
                          f"deltas); export it merged (--merge)")
    config = saved.config
    spec = vlm or config["vqa"]["model"]
    family = resolve_vlm(spec)
    loaded = family.load(torch.device("cpu"), stored_dtype(family.config()))
    model = loaded.model
    if saved.encoder is not None:
        backbone = load_backbone(config["backbone"], "cpu")
        backbone.visual.load_state_dict(saved.encoder)
        loaded.swap_encoder(backbone)
    if saved.strategy_state is not None:
        return merge_strategy_update(saved, loaded, out)
    options = config[config["strategy"]]
    targets = sorted({name.split(".lora_", 1)[0] for name in saved.factors})
    if merge:
        refuse_tied(model, targets)
    whole = [tower_name(model)] if saved.encoder is not None and not merge else None
    lora = LoraConfig(r=options["rank"], lora_alpha=options["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=targets, modules_to_save=whole)
    peft_model = get_peft_model(model, lora, adapter_name=ADAPTER)
    load_factors(peft_model.base_model.model, saved.factors, spec)
    out = Path(out)
    if merge:
        peft_model.merge_and_unload().save_pretrained(out)
    else:
        peft_model.save_pretrained(out, save_embedding_layers=False)  # the run changed no embedding: the base has them
    loaded.processor.save_pretrained(out)
    return out


def merge_strategy_update(saved: SessionAdapter, loaded: Any, out: str | Path) -> Path:
    """Write the VLM with the update of a strategy that merges its own (``lorsu-llm``'s masked deltas), built from
    the run's options and saved state."""
    from benchmark.config import from_dict

    name = saved.config["strategy"]
    entry = STRATEGIES.get(name)
    options = from_dict(entry.options, saved.config.get(name) or {}, prefix=name) if entry.options else None
    strategy = entry.obj(None, options)
    strategy.load_state_dict(saved.strategy_state)
    if not strategy.merge_into_vlm(loaded.model):
        raise unknown_update(name)
    out = Path(out)
    loaded.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out


def vlm_loading_snippet(out: str | Path) -> str:
    """Python that loads :func:`export_vlm`'s folder at ``out`` with transformers (and peft) alone; it defines
    ``model`` and ``processor``."""
    folder = Path(out).resolve()
    adapter = folder / "adapter_config.json"
    head = "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
    tail = f"processor = AutoProcessor.from_pretrained({str(folder)!r})\n"
    if not adapter.is_file():
        family = json.loads((folder / "config.json").read_text()).get("model_type")  # the family's name: its vqa.model
        return (f"{head}model = AutoModelForImageTextToText.from_pretrained({str(folder)!r})\n{tail}"
                f"# as a run's VLM: vqa.model={family}:{folder}\n")
    base = json.loads(adapter.read_text())["base_model_name_or_path"]
    return (f"from peft import PeftModel\n{head}base = AutoModelForImageTextToText.from_pretrained({base!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n{tail}"
            f"# one plain model: model = model.merge_and_unload()\n")
