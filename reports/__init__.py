"""Reports: run records → pandas tables (mean ± std, paired tests), matplotlib figures, Markdown/HTML.

Python entry points: :func:`load_runs` (tidy scores frame), :func:`scan_runs` (all frames of
a runs folder), :func:`filter_runs`, :func:`results_table`, :func:`paired_test` and
:func:`write_report` (what ``fscl report`` does). They are imported on first use, so that the
command line's verbs (:mod:`reports.commands`) load no pandas until they run.
"""
from benchmark.lazy import lazy_exports

__all__ = ["ReportError", "ReportPaths", "RunSet", "filter_runs", "load_runs", "paired_test", "results_table",
           "scan_runs", "write_report"]
__getattr__ = lazy_exports(__name__, {
    **dict.fromkeys(["ReportError", "RunSet", "filter_runs", "load_runs", "scan_runs"], "reports.frame"),
    **dict.fromkeys(["ReportPaths", "write_report"], "reports.report"),
    **dict.fromkeys(["paired_test", "results_table"], "reports.tables"),
})
