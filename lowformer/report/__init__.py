"""Readable output of the records that `lowformer.bench` and `lowformer.analyze` produce: terminal
tables (`tables`), figures (`plots`) and the markdown report of an analysis folder (`markdown`).
Pure functions of records; the CLI composes them. Records never import this package."""

from .markdown import write_report
from .plots import plot_bench, plot_element_heatmaps, plot_models, plot_predictions, plot_profile, plot_roofline
from .tables import (
    format_bench,
    format_calibration,
    format_compare,
    format_elements,
    format_models,
    format_predictions,
    format_profile,
    format_roofline,
    render_table,
)

__all__ = [
    "format_bench",
    "format_calibration",
    "format_compare",
    "format_elements",
    "format_models",
    "format_predictions",
    "format_profile",
    "format_roofline",
    "plot_bench",
    "plot_element_heatmaps",
    "plot_models",
    "plot_predictions",
    "plot_profile",
    "plot_roofline",
    "render_table",
    "write_report",
]
