"""The convert and inspect pipelines: selection, planning, rewriting, reporting."""
