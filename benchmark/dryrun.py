"""What ``fscl run --dry-run`` says a checked grid will and will not produce, and what to look at first.

- :func:`grid_lines`: the grid's axes (targets × strategies × seeds, ...), the runs to do and the finished runs it
  skips (``verbose``: every run folder with its state);
- :func:`output_lines`: what the runs write (checkpoints kept or not), VQA on or off (off in a paper setting: how
  to turn it on) and where each backbone's weights come from (a local file, a cache, or a hub that needs
  internet, :func:`benchmark.backbones.weights_source`), found without loading anything;
- :func:`grid_warnings`: comparisons that would not be fair, printed by the dry run and logged by every grid
  (:func:`benchmark.grid.run_grid`): a strategy at the base learning rate beside strategies with their own
  (tuned) rates, and a strategy that with ``vqa.model`` trains only parameters the VLM never reads.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmark.config import GRID_AXES, TRAIN, Config
from benchmark.errors import FsclError
from benchmark.registry import STRATEGIES
from benchmark.vlm import PAPER_VLM, PAPER_VLM_HUB

AXIS_NAMES = {"stream": "target", "strategy": "strategy", "backbone": "backbone", "shots": "shots", "seed": "seed"}
PLURALS = {"target": "targets", "strategy": "strategies", "backbone": "backbones", "shots": "shots", "seed": "seeds"}


def _values(runs: Sequence[Config], axis: str) -> list:
    return list(dict.fromkeys(getattr(run, axis) for run in runs))


def grid_lines(cfg: Config, runs: Sequence[Config], done: Sequence[bool], folders: Sequence[Path],
               verbose: bool) -> list[str]:
    """The grid in a few lines: a heading line's tail (``5 targets × 7 strategies × 3 seeds``), then each axis, the
    swept keys, the runs to do and the finished ones skipped (``done``), and with ``verbose`` every run folder."""
    axes = {AXIS_NAMES[axis]: _values(runs, axis) for axis in GRID_AXES}
    product = " × ".join(f"{len(v)} {PLURALS[k] if len(v) > 1 else k}" for k, v in axes.items() if len(v) > 1)
    lines = [product or "one grid point"]
    for name, values in axes.items():
        label = PLURALS[name] if len(values) > 1 else name
        lines.append(f"  {label}: {', '.join(map(str, values))}")
    lines.append(f"  sessions: {cfg.sessions}; controls: {', '.join(cfg.controls) or 'none'}"
                 + (" (a run leaves its own target out)" if set(cfg.controls) & set(axes["target"]) else ""))
    for key, values in cfg.sweeps.items():
        lines.append(f"  swept {key}: {', '.join(map(str, values))}")
    todo = len(runs) - sum(done)
    lines.append(f"  to run: {todo}; finished, skipped: {sum(done)} -> {Path(cfg.out) / cfg.name}"
                 + ("" if verbose else "  (-v lists every run folder)"))
    if verbose:
        lines += [f"    {'finished' if d else 'to run  '} {folder}" for d, folder in zip(done, folders)]
    return lines


def output_lines(cfg: Config, runs: Sequence[Config]) -> list[str]:
    """What the runs write besides their accuracy records (checkpoints, VQA) and where each backbone's weights come
    from; a backbone whose weights this machine cannot load is marked so."""
    from benchmark.backbones import weights_source

    keep = {"none": "no checkpoint kept (fscl export: session 0 only; keep_checkpoints=last or all keeps them)",
            "last": "the last session's checkpoint kept (fscl export --session N: the last session)",
            "all": "every session's checkpoint kept (fscl export: any session)"}[cfg.keep_checkpoints]
    zeroshot = ("zero-shot accuracy of the target and its controls before training and after every session"
                if "zeroshot" in cfg.evaluate else "no zero-shot accuracy (evaluate: [vqa]): the VQA scores alone")
    lines = [f"produces: {zeroshot}, per run; {keep}"]
    if cfg.vqa.model is not None and "vqa" not in cfg.evaluate:
        lines.append(f"VQA: off (evaluate has no vqa; {cfg.vqa.model} serves the VLM-loss strategies only)")
    elif cfg.vqa.model is None:
        paper = cfg.name.startswith("paper-")
        lines.append("VQA: off" + (f" — set `vqa.model={PAPER_VLM}` (or {PAPER_VLM_HUB} with internet) "
                                   f"for the paper's headline numbers" if paper else " (vqa.model: null)"))
    else:
        lines.append(f"VQA: {cfg.vqa.model}, after {'the last session' if cfg.vqa.sessions == 'ends' else 'every session'}"
                     f" and before training")
    lines.append("weights:")
    for backbone in _values(runs, "backbone"):
        source = weights_source(backbone)
        where = "not said by its family" if source is None else source.where
        fails = source is not None and not source.ready
        lines.append(f"  {backbone}: {where}" + (" — a run on this machine fails loading them: pass a local copy "
                                                 "('fscl ls backbones' lists the load forms)" if fails else ""))
    return lines


def grid_warnings(cfg: Config, runs: Sequence[Config], source: str | None = None) -> list[str]:
    """Comparisons in the grid ``cfg`` (expanded into ``runs``) that would not be fair, one line each: a strategy
    that trains at the base ``train.lr`` while others of the grid have their own (a strategy section's
    ``train.lr``: tuned rates), and, with ``vqa.model``, a strategy that trains only parameters the VLM never
    reads (:func:`unread_by_vlm`). ``source``: the preset or file, for the ``fscl tune`` command shown."""
    strategies = _values(runs, "strategy")
    own = [s for s in strategies if "lr" in (cfg.options.get(s, {}).get(TRAIN) or {}) or f"{s}.{TRAIN}.lr" in cfg.sweeps]
    base = [s for s in strategies if s not in own and STRATEGIES.get(s).obj.trains]
    warnings = []
    if own and base and f"{TRAIN}.lr" not in cfg.sweeps:
        tune = f"fscl tune {source or 'CONFIG'} strategy={base[0] if len(base) == 1 else '[' + ','.join(base) + ']'}"
        warnings.append(f"{', '.join(base)} train{'s' if len(base) == 1 else ''} at the base train.lr {cfg.train.lr:g} "
                        f"while {', '.join(own)} run at their own (tuned) rates: an unfair comparison. Tune "
                        f"{'it' if len(base) == 1 else 'them'} the same way ('{tune}', then run the tuned config) or "
                        f"give {base[0]}.train.lr")
    seen = set()
    for run in runs:
        key = (run.strategy, run.backbone, run.vqa.model)
        if run.vqa.model is None or key in seen or not STRATEGIES.get(run.strategy).obj.trains:
            continue
        seen.add(key)
        unread = unread_by_vlm(run)
        if unread:
            warnings.append(f"{run.strategy} on {run.backbone} trains only parameters that {run.vqa.model} never reads "
                            f"({unread}): its VQA scores cannot change")
    return warnings


def unread_by_vlm(run: Config) -> str | None:
    """Where the parameters that ``run``'s strategy trains lie, when the VLM of ``vqa.model`` reads none of them
    (e.g. only the last block, LLaVA-1.5 reading the input of the last block); else None.

    Found on the backbone's skeleton (meta device, no weights): the strategy's ``setup`` chooses its parameters,
    and a backward pass through the tokens the VLM takes (:meth:`benchmark.vlm.base.VLMFamily.encoder_tokens`)
    marks those it reads. A strategy whose ``setup`` needs the session's data (importance scores) is not checked."""
    import torch

    from benchmark.backbones import backbone_skeleton
    from benchmark.vlm.recipe import with_vlm_defaults
    from benchmark.vlm.spec import resolve_vlm

    family = resolve_vlm(run.vqa.model)
    skeleton = backbone_skeleton(run.backbone)
    entry = STRATEGIES.get(run.strategy)
    try:
        entry.obj(skeleton, with_vlm_defaults(run.options_of(run.strategy), run.vqa.model)).setup(None)
    except Exception:  # its setup needs a session (data, gradients): not checked
        return None
    trained = {name: p for name, p in skeleton.named_parameters() if p.requires_grad}
    if not trained:
        return None
    size = family.tower_config().image_size
    images = torch.empty(1, 3, size, size, device="meta")
    try:
        tokens = family.encoder_tokens(skeleton, images)
        if tokens.requires_grad:  # the tokens depend on a trained parameter: which ones do they reach?
            tokens.sum().backward()
    except (RuntimeError, NotImplementedError, FsclError):  # torch: an op without a meta kernel; a tower it cannot read
        return None
    if any(p.grad is not None for p in trained.values()):
        return None
    names = sorted(trained)
    return f"{len(names)} tensors: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
