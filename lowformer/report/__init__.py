"""Readable output of the records that `lowformer.bench` and `lowformer.analyze` produce: terminal
tables (`tables`), figures (`plots`) and the markdown report of an analysis folder (`markdown`).
Pure functions of records; the CLI composes them. Records never import this package."""

from .plots import plot_bench
from .tables import format_bench, format_compare, render_table

__all__ = ["format_bench", "format_compare", "plot_bench", "render_table"]
