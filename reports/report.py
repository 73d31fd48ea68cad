"""The report of a runs folder: ``report.md``, a self-contained ``report.html``, tables, figures.

The content is built once as a list of blocks (headings, text, tables, figures) and then
rendered twice: to Markdown (figures linked) and to HTML (figures embedded as base64 PNG).
Every setting gets its results table and figures once per evaluation its runs have (VQA first,
the paper's headline, then zero-shot: those the runs' ``evaluate`` lists), then its costs table; a run without an
evaluation enters only the others' tables and figures, and the report names it.
Failed and partial runs are listed in their own section and never enter an aggregate.
"""
from __future__ import annotations

import base64
import html
import inspect
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.config import compared
from benchmark.metrics import backward_transfer, control_change, forgetting, target_improvement
from benchmark.records import slug
from reports.ablation import ablation_section, main_runs
from reports.blocks import Block, Heading, Image, Table, Text
from reports.figures import (
    COMPUTE_AXES,
    MIN_ACCURACY_SPAN,
    MIN_CHANGE_SPAN,
    Style,
    cost_figure,
    curves_figure,
    matrix_figure,
    save_figure,
    strategy_styles,
    tradeoff_figure,
)
from reports.frame import (
    GROUP_KEYS,
    SWEEP,
    VQA,
    ZEROSHOT,
    Evaluation,
    ReportError,
    RunSet,
    evaluations,
    group_label,
    has_random_weights,
    is_mini_world,
    named,
    scan_runs,
    scored,
    strategy_order,
)
from reports.overview import FAMILY_KEYS, MEAN, family_label, main_figure, main_table, main_text_table
from reports.sequence import (
    POOLED_NOTE,
    SEQUENCE_DEFINITIONS,
    SEQUENCE_INTRO,
    dataset_order,
    datasets_of,
    is_sequence,
    order_note,
    sequence_caption,
    sequence_table,
    sequence_text_table,
)
from reports.tables import (
    BEST_RULE,
    COMPUTE_REFERENCE,
    COST_COLUMNS,
    MIN_SEEDS,
    TEST_NAME,
    TextTable,
    curve_table,
    result_columns,
    results_table,
    results_text_table,
    set_columns,
)

MINI_WORLD_NOTE = ("**Mini-world results, not CLIP.** These runs use the offline procedural mini world (a tiny "
                   "model and synthetic streams); they show that a method works, not how it does on real CLIP "
                   "models and datasets, and must not be reported as CLIP results.")
MINI_WORLD_BANNER = ("**This report contains mini-world results, not CLIP results:** the settings marked "
                     "[mini world, not CLIP].")
RANDOM_WEIGHTS_BANNER = ("**This report contains runs on backbones with random weights** (an `openclip:NAME` without "
                         "a `@TAG`: no pretrained weights were loaded): the settings marked [random weights]. Their "
                         "numbers check the machinery; they say nothing about a pretrained model.")


@dataclass(frozen=True)
class ReportPaths:
    """What :func:`write_report` wrote."""

    markdown: Path
    html: Path
    results_csv: Path
    results_latex: Path
    runs_csv: Path
    main_csv: Path
    main_latex: Path
    figures: list[Path]
    excluded: list[str]  # failed or partial runs (folders relative to the runs folder), left out of the aggregates
    headline: str  # the first table across settings (its caption and Markdown), for a terminal
    sequence_csv: Path | None = None  # the MTIL tables of the sequence settings (None: the runs have none)


def write_report(runs_dir: str | Path, out_dir: str | Path, reference: str = "lorsu") -> ReportPaths:
    """Scan ``runs_dir`` and write the report into ``out_dir``.

    Args:
        runs_dir: a folder of run records (``fscl run`` output).
        out_dir: where to write ``report.md``, ``report.html``, ``main_table.csv`` / ``.tex`` (the tables across
            settings: :mod:`reports.overview`), ``results.csv`` (numbers per setting and strategy, record units),
            ``results.tex``, ``runs.csv`` (every run with its status), ``figures/`` (PNG + SVG) and, with sequence
            runs (MTIL's protocol), ``sequence.csv`` (their Transfer, Avg and Last: :mod:`reports.sequence`).
        reference: the strategy the paired tests compare every other strategy against.

    Raises:
        ReportError: no run records, or none of them finished.
    """
    runset = scan_runs(runs_dir)
    finished = runset.finished
    if finished.empty:
        raise ReportError(f"none of the {len(runset.runs)} run(s) under '{runset.root}' finished: " + "; ".join(
            f"{r.run}: {r.status} ({r.reason})" for r in runset.excluded.itertuples()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    styles = strategy_styles(strategy_order(finished["strategy"], reference), reference)
    swept = finished[finished[SWEEP] != ""]  # sweeps: reports.ablation; the main comparison at their reference
    finished, references = main_runs(finished)
    table = results_table(finished, reference)
    mtil = sequence_table(finished, reference)

    blocks: list[Block] = [Heading("fscl-bench report", 1), Text(_intro(runset, reference))]
    if any(is_mini_world(r.stream, r.backbone) for r in finished.itertuples()):
        blocks.append(Text(MINI_WORLD_BANNER))
    if any(has_random_weights(b) for b in finished["backbone"]):
        blocks.append(Text(RANDOM_WEIGHTS_BANNER))
    overview, figures, main, main_latex = _overview_section(finished, mtil, references, reference, styles, out)
    blocks += overview
    latex = ["% fscl-bench results (needs \\usepackage{booktabs})"]
    runs_by_setting = dict(iter(finished.groupby(list(GROUP_KEYS), sort=True)))
    mtil_by_setting = dict(iter(mtil.groupby(list(GROUP_KEYS), sort=True)))
    for key, rows in table.groupby(list(GROUP_KEYS), sort=True):
        setting = dict(zip(GROUP_KEYS, key))
        sequence = mtil_by_setting.get(key)
        tables = _setting_tables(rows, runs_by_setting[key], group_label(**setting), reference, sequence)
        latex += [t.latex(caption) for t, caption, _ in tables]
        section, drawn = _setting_section(runset.scores, setting, runs_by_setting[key], rows, tables, reference,
                                          references, styles, out)
        blocks += section
        figures += drawn
    if len(swept):
        section, drawn, sweeps = ablation_section(swept, styles, out, table)
        blocks, figures = blocks + section, figures + drawn
        sweeps.to_csv(out / "ablation.csv", index=False)
    blocks += _excluded_section(runset) + _configuration_section(runset) + _versions_section(runset)
    blocks += _definitions_section(reference, evaluations(finished), sequences=len(mtil) > 0)

    paths = ReportPaths(out / "report.md", out / "report.html", out / "results.csv", out / "results.tex",
                        out / "runs.csv", out / "main_table.csv", out / "main_table.tex", figures,
                        list(runset.excluded["run"]), _headline(overview), out / "sequence.csv" if len(mtil) else None)
    paths.markdown.write_text(render_markdown(blocks, out))
    paths.html.write_text(render_html(blocks, "fscl-bench report"))
    table.to_csv(paths.results_csv, index=False)
    main.to_csv(paths.main_csv, index=False)
    paths.main_latex.write_text("% fscl-bench tables across settings (needs \\usepackage{booktabs})\n\n"
                                + "\n\n".join(main_latex) + "\n")
    paths.results_latex.write_text("\n\n".join(latex) + "\n")
    runset.runs.to_csv(paths.runs_csv, index=False)
    if paths.sequence_csv:
        mtil.to_csv(paths.sequence_csv, index=False)
    return paths


def _intro(runset: RunSet, reference: str) -> str:
    excluded = len(runset.excluded)
    settings = runset.finished.groupby(list(GROUP_KEYS)).ngroups
    return (f"{len(runset.finished)} finished run(s) in {settings} setting(s) from `{runset.root}`"
            + (f"; {excluded} failed or partial run(s) left out (see *Excluded runs*)" if excluded else "")
            + f". Reference strategy for the paired tests: `{reference}`." + _evaluations_note(runset.finished)
            + " Generated "
            + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + ".")


def _evaluations_note(finished: pd.DataFrame) -> str:
    """What the intro says of the evaluations: nothing when every run has zero-shot classification (with or
    without VQA), else which evaluation each number is."""
    if scored(finished, ZEROSHOT).all():
        return ""
    if not scored(finished, ZEROSHOT).any():
        return (f" Every number is of {VQA.title}: the runs evaluated VQA only (`evaluate: [vqa]`), no zero-shot "
                "classification.")
    return (" Not every run has every evaluation (`evaluate`); each table and figure is made from the runs that have "
            "its evaluation, and the runs without one are named.")


def _lacking(runs: pd.DataFrame, evaluation: Evaluation) -> str:
    """Those of ``runs`` (finished) without results of ``evaluation``, as ``setting: strategy (seeds)`` items
    (empty when every run has them)."""
    missing = runs[~scored(runs, evaluation)]
    items = [f"{group_label(*key[:4])}: `{key[4]}` (seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(str(s) for s in sorted(seeds['seed']))})"
             for key, seeds in missing.groupby([*GROUP_KEYS, "strategy"], sort=True)]
    return "; ".join(items)


def _lacking_note(runs: pd.DataFrame, evaluation: Evaluation) -> list[Block]:
    """Paragraphs naming the runs without results of ``evaluation`` (none when every run has them): the strategies
    that train only the VLM (zero-shot), apart from the runs whose config leaves the evaluation out."""
    unchanged = runs["encoder_unchanged"].fillna(False).astype(bool) if evaluation == ZEROSHOT else False
    blocks = []
    if evaluation == ZEROSHOT and unchanged.any():
        strategies = sorted(set(runs.loc[unchanged, "strategy"]))
        names, many = ", ".join(f"`{s}`" for s in strategies), len(strategies) > 1
        blocks.append(Text(f"**Encoder unchanged:** {names} {'train' if many else 'trains'} only the VLM's own modules "
                           f"(projector, language model, head), so {'their' if many else 'its'} zero-shot accuracy is "
                           f"the pretrained encoder's: left out of the zero-shot tables and figures rather than shown "
                           f"as a zero TI; {'their' if many else 'its'} VQA numbers are above."))
    lacking = _lacking(runs[~unchanged] if evaluation == ZEROSHOT else runs, evaluation)
    return blocks + ([Text(f"**Without {evaluation.name} results** (their `evaluate` leaves it out"
                           + (", or they have no `vqa.model`" if evaluation == VQA else "")
                           + f"), so not in its tables and figures: {lacking}.")] if lacking else [])


def _overview_section(finished: pd.DataFrame, mtil: pd.DataFrame, references: dict[tuple, dict[str, Any]],
                      reference: str, styles: dict[str, Style],
                      out: Path) -> tuple[list[Block], list[Path], pd.DataFrame, list[str]]:
    """The tables across settings (:mod:`reports.overview`), one per family and evaluation (VQA first), each with
    its figure, of the runs that are not sequence runs; then the MTIL table of each sequence setting (``mtil``:
    :func:`reports.sequence.sequence_table`): the blocks, the figure files, the tidy table across settings (an
    ``evaluation`` column added) and the LaTeX tables."""
    blocks: list[Block] = [Heading("Main results across settings")]
    figures, frames, latex = [], [], []
    sequences = is_sequence(finished)
    runs_by_setting = dict(iter(finished[sequences].groupby(list(GROUP_KEYS), sort=True)))
    finished = finished[~sequences]
    if len(finished):
        blocks.append(Text(
            f"Per target (the grid's streams) TI and CC, mean ± std over seeds, in pp; **{MEAN}**: per seed the mean "
            f"over the targets (seeds finished on every target), then mean ± std. {BEST_RULE[0].upper()}"
            f"{BEST_RULE[1:]}." + _swept_note(references)
            + (" Sequence settings (MTIL's protocol) are not in these tables: theirs follow." if sequences.any()
               else "")))
    evaluated = evaluations(finished)
    for evaluation in evaluated:
        blocks += _lacking_note(finished, evaluation)
        table = main_table(finished, evaluation, reference)
        frames.append(table.assign(evaluation=evaluation.name))
        for key, rows in table.groupby(list(FAMILY_KEYS), sort=True):
            label = family_label(*key, sorted(set(rows["target"]) - {MEAN}))
            title = f"{evaluation.title} · {label}" if named(evaluated) else label
            text = main_text_table(rows)
            blocks += [Heading(title, 3), Table(text)]
            caption = f"{title}. TI and CC per target (pp), mean ± std over seeds."
            latex.append(text.latex(caption))
            tag = "" if evaluation == ZEROSHOT else f"{evaluation.name}-"
            stem = out / "figures" / slug("main-{}{}-{}-{}shot".format(tag, *key))
            png, svg = save_figure(main_figure(rows, styles, title, evaluation), stem)
            figures += [png, svg]
            blocks.append(Image(png, f"{title}. TI and CC per target (hatched) and their mean (solid), one group "
                                     "per strategy; bars ± std over seeds."))
    for key, rows in mtil.groupby(list(GROUP_KEYS), sort=True):
        title = f"MTIL · {group_label(*key)}"
        text = sequence_text_table(rows)
        blocks += [Heading(title, 3), Text(f"{SEQUENCE_INTRO} {order_note(runs_by_setting[key])}"), Table(text)]
        latex.append(text.latex(sequence_caption(title, reference)))
    main = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*FAMILY_KEYS, "strategy", "target", "metric", "mean", "std", "n", "best", "evaluation"])
    return blocks, figures, main, latex


def _swept_note(references: dict[tuple, dict[str, Any]]) -> str:
    """Which swept strategies the main comparison shows at which values (empty without sweeps)."""
    shown = {f"`{key[-1]}` at " + ", ".join(f"{k}={v}" for k, v in values.items()) for key, values in references.items()}
    return (" Swept strategies appear at their reference values (each swept key at its documented default when "
            "that value was swept, else at its smallest value; the other values: *Sweeps and ablations*): "
            + "; ".join(sorted(shown)) + ".") if shown else ""


def _headline(overview: list[Block]) -> str:
    """The first table across settings with its heading, as Markdown (what ``fscl demo`` prints)."""
    heading = next(b.text for b in overview if isinstance(b, Heading) and b.level == 3)
    return f"{heading}\n{next(b.table for b in overview if isinstance(b, Table)).markdown()}"


# The zero-shot results of a sequence's target, its sessions' datasets pooled (each among its own classes), which
# answer no question of MTIL's protocol: Transfer, Avg and Last replace them (and BWT, in runs.csv only).
POOLED_TARGET = ("target_improvement", "target_forgetting", "target_final")


def forgetting_is_minus_ti(runs: pd.DataFrame, evaluation: Evaluation) -> bool:
    """Whether target forgetting under ``evaluation`` is only −TI in every run: the evaluation scored two
    sessions, 0 and T (VQA with ``vqa.sessions: ends``), so max over t < T of A[t, τ] is A[0, τ]."""
    key = evaluation.key("scored_sessions")
    return key in runs and bool((runs[key] <= 2).all())


def _setting_tables(rows: pd.DataFrame, runs: pd.DataFrame, label: str, reference: str,
                    sequence: pd.DataFrame | None = None) -> list[tuple[TextTable, str, Evaluation | None]]:
    """The printed tables of one setting with their captions: the results of each evaluation of ``runs`` (its
    finished runs; VQA first; the strategies with results of it, :func:`_scored_rows`) with each strategy's learning
    rate, then the costs (None: of no evaluation; left out when none was recorded). A forgetting that is only −TI
    is left out. A sequence setting (``sequence``: its rows of :func:`reports.sequence.sequence_table`) opens with
    its MTIL table (of zero-shot), and its zero-shot results leave out the pooled target's TI, forgetting and final
    accuracy (:data:`POOLED_TARGET`)."""
    evaluated = evaluations(runs)
    test = f"p: {TEST_NAME}, against {reference}"
    tables = []
    if sequence is not None:
        tables.append((sequence_text_table(sequence), sequence_caption(f"MTIL · {label}", reference), ZEROSHOT))
    for e in evaluated:
        pooled = {e.key(k) for k in POOLED_TARGET} if sequence is not None and e == ZEROSHOT else set()
        columns = [c for c in result_columns(e) if c.key not in pooled and not (
            c.key == e.key("target_forgetting") and forgetting_is_minus_ti(runs[scored(runs, e)], e))]
        columns += set_columns(runs) if e == VQA else []  # the VQA sets' own metrics (MMVP pairs, HM AUROC)
        tables.append((results_text_table(_scored_rows(rows, runs, e), columns, lr=True),
                       f"{label}{f'. {e.title}' if named(evaluated) else ''}. Mean ± std over seeds; {test}.", e))
    tables.append((results_text_table(rows, COST_COLUMNS), f"{label}. Costs, mean ± std over seeds.", None))
    return [(t, caption, e) for t, caption, e in tables if len(t.header) > 2]


def _scored_rows(rows: pd.DataFrame, runs: pd.DataFrame, evaluation: Evaluation) -> pd.DataFrame:
    """The :func:`results_table` rows of one setting whose strategy has results of ``evaluation`` among ``runs`` (its
    finished runs), ``n`` counting those runs (the seeds its means are over)."""
    counts = runs[scored(runs, evaluation)].groupby("strategy").size()
    rows = rows.assign(n=rows["strategy"].map(counts).fillna(0).astype(int))
    return rows[rows["n"] > 0]


def _setting_section(all_scores: pd.DataFrame, setting: dict[str, Any], runs: pd.DataFrame, rows: pd.DataFrame,
                     tables: list[tuple[TextTable, str, Evaluation | None]], reference: str,
                     references: dict[tuple, dict[str, Any]], styles: dict[str, Style],
                     out: Path) -> tuple[list[Block], list[Path]]:
    """Heading, description, results (and costs) tables and figures of one setting, the figures once
    per evaluation from the runs that have it (an evaluation's name heads its table and captions when the runs
    have several, or only VQA; the runs without one are named).

    Args:
        all_scores: the tidy scores of every finished run.
        setting: the values of :data:`GROUP_KEYS`; ``runs`` and ``rows`` are its finished runs
            and its :func:`results_table` rows, ``tables`` their printed forms (:func:`_setting_tables`).
        references: the reference values of the swept strategies (:func:`reports.ablation.main_runs`).
    """
    label = group_label(**setting)
    stem = out / "figures" / slug("{name}-{stream}-{backbone}-{shots}shot".format(**setting))
    setting_styles = {s: styles[s] for s in rows["strategy"]}
    blocks: list[Block] = [Heading(label)]
    if is_mini_world(setting["stream"], setting["backbone"]):
        blocks.append(Text(MINI_WORLD_NOTE))
    controls = "; ".join(sorted(set(runs["controls"]) - {""})) or "none"
    sessions = ", ".join(str(s) for s in sorted({int(s) for s in runs["sessions"]}))
    shots = (f"the released rows of each session for {setting['shots']} shots (a set with its own questions)"
             if runs["own_questions"].fillna(False).any() else f"{setting['shots']} shots per class")
    blocks.append(Text(f"Target stream `{setting['stream']}`, backbone `{setting['backbone']}`, {shots}, "
                       f"{sessions} session(s); controls: {controls}."
                       + _swept_note({k: v for k, v in references.items() if k[:-1] == tuple(setting.values())})))
    shared = runs[runs["jobs"].fillna(1) > 1]
    if len(shared):
        blocks.append(Text(f"**Timings from processes sharing cores:** {len(shared)} of the {len(runs)} run(s) ran "
                           f"beside other runs (`fscl run --jobs {int(shared['jobs'].max())}`), so their train "
                           "and setup times are longer than alone and compare only with runs made the same way."))
    evaluated = evaluations(runs)
    sequences = datasets_of(runs)  # its sequence runs (MTIL's protocol): their tables open with the MTIL table
    if sequences:
        blocks.append(Text(f"{SEQUENCE_INTRO} {order_note(runs[is_sequence(runs)])} {POOLED_NOTE}"))
    for i, (table, _, evaluation) in enumerate(tables):
        mtil = bool(sequences) and i == 0
        if named(evaluated):
            blocks.append(Text(f"**{'MTIL' if mtil else evaluation.title if evaluation else 'Costs'}**"))
        blocks += [Table(table), *(_lacking_note(runs, evaluation) if evaluation and not mtil else [])]
    if reference not in set(rows["strategy"]):
        blocks.append(Text(f"The reference strategy `{reference}` has no finished run in this setting, so there are "
                           f"no paired tests (p: n/a)."))

    scores = all_scores[all_scores["run"].isin(runs["run"])]
    written = []
    for evaluation in evaluated:
        these = runs[scored(runs, evaluation)]
        panels = {}
        for strategy in rows["strategy"][rows["strategy"].isin(these["strategy"])]:
            run = these[these["strategy"] == strategy].sort_values("seed").iloc[0]
            panels[run["run"]] = f"{strategy} (seed {run['seed']})"
        chance = _chance(these, evaluation)
        if sequences and evaluation == ZEROSHOT:  # the target's 1 / classes of every dataset: not its pooled chance
            chance.pop("target", None)
        figures = _figures(scores, _scored_rows(rows, runs, evaluation), panels, setting_styles, label, evaluation,
                           chance, compute=evaluation == evaluated[0],
                           sequences=sequences if evaluation == ZEROSHOT else {},
                           columns=dataset_order(runs[is_sequence(runs)])[0] if sequences else None)
        for fig, kind, caption in figures:
            tag = "" if evaluation == ZEROSHOT else f"{evaluation.name}-"  # zero-shot keeps its file names
            png, svg = save_figure(fig, stem.parent / f"{stem.name}-{tag}{kind}")
            written += [png, svg]
            blocks.append(Image(png, f"{evaluation.title}. {caption}" if named(evaluated) else caption))
    return blocks, written


def _chance(runs: pd.DataFrame, evaluation: Evaluation) -> dict[str, float]:
    """The chance accuracy of the target and the mean control under ``evaluation`` (those recorded)."""
    chance = {kind: runs[evaluation.key(f"chance_{kind}")].mean() for kind in ("target", "control")}
    return {kind: level for kind, level in chance.items() if pd.notna(level)}


def _figures(scores: pd.DataFrame, rows: pd.DataFrame, panels: dict[str, str], styles: dict[str, Style],
             label: str, evaluation: Evaluation, chance: dict[str, float], compute: bool = False,
             sequences: dict[str, list[str]] | None = None, columns: list[str] | None = None
             ) -> list[tuple[Any, str, str]]:
    """(figure, kind, caption) of one setting under one evaluation: the accuracy curves (with the ``chance``
    levels), TI against CC (with controls), TI against costs, with ``compute`` (the setting's first evaluation: VQA
    when it has one) TI against training TFLOPs per session where recorded, and the accuracy matrices of ``panels``
    (runs). A sequence setting (``sequences``: its runs' datasets in session order; ``columns``: the order of its
    table) has no figure of TI (of its pooled target): its curves, and its matrices with a column per dataset."""
    ti, cc = evaluation.key("target_improvement"), evaluation.key("control_change")
    pooled = "Pooled accuracy of the sequence's datasets (each among its own classes)" if sequences else \
        "Target accuracy"
    figures = [(curves_figure(curve_table(scores, evaluation), styles, label, evaluation, chance), "curves",
                f"{pooled} (and mean control accuracy) after each session: mean over seeds, band ± std"
                + ("; dotted: chance." if chance else "."))]
    if sequences:
        unit = "top-1 %, sessions (the dataset each trained) × datasets, each among its own classes"
        return [*figures, (matrix_figure(scores, panels, label, evaluation, sequences, columns), "matrix",
                           f"Accuracy matrix ({unit}) of each strategy's lowest-seed run.")]
    if cc + "_mean" in rows and rows[cc + "_mean"].notna().any():
        figures.append((tradeoff_figure(rows, styles, label, evaluation), "tradeoff",
                        "Gain vs forgetting: TI against CC, mean ± std over seeds; upper right is best."))
    if ti + "_mean" in rows:
        figures.append((cost_figure(rows, styles, label, evaluation), "cost",
                        "Cost vs gain: TI against trainable parameters and training time (log scale); a strategy "
                        "that trains nothing has no point."))
    if compute and ti + "_mean" in rows and rows["paper_train_flops_mean"].notna().any():
        figures.append((cost_figure(rows, styles, label, evaluation, COMPUTE_AXES), "compute",
                        "Compute vs gain: TI against the training TFLOPs of a session (log scale; the paper's count: "
                        "forward + backward through everything the loss passes, both CLIP towers for the CLIP loss, "
                        "tower, projector and language model for the VLM loss; mean over sessions, mean ± std over "
                        "seeds)" + (f"; the costs table gives each strategy's ratio to `{COMPUTE_REFERENCE}`."
                                    if rows["compute_ratio_mean"].notna().any() else ".")))
    unit = "top-1" if evaluation == ZEROSHOT else evaluation.accuracy
    figures.append((matrix_figure(scores, panels, label, evaluation), "matrix",
                    f"Accuracy matrix ({unit} %, sessions × datasets) of each strategy's lowest-seed run."))
    return figures


def _excluded_section(runset: RunSet) -> list[Block]:
    excluded = runset.excluded
    if excluded.empty:
        return [Heading("Excluded runs"), Text("None: every run found finished.")]
    return [Heading("Excluded runs"),
            Text("Failed or partial runs, left out of every table and figure:"),
            Table(TextTable.from_frame(excluded.rename(columns=str.capitalize)))]


def _configuration_section(runset: RunSet) -> list[Block]:
    """Config keys shared by all finished runs, and those that vary (with their values)."""
    flat = pd.DataFrame([_flatten(runset.configs[r]) for r in runset.finished["run"]])
    values = {k: sorted(set(flat[k].dropna()), key=_natural) for k in flat.columns}
    shared = pd.DataFrame([(k, v[0]) for k, v in values.items() if len(v) == 1], columns=["Key", "Value"])
    varying = pd.DataFrame([(k, ", ".join(v)) for k, v in values.items() if len(v) > 1], columns=["Key", "Values"])
    blocks: list[Block] = [Heading("Configuration"),
                           Text("From the runs' resolved `config.yaml`. Shared by all runs (a strategy's or stream's "
                                "options: by all runs it takes part in):"),
                           Table(TextTable.from_frame(shared))]
    if not varying.empty:
        blocks += [Text("Varying between runs:"), Table(TextTable.from_frame(varying))]
    return blocks


def _versions_section(runset: RunSet) -> list[Block]:
    """Software versions and git commits recorded in the finished runs' manifests."""
    found: dict[str, set[str]] = {}
    for run in runset.finished["run"]:
        manifest = runset.manifests[run]
        for name, version in {**(manifest.get("versions") or {}), "git commit": manifest.get("git")}.items():
            found.setdefault(name, set()).add(str(version) if version else "not installed / unknown")
    frame = pd.DataFrame([(k, ", ".join(sorted(v))) for k, v in found.items()], columns=["Software", "Version(s)"])
    blocks: list[Block] = [Heading("Software versions"), Text("From the runs' `manifest.json`:"),
                           Table(TextTable.from_frame(frame))]
    mixed = [k for k, v in found.items() if len(v) > 1]
    if mixed:
        blocks.append(Text(f"**Runs were made with different versions of:** {', '.join(mixed)}."))
    return blocks


def _definitions_section(reference: str, evaluated: list[Evaluation], sequences: bool = False) -> list[Block]:
    """What the tables' numbers mean, under the ``evaluated`` evaluations (those with results among the runs), and
    with ``sequences`` (sequence runs among them) MTIL's Transfer, Avg and Last."""
    def doc(fn: Any) -> str:
        return " ".join(inspect.getdoc(fn).split())

    vqa, zeroshot = VQA in evaluated, ZEROSHOT in evaluated
    accuracy, then = ("zero-shot top-1 accuracy", "then ") if zeroshot else (f"accuracy under {VQA.title} (below)", "")
    vqa_text = [Text(f"**{VQA.title}**: A[t, d] is {then}the multiple-choice accuracy on dataset d of the VLM of "
                     "`vqa.model` (LLaVA-1.5, or the mini world's own) with the encoder of session t in its "
                     "vision tower (`vqa.scoring`: the most probable option letter, or "
                     "the released greedy answer and parse rules), and TI, CC and forgetting are computed in the same "
                     "way over the sessions VQA scored (`vqa.sessions: ends`: sessions 0 and T only, so forgetting "
                     "is A[0, τ] − A[T, τ]). Its curves and matrices show those sessions; `vqa_*` columns of "
                     "`results.csv` and `runs.csv` hold its numbers.")] if vqa else []
    return [
        Heading("How to read the tables"),
        Text(f"Notation: A[t, d] is the {accuracy} on dataset d after session t (t = 0: the "
             "pretrained model, T: the last session); τ is the target, C the controls. Accuracies are in percent, "
             "their changes in percentage points (pp)."),
        *vqa_text,
        Text(f"**TI**: {doc(target_improvement)} **CC**: {doc(control_change)} **Forgetting** (of the target): "
             f"{doc(forgetting)} **Final target acc.**: A[T, τ]. **BWT** (in `runs.csv`): {doc(backward_transfer)}"),
        *([Text(SEQUENCE_DEFINITIONS)] if sequences else []),
        Text("**Trainable params**: the free parameters the strategy updates (with and without dense biases), "
             "mean over sessions; LoRSU's low-rank update of the R chosen q/k/v rows of width W counts "
             "min(R·W, r·(R + W)). **Trainable (released count)**: the convention of the released LoRSU code's log, "
             "min(R·W, r·4W) per block (the paper's figures, e.g. 5.4 % of ViT-L/14-336); the same as Trainable "
             "params for every other strategy. **Train time**: training seconds summed over sessions (evaluation "
             "excluded). **FLOPs / sample**: forward + backward FLOPs of one training sample (torch's FLOP counter), mean over "
             "sessions. **Mask / setup time**: seconds spent choosing what to train (e.g. building masks), summed "
             "over sessions. **Peak memory**: the largest per-session peak (CUDA allocations on GPU, process RSS "
             "on CPU). **Optimizer state**: size of the optimizer's state tensors, mean over sessions."),
        Text(f"Each cell is mean ± std over n seeds (std with ddof 1, shown for n ≥ 2); {BEST_RULE} (within a "
             f"setting, or a target of a table across settings). p: {TEST_NAME}, each strategy against `{reference}` "
             f"on the seeds both have; *ref.* is the reference itself; n/a (n<{MIN_SEEDS}): fewer than {MIN_SEEDS} "
             "shared seeds, too few for a test to mean anything; n/a (zero variance): every seed differs by the same "
             "amount, so the test is undefined. **LR**: the strategy's effective learning rate (`train.lr`, or its "
             "own `<strategy>.train.lr`); – for a strategy that trains nothing."
             + (" Where VQA scored only sessions 0 and T its forgetting is −TI, and its column is left out." if vqa
                else "")),
        Text("**Figures**: every strategy keeps one colour, marker and line style in all figures (the reference "
             "black with stars, `zeroshot` grey and dashed); dotted grey lines on accuracy axes mark chance (1 / "
             f"classes{'; VQA: 1 / options' if vqa else ''}); accuracy axes span at least "
             f"{MIN_ACCURACY_SPAN:.0f} pp and TI / CC axes {MIN_CHANGE_SPAN:.0f} pp, so a difference of a point "
             "or two looks as small as it is."),
    ]


def _flatten(data: dict[str, Any]) -> dict[str, str]:
    """A run's config → dotted keys with JSON-rendered values (lists included), resolved as runs are compared
    (:func:`benchmark.config.compared`: keys an older record lacks at their defaults; of the option sections only
    those that reach the run), so folders written by different versions read alike."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in compared(data).items()}


def _natural(value: str) -> tuple[int, float, str]:
    """Sort key: numbers by value (2 before 10), then other text alphabetically."""
    try:
        return 0, float(value), ""
    except ValueError:
        return 1, 0.0, value


def render_markdown(blocks: list[Block], base: Path) -> str:
    """Markdown; figures as links relative to ``base`` (the report's folder)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(block.table.markdown())
        else:
            parts.append(f"![{block.caption}]({block.png.relative_to(base).as_posix()})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}th,td{border:1px solid #bbb;padding:.25rem .5rem}
th{background:#eee}td:not(:first-child){text-align:right;white-space:nowrap}img{max-width:100%}figcaption{font-style:italic}
code{background:#f3f3f3;padding:0 .2rem}"""


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures embedded as base64 PNG."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(block.table.html())
        else:
            data = base64.b64encode(block.png.read_bytes()).decode("ascii")
            caption = html.escape(block.caption)
            parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body>\n</html>\n")


def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\*(.+?)\*", r"<em>\1</em>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
