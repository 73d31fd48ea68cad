"""``fscl report`` and ``fscl demo``: the verbs this package adds to the command line.

Named in the ``fscl.commands`` entry-point group (setup.cfg); only the parsers live here, the
handlers import the work, so ``fscl --help`` stays light.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark.cli import add_jobs_argument
from benchmark.config import DEMO_PRESET


def add_report(verbs: argparse._SubParsersAction) -> None:
    """``fscl report RUNS_DIR --out DIR [--reference STRATEGY]``."""
    report = verbs.add_parser(
        "report", help="tables, figures and a Markdown/HTML report of a runs folder",
        description="Aggregate finished runs (mean ± std over seeds, paired tests against a reference strategy) "
                    "into report.md, report.html, main_table.csv/.tex (the table across settings, printed here too), "
                    "results.csv/.tex and figures/; sequence runs (MTIL's protocol) get Transfer/Avg/Last tables, "
                    "also in sequence.csv; failed or partial runs are listed and left out.",
        epilog="example:\n  fscl report runs/quick --out report/quick --reference full-ft",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("runs_dir", metavar="RUNS_DIR", help="folder of run records ('fscl run' output)")
    report.add_argument("--out", required=True, metavar="DIR", help="folder to write the report into")
    report.add_argument("--reference", default="lorsu",
                        help="strategy the others are tested against, paired by seed (default: lorsu)")
    report.set_defaults(func=_report)


def add_demo(verbs: argparse._SubParsersAction) -> None:
    """``fscl demo [key=value ...]``."""
    demo = verbs.add_parser("demo", help="run the offline benchmark end to end (no download), then its report",
                            description=f"Run the offline default preset '{DEMO_PRESET}' end to end, then write "
                                        "its report into the runs folder.")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for 'run'")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_jobs_argument(demo, "auto")
    demo.set_defaults(func=_demo)


def _report(args: argparse.Namespace) -> int:
    """Tables, figures and report.md/.html of a runs folder (the first table across settings printed); failed or
    partial runs are listed, not averaged."""
    from reports import write_report

    paths = write_report(args.runs_dir, args.out, reference=args.reference)
    mtil = f", MTIL tables in {paths.sequence_csv.name}" if paths.sequence_csv else ""
    print(f"{paths.headline}\n\nreport: {paths.markdown}, {paths.html} ({len(paths.figures)} figure files, tables "
          f"in {paths.main_csv.name} / {paths.main_latex.name}, {paths.results_csv.name} / {paths.results_latex.name}"
          f"{mtil})")
    if paths.excluded:
        print(f"  {len(paths.excluded)} failed or partial run(s) left out; listed in the report", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The offline benchmark end to end: the default preset, then its report (its headline table printed)."""
    from benchmark.cli import run_command
    from benchmark.config import load_config
    from reports import write_report

    args.config, args.dry_run = DEMO_PRESET, False
    status = run_command(args)
    cfg = load_config(DEMO_PRESET, args.overrides)
    runs = Path(cfg.out) / cfg.name
    paths = write_report(runs, runs / "report")
    print(f"{paths.headline}\n\nreport: {paths.markdown}\n        {paths.html}")
    return status
