"""Reports: run records → pandas tables (mean ± std, paired tests), matplotlib figures, Markdown/HTML.

Python entry points: :func:`load_runs` (tidy scores frame), :func:`scan_runs` (all frames of
a runs folder), :func:`filter_runs`, :func:`results_table`, :func:`paired_test` and
:func:`write_report` (what ``fscl report`` does).
"""
from reports.frame import ReportError, RunSet, filter_runs, load_runs, scan_runs
from reports.report import ReportPaths, write_report
from reports.tables import paired_test, results_table

__all__ = ["ReportError", "ReportPaths", "RunSet", "filter_runs", "load_runs", "paired_test", "results_table",
           "scan_runs", "write_report"]
