"""Readable output of a benchmark: the text table, MACs-vs-time rank correlations, and the plot."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..measure import stats

if TYPE_CHECKING:
    from .compare import CompareReport
    from .result import BenchReport, BenchResult

MODE_ORDER = {"throughput": 0, "latency": 1}


def _group_key(r: BenchResult) -> tuple:
    """Results comparable across models: same everything except the model."""
    return (
        r.mode,
        r.batch_size,
        r.image_height,
        r.image_width,
        r.backend,
        r.precision,
        r.channels_last,
        r.reparam,
        r.threads,
        r.jobs,
        r.task,
    )


def _groups(results: Sequence[BenchResult]) -> dict[tuple, list[BenchResult]]:
    groups: dict[tuple, list[BenchResult]] = {}
    for r in sorted(results, key=lambda r: MODE_ORDER.get(r.mode, 9)):
        if r.ok and r.macs:
            groups.setdefault(_group_key(r), []).append(r)
    return groups


def _group_title(key: tuple) -> str:
    mode, bs, h, w, backend, precision, channels_last, reparam, threads, jobs, task = key
    parts = [f"{_task_prefix(task)}{mode}, batch {bs}, {h}x{w}, {backend} {precision}"]
    if channels_last:
        parts.append("channels_last")
    if reparam:
        parts.append("reparam")
    if threads:
        parts.append(f"{threads} threads")
    if jobs > 1:
        parts.append(f"{jobs} jobs")
    return ", ".join(parts)


def correlations(results: Sequence[BenchResult]) -> list[dict]:
    """Rank correlation of counted MACs with measured time (latency_ms_p50), per comparable group.

    1.0 means MACs order the models exactly as the clock does; groups of fewer than 3 models are
    left out. (Throughput is batch / time, so its correlation is the same with the sign flipped.)
    """
    out = []
    for key, rs in _groups(results).items():
        if len(rs) < 3:
            continue
        macs = [float(r.macs) for r in rs]
        times = [r.latency_ms_p50 for r in rs]
        mode, bs, h, w, backend, precision, channels_last, reparam, threads, jobs, task = key
        out.append(
            {
                "task": task,
                "mode": mode,
                "batch_size": bs,
                "image_size": [h, w],
                "backend": backend,
                "precision": precision,
                "channels_last": channels_last,
                "reparam": reparam,
                "threads": threads,
                "jobs": jobs,
                "models": [r.model for r in rs],
                "spearman_macs_latency": stats.spearman(macs, times),
                "kendall_macs_latency": stats.kendall(macs, times),
            }
        )
    return out


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Plain-text table: columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(wd) if r else c.ljust(wd) for c, wd, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), line(["-" * wd for wd in widths]), *(line(row) for row in rows)])


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


_REPARAM_SHORT = {"timm.utils.reparameterize_model": "timm", "lowformer.deploy": "deploy", "none-available": "none"}


def format_results(results: Sequence[BenchResult]) -> str:
    """The results table. Settings shared by every row are printed once above it."""
    rows = sorted(results, key=lambda r: MODE_ORDER.get(r.mode, 9))
    config_cols = {
        "task": [r.task for r in rows],
        "mode": [r.mode for r in rows],
        "batch": [str(r.batch_size) for r in rows],
        "image": [f"{r.image_height}x{r.image_width}" for r in rows],
        "backend": [r.backend for r in rows],
        "precision": [r.precision for r in rows],
        "layout": ["channels_last" if r.channels_last else "NCHW" for r in rows],
        "reparam": [_REPARAM_SHORT.get(r.reparam_applied, "on") if r.reparam else "off" for r in rows],
        "threads": [str(r.threads) for r in rows],
        "jobs": [str(r.jobs) for r in rows],
    }
    if all(t == "classification" for t in config_cols["task"]):
        del config_cols["task"]  # the classic run: nothing to say
    varying = [k for k, v in config_cols.items() if len(set(v)) > 1 or k in ("mode", "batch")]
    shared = [f"{k} {v[0]}" for k, v in config_cols.items() if k not in varying and v]
    show_mfu = any(r.mfu is not None for r in rows)
    show_status = any(not r.ok for r in rows)
    headers = ["model", *varying, "params M", "GMACs", "ms p50", "ms p10-p90", "img/s", "peak MiB"]
    headers += ["MFU %"] * show_mfu + ["status"] * show_status
    right = [False] + [k in ("batch", "threads", "jobs") for k in varying] + [True] * 6 + [True] * show_mfu
    right += [False] * show_status
    notes = []
    table_rows = []
    for i, r in enumerate(rows):
        row = [r.model, *(config_cols[k][i] for k in varying)]
        row += [
            _num(r.params and r.params / 1e6, ".2f"),
            _num(r.macs and r.macs / 1e9, ".3f"),
            _ms(r.latency_ms_p50),
            f"{_ms(r.latency_ms_p10)}-{_ms(r.latency_ms_p90)}" if r.ok else "-",
            _num(r.throughput_img_s, ".1f"),
            _num(r.peak_memory_mib, ".0f"),
        ]
        if show_mfu:
            row.append(_num(r.mfu and 100 * r.mfu, ".1f"))
        if show_status:
            if r.ok:
                row.append("ok")
            else:
                notes.append(f"[{len(notes) + 1}] {r.model} {r.mode} batch {r.batch_size}: {r.error}")
                row.append(f"{r.status} [{len(notes)}]")
        table_rows.append(row)
    parts = []
    if shared:
        parts.append("all rows: " + ", ".join(shared))
    parts.append(render_table(headers, table_rows, right))
    parts.extend(notes)
    return "\n".join(parts)


def format_correlations(corrs: Sequence[dict]) -> str:
    lines = []
    for c in corrs:
        h, w = c["image_size"]
        rho, tau = c["spearman_macs_latency"], c["kendall_macs_latency"]
        lines.append(
            f"MACs vs measured time ({_task_prefix(c.get('task'))}{c['mode']}, batch {c['batch_size']}, {h}x{w}, "
            f"{c['backend']} {c['precision']}): "
            f"Spearman rho {_num(rho, '.2f')}, Kendall tau {_num(tau, '.2f')} over {len(c['models'])} models"
        )
    if lines:
        lines.append("(rank correlation 1 = MACs order the models exactly as the clock does; 0 = not at all)")
    return "\n".join(lines)


def format_report(report: BenchReport) -> str:
    env = report.environment
    head = f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}"
    parts = [head, format_results(report.results)]
    corr = format_correlations(report.correlations())
    if corr:
        parts.append(corr)
    units = "ms: time per forward call of the whole batch; img/s: batch / median call time"
    return "\n".join(parts) + f"\n({units})"


def format_compare(report: CompareReport) -> str:
    env = report.environment
    s = report.settings
    head = (
        f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}\n"
        f"paired comparison: {s['rounds']} rounds, order alternating (A B ... | ... B A), "
        f"{_task_prefix(s.get('task'))}batch {s['batch_size']}, {s['image_size'][0]}x{s['image_size'][1]}"
    )
    headers = ["", "configuration", "ms p50", "ms p10-p90", "round medians ms (min-max)", "img/s", "status"]
    rows = []
    for tag, e in zip(report.tags, report.entries):
        spread = f"{_ms(min(e.round_medians_ms))}-{_ms(max(e.round_medians_ms))}" if e.round_medians_ms else "-"
        rows.append(
            [
                tag,
                e.label,
                _ms(e.latency_ms_p50),
                f"{_ms(e.latency_ms_p10)}-{_ms(e.latency_ms_p90)}" if e.ok else "-",
                spread,
                _num(e.throughput_img_s, ".1f"),
                "ok" if e.ok else f"{e.status}: {e.error}",
            ]
        )
    table = render_table(headers, rows, [False, False, True, True, True, True, False])
    pair_rows = [
        [
            f"{p.b_tag} vs {p.a_tag}",
            f"{p.speedup_median:.3f}x",
            f"{p.speedup_min:.3f}x",
            f"{p.speedup_max:.3f}x",
            str(p.rounds),
            p.verdict,
        ]
        for p in report.pairs
    ]
    pairs = render_table(
        ["pair", "speedup median", "min", "max", "rounds", "verdict"],
        pair_rows,
        [False, True, True, True, True, False],
    )
    legend = "speedup = time(first) / time(second) per round; > 1 means the second is faster"
    return "\n".join([head, table, "", pairs, f"({legend})"])


def plot_macs_vs_speed(report: BenchReport, path: str | os.PathLike, max_panels: int = 4) -> Path:
    """Scatter of counted MACs against measured throughput / latency, one panel per comparable group.

    Written with matplotlib's Agg canvas (no display, no change to the global backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(_groups(report.results).items())[:max_panels]
    if not groups:
        raise ValueError("no successful results with a MAC count to plot")
    corr = {_group_key_from_corr(c): c for c in report.correlations()}
    fig = Figure(figsize=(5.2 * len(groups), 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
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
        rho = f"\nSpearman rho(MACs, time) = {_num(c['spearman_macs_latency'], '.2f')}" if c else ""
        ax.set_title(_group_title(key) + rho, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    env = report.environment
    fig.suptitle(f"MACs vs measured speed: {env['device_name']} ({env['device']}), {env['date'][:10]}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


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


def _task_prefix(task: str | None) -> str:
    return "detection neck, " if task == "detection" else ""
