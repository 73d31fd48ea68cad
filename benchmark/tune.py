"""``fscl tune``: each strategy's hyper-parameters chosen on validation data, never on a test set.

Protocol. The tune is a grid of runs (:mod:`benchmark.grid`, so resume and sharding work as for
``fscl run``) of every strategy that trains, over the swept keys (the config's list values, e.g.
``train.lr=[1e-5,1e-4]`` or ``lorsu.top_k_heads=[1,2,4]``; none given: ``train.lr`` on a log grid
around the config's, :func:`lr_grid`), its streams and seeds, each with ``validation_per_class``: a
seeded draw of N images per class is held out of the target's training split (the few-shot sessions
are drawn from the rest, so they never meet a validation image) and N per class are drawn from each
control's training split; those are evaluated instead of the test splits, which no tune run reads
(controls without a training split are left out). A candidate's score is its validation TI and CC,
averaged over the streams and seeds; :func:`choose` picks one per strategy by the criterion. The TI and CC are
those of zero-shot classification when the runs have it, else (``evaluate: [vqa]``, or a strategy that trains only
the VLM, whose zero-shot rows are the pretrained encoder's) those of VQA: the *basis* (:data:`BASES`), named in the
tuned config's comments and in ``tune.csv``.

The result is a config that ``fscl run`` takes like a preset: the base config with each strategy's
chosen values in its own section (``lorsu: {train: {lr: ...}}``), the protocol and the validation
table written above it as comments (the table also as ``tune.csv`` in the tune's runs folder).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from benchmark.config import GRID_AXES, TRAIN, Config, ConfigError, check, parse_config, set_dotted, without_keys
from benchmark.records import STATUS_FAILED, RunRecord, git_hash
from benchmark.registry import STRATEGIES, STREAMS

CRITERIA = {
    "constrained": "the largest validation TI among the candidates whose validation CC stays within the tolerance "
                   "of the zero-shot model's (0: it does not change); none within it: the largest CC (the smallest "
                   "control loss)",
    "target": "the largest validation TI",
    "sum": "the largest validation TI + CC",
}
LR_STEPS = (-0.5, 0.0, 0.5, 1.0, 1.5)  # the default train.lr grid: the config's lr × 10^step
BASES = {  # the evaluation a run's validation TI / CC come from (summary.json's top level, or its vqa block)
    "zeroshot": "zero-shot classification (top-1)",
    "vqa": "VQA (the VLM's multiple-choice accuracy; the runs evaluate VQA only, evaluate: [vqa])",
}


@dataclass(frozen=True)
class TuneOptions:
    """How ``fscl tune`` chooses (its command-line options)."""

    criterion: str = "constrained"  # a key of CRITERIA
    tolerance: float = 1.0  # percentage points of validation CC below the zero-shot model's (constrained)
    validation_per_class: int = 10  # validation images per class, of the target and of each control

    def __post_init__(self) -> None:
        check(self.criterion in CRITERIA, "--criterion", self.criterion, " | ".join(CRITERIA))
        check(self.tolerance >= 0 and math.isfinite(self.tolerance), "--tolerance", self.tolerance,
              "a number of percentage points >= 0")
        check(self.validation_per_class >= 1, "--validation-per-class", self.validation_per_class, "an integer >= 1")


@dataclass(frozen=True)
class Score:
    """One tune run: its strategy, candidate (swept key → value), stream, seed, validation TI / CC (fractions;
    None when the run failed) and the key of :data:`BASES` they come from (None when the run failed)."""

    strategy: str
    candidate: tuple[tuple[str, Any], ...]
    stream: str
    seed: int
    ti: float | None
    cc: float | None
    basis: str | None = None


def lr_grid(lr: float, steps: tuple[float, ...] = LR_STEPS) -> list[float]:
    """``lr × 10^step`` for each step, to two significant digits (5e-05 → 1.6e-05, 5e-05, 0.00016, ...)."""
    return [float(f"{lr * 10 ** step:.2g}") for step in steps]


def tune_grid(cfg: Config, options: TuneOptions) -> tuple[Config, list[str]]:
    """The tune's grid config, and the controls it leaves out (no training split to draw validation from).

    ``cfg``: the base config (a preset with overrides); its strategies that train, its swept keys (none:
    ``train.lr`` over :func:`lr_grid`), streams and seeds; named ``<name>-tune``. A strategy's own value of a
    swept ``train`` key is dropped (the sweep decides it); ``control_subset`` is off (the validation draw
    bounds the controls).
    """
    data = cfg.to_dict()
    sweeps = dict(cfg.sweeps) or {f"{TRAIN}.lr": lr_grid(cfg.train.lr)}
    trainers = [s for s in _as_list(cfg.strategy) if STRATEGIES.get(s).obj.trains]
    check(bool(trainers), "strategy", cfg.strategy, "at least one strategy that trains (zeroshot has nothing to tune)")
    for key in sweeps:
        if not (key.startswith(f"{TRAIN}.") or key.partition(".")[0] in trainers):
            raise ConfigError(f"{key}: a tune sweeps train.* keys or the options of a strategy it tunes "
                              f"({', '.join(trainers)}), not {key.partition('.')[0]!r}")
    left_out = [c for c in cfg.controls if "train" not in STREAMS.get(c).obj.splits]
    for key, values in sweeps.items():
        set_dotted(data, key, list(values))
        if key.startswith(f"{TRAIN}."):
            for strategy in trainers:
                (data.get(strategy, {}).get(TRAIN) or {}).pop(key.partition(".")[2], None)
    data.update(strategy=trainers, controls=[c for c in cfg.controls if c not in left_out], name=f"{cfg.name}-tune",
                validation_per_class=options.validation_per_class, control_subset=None, swept={})
    return parse_config(data), left_out


def scores(runs: list[Config]) -> tuple[list[Score], int]:
    """The validation scores of the tune's runs, and how many are not done yet (running, or not started)."""
    from benchmark.runs import run_dir

    found, pending = [], 0
    for run in runs:
        record = RunRecord(run_dir(run), writable=False)
        candidate = tuple(run.swept.items())
        if record.is_finished():
            summary = json.loads((record.path / "summary.json").read_text())
            # evaluate: [vqa] has only its block; a strategy that trains only the VLM is judged on VQA (its zero-shot
            # rows are the pretrained encoder's)
            encoder = "encoder" in ((record.manifest() or {}).get("updates") or ["encoder"])
            basis = "zeroshot" if "target_improvement" in summary and (encoder or "vqa" not in summary) else "vqa"
            scored = summary if basis == "zeroshot" else summary["vqa"]
            cc = scored.get("control_change")  # None without controls: nothing to lose
            found.append(Score(run.strategy, candidate, run.stream, run.seed, scored["target_improvement"],
                               0.0 if cc is None else cc, basis))
        elif (record.manifest() or {}).get("status") == STATUS_FAILED:
            found.append(Score(run.strategy, candidate, run.stream, run.seed, None, None))
        else:
            pending += 1
    return found, pending


def table(found: list[Score]) -> list[dict[str, Any]]:
    """One row per (strategy, candidate) in run order: ``strategy``, ``candidate`` (dict), ``runs``, ``failed``,
    ``ti`` and ``cc`` (means over the candidate's finished runs, fractions; None when one failed) and ``basis``
    (the :data:`BASES` keys of its finished runs, comma-joined)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for s in found:
        row = rows.setdefault((s.strategy, s.candidate), {"strategy": s.strategy, "candidate": dict(s.candidate),
                                                          "runs": 0, "failed": 0, "ti": [], "cc": [], "basis": {}})
        row["runs"] += 1
        row["basis"].update(dict.fromkeys([s.basis] if s.basis else []))
        if s.ti is None:
            row["failed"] += 1
        else:
            row["ti"].append(s.ti)
            row["cc"].append(s.cc)
    for row in rows.values():
        ok = row["ti"] and not row["failed"]
        row["ti"] = sum(row["ti"]) / len(row["ti"]) if ok else None
        row["cc"] = sum(row["cc"]) / len(row["cc"]) if ok else None
        row["basis"] = ", ".join(row["basis"])
    return list(rows.values())


def choose(rows: list[dict[str, Any]], criterion: str, tolerance: float) -> dict[str, dict[str, Any]]:
    """Each strategy's chosen candidate (swept key → value) from :func:`table` rows by ``criterion`` (see
    :data:`CRITERIA`; ``tolerance`` in percentage points); ties go to the earlier candidate, a candidate with
    a failed run is never chosen. A strategy whose every candidate failed is left out."""
    chosen = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        ok = [r for r in rows if r["strategy"] == strategy and r["ti"] is not None]
        if not ok:
            continue
        if criterion == "constrained":
            within = _within(ok, tolerance)
            best = max(within, key=lambda r: r["ti"]) if within else max(ok, key=lambda r: r["cc"])
        elif criterion == "target":
            best = max(ok, key=lambda r: r["ti"])
        else:
            best = max(ok, key=lambda r: r["ti"] + r["cc"])
        chosen[strategy] = best["candidate"]
    return chosen


def fallbacks(rows: list[dict[str, Any]], criterion: str, tolerance: float) -> list[str]:
    """The strategies :func:`choose` gave a fallback: under ``constrained``, none of their candidates kept the
    validation CC within ``tolerance`` (pp), so the one with the largest CC was chosen."""
    if criterion != "constrained":
        return []
    ok = [r for r in rows if r["ti"] is not None]
    return [s for s in dict.fromkeys(r["strategy"] for r in ok)
            if not _within([r for r in ok if r["strategy"] == s], tolerance)]


def refinements(rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], criterion: str,
                tolerance: float) -> dict[str, str]:
    """Where a finer grid may choose better, per strategy whose candidates sweep one numeric key (``train.lr``):
    under ``constrained``, the chosen value uses less than half the tolerance while its neighbour gains more
    validation TI but leaves it (the edge lies between them: a half-decade lr step can jump from CC −0.1 to
    −3 pp), or the chosen value is the grid's end and TI still rises towards it (the best may lie beyond).
    Strategy → a sentence; none: {}."""
    notes: dict[str, str] = {}
    for strategy, values in chosen.items() if criterion == "constrained" else ():
        own = [r for r in rows if r["strategy"] == strategy and r["ti"] is not None]
        if len(values) != 1 or any(r["candidate"].keys() != values.keys() for r in own):
            continue
        (key, value), = values.items()
        if not all(isinstance(r["candidate"][key], (int, float)) for r in own) or not _within(own, tolerance):
            continue
        own.sort(key=lambda r: r["candidate"][key])
        at = next(i for i, r in enumerate(own) if r["candidate"][key] == value)
        best = own[at]
        over = [own[i] for i in (at - 1, at + 1) if 0 <= i < len(own) and _within([best], tolerance / 2)
                and own[i]["ti"] > best["ti"] and not _within([own[i]], tolerance)]
        if over:
            nxt = over[0]
            notes[strategy] = (f"the tolerance's edge lies between {key}={value:g} (CC {100 * best['cc']:.1f} pp) and "
                               f"{nxt['candidate'][key]:g} (TI {100 * nxt['ti']:.1f}, CC {100 * nxt['cc']:.1f} pp): a "
                               f"finer grid between them may choose a value that gains more")
        elif len(own) > 1 and at in (0, len(own) - 1) and own[1 if at == 0 else -2]["ti"] < best["ti"]:
            notes[strategy] = (f"{key}={value:g} is the grid's {'smallest' if at == 0 else 'largest'} value and "
                               f"validation TI still rises towards it: the best may lie beyond the grid")
    return notes


@dataclass(frozen=True)
class Decision:
    """What a tune decided from its :func:`table` rows: each strategy's chosen candidate (:func:`choose`), the
    strategies given a fallback (:func:`fallbacks`) and where a finer grid may choose better (:func:`refinements`)."""

    chosen: dict[str, dict[str, Any]]
    fallback: list[str]
    refine: dict[str, str]


def decide(rows: list[dict[str, Any]], options: TuneOptions) -> Decision:
    """The :class:`Decision` of ``rows`` under ``options``' criterion and tolerance."""
    chosen = choose(rows, options.criterion, options.tolerance)
    return Decision(chosen, fallbacks(rows, options.criterion, options.tolerance),
                    refinements(rows, chosen, options.criterion, options.tolerance))


def decision_lines(rows: list[dict[str, Any]], decision: Decision, options: TuneOptions) -> list[str]:
    """What the terminal says of a tune: its basis, then each strategy's chosen values (a fallback and a refinement
    said beside them)."""
    lines = [basis_line(rows)]
    for strategy, values in decision.chosen.items():
        lines.append(f"  {strategy}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                     + (f"  (fallback: no candidate kept validation CC within {options.tolerance:g} pp; the largest "
                        "CC)" if strategy in decision.fallback else ""))
        if strategy in decision.refine:
            lines.append(f"    refine: {decision.refine[strategy]}")
    return lines


def _within(rows: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """The rows whose validation CC is at most ``tolerance`` pp below the zero-shot model's (0)."""
    return [r for r in rows if r["cc"] >= -tolerance / 100 - 1e-12]


def tuned_config(base: Config, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config ``fscl run`` takes: ``base`` as YAML data (keys at their defaults and the swept keys left
    out), named ``<name>-tuned``, each strategy's chosen values in its own section (``train.X`` →
    ``<strategy>.train.X``, ``<strategy>.Y`` as is)."""
    data = without_keys(dataclasses.replace(base, sweeps={}).to_dict(), base.sweeps)
    data = _compact(data, Config().to_dict())
    for strategy, values in chosen.items():
        for key, value in values.items():
            set_dotted(data, key if key.startswith(f"{strategy}.") else f"{strategy}.{key}", value)
    return {"name": f"{base.name}-tuned", **{k: v for k, v in data.items() if k != "name" and v != {}}}


def _compact(data: dict[str, Any], defaults: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """``data`` without the keys whose value is the default's (at top level the grid axes and name kept)."""
    out = {}
    for key, value in data.items():
        default = defaults[key] if key in defaults else object()
        if isinstance(value, dict) and isinstance(default, dict):
            value = _compact(value, default, top=False)
            if value:
                out[key] = value
        elif (top and key in (*GRID_AXES, "name")) or value != default:
            out[key] = value
    return out


def write(path: Path, base: Config, source: str, options: TuneOptions, grid: Config, left_out: list[str],
          rows: list[dict[str, Any]], decision: Decision) -> Path:
    """Write the tuned config (protocol, validation table and ``decision``'s refinements as comments above it) to
    ``path``, and the table as ``tune.csv`` into the tune's runs folder; returns ``path``."""
    from benchmark.records import atomic_write

    runs = grid.expand()
    seeds = sorted({r.seed for r in runs})
    streams = list(dict.fromkeys(r.stream for r in runs))
    chosen, fallback = decision.chosen, decision.fallback
    header = [
        f"Tuned by `fscl tune` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {source} "
        f"(git {git_hash() or 'unknown'}); the tune's runs: {Path(grid.out) / grid.name}.",
        f"Protocol: validation runs (validation_per_class: {options.validation_per_class}): per class, that many "
        "images held out of the target's training split (the few-shot sessions are drawn from the rest) and drawn "
        "from each control's training split are evaluated; no test split is read.",
        f"Streams {', '.join(streams)}; seeds {', '.join(map(str, seeds))}; controls "
        f"{', '.join(grid.controls) or 'none'}" + (f" (left out, no training split: {', '.join(left_out)})"
                                                   if left_out else "") + ".",
        f"Criterion {options.criterion}: {CRITERIA[options.criterion]}"
        + (f"; tolerance {options.tolerance:g} pp" if options.criterion == "constrained" else "") + ".",
        basis_line(rows),
        "Validation TI / CC in pp, mean over the streams and seeds (* = chosen; ! = fallback: no candidate within "
        "the tolerance, the largest CC chosen):",
        *_table_text(rows, chosen, fallback).splitlines(),
        *(f"Refine {strategy}: {note}." for strategy, note in decision.refine.items()),
    ]
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(tuned_config(base, chosen), sort_keys=False, default_flow_style=None)
    parse_config(yaml.safe_load(text))  # what fscl run will read: valid, or no file
    atomic_write(path, text)
    atomic_write(Path(grid.out) / grid.name / "tune.csv", _table_csv(rows, chosen, fallback))
    return path


def basis_line(rows: list[dict[str, Any]]) -> str:
    """Which evaluation the validation TI / CC of :func:`table` rows come from (:data:`BASES`)."""
    bases = dict.fromkeys(b for r in rows for b in r["basis"].split(", ") if b)
    return f"Basis: the validation TI / CC of {'; '.join(BASES[b] for b in bases) or 'no run (every one failed)'}."


def _table_text(rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], fallback: list[str]) -> str:
    lines = ["| strategy | candidate | runs | TI (pp) | CC (pp) |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " *" if chosen.get(r["strategy"]) == r["candidate"] else ""
        mark += "!" if mark and r["strategy"] in fallback else ""
        values = ", ".join(f"{k}={v}" for k, v in r["candidate"].items()) or "(base)"
        ti = "failed" if r["ti"] is None else f"{100 * r['ti']:.1f}"
        cc = "failed" if r["cc"] is None else f"{100 * r['cc']:.1f}"
        lines.append(f"| {r['strategy']}{mark} | {values} | {r['runs']} | {ti} | {cc} |")
    return "\n".join(lines)


def _table_csv(rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], fallback: list[str]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["candidate"]))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["strategy", *keys, "runs", "failed", "ti", "cc", "chosen", "fallback", "basis"])
    for r in rows:
        writer.writerow([r["strategy"], *(r["candidate"].get(k, "") for k in keys), r["runs"], r["failed"],
                         r["ti"], r["cc"], chosen.get(r["strategy"]) == r["candidate"], r["strategy"] in fallback,
                         r["basis"]])
    return out.getvalue()


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]

