"""Reports: run records → pandas tables (mean ± std, paired tests), figures, Markdown/HTML."""
