"""Reports from whichever evaluations runs have (``evaluate``): real ``fscl run quick`` grids on CPU with a tiny
random LLaVA whose tower takes ``openclip:fscl-tiny``.

- VQA only: ``strategy=[zeroshot,full-ft] evaluate=[vqa]``, seeds 0 and 1 (no ``matrix.csv``; the summary has only
  its ``vqa`` block and costs).
- Mixed: the same runs plus ``lorsu`` with both evaluations in the same grid folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.records import slug
from reports import scan_runs, write_report
from reports.frame import VQA, ZEROSHOT

SETTINGS = ("seed=[0,1]", "sessions=2", "train.epochs=1", "digits.test_fraction=0.03", "--no-progress")
SETTING = "digits · openclip:fscl-tiny · 5-shot · quick [random weights]"
STEM = slug("quick-digits-openclip-fscl-tiny-5shot")
KINDS = ("curves", "cost", "matrix")  # no controls: no TI against CC figure


@pytest.fixture(scope="module")
def vqa_only(tiny_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa-only")
    assert main(["run", "quick", "strategy=[zeroshot,full-ft]", f"vqa.model=llava:{tiny_llava}", "evaluate=[vqa]",
                 f"out={out}", *SETTINGS]) == 0
    return out / "quick"


@pytest.fixture(scope="module")
def mixed(vqa_only, tiny_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    shutil.copytree(vqa_only, out / "quick")
    assert main(["run", "quick", "strategy=lorsu", f"vqa.model=llava:{tiny_llava}", f"out={out}", *SETTINGS]) == 0
    return out / "quick"


def sections(markdown: str) -> dict[str, str]:
    """The report's level-2 sections by heading."""
    return {s.split("\n", 1)[0]: s for s in markdown.split("\n## ")}


def test_a_vqa_only_run_reads_its_sessions_and_controls_from_its_vqa_block(vqa_only):
    run = vqa_only / "digits/openclip-fscl-tiny/full-ft/5-s0"
    assert not (run / "matrix.csv").exists() and set(json.loads((run / "summary.json").read_text())) == {"vqa", "costs"}
    finished = scan_runs(vqa_only).finished
    assert len(finished) == 4 and set(finished["sessions"]) == {2} and set(finished["controls"]) == {""}
    assert finished["target_final"].isna().all() and finished[VQA.key("target_final")].notna().all()


def test_a_vqa_only_grid_gives_a_full_report_on_the_vqa_numbers(vqa_only, tmp_path):
    report = write_report(vqa_only, tmp_path, reference="zeroshot")
    markdown = report.markdown.read_text()
    assert ZEROSHOT.title not in markdown and "zero-shot top-1 accuracy" not in markdown
    assert f"Every number is of {VQA.title}" in markdown  # the intro says which evaluation
    heading = f"### {VQA.title} · openclip:fscl-tiny · 5-shot · quick [random weights]"
    assert heading in markdown and report.headline.startswith(heading[4:])  # the overview names it
    setting = sections(markdown)[SETTING]
    assert f"**{VQA.title}**" in setting and "**Costs**" in setting
    assert setting.count("| Strategy | n | LR | TI (pp) | p (TI) |") == 1
    assert "Forgetting" not in setting  # VQA scored sessions 0 and T: it is -TI
    summaries = {s: [json.loads((vqa_only / f"digits/openclip-fscl-tiny/{s}/5-s{seed}/summary.json").read_text())
                     ["vqa"] for seed in (0, 1)] for s in ("zeroshot", "full-ft")}
    results = pd.read_csv(report.results_csv).set_index("strategy")
    assert not any(c.startswith("target_") for c in results.columns)  # no empty zero-shot columns
    for strategy, blocks in summaries.items():
        finals = [b["target_final"] for b in blocks]
        assert results.loc[strategy, "vqa_target_final_mean"] == pytest.approx(np.mean(finals))
        assert results.loc[strategy, "vqa_target_final_std"] == pytest.approx(np.std(finals, ddof=1))
        assert results.loc[strategy, "n"] == 2
    assert results.loc["full-ft", "vqa_target_improvement_note"] == "n<3"  # tested against zeroshot, by seed
    assert results.loc["zeroshot", "vqa_target_improvement_note"] == "reference"
    row = next(line for line in setting.splitlines() if line.startswith("| full-ft | 2 |"))
    assert f"{100 * np.mean([b['target_final'] for b in summaries['full-ft']]):.1f} ±" in row
    names = {p.name for p in report.figures}
    assert {f"{STEM}-vqa-{kind}.png" for kind in KINDS} | {"main-vqa-quick-openclip-fscl-tiny-5shot.png"} <= names
    assert not any(n.startswith(STEM) and "-vqa-" not in n for n in names)  # no zero-shot figure
    assert all(p.is_file() and p.stat().st_size for p in report.figures)
    main_table = pd.read_csv(report.main_csv)
    assert set(main_table["evaluation"]) == {"vqa"} and set(main_table["strategy"]) == {"zeroshot", "full-ft"}
    assert VQA.title in report.results_latex.read_text() and VQA.title in report.main_latex.read_text()
    assert f"accuracy under {VQA.title}" in sections(markdown)["How to read the tables"]


def test_a_mixed_grid_shows_each_evaluation_for_the_runs_that_have_it(mixed, tmp_path):
    report = write_report(mixed, tmp_path, reference="zeroshot")
    markdown = report.markdown.read_text()
    assert "Not every run has every evaluation" in markdown
    lacking = "**Without zeroshot results** (their `evaluate` leaves it out), so not in its tables and figures: "
    assert markdown.count(lacking) == 2  # the overview and the setting
    assert f"{lacking}{SETTING}: `full-ft` (seeds 0, 1); {SETTING}: `zeroshot` (seeds 0, 1)." in markdown
    assert "**Without vqa results**" not in markdown  # every run has VQA
    setting = sections(markdown)[SETTING]
    vqa_part = setting[setting.index(f"**{VQA.title}**"):setting.index(f"**{ZEROSHOT.title}**")]
    zeroshot_part = setting[setting.index(f"**{ZEROSHOT.title}**"):setting.index("**Costs**")]
    assert all(f"| {s} | 2 |" in vqa_part for s in ("zeroshot", "full-ft", "lorsu"))
    assert "| lorsu | 2 |" in zeroshot_part and "| full-ft |" not in zeroshot_part
    assert "| zeroshot |" not in zeroshot_part
    main_table = pd.read_csv(report.main_csv)
    assert set(main_table.loc[main_table["evaluation"] == "zeroshot", "strategy"]) == {"lorsu"}
    assert set(main_table.loc[main_table["evaluation"] == "vqa", "strategy"]) == {"zeroshot", "full-ft", "lorsu"}
    results = pd.read_csv(report.results_csv).set_index("strategy")
    assert results["target_final_mean"].notna().tolist() == [s == "lorsu" for s in results.index]
    names = {p.name for p in report.figures if p.suffix == ".png"}
    assert {f"{STEM}-{tag}{kind}.png" for tag in ("", "vqa-") for kind in KINDS} <= names
    matrix = next(p for p in report.figures if p.name == f"{STEM}-matrix.svg").read_text()
    assert "lorsu (seed 0)" in matrix and "full-ft (seed 0)" not in matrix  # panels: the runs with zero-shot
