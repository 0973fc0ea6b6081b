"""Terminal tables: pure functions of the records (`lowformer.bench`, `lowformer.analyze`) to text.

Columns are two spaces apart with a dashed rule under the header; units are in the headers; settings
shared by every row are printed once above a table.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bench.compare import CompareReport
from ..bench.result import MODE_ORDER, BenchReport, BenchResult

# --------------------------------------------------------------------------------------------
# Layout and numbers
# --------------------------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Plain-text table: columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(wd) if r else c.ljust(wd) for c, wd, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), line(["-" * wd for wd in widths]), *(line(row) for row in rows)])


def format_number(value: float | None, fmt: str) -> str:
    """`value` in `fmt`, or "-" when there is none."""
    return "-" if value is None else format(value, fmt)


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits or more ("-" when there is none)."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def task_prefix(task: str | None) -> str:
    return "detection neck, " if task == "detection" else ""


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

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
            format_number(r.params and r.params / 1e6, ".2f"),
            format_number(r.macs and r.macs / 1e9, ".3f"),
            format_ms(r.latency_ms_p50),
            f"{format_ms(r.latency_ms_p10)}-{format_ms(r.latency_ms_p90)}" if r.ok else "-",
            format_number(r.throughput_img_s, ".1f"),
            format_number(r.peak_memory_mib, ".0f"),
        ]
        if show_mfu:
            row.append(format_number(r.mfu and 100 * r.mfu, ".1f"))
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
            f"MACs vs measured time ({task_prefix(c.get('task'))}{c['mode']}, batch {c['batch_size']}, {h}x{w}, "
            f"{c['backend']} {c['precision']}): "
            f"Spearman rho {format_number(rho, '.2f')}, Kendall tau {format_number(tau, '.2f')} "
            f"over {len(c['models'])} models"
        )
    if lines:
        lines.append("(rank correlation 1 = MACs order the models exactly as the clock does; 0 = not at all)")
    return "\n".join(lines)


def format_bench(report: BenchReport) -> str:
    """The table `lowformer bench` prints: environment, results, rank correlations, units."""
    env = report.environment
    head = f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}"
    parts = [head, format_results(report.results)]
    corr = format_correlations(report.correlations())
    if corr:
        parts.append(corr)
    units = "ms: time per forward call of the whole batch; img/s: batch / median call time"
    return "\n".join(parts) + f"\n({units})"


def format_compare(report: CompareReport) -> str:
    """The table `lowformer bench --compare` prints: every configuration, then every pair."""
    env = report.environment
    s = report.settings
    head = (
        f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}\n"
        f"paired comparison: {s['rounds']} rounds, order alternating (A B ... | ... B A), "
        f"{task_prefix(s.get('task'))}batch {s['batch_size']}, {s['image_size'][0]}x{s['image_size'][1]}"
    )
    headers = ["", "configuration", "ms p50", "ms p10-p90", "round medians ms (min-max)", "img/s", "status"]
    rows = []
    for tag, e in zip(report.tags, report.entries):
        medians = e.round_medians_ms
        spread = f"{format_ms(min(medians))}-{format_ms(max(medians))}" if medians else "-"
        rows.append(
            [
                tag,
                e.label,
                format_ms(e.latency_ms_p50),
                f"{format_ms(e.latency_ms_p10)}-{format_ms(e.latency_ms_p90)}" if e.ok else "-",
                spread,
                format_number(e.throughput_img_s, ".1f"),
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
