"""Terminal tables: pure functions of the records (`lowformer.bench`, `lowformer.analyze`) to text.

Columns are two spaces apart with a dashed rule under the header; units are in the headers; settings
shared by every row are printed once above a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..analyze.cells import comparisons, summarize_comparison
from ..bench.compare import CompareReport
from ..bench.result import MODE_ORDER, BenchReport, BenchResult
from ..measure.calibrate import FRESH_PAGES_ABOVE

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


def format_bytes(n: float) -> str:
    """A size in binary units ("48 KiB", "2 MiB")."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits or more ("-" when there is none)."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def task_prefix(task: str | None) -> str:
    return {"detection": "detection neck, ", "segmentation": "segmentation, "}.get(task or "", "")


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


# --------------------------------------------------------------------------------------------
# Design elements
# --------------------------------------------------------------------------------------------

# the short word an unmeasured cell shows in a grid
SHORT_STATUS = {"skipped": "skip", "not-run": "not run", "error": "error", "oom": "OOM"}


def format_ratio(v: float | None) -> str:
    """Ratios in cells and tables: 2 decimals near 1, 2 significant digits when small, none when large."""
    if v is None or not math.isfinite(v):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.2g}"


def verdict(s: dict) -> str:
    """One sentence: what MACs say, what the clock says, where they disagree."""
    if not s["measured"]:
        return "no cell measured"
    a, b, n = s["side_a"], s["side_b"], s["measured"]
    if s["mac_tie"] == n:
        macs = f"MACs call {a} and {b} equal in all {n} measured cells"
    else:
        parts = [f"{a} in {s['fewer_macs_a']}", f"{b} in {s['fewer_macs_b']}"]
        if s["mac_tie"]:
            parts.append(f"equal in {s['mac_tie']}")
        macs = f"fewer MACs: {', '.join(parts)} of {n} cells"
        macs += f" (MAC ratio {format_ratio(s['mac_ratio_min'])}-{format_ratio(s['mac_ratio_max'])})"
    clock = (
        f"faster in every round: {a} in {s['faster_a']}, {b} in {s['faster_b']}, neither in {s['time_tie']}"
        f" (time ratio {format_ratio(s['time_ratio_min'])}-{format_ratio(s['time_ratio_max'])})"
    )
    text = f"{macs}; {clock}; MACs and time pick different sides in {s['disagree']} of {n} cells"
    if s["mac_error_median"] is not None and s["mac_tie"] != n:
        text += f"; median (time ratio / MAC ratio) {format_ratio(s['mac_error_median'])}"
    return text


def cell_text(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok" or row.get("time_ratio") is None:
        return SHORT_STATUS.get(row["status"], row["status"])
    star = "*" if row.get("disagree") else ""
    return f"{format_ratio(row['time_ratio'])}/{format_ratio(row.get('mac_ratio'))}{star}"


def ratio_grid(rows: Sequence[dict], channels: Sequence[int], resolutions: Sequence[int]) -> list[list[str]]:
    by_cell = {(r["channels"], r["resolution"]): r for r in rows}
    return [[str(c), *(cell_text(by_cell.get((c, res))) for res in resolutions)] for c in channels]


def settings_line(data: dict) -> str:
    s, env = data["settings"], data["environment"]
    layout = "channels_last" if s["channels_last"] else "NCHW"
    cap = f"{s['max_gmacs']:g} GMACs per call" if s.get("max_gmacs") is not None else "none"
    return (
        f"{env.get('device_name')} ({s['device']}), torch {env.get('torch')}, {env.get('date')}; "
        f"{s['mode']} (batch {s['batch_size']}), {s['backend']} {s['precision']} {layout}, threads {s['threads']}; "
        f"MAC cap {cap}"
    )


def format_elements(data: dict) -> str:
    """The terminal table of a sweep: per comparison, a channels x resolution grid of ratios."""
    s = data["settings"]
    lines = [settings_line(data)]
    lines.append("cells: time ratio / MAC ratio of the first side to the other (< 1: first side cheaper); ")
    lines[-1] += "* = MACs and time pick different sides"
    for pair, b, rows in comparisons(data):
        a = pair["sides"][0]["label"]
        lines.append("")
        lines.append(f"{pair['name']}: {a} vs {b}  ({pair['description']})")
        headers = ["channels", *(f"{r}px" for r in s["resolutions"])]
        table = render_table(headers, ratio_grid(rows, s["channels"], s["resolutions"]), [True] * len(headers))
        lines.extend("  " + line for line in table.splitlines())
        lines.append("  " + verdict(summarize_comparison(rows)))
    missing = not_measured(data)
    if missing:
        lines.append("")
        lines.append("not measured: " + "; ".join(f"{n} cell(s) {why}" for why, n in missing.items()))
    return "\n".join(lines)


def not_measured(data: dict) -> dict[str, int]:
    """Unmeasured cells by reason ("skipped: over the MAC cap (4 GMACs per call)": 26, ...)."""
    cap = data["settings"].get("max_gmacs")
    out: dict[str, int] = {}
    for cell in data["cells"]:
        if cell["status"] == "ok":
            continue
        error = cell.get("error") or ""
        if error.startswith("over the MAC cap"):
            error = f"over the MAC cap ({cap:g} GMACs per call)"
        why = f"{cell['status']}: {error}" if error else cell["status"]
        out[why] = out.get(why, 0) + 1
    return out


# --------------------------------------------------------------------------------------------
# Operator profiles
# --------------------------------------------------------------------------------------------


def _share_ratio(k: dict) -> str:
    if k["mac_share"] <= 0:
        return "no MACs" if k["time_share"] > 0 else "-"
    return format_ratio(k["time_share"] / k["mac_share"])


def profile_rows(data: dict) -> list[list[str]]:
    rows = []
    for k in data["kinds"]:
        if k["ops"] == 0 and k["macs"] == 0:
            continue
        rows.append(
            [
                k["label"],
                str(k["ops"]),
                f"{k['time_ms']:.3f}",
                f"{100 * k['time_share']:.1f}%",
                f"{k['macs'] / 1e9:.3f}",
                f"{100 * k['mac_share']:.1f}%",
                _share_ratio(k),
            ]
        )
    return rows


PROFILE_HEADERS = ["kind", "ops/call", "ms/call", "time %", "GMACs", "MACs %", "time% / MACs%"]


def profile_head(data: dict) -> str:
    s = data["settings"]
    layout = "channels_last" if s["channels_last"] else "NCHW"
    h, w = s["image_size"]
    return (
        f"{data['model']}: batch {s['batch_size']} ({s['mode']}), {h}x{w}, eager {s['precision']} {layout}, "
        f"{data['params'] / 1e6:.2f}M params, {data['macs'] / 1e9:.3f} GMACs per image\n"
        f"{'CPU time' if s.get('clock') == 'cpu' else 'wall time'} {data['wall_ms_p50']:.2f} ms per call (p10-p90 "
        f"{data['wall_ms_p10']:.2f}-"
        f"{data['wall_ms_p90']:.2f}, {s['wall_iterations']} calls, no profiler); operator time "
        f"{data['profiled_ms_per_call']:.2f} ms per call over {s['iters']} profiled calls ({s['time_source']})"
    )


def format_profile(data: dict) -> str:
    env = data["environment"]
    head = f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, {env.get('date')}"
    table = render_table(PROFILE_HEADERS, profile_rows(data), [False] + [True] * 6)
    legend = "time% / MACs%: > 1 means the kind takes more of the time than of the MACs"
    return "\n".join([head, profile_head(data), table, f"({legend})"])


# --------------------------------------------------------------------------------------------
# Model sets
# --------------------------------------------------------------------------------------------


def format_rank(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def models_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    batch = next((r.get("throughput_batch") for r in data["ranks"] if r.get("throughput_batch")), None)
    predicted = any(r.get("predicted_latency_ms") or r.get("predicted_throughput_ms") for r in data["ranks"])
    headers = ["model", "GMACs", "latency ms", f"img/s (batch {batch})", "rank MACs", "rank latency", "rank img/s"]
    if predicted:
        headers[4:4] = ["predicted latency ms", f"predicted img/s (batch {batch})"]
    rows = []
    for r in data["ranks"]:
        row = [
            r["model"],
            "-" if r.get("macs") is None else f"{r['macs'] / 1e9:.3f}",
            "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}",
            "-" if r.get("throughput_img_s") is None else f"{r['throughput_img_s']:.1f}",
            format_rank(r.get("rank_macs")),
            format_rank(r.get("rank_latency")),
            format_rank(r.get("rank_throughput")),
        ]
        if predicted:
            pred_ms = r.get("predicted_throughput_ms")
            row[4:4] = [
                "-" if r.get("predicted_latency_ms") is None else f"{r['predicted_latency_ms']:.2f}",
                "-" if not pred_ms or not batch else f"{1e3 * batch / pred_ms:.1f}",
            ]
        rows.append(row)
    return headers, rows


def format_models(data: dict) -> str:
    bench = data["bench"]
    env = bench["environment"]
    head = f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, {env.get('date')}"
    headers, rows = models_rows(data)
    parts = [head, render_table(headers, rows, [False] + [True] * (len(headers) - 1))]
    parts.append("(rank 1 = fewest MACs / lowest latency / highest throughput)")
    judgement = format_judgement(data.get("judgement") or [])
    corr = judgement or format_correlations(bench["correlations"])
    if corr:
        parts.append(corr)
    if data.get("latency_model"):
        parts.append("prediction: " + ceilings_line(data["latency_model"]["ceilings"]))
    if data.get("probes"):
        parts.append(probe_line(data["probes"]))
    failed = [r for r in bench["results"] if r["status"] != "ok"]
    for r in failed:
        parts.append(f"{r['model']} {r['mode']}: {r['status']}: {r['error']}")
    if data.get("not_run"):
        parts.append(f"time budget spent: {len(data['not_run'])} configuration(s) not run")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Calibration, roofline, predictions
# --------------------------------------------------------------------------------------------


def format_rate(value: float | None, unit: str) -> str:
    """A rate in G<unit> with 3 significant digits ("-" when there is none)."""
    if value is None:
        return "-"
    g = value / 1e9
    return f"{g:.0f}" if g >= 100 else f"{g:.1f}" if g >= 10 else f"{g:.2f}"


def format_share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%" if value < 10 else f"{100 * value:.0f}%"


_FRESH_MIB = FRESH_PAGES_ABOVE >> 20  # outputs above this pay their pages (`Ceilings.fresh_pages_s`)


def ceilings_line(c: dict) -> str:
    """One line: the measured ceilings and how they were measured."""
    threads = f", {c['threads']} thread{'s' * (c['threads'] != 1)}" if c.get("threads") else ""
    clock = ", CPU-time clock" if c.get("clock") == "cpu" else ""
    memory = ", freed memory kept" if c.get("memory") == "keep" else ""
    fresh = ""
    if c.get("fresh_page_s"):
        fresh = f"fresh page {c['fresh_page_s'] * 1e6:.2f} us (outputs > {_FRESH_MIB} MiB), "
    return (
        f"{c['device_name']} ({c['device']}{threads}{clock}{memory}), {c['precision']}, torch {c['torch']}: "
        f"compute {format_rate(c['flops_per_s'], 'FLOP/s')} GFLOP/s (matmul), bandwidth "
        f"{format_rate(c['bytes_per_s'], 'B/s')} GB/s (large copy), overhead {c['overhead_s'] * 1e6:.1f} us per call "
        f"(tiny op), {fresh}ridge {c['flops_per_s'] / c['bytes_per_s']:.1f} FLOP/byte"
    )


def overhead_from_hot_calls(model: dict) -> bool:
    """Whether a latency model (`LatencyModel.to_dict()`) fitted the overheads of its first-call factors on
    hot calls (sweep versions 2-9), keeping the first calls' beside them."""
    return any(f.get("first_call_overhead") is not None for f in model["factors"].values())


def hot_factors_apart(model: dict) -> bool:
    """Whether a latency model (`LatencyModel.to_dict()`) fitted all its first-call factors on first calls
    and all its hot factors, the overhead too, on hot calls (sweep version 10 on)."""
    return has_cache_reuse(model) and not overhead_from_hot_calls(model)


def has_serial_share(model: dict) -> bool:
    """Whether a latency model (`LatencyModel.to_dict()`) has a half-parallel time (sweep version 6 on)
    or size (versions 4 and 5) for any kind, fitted with more than one CPU thread."""
    return any(f.get("half_parallel_s") or f.get("half_parallel_bytes") for f in model["factors"].values())


def _serial_by_bytes(model: dict) -> bool:
    return any(f.get("half_parallel_bytes") for f in model["factors"].values())


def serial_share_formula(model: dict) -> str:
    """The serial share's factor on a call's roofline time, as the calibration table and report print it."""
    size = "output bytes" if _serial_by_bytes(model) else "that time"
    return f"x (1 + {model['ceilings']['threads'] - 1} x h / ({size} + h))"


def serial_share_note(model: dict) -> str:
    """What h is, as the calibration report explains it."""
    size = "output size" if _serial_by_bytes(model) else "roofline time"
    return f"the {size} h at which half of a call's work runs on all {model['ceilings']['threads']} threads"


def format_half(f: dict) -> str:
    """A kind's half-parallel time (or size, sweep versions 4 and 5) as the calibration table shows it."""
    if f.get("half_parallel_bytes"):
        return format_bytes(f["half_parallel_bytes"])
    half = f.get("half_parallel_s") or 0.0
    return _format_seconds(half) if half else "any size"


def _format_seconds(s: float) -> str:
    us = s * 1e6
    return f"{us:.1f} us" if us < 10 else f"{us:.0f} us" if us < 1000 else f"{us / 1e3:.1f} ms"


def has_cache_reuse(model: dict) -> bool:
    """Whether a latency model (`LatencyModel.to_dict()`) blends in hot-call factors for reads still in
    cache (sweep version 5 on, where the private cache size is known)."""
    return bool(model.get("cache_bytes")) and any(f.get("hot") for f in model["factors"].values())


def cache_reuse_formula(model: dict) -> str:
    """The cache reuse's part of a call's time, as the calibration table and report print it."""
    return (
        f"+ r x (that time at the hot factors - that time), r: the share of the call's reads that fit in the "
        f"{format_bytes(model['cache_bytes'])} private cache with the traffic since their last use"
    )


def calibration_rows(model: dict) -> tuple[list[str], list[list[str]]]:
    """The fitted factors of a latency model (`LatencyModel.to_dict()`), one row per kind."""
    from ..analyze.opkinds import FIT_KINDS

    overhead = model["ceilings"]["overhead_s"]
    headers = ["kind", "compute eff.", "memory eff.", "overhead us/call", "cases", "fit error (median)"]
    first_calls = overhead_from_hot_calls(model)
    if first_calls:  # the overhead is the hot calls'; the first calls' beside it
        headers.insert(4, "1st-call overhead")
    serial = has_serial_share(model)
    if serial:
        headers.insert(len(headers) - 2, "half parallel at")
    reuse = has_cache_reuse(model)
    hot_overhead = hot_factors_apart(model)
    if hot_overhead:
        headers.insert(4, "hot overhead")
    if reuse:
        headers[3:3] = ["hot compute eff.", "hot memory eff."]
    refined = "elements" in model.get("settings", {})
    if refined:
        headers.append("element scale")
    rows = []
    order = {k: i for i, k in enumerate(FIT_KINDS)}
    for kind, f in sorted(model["factors"].items(), key=lambda kv: order.get(kv[0], len(order))):
        row = [
            FIT_KINDS.get(kind, kind),
            format_share(f["compute_efficiency"]),
            format_share(f["memory_efficiency"]),
            f"{f['overhead_calls'] * overhead * 1e6:.1f}",
            str(f["samples"]),
            format_share(f.get("median_abs_error")),
        ]
        if first_calls:
            first = f.get("first_call_overhead")
            row.insert(4, "-" if first is None else f"{first * overhead * 1e6:.1f}")
        if hot_overhead:
            hot = (f.get("hot") or {}).get("overhead_calls")
            row.insert(4, "-" if hot is None else f"{hot * overhead * 1e6:.1f}")
        if serial:
            row.insert(len(row) - 2, format_half(f))
        if reuse:
            hot = f.get("hot") or {}
            row[3:3] = [format_share(hot.get("compute_efficiency")), format_share(hot.get("memory_efficiency"))]
        if refined:
            row.append(f"{f.get('element_scale', 1.0):.2f}")
        rows.append(row)
    return headers, rows


def element_fit_line(model: dict) -> str | None:
    """One line on the refinement on element sweeps of a latency model (`LatencyModel.to_dict()`), if any."""
    e = model.get("settings", {}).get("elements")
    if not e:
        return None
    line = (
        f"refined on {e['sides']} measured sides of design-element sweeps ({', '.join(e['pairs'])}; batch "
        f"{', '.join(map(str, e['batch_sizes']))}; measured {', '.join(d[:16] for d in e['dates'] if d)}): median "
        f"error of those sides {format_share(e['median_abs_error_before'])} with the operator fit alone, "
        f"{format_share(e['median_abs_error_after'])} with the element scales"
    )
    return "\n".join([line, *e.get("notes", [])])


def format_calibration(ceilings: dict, model: dict | None = None) -> str:
    """What `lowformer analyze calibrate` prints: the ceilings, the bandwidth curve, the fitted factors."""
    lines = [ceilings_line(ceilings)]
    curve = sorted((int(k), v) for k, v in ceilings.get("bandwidth_curve", {}).items())
    if curve:
        points = ", ".join(f"{n / 2**20:g} MiB {format_rate(v, 'B/s')}" for n, v in curve)
        lines.append(f"copy bandwidth by bytes moved (GB/s): {points}")
    if model is not None:
        s = model.get("settings", {})
        lines.append(
            f"latency model: per-kind factors fitted on {len(model.get('samples', [])) or s.get('cases', '?')} "
            f"single-operator cases at batch {', '.join(map(str, s.get('batch_sizes', [])))}"
        )
        headers, rows = calibration_rows(model)
        lines.append(render_table(headers, rows, [False] + [True] * (len(headers) - 1)))
        if (refined := element_fit_line(model)) is not None:
            lines.append(refined)
        lines.append(
            "(time of one call = max(FLOPs / (compute eff. x compute ceiling), bytes / (memory eff. x bandwidth at "
            "that size))"
            + (f" {serial_share_formula(model)}, h = half parallel at," if has_serial_share(model) else "")
            + " + overhead"
            + (", times the element scale" if refined is not None else "")
            + (
                f" + the fresh pages of an output over {_FRESH_MIB} MiB"
                if model.get("ceilings", {}).get("fresh_page_s")
                else ""
            )
            + (f"; then {cache_reuse_formula(model)}" if has_cache_reuse(model) else "")
            + (
                "; efficiencies fitted on each case's first call of a round, after the other cases; overhead on "
                "its second, right after itself)"
                if overhead_from_hot_calls(model)
                else "; the factors fitted on each case's first call of a round, after the other cases; the hot ones "
                "on its second, right after itself)"
                if hot_factors_apart(model)
                else ")"
            )
        )
    return "\n".join(lines)


ROOFLINE_HEADERS = ["calls", "ms", "time %", "GFLOP", "MB moved", "FLOP/B", "GFLOP/s", "% peak", "GB/s", "% BW"]


def roofline_rows(rows: Sequence[dict], key: str) -> list[list[str]]:
    """Per-kind or per-stage summaries (`lowformer.analyze.roofline.summarize`) as table rows."""
    out = []
    for r in rows:
        by_bound = r["time_ms_by_bound"]
        total = sum(by_bound.values()) or 1.0
        bound = ", ".join(f"{b} {100 * t / total:.0f}%" for b, t in by_bound.items() if t / total >= 0.005)
        out.append(
            [
                r.get("label", r[key]),
                str(r["calls"]),
                format_ms(r["time_ms"]),
                f"{100 * r['time_share']:.1f}%",
                f"{r['flops'] / 1e9:.3f}",
                f"{r['bytes'] / 1e6:.1f}",
                format_number(r["intensity"], ".1f"),
                format_rate(r["achieved_flops_per_s"], "FLOP/s"),
                format_share(r["compute_share"]),
                format_rate(r["achieved_bytes_per_s"], "B/s"),
                format_share(r["bandwidth_share"]),
                bound or "-",
            ]
        )
    return out


def format_roofline(data: dict) -> str:
    """The roofline section of `lowformer analyze model`: ceilings, per kind, per stage."""
    roof = data["roofline"]
    headers = ["kind", *ROOFLINE_HEADERS, "bound (share of time)"]
    right = [False] + [True] * 10 + [False]
    parts = [
        "roofline: " + ceilings_line(roof["ceilings"]),
        render_table(headers, roofline_rows(roof["by_kind"], "kind"), right),
        "",
        render_table(["stage", *headers[1:]], roofline_rows(roof["by_stage"], "stage"), right),
        "(bytes: each call reads its inputs and weights and writes its outputs once, nothing kept in caches between "
        "calls; % peak / % BW: achieved FLOP/s and bytes/s as a share of the measured ceilings; bound: what would "
        "limit a call at the ceilings)",
    ]
    if roof.get("unmatched_calls"):
        parts.append(f"{roof['unmatched_calls']} call(s) could not be matched to a profiled call and have no time")
    return "\n".join(parts)


PREDICT_HEADERS = [
    "model", "batch", "GMACs", "GFLOP", "MB moved", "calls", "predicted ms", "compute", "memory", "serial", "overhead",
    "pages", "reuse",
]  # fmt: skip


def prediction_rows(models: Sequence[dict]) -> list[list[str]]:
    rows = []
    for m in models:
        total = m["predicted_ms"] or 1.0
        rows.append(
            [
                m["model"],
                str(m["batch_size"]),
                f"{m['macs'] / 1e9:.3f}",
                f"{m['flops'] / 1e9:.2f}",
                f"{m['bytes'] / 1e6:.0f}",
                str(m["calls"]),
                format_ms(m["predicted_ms"]),
                f"{100 * m['compute_ms'] / total:.0f}%",
                f"{100 * m['memory_ms'] / total:.0f}%",
                f"{100 * m.get('serial_ms', 0.0) / total:.0f}%",
                f"{100 * m['overhead_ms'] / total:.0f}%",
                f"{100 * m.get('fresh_pages_ms', 0.0) / total:.0f}%",
                f"{100 * m.get('reuse_ms', 0.0) / total:.0f}%",
            ]
        )
    return rows


def format_predictions(data: dict) -> str:
    """What `lowformer analyze predict` prints: per model, the predicted time and what it is made of."""
    s = data["settings"]
    head = (
        f"predicted on {ceilings_line(data['latency_model']['ceilings'])}\n"
        f"batch {s['batch_size']}, {s['image_size'][0]}x{s['image_size'][1]}, eager {s['precision']}; nothing timed"
    )
    table = render_table(PREDICT_HEADERS, prediction_rows(data["models"]), [False] + [True] * 12)
    legend = (
        "(compute / memory / serial / overhead / pages: share of the predicted time in calls bound by each at all "
        "threads, what calls too small to run on all threads add, the per-call overhead, and the page faults of "
        f"outputs over {_FRESH_MIB} MiB; reuse: what reading inputs still in cache changes, negative when it saves "
        "time; the shares sum to 100%)"
    )
    return "\n".join([head, table, legend])


def format_judgement(judgement: Sequence[dict]) -> str:
    """How MACs, parameters and the prediction order the models by measured time, per mode."""
    lines = []
    for j in judgement:
        parts = [f"MACs {format_number(j.get('spearman_macs'), '.2f')}"]
        parts.append(f"params {format_number(j.get('spearman_params'), '.2f')}")
        if "spearman_predicted" in j:
            parts.append(f"prediction {format_number(j['spearman_predicted'], '.2f')}")
        text = f"{j['mode']}, batch {j['batch_size']}, {len(j['models'])} models: Spearman rho with measured time: "
        text += ", ".join(parts)
        if "median_abs_error" in j:
            text += f"; prediction error median {100 * j['median_abs_error']:.0f}%, max {100 * j['max_abs_error']:.0f}%"
        if "median_abs_error_at_probe_speed" in j:
            text += f" ({100 * j['median_abs_error_at_probe_speed']:.0f}% at the probed speed)"
        lines.append(text)
    return "\n".join(lines)


def probe_line(probes: Sequence[dict], subject: str = "compute ceiling") -> str:
    """How fast the device ran each mode, by the compute probe timed between the models, against the
    calibration; `subject` names the probe."""
    if not probes:
        return ""
    parts = [
        f"batch {p['batch_size']} {p['flops_per_s'] / 1e9:.0f} GFLOP/s (time x{p['time_scale']:.2f})" for p in probes
    ]
    calibrated = probes[0]["calibrated_flops_per_s"] / 1e9
    return (
        f"{subject} re-measured between the models: {', '.join(parts)}, against {calibrated:.0f} GFLOP/s "
        "at the calibration"
    )
