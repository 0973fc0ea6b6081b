"""Figures: pure functions of the records (`lowformer.bench`, `lowformer.analyze`) to PNG files.

Drawn with matplotlib's Agg canvas (no display, no change to the global backend) and written
through `lowformer._io.atomic_write`, so a reader never sees half a figure.

- `plot_bench`, `plot_models`: counted MACs against measured throughput / latency, one panel per
  comparable group.
- `plot_element_heatmaps`: per design-element pair, time ratio | MAC ratio over the grid.
- `plot_profile`: time share against MAC share per operator kind, as bars.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .._io import atomic_write
from ..analyze.cells import element_rows
from ..analyze.models import ModelsReport
from ..bench.result import BenchReport, comparable_groups, correlation_group_key
from .tables import SHORT_STATUS, format_number, format_ratio, task_prefix

BLUE_RED = "RdBu_r"  # blue: the first side is cheaper (ratio < 1); red: it costs more


def figure(width: float, height: float, dpi: int = 100):
    """A matplotlib figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, palette: bool = False) -> Path:
    """Write `fig` atomically, in the format its suffix names (PNG without one); with `palette`, a
    PNG gets 256 colours.

    NOTE: analysis figures are flat colours and text, so a palette loses nothing visible and makes
    the file about 3x smaller than matplotlib's RGBA output, which matters for reports committed to
    a repository.
    """
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if not palette or fmt != "png":
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))
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
    return save_figure(_macs_vs_speed(report, max_panels), path)


def plot_models(report: ModelsReport, path: str | os.PathLike) -> Path:
    """The MACs-vs-speed scatter of a model set (`lowformer analyze models`; a `ModelsReport`), as a
    256-colour PNG like the other analysis figures."""
    return save_figure(_macs_vs_speed(report.bench, max_panels=4), path, palette=True)


def _macs_vs_speed(report: BenchReport, max_panels: int):
    groups = list(comparable_groups(report.results).items())[:max_panels]
    if not groups:
        raise ValueError("no successful results with a MAC count to plot")
    corr = {correlation_group_key(c): c for c in report.correlations()}
    fig = figure(5.2 * len(groups), 4.4)
    styles = {"lowformer": ("tab:orange", "ours"), "timm": ("tab:blue", "timm"), "module": ("tab:green", "module")}
    for i, (key, rs) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        throughput = key[0] == "throughput"  # group_key starts with the mode
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


def _group_title(key: tuple) -> str:
    """The title of a comparable group (`lowformer.bench.result.group_key`)."""
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


# --------------------------------------------------------------------------------------------
# Analyses
# --------------------------------------------------------------------------------------------

_NICE_RATIOS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 20.0)
_DECADES = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def plot_element_heatmaps(data: dict, out_dir: str | Path, stem: str = "elements", dpi: int = 100) -> list[Path]:
    """`<stem>_<pair>.png` for every pair of a sweep (`ElementReport.to_dict()` or its JSON): per
    comparison, time ratio | MAC ratio side by side over the channels x resolution grid, on one
    diverging colour scale centred at 1 (log scale, so 2x and 0.5x are equally strong), cells where
    MACs and time pick different sides framed and starred; unmeasured cells grey with the reason."""
    import numpy as np
    from matplotlib.colors import LogNorm

    out_dir = Path(out_dir)
    channels = data["settings"]["channels"]
    resolutions = data["settings"]["resolutions"]
    env, settings = data["environment"], data["settings"]
    all_rows = element_rows(data)
    paths = []
    for pair in data["pairs"]:
        rows = [r for r in all_rows if r["pair"] == pair["name"]]
        if not rows:
            continue
        others = [s["label"] for s in pair["sides"][1:]]
        a = pair["sides"][0]["label"]
        n_rows = len(others)
        cell_w = 0.62 if len(resolutions) > 3 else 0.8
        width = max(8.0, 2 * (cell_w * len(resolutions) + 1.3) + 1.2)
        height = n_rows * (0.42 * len(channels) + 1.1) + 0.9
        fig = figure(width, height, dpi)
        axes = fig.subplots(n_rows, 2, squeeze=False)
        for i, b in enumerate(others):
            by_cell = {(r["channels"], r["resolution"]): r for r in rows if r["side_b"] == b}
            grids = {}
            for col in ("time_ratio", "mac_ratio"):
                g = np.full((len(channels), len(resolutions)), np.nan)
                for (ci, c), (ri, res) in ((x, y) for x in enumerate(channels) for y in enumerate(resolutions)):
                    row = by_cell.get((c, res))
                    value = row.get(col) if row else None
                    # MACs are counted for every cell, times only for measured ones
                    measured = row is not None and (row["status"] == "ok" or col == "mac_ratio")
                    if measured and value is not None and value > 0:
                        g[ci, ri] = value
                grids[col] = g
            finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
            spread = float(np.max(np.abs(np.log10(finite)))) if finite.size else 0.0
            limit = 10 ** max(spread, math.log10(2.0))  # at least 0.5x..2x, so noise near 1 stays pale
            norm = LogNorm(vmin=1 / limit, vmax=limit)
            for j, (col, title) in enumerate((("time_ratio", "time"), ("mac_ratio", "MACs"))):
                ax = axes[i][j]
                g = grids[col]
                masked = np.ma.masked_invalid(g)
                ax.set_facecolor("#d9d9d9")
                im = ax.imshow(masked, cmap=BLUE_RED, norm=norm, aspect="auto")
                ax.set_xticks(range(len(resolutions)), [str(r) for r in resolutions])
                ax.set_yticks(range(len(channels)), [str(c) for c in channels])
                ax.set_xlabel("resolution (px)")
                ax.set_ylabel("channels")
                ax.set_title(f"{title}({a}) / {title}({b})", fontsize=9)
                for ci, c in enumerate(channels):
                    for ri, res in enumerate(resolutions):
                        row = by_cell.get((c, res))
                        if row is None:
                            continue
                        if row["status"] != "ok" and col == "time_ratio":
                            text = SHORT_STATUS.get(row["status"], row["status"])
                            ax.text(ri, ci, text, ha="center", va="center", fontsize=6, color="#555555")
                            continue
                        value = g[ci, ri]
                        if not np.isfinite(value):
                            continue
                        dark = abs(math.log10(value)) > 0.6 * math.log10(limit)
                        star = "*" if row.get("disagree") else ""
                        ax.text(
                            ri,
                            ci,
                            format_ratio(float(value)) + star,
                            ha="center",
                            va="center",
                            fontsize=6.5,
                            color="white" if dark else "black",
                            fontweight="bold" if star else "normal",
                        )
                        if star:
                            ax.add_patch(_frame(ri, ci))
            cbar = fig.colorbar(im, ax=list(axes[i]), shrink=0.9, pad=0.02)
            nice = _NICE_RATIOS if limit <= 20 else _DECADES  # fine ticks would crowd a wide scale
            ticks = [t for t in nice if 1 / limit <= t <= limit]
            cbar.ax.minorticks_off()
            cbar.set_ticks(ticks, labels=[format_ratio(t) for t in ticks])
            cbar.set_label(f"{a} / {b}", fontsize=8)
            cbar.ax.tick_params(labelsize=7)
        mode = f"{settings['mode']}, batch {settings['batch_size']}"
        layout = "channels_last" if settings["channels_last"] else "NCHW"
        fig.suptitle(
            f"{pair['name']}: {pair['description']}\n{env.get('device_name')} ({settings['device']}), {mode}, "
            f"{settings['backend']} {settings['precision']} {layout}, {env.get('date', '')[:10]}\n"
            f"ratio < 1 (blue): the first side ({a}) is cheaper;  * framed: MACs and time pick different sides",
            fontsize=8,
        )
        paths.append(save_figure(fig, out_dir / f"{stem}_{pair['name']}.png", palette=True))
    return paths


def _frame(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.46, y - 0.46), 0.92, 0.92, fill=False, edgecolor="black", linewidth=1.5)


def plot_profile(data: dict, path: str | Path, dpi: int = 100) -> Path:
    """Bars of time share against MAC share per operator kind (`ModelProfile.to_dict()` or its JSON)."""
    kinds = [k for k in data["kinds"] if k["time_share"] > 0.0005 or k["mac_share"] > 0.0005]
    fig = figure(7.0, 0.45 * len(kinds) + 1.6, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(kinds)))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], [100 * k["time_share"] for k in kinds], h, label="share of time", color="tab:red")
    ax.barh([y + h / 2 for y in ys], [100 * k["mac_share"] for k in kinds], h, label="share of MACs", color="tab:blue")
    for y, k in zip(ys, kinds):
        ax.text(100 * k["time_share"] + 0.5, y - h / 2, f"{100 * k['time_share']:.1f}%", va="center", fontsize=7)
        ax.text(100 * k["mac_share"] + 0.5, y + h / 2, f"{100 * k['mac_share']:.1f}%", va="center", fontsize=7)
    ax.set_yticks(ys, [k["label"] for k in kinds])
    ax.invert_yaxis()
    ax.set_xlabel("% of profiled operator time / % of counted MACs")
    ax.set_xlim(0, 105)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    s, env = data["settings"], data["environment"]
    layout = "channels_last" if s["channels_last"] else "NCHW"
    ax.set_title(
        f"{data['model']}: time vs MACs per operator kind\n{env.get('device_name')} ({s['device']}), batch "
        f"{s['batch_size']}, {s['image_size'][0]}x{s['image_size'][1]}, eager {s['precision']} {layout}, "
        f"{data['wall_ms_p50']:.2f} ms per call, {env.get('date', '')[:10]}",
        fontsize=9,
    )
    return save_figure(fig, path, palette=True)


# --------------------------------------------------------------------------------------------
# Roofline and predictions
# --------------------------------------------------------------------------------------------

_KIND_COLORS = {
    "dense_conv": "tab:blue",
    "depthwise_conv": "tab:orange",
    "transposed_conv": "tab:olive",
    "linear": "tab:cyan",
    "attention": "tab:red",
    "norm": "tab:purple",
    "activation": "tab:green",
    "reshape_copy": "tab:gray",
    "other": "tab:brown",
}


def plot_roofline(data: dict, path: str | Path, dpi: int = 100) -> Path:
    """The roofline of one profiled model (`ModelProfile.to_dict()` with its roofline): every operator
    call at its arithmetic intensity (FLOPs per byte moved) and achieved FLOP/s, coloured by kind and
    sized by its time, under the measured compute ceiling and the bandwidth slope. Calls without
    FLOPs or bytes (views, copies) have no place on it and are counted in the legend."""
    import numpy as np

    from ..analyze.opkinds import KINDS

    roof = data["roofline"]
    c = roof["ceilings"]
    ops = [o for o in roof["ops"] if o["flops"] and o["bytes"] and o["time_ms"]]
    fig = figure(7.5, 5.2, dpi)
    ax = fig.add_subplot(1, 1, 1)
    intensities = [o["intensity"] for o in ops] or [c["flops_per_s"] / c["bytes_per_s"]]
    lo, hi = min(intensities + [0.05]) / 2, max(intensities + [200.0]) * 2
    x = np.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(x, np.minimum(c["flops_per_s"], x * c["bytes_per_s"]), color="black", linewidth=1.5, zorder=2)
    ridge = c["flops_per_s"] / c["bytes_per_s"]
    ax.annotate(
        f"compute ceiling {c['flops_per_s'] / 1e9:.0f} GFLOP/s",
        (hi, c["flops_per_s"]),
        xytext=(-4, 4),
        textcoords="offset points",
        ha="right",
        fontsize=7,
    )
    ax.annotate(
        f"bandwidth {c['bytes_per_s'] / 1e9:.0f} GB/s",
        (lo * 1.2, lo * 1.2 * c["bytes_per_s"]),
        xytext=(2, 6),
        textcoords="offset points",
        fontsize=7,
        rotation=30,
    )
    ax.axvline(ridge, color="black", linestyle=":", linewidth=0.8, zorder=1)
    total = sum(o["time_ms"] for o in ops) or 1.0
    for kind, color in _KIND_COLORS.items():
        pts = [o for o in ops if o["kind"] == kind]
        if not pts:
            continue
        share = sum(o["time_ms"] for o in pts) / total
        ax.scatter(
            [o["intensity"] for o in pts],
            [o["achieved_flops_per_s"] for o in pts],
            s=[8 + 400 * o["time_ms"] / total for o in pts],
            color=color,
            alpha=0.6,
            edgecolors="none",
            label=f"{KINDS.get(kind, kind)} ({100 * share:.0f}% of time)",
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity, FLOPs per byte moved (compulsory traffic)")
    ax.set_ylabel("achieved FLOP/s")
    ax.grid(alpha=0.3, which="both")
    left_out = len(roof["ops"]) - len(ops)
    ax.legend(
        fontsize=7, loc="lower right", title=f"{left_out} calls without FLOPs or bytes not shown", title_fontsize=7
    )
    s, env = data["settings"], data["environment"]
    ax.set_title(
        f"{data['model']}: roofline, batch {s['batch_size']}, {s['image_size'][0]}x{s['image_size'][1]}, eager "
        f"{s['precision']}\n{env.get('device_name')} ({s['device']}, {s['threads']} thread"
        f"{'s' * (s['threads'] != 1)}), {env.get('date', '')[:10]}; point size: share of profiled time",
        fontsize=9,
    )
    return save_figure(fig, path, palette=True)


def plot_predictions(data: dict, path: str | Path, dpi: int = 100) -> Path:
    """Per mode of a model set (`ModelsReport.to_dict()`), measured time against MACs (left) and against
    the latency model's prediction (right), both log-log, each with its Spearman rho."""
    import numpy as np

    judgement = data.get("judgement") or []
    predicted = {(p["model"], p["batch_size"]): p["predicted_ms"] for p in data.get("predictions", [])}
    results = [r for r in data["bench"]["results"] if r["status"] == "ok" and r.get("latency_ms_p50")]
    groups = [j for j in judgement if "spearman_predicted" in j]
    if not groups:
        raise ValueError("no mode with predictions to plot")
    fig = figure(10.0, 4.2 * len(groups), dpi)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, j in enumerate(groups):
        rs = [r for r in results if r["mode"] == j["mode"] and r["batch_size"] == j["batch_size"]]
        measured = [r["latency_ms_p50"] for r in rs]
        for col, (xs, label, rho) in enumerate(
            (
                ([r["macs"] / 1e9 for r in rs], "GMACs per image (counted)", j.get("spearman_macs")),
                (
                    [predicted[(r["model"], r["batch_size"])] for r in rs],
                    "predicted ms per call",
                    j["spearman_predicted"],
                ),
            )
        ):
            ax = axes[row][col]
            colors = ["tab:orange" if r["source"] == "lowformer" else "tab:blue" for r in rs]
            ax.scatter(xs, measured, c=colors, zorder=3, s=18)
            for x, y, r in zip(xs, measured, rs):
                ax.annotate(
                    r["model"].removeprefix("timm:"), (x, y), xytext=(3, 2), textcoords="offset points", fontsize=6
                )
            if col == 1:
                lo, hi = min(xs + measured) / 1.3, max(xs + measured) * 1.3
                line = np.array([lo, hi])
                ax.plot(line, line, color="black", linewidth=1, zorder=2)
                ax.fill_between(line, line / 1.25, line * 1.25, color="gray", alpha=0.15, zorder=1)
                title = f"prediction: rho {format_number(rho, '.2f')}, median error {100 * j['median_abs_error']:.0f}%"
            else:
                title = f"MACs: rho {format_number(rho, '.2f')}"
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_xlabel(label)
            ax.set_ylabel(f"measured ms per call ({j['mode']}, batch {j['batch_size']})")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, which="both")
    env = data["bench"]["environment"]
    fig.suptitle(
        f"Measured time against MACs and against the latency model: {env['device_name']} ({env['device']}), "
        f"{env['date'][:10]} (grey band: within 25%; orange: ours, blue: timm)",
        fontsize=9,
    )
    return save_figure(fig, path, palette=True)


def _plain_log_ticks(ax) -> None:
    """Log axes labelled 0.5, 2, 20 rather than 5x10^-1: a model set spans a decade or two."""
    from matplotlib.ticker import FuncFormatter

    def major(v, _):
        return f"{v:g}"

    def minor(v, _):
        lead = v / 10 ** math.floor(math.log10(v))
        return f"{v:g}" if round(lead) in (2, 5) else ""

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(major))
        axis.set_minor_formatter(FuncFormatter(minor))
        axis.set_tick_params(which="minor", labelsize=6)
