"""Figures: pure functions of the records (`lowformer.bench`, `lowformer.analyze`) to PNG files.

Drawn with matplotlib's Agg canvas (no display, no change to the global backend) and written
through `lowformer._io.atomic_write`, so a reader never sees half a figure.

- `plot_bench`: counted MACs against measured throughput / latency, one panel per comparable group.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .._io import atomic_write
from ..bench.result import BenchReport, comparable_groups, correlation_group_key
from .tables import format_number, task_prefix


def figure(width: float, height: float, dpi: int = 100):
    """A matplotlib figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike, palette: bool = False) -> Path:
    """Write `fig` as a PNG, atomically; with `palette`, as a 256-colour PNG.

    NOTE: analysis figures are flat colours and text, so a palette loses nothing visible and makes
    the file about 3x smaller than matplotlib's RGBA output, which matters for reports committed to
    a repository.
    """
    if not palette:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    with Image.open(buf) as image:
        shrunk = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    return atomic_write(path, lambda tmp: shrunk.save(tmp, format="PNG", optimize=True))


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def plot_bench(report: BenchReport, path: str | os.PathLike, max_panels: int = 4) -> Path:
    """Scatter of counted MACs against measured throughput / latency, one panel per comparable group
    (`lowformer bench --plot`)."""
    return save_png(_macs_vs_speed(report, max_panels), path)


def plot_models(report, path: str | os.PathLike) -> Path:
    """The MACs-vs-speed scatter of a model set (`lowformer analyze models`; a `ModelsReport`), as a
    256-colour PNG like the other analysis figures."""
    return save_png(_macs_vs_speed(report.bench, max_panels=4), path, palette=True)


def _macs_vs_speed(report: BenchReport, max_panels: int):
    groups = list(comparable_groups(report.results).items())[:max_panels]
    if not groups:
        raise ValueError("no successful results with a MAC count to plot")
    corr = {correlation_group_key(c): c for c in report.correlations()}
    fig = figure(5.2 * len(groups), 4.4)
    styles = {"lowformer": ("tab:orange", "ours"), "timm": ("tab:blue", "timm"), "module": ("tab:green", "module")}
    for i, (key, rs) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        throughput = key[0] == "throughput"
        for source, (color, name) in styles.items():
            pts = [r for r in rs if r.source == source]
            if not pts:
                continue
            x = [r.macs / 1e9 for r in pts]
            if throughput:
                ax.scatter(x, [r.throughput_img_s for r in pts], color=color, label=name, zorder=3)
            else:
                y = [r.latency_ms_p50 for r in pts]
                below = [r.latency_ms_p50 - r.latency_ms_p10 for r in pts]
                above = [r.latency_ms_p90 - r.latency_ms_p50 for r in pts]
                ax.errorbar(x, y, yerr=[below, above], fmt="o", color=color, label=name, capsize=2, zorder=3)
        values = [r.throughput_img_s if throughput else r.latency_ms_p50 for r in rs]
        log_y = max(values) > 20 * min(values)  # one outlier would flatten everything else
        if log_y:
            ax.set_yscale("log")
        offsets = _label_offsets([r.macs for r in rs], values, log_y)
        for r, y, dy in zip(rs, values, offsets):
            label = r.model.removeprefix("timm:")
            ax.annotate(label, (r.macs / 1e9, y), textcoords="offset points", xytext=(4, dy), fontsize=7)
        ax.set_xlabel("GMACs per image (counted)")
        ax.set_ylabel("throughput, img/s (higher is faster)" if throughput else "latency p50, ms (p10-p90 bars)")
        c = corr.get(key)
        rho = f"\nSpearman rho(MACs, time) = {format_number(c['spearman_macs_latency'], '.2f')}" if c else ""
        ax.set_title(_group_title(key) + rho, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    env = report.environment
    fig.suptitle(f"MACs vs measured speed: {env['device_name']} ({env['device']}), {env['date'][:10]}", fontsize=10)
    return fig


def _label_offsets(xs: Sequence[float], ys: Sequence[float], log_y: bool) -> list[int]:
    """Vertical label offsets (points) that step down where labels of nearby points would overlap."""
    ys = [math.log10(y) for y in ys] if log_y else list(ys)

    def norm(v):
        lo, hi = min(v), max(v)
        return [(a - lo) / ((hi - lo) or 1.0) for a in v]

    nx, ny = norm(xs), norm(ys)
    offsets: list[int] = []
    for i in range(len(nx)):
        dy = 3
        while any(abs(nx[i] - nx[j]) < 0.15 and abs(ny[i] - ny[j]) < 0.06 and offsets[j] == dy for j in range(i)):
            dy -= 10
        offsets.append(dy)
    return offsets


def _group_key_from_corr(c: dict) -> tuple:
    h, w = c["image_size"]
    keys = ("backend", "precision", "channels_last", "reparam", "threads", "jobs")
    return (c["mode"], c["batch_size"], h, w, *(c[k] for k in keys), c.get("task", "classification"))


def _group_title(key: tuple) -> str:
    mode, bs, h, w, backend, precision, channels_last, reparam, threads, jobs, task = key
    parts = [f"{task_prefix(task)}{mode}, batch {bs}, {h}x{w}, {backend} {precision}"]
    if channels_last:
        parts.append("channels_last")
    if reparam:
        parts.append("reparam")
    if threads:
        parts.append(f"{threads} threads")
    if jobs > 1:
        parts.append(f"{jobs} jobs")
    return ", ".join(parts)
