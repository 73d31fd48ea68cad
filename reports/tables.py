"""Aggregate tables: mean ± std over seeds, the best value per column, paired tests.

:func:`results_table` gives one numeric row per (setting, strategy) in the units of the run
records (accuracies as fractions); :func:`results_text_table` formats one setting of it for
print (accuracies in percent / percentage points), either the results of one evaluation
(:func:`result_columns`) or the remaining costs (:data:`COST_COLUMNS`), and :class:`TextTable`
renders any table as Markdown, HTML or LaTeX.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from reports.frame import (
    EVALUATIONS,
    GROUP_KEYS,
    SET_METRIC,
    ZEROSHOT,
    Evaluation,
    ReportError,
    evaluations,
    strategy_order,
)

TEST_NAME = "two-sided paired t-test over seeds (scipy.stats.ttest_rel), runs paired by seed"
MIN_SEEDS = 3  # fewer seeds: no p-value and no bold "best"
BEST_RULE = (f"bold marks a column's best mean only where it is clear: the best and the runner-up both have "
             f"n ≥ {MIN_SEEDS} seeds and their mean ± std intervals do not overlap (the gap exceeds the sum of "
             f"their stds); a strategy that trains nothing (the zero-shot reference: TI and CC 0 by construction, no cost) is "
             f"never the best")


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _seconds(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"


def _compact(x: float, suffixes: str) -> str:
    """``x`` with a thousands suffix: 950, 12.3K, 4.6M, ... (``suffixes`` for 10³, 10⁶, 10⁹, 10¹²)."""
    for power, suffix in reversed(list(enumerate(suffixes, start=1))):
        if abs(x) >= 1000**power:
            return f"{x / 1000**power:.1f}{suffix}"
    return f"{x:.0f}"


def _count(x: float) -> str:
    return _compact(x, "KMB")


def _flops(x: float) -> str:
    return _compact(x, "KMGT")


def _teraflops(x: float) -> str:
    """FLOPs in TFLOPs, three significant digits."""
    return f"{x / 1e12:.3g}"


def _ratio(x: float) -> str:
    return f"{x:.3g}×"


def _mebibytes(x: float) -> str:
    return f"{x:.0f}"


def _bytes_as_mebibytes(x: float) -> str:
    return f"{x / 2**20:.1f}"


@dataclass(frozen=True)
class Column:
    """One aggregated column of the results table.

    Attributes:
        key: column of the ``runs`` frame (see :mod:`reports.frame`).
        label: header in print, with its display unit.
        short: name in the header of its p-value column.
        better: which direction the best value lies in.
        fmt: formats one number (mean or std) in the display unit.
        tested: whether a paired test against the reference strategy is run on it.
        scored: an accuracy metric, one per evaluation (its key then carries the evaluation's prefix).
    """

    key: str
    label: str
    short: str
    better: Literal["higher", "lower"]
    fmt: Callable[[float], str]
    tested: bool = False
    scored: bool = False


RESULT_COLUMNS = (
    Column("target_improvement", "TI (pp)", "TI", "higher", _percent, tested=True, scored=True),
    Column("control_change", "CC (pp)", "CC", "higher", _percent, tested=True, scored=True),
    Column("target_forgetting", "Forgetting (pp)", "Forgetting", "lower", _percent, tested=True, scored=True),
    Column("target_final", "Final target acc. (%)", "Final acc.", "higher", _percent, scored=True),
    Column("trainable", "Trainable params", "Trainable", "lower", _count),
    Column("train_seconds", "Train time (s)", "Train time", "lower", _seconds),
)
# The strategy whose training compute the ratio column divides by: LoRA on the whole VLM, the paper's "full VLM update".
COMPUTE_REFERENCE = "lora-vlm"
# The other costs of the run records (see reports.frame.cost_scalars for how sessions are combined), and the ratio of
# each strategy's training TFLOPs per session (paper's count) to COMPUTE_REFERENCE's in its setting (compute_ratio).
COST_COLUMNS = (
    Column("trainable_with_biases", "Trainable incl. biases", "Trainable incl. biases", "lower", _count),
    Column("trainable_released", "Trainable (released count)", "Trainable (released)", "lower", _count),
    Column("flops_per_sample", "FLOPs / sample (fwd+bwd)", "FLOPs", "lower", _flops),
    Column("lm_flops_per_sample", "LM FLOPs / sample (VLM loss)", "LM FLOPs", "lower", _flops),
    Column("paper_flops_per_sample", "FLOPs / sample (paper's count)", "Paper FLOPs", "lower", _flops),
    Column("train_flops", "Train TFLOPs / session", "Train TFLOPs", "lower", _teraflops),
    Column("paper_train_flops", "Train TFLOPs / session (paper's count)", "Paper TFLOPs", "lower", _teraflops),
    Column("compute_ratio", f"× {COMPUTE_REFERENCE} (paper's count)", f"× {COMPUTE_REFERENCE}", "lower", _ratio),
    Column("setup_seconds", "Mask / setup time (s)", "Setup time", "lower", _seconds),
    Column("peak_memory_mb", "Peak memory (MiB)", "Peak memory", "lower", _mebibytes),
    Column("optimizer_state_bytes", "Optimizer state (MiB)", "Optimizer state", "lower", _bytes_as_mebibytes),
)
COLUMNS = RESULT_COLUMNS + COST_COLUMNS


def result_columns(evaluation: Evaluation = ZEROSHOT) -> tuple[Column, ...]:
    """:data:`RESULT_COLUMNS` of one evaluation: its accuracy metrics, and the training costs."""
    return tuple(replace(c, key=evaluation.key(c.key)) if c.scored else c for c in RESULT_COLUMNS)


def table_columns(finished: pd.DataFrame) -> tuple[Column, ...]:
    """The columns :func:`results_table` aggregates: :data:`COLUMNS` (their zero-shot accuracy metrics only when a
    run of ``finished`` has zero-shot results), then the accuracy metrics of every other evaluation with results
    among ``finished`` (VQA's ``vqa_target_improvement``, ...), then the VQA sets' own metrics
    (:func:`set_columns`)."""
    present = evaluations(finished)
    return (tuple(c for c in COLUMNS if ZEROSHOT in present or not c.scored)
            + tuple(c for e in EVALUATIONS if e in present and e != ZEROSHOT for c in result_columns(e) if c.scored)
            + set_columns(finished))


SET_METRIC_LABELS = {"pair_acc": ("pair acc. (%)", _percent), "auroc": ("AUROC", lambda x: f"{x:.3f}")}


def set_columns(runs: pd.DataFrame) -> tuple[Column, ...]:
    """A column per VQA set's own metric among ``runs`` after the last scored session (``vqa_set:<dataset>:<metric>``:
    MMVP's pair accuracy, HM's AUROC), in the order of the frame's columns."""
    columns = []
    for key in runs.columns:
        if key.startswith(SET_METRIC):
            dataset, metric = key[len(SET_METRIC):].split(":", 1)
            label, fmt = SET_METRIC_LABELS.get(metric, (metric, _percent))
            columns.append(Column(key, f"{dataset} {label}", f"{dataset} {metric}", "higher", fmt))
    return tuple(columns)


@dataclass(frozen=True)
class PairedTest:
    """Outcome of a paired test: the p-value (NaN when undefined), the pairs used, and why undefined."""

    p: float
    pairs: int
    note: str = ""


def paired_test(values: pd.Series, reference: pd.Series) -> PairedTest:
    """Paired t-test of ``values`` against ``reference``, both indexed by seed.

    Only seeds present (and not NaN) in both enter. Not given, with a note, for fewer than
    :data:`MIN_SEEDS` pairs (a test on two seeds says nothing) or when every pair differs by the
    same amount (zero variance of the differences: undefined).
    """
    pairs = pd.concat({"x": values, "ref": reference}, axis=1, join="inner").dropna()
    n = len(pairs)
    if n < MIN_SEEDS:
        return PairedTest(math.nan, n, f"n<{MIN_SEEDS}")
    diff = (pairs["x"] - pairs["ref"]).to_numpy()
    if np.ptp(diff) <= 1e-12:
        return PairedTest(math.nan, n, "zero variance")
    return PairedTest(float(stats.ttest_rel(pairs["x"], pairs["ref"]).pvalue), n)


def reference_test(strategy: str, reference: str, values: pd.Series, ref: pd.Series | None) -> PairedTest:
    """The paired test of one strategy's ``values`` (by seed) against the reference strategy's ``ref`` (by seed;
    None: no run of it in the setting): a :func:`paired_test`, or no test noted ``reference`` for the reference
    itself (its pairs: its runs) and ``no reference`` without one."""
    if strategy == reference:
        return PairedTest(math.nan, len(values), "reference")
    if ref is None:
        return PairedTest(math.nan, 0, "no reference")
    return paired_test(values, ref)


def results_table(finished: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per setting (:data:`GROUP_KEYS`) and strategy: mean, std (ddof 1), best flag and tests.

    Args:
        finished: the finished runs (``RunSet.finished``), one row per run.
        reference: the strategy every other one is tested against (by seed).

    Returns:
        One row per (setting, strategy), the reference first: the group keys, ``strategy``,
        ``n`` (seeds), ``seeds``, ``lr`` (its effective learning rates, comma-joined), ``jobs`` (the most
        processes a run shared the machine with; NaN: not recorded), the mean chance accuracies of each
        evaluation (``chance_target``, ``chance_control``, ``vqa_chance_*``), and per column of
        :func:`table_columns` ``<key>_mean``, ``<key>_std``, ``<key>_best`` (:func:`clear_best`); tested columns
        add ``<key>_p``, ``<key>_pairs`` and ``<key>_note`` (``reference``, ``no reference``, ``n<3``,
        ``zero variance`` or empty). Units as in the run records.

    Raises:
        ReportError: there is no finished run to aggregate.
    """
    if finished.empty:
        raise ReportError("no finished runs to aggregate")
    columns = table_columns(finished)
    chance = [e.key(f"chance_{kind}") for e in evaluations(finished) for kind in ("target", "control")]
    finished = finished.reindex(columns=list(dict.fromkeys([*finished.columns, *(c.key for c in columns)])))
    rows = []
    for key, group in finished.groupby(list(GROUP_KEYS), sort=True):
        ref = group[group["strategy"] == reference].set_index("seed")
        for strategy in strategy_order(group["strategy"], reference):
            runs = group[group["strategy"] == strategy]
            by_seed = runs.set_index("seed")
            row = {**dict(zip(GROUP_KEYS, key)), "strategy": strategy, "n": len(runs),
                   "seeds": ", ".join(str(s) for s in sorted(runs["seed"])),
                   "lr": ", ".join(f"{v:g}" for v in sorted(set(runs["lr"].dropna()))),
                   "jobs": runs["jobs"].max(), **{c: runs[c].mean() for c in chance}}
            for col in columns:
                row[f"{col.key}_mean"] = runs[col.key].mean()
                row[f"{col.key}_std"] = runs[col.key].std(ddof=1)
                if col.tested:
                    test = reference_test(strategy, reference, by_seed[col.key], ref[col.key] if len(ref) else None)
                    row.update({f"{col.key}_p": test.p, f"{col.key}_pairs": test.pairs, f"{col.key}_note": test.note})
            rows.append(row)
    table = pd.DataFrame(rows)
    table["compute_ratio_mean"] = compute_ratio(table)
    trains = table["trainable_mean"].fillna(1) > 0  # unknown: counted as training
    for col in columns:
        table[f"{col.key}_best"] = pd.concat(
            [clear_best(group[f"{col.key}_mean"], group[f"{col.key}_std"], group["n"], col.better, trains[group.index])
             for _, group in table.groupby(list(GROUP_KEYS))]).reindex(table.index)
    return table


def compute_ratio(table: pd.DataFrame) -> pd.Series:
    """Per row of :func:`results_table` its mean training TFLOPs per session (paper's count) over the mean of
    :data:`COMPUTE_REFERENCE` in the same setting: the paper's "over 25× less compute than full VLM updates" read
    from the runs (NaN where the setting has no run of it, or a strategy trained nothing)."""
    key = "paper_train_flops_mean"
    reference = table[table["strategy"] == COMPUTE_REFERENCE].set_index(list(GROUP_KEYS))[key]
    settings = pd.MultiIndex.from_frame(table[list(GROUP_KEYS)])
    return table[key] / reference.reindex(settings).to_numpy()


def clear_best(mean: pd.Series, std: pd.Series, n: pd.Series, better: str,
               eligible: pd.Series | None = None) -> pd.Series:
    """True for the one row whose mean is clearly the best (:data:`BEST_RULE`), False everywhere else.

    Args:
        mean, std, n: per row (same index) the mean, std (ddof 1) and number of seeds.
        better: ``higher`` or ``lower``.
        eligible: rows that may be best (None: every row); e.g. not a strategy that trains nothing.
    """
    best = pd.Series(False, index=mean.index)
    candidates = mean[mean.notna() & (True if eligible is None else eligible)]
    if len(candidates) < 2:
        return best
    ranked = candidates.sort_values(ascending=better == "lower", kind="stable").index
    first, second = ranked[0], ranked[1]
    gap = abs(mean[first] - mean[second])
    clear = min(n[first], n[second]) >= MIN_SEEDS and gap > std[first] + std[second] + 1e-12
    best[first] = bool(clear)  # NaN stds compare False
    return best


def curve_table(scores: pd.DataFrame, evaluation: Evaluation = ZEROSHOT) -> pd.DataFrame:
    """Mean and std over seeds of the per-session accuracy curves of each strategy under ``evaluation``.

    Curve ``target`` is the target's accuracy (top-1, or VQA); ``control`` the mean accuracy over
    the control datasets of a run (absent without controls). Only the sessions the evaluation
    scored appear (VQA: often 0 and T). Returns columns ``strategy``, ``curve``, ``session``,
    ``mean``, ``std`` (ddof 1, NaN for one seed), ``n``; fractions.
    """
    accuracy = scores[scores["metric"] == evaluation.metric]
    per_run = (accuracy.groupby(["run", "strategy", "role", "session"], as_index=False)["value"].mean()
               .rename(columns={"role": "curve"}))
    return (per_run.groupby(["strategy", "curve", "session"])["value"].agg(["mean", "std", "count"])
            .rename(columns={"count": "n"}).reset_index())


@dataclass(frozen=True)
class Cell:
    """One table cell: plain text, optionally emphasised (the best value of its column)."""

    text: str
    bold: bool = False


@dataclass(frozen=True)
class TextTable:
    """A table of text cells with one renderer per output format.

    ``groups``: an optional header row above ``header``, (label, columns spanned) from the left (an empty label
    over columns of no group); Markdown, which has one header row, joins it into the header cells.
    """

    header: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] | None = None

    def group_of_column(self) -> list[str]:
        """The group label above each header cell ("" outside a group)."""
        return [label for label, span in self.groups or [("", len(self.header))] for _ in range(span)]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> TextTable:
        """Every value as plain text (NaN as an en dash)."""
        return cls([str(c) for c in frame.columns],
                   [[Cell("–" if _missing(v) else str(v)) for v in row] for row in frame.itertuples(index=False)])

    def markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        body = [line([f"**{c.text}**" if c.bold else c.text for c in row]) for row in self.rows]
        header = [f"{g} {h}" if g else h for g, h in zip(self.group_of_column(), self.header)]
        return "\n".join([line(header), line(["---"] * len(self.header)), *body])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        if self.groups:
            top = "".join(f'<th colspan="{span}">{html.escape(label)}</th>' for label, span in self.groups)
            head = f"{top}</tr><tr>{head}"
        body = "".join(
            "<tr>" + "".join(f"<td><strong>{html.escape(c.text)}</strong></td>" if c.bold else
                             f"<td>{html.escape(c.text)}</td>" for c in row) + "</tr>"
            for row in self.rows)
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"

    def latex(self, caption: str) -> str:
        """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
        def cell(c: Cell) -> str:
            text = _latex_escape(c.text)
            return f"\\textbf{{{text}}}" if c.bold else text

        groups = []
        if self.groups:
            start, spans, rules = 1, [], []
            for label, span in self.groups:
                spans.append(f"\\multicolumn{{{span}}}{{c}}{{{_latex_escape(label)}}}" if label and span > 1
                             else _latex_escape(label) if label else " & ".join([""] * span))
                if label:
                    rules.append(f"\\cmidrule(lr){{{start}-{start + span - 1}}}")
                start += span
            groups = [" & ".join(spans) + " \\\\", " ".join(rules)]
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_latex_escape(caption)}}}",
                 f"\\begin{{tabular}}{{l{'r' * (len(self.header) - 1)}}}", "\\toprule", *groups,
                 " & ".join(_latex_escape(h) for h in self.header) + " \\\\", "\\midrule",
                 *(" & ".join(cell(c) for c in row) + " \\\\" for row in self.rows),
                 "\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines)


def results_text_table(table: pd.DataFrame, columns: Sequence[Column] = RESULT_COLUMNS, lr: bool = False) -> TextTable:
    """One setting of :func:`results_table` for print: ``mean ± std`` (± only for n ≥ 2),
    the clear best value per column in bold (:data:`BEST_RULE`), and a p-value column after each tested column;
    with ``lr`` an ``LR`` column after ``n``: each strategy's effective learning rate (– when it trains nothing).

    Columns without any value in this setting (e.g. CC without controls, or costs an older
    runner did not record) are left out.
    """
    columns = [c for c in columns if table[f"{c.key}_mean"].notna().any()]
    header = ["Strategy", "n", *(["LR"] if lr else [])]
    for col in columns:
        header += [col.label, f"p ({col.short})"] if col.tested else [col.label]
    rows = []
    for _, row in table.iterrows():
        cells = [Cell(str(row["strategy"])), Cell(str(row["n"]))]
        if lr:
            cells.append(Cell(row["lr"] if row["lr"] and row["trainable_mean"] != 0 else "–"))
        for col in columns:
            mean = row[f"{col.key}_mean"]
            cells.append(Cell(mean_std(mean, row[f"{col.key}_std"], col.fmt), bool(row[f"{col.key}_best"])))
            if col.tested:
                cells.append(Cell("–" if _missing(mean) else _p_text(row[f"{col.key}_p"], row[f"{col.key}_note"])))
        rows.append(cells)
    return TextTable(header, rows)


def mean_std(mean: float, std: float, fmt: Callable[[float], str] = _percent) -> str:
    """A cell's ``mean ± std`` in ``fmt``'s unit (– without a mean; no ± without a std, i.e. one seed)."""
    return "–" if _missing(mean) else fmt(mean) + ("" if _missing(std) else f" ± {fmt(std)}")


def trains(finished: pd.DataFrame) -> pd.Series:
    """Per strategy among ``finished`` (one row per run) whether it trains anything (its most trainable
    parameters > 0; unknown counts as training): the strategies that may be a column's best (:data:`BEST_RULE`)."""
    trainable = finished["trainable"] if "trainable" in finished else pd.Series(np.nan, index=finished.index)
    return trainable.groupby(finished["strategy"]).max().fillna(1) > 0


def _p_text(p: float, note: str) -> str:
    if note == "reference":
        return "ref."
    if note:
        return f"n/a ({note})"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "<": r"$<$", ">": r"$>$", "·": r"$\cdot$", "–": "--"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
