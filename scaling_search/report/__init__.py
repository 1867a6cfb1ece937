"""A study's report: its data, its figures, the offline page and the live dashboard."""
