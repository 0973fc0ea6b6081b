"""Readable output of an analysis: text tables for the terminal and `report.md` for an output directory.

Everything here works on the plain dicts the analyses write as JSON, so `write_report(out_dir)`
rebuilds the markdown report from whatever results a directory holds (element sweeps, operator
profiles, model sets), each section naming the machine, command and date it was measured on.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..report.tables import format_correlations, render_table
from . import models as models_mod
from . import profile as profile_mod
from . import sweep as sweep_mod
from .plots import format_ratio

_logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
NOT_MEASURED = {"skipped": "skip", "not-run": "not run", "error": "error", "oom": "OOM"}


# --------------------------------------------------------------------------------------------
# Element sweeps
# --------------------------------------------------------------------------------------------


def summarize_comparison(rows: Sequence[dict]) -> dict:
    """Counts and ranges of one comparison (one pair, one other side) over its cells."""
    measured = [r for r in rows if r["status"] == "ok" and r.get("time_ratio") is not None]
    a = rows[0]["side_a"] if rows else None
    b = rows[0]["side_b"] if rows else None
    by_status: dict[str, int] = {}
    for r in rows:
        if r not in measured:
            by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    time_ratios = [r["time_ratio"] for r in measured]
    mac_ratios = [r["mac_ratio"] for r in measured if r.get("mac_ratio") is not None]
    errors = [r["mac_error"] for r in measured if r.get("mac_error") is not None]
    return {
        "side_a": a,
        "side_b": b,
        "cells": len(rows),
        "measured": len(measured),
        "not_measured": by_status,
        "disagree": sum(bool(r.get("disagree")) for r in measured),
        "faster_a": sum(r.get("cheaper_by_time") == a for r in measured),
        "faster_b": sum(r.get("cheaper_by_time") == b for r in measured),
        "time_tie": sum(r.get("cheaper_by_time") == "tie" for r in measured),
        "fewer_macs_a": sum(r.get("cheaper_by_macs") == a for r in measured),
        "fewer_macs_b": sum(r.get("cheaper_by_macs") == b for r in measured),
        "mac_tie": sum(r.get("cheaper_by_macs") == "tie" for r in measured),
        "time_ratio_min": min(time_ratios) if time_ratios else None,
        "time_ratio_max": max(time_ratios) if time_ratios else None,
        "mac_ratio_min": min(mac_ratios) if mac_ratios else None,
        "mac_ratio_max": max(mac_ratios) if mac_ratios else None,
        "mac_error_median": statistics.median(errors) if errors else None,
    }


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


def _cell_text(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok" or row.get("time_ratio") is None:
        return NOT_MEASURED.get(row["status"], row["status"])
    star = "*" if row.get("disagree") else ""
    return f"{format_ratio(row['time_ratio'])}/{format_ratio(row.get('mac_ratio'))}{star}"


def _grid(rows: Sequence[dict], channels: Sequence[int], resolutions: Sequence[int]) -> list[list[str]]:
    by_cell = {(r["channels"], r["resolution"]): r for r in rows}
    return [[str(c), *(_cell_text(by_cell.get((c, res))) for res in resolutions)] for c in channels]


def _comparisons(data: dict) -> list[tuple[dict, str, list[dict]]]:
    all_rows = sweep_mod.element_rows(data)
    out = []
    for pair in data["pairs"]:
        for side in pair["sides"][1:]:
            rows = [r for r in all_rows if r["pair"] == pair["name"] and r["side_b"] == side["label"]]
            out.append((pair, side["label"], rows))
    return out


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
    for pair, b, rows in _comparisons(data):
        a = pair["sides"][0]["label"]
        lines.append("")
        lines.append(f"{pair['name']}: {a} vs {b}  ({pair['description']})")
        headers = ["channels", *(f"{r}px" for r in s["resolutions"])]
        table = render_table(headers, _grid(rows, s["channels"], s["resolutions"]), [True] * len(headers))
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


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    right = right or [False] * len(headers)
    rule = ["---:" if r else "---" for r in right]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("*", "\\*") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _environment_md(env: dict, settings: dict | None = None) -> str:
    cpus = env.get("cpu_count")
    threads = (settings or {}).get("threads") or env.get("torch_threads")
    load = env.get("load_avg_1m")
    text = (
        f"Measured on **{env.get('device_name')}** ({env.get('device')}; {cpus} CPUs, {threads} "
        f"thread{'' if threads == 1 else 's'}), "
        f"torch {env.get('torch')}, {env.get('date')}, command `{env.get('command')}`"
    )
    if load is not None:
        text += f"; load average {load:.1f} before the run"
        if env.get("device") == "cpu" and cpus and load > 0.5 * cpus:
            text += (
                f". **The machine was busy with other work** (load {load:.1f} on {cpus} CPUs): absolute times are "
                "inflated and single measurements can be off by several times; trust the patterns, not one number"
            )
    return text + "."


def _elements_md(data: dict, stem: str) -> list[str]:
    s = data["settings"]
    timing = sweep_mod.ElementTiming(
        warmup=sweep_mod.TimingPolicy(**s["timing"]["warmup"]),
        round=sweep_mod.TimingPolicy(**s["timing"]["round"]),
        rounds=s["timing"]["rounds"],
    )
    layout = "channels_last" if s["channels_last"] else "NCHW"
    cap = f"{s['max_gmacs']:g} GMACs per call" if s.get("max_gmacs") is not None else "no cap"
    out = [
        f"## Design elements: {s['mode']}, batch {s['batch_size']}, {s['backend']} {s['precision']} {layout}",
        "",
        _environment_md(data["environment"], s),
        "",
        f"Grid: channels {', '.join(map(str, s['channels']))} x resolutions {', '.join(map(str, s['resolutions']))} "
        f"px (input of every side: batch x channels x resolution x resolution). MACs per image "
        f"({s['mac_convention']}); MAC cap {cap} (larger cells are skipped). Timing per cell: {timing.describe()}.",
        "",
        "Every ratio is first side / other side, so below 1 (blue) means the first side is cheaper. The time "
        "ratio is the median of the per-round ratios of interleaved rounds; a side is *faster* when it was "
        "faster in every round. \\* (framed in the figures): MACs and time pick different sides.",
    ]
    missing = not_measured(data)
    if missing:
        out += ["", "Not measured: " + "; ".join(f"{n} cell(s) {why}" for why, n in missing.items()) + "."]
    if data.get("stopped"):
        out += ["", f"**The sweep stopped early ({data['stopped']})**: cells marked *not run* were not measured."]
    by_name: dict[str, list[tuple[str, list[dict]]]] = {}
    summary_rows = []
    for pair, b, rows in _comparisons(data):
        by_name.setdefault(pair["name"], []).append((b, rows))
        sm = summarize_comparison(rows)
        summary_rows.append(
            [
                f"{pair['name']}: {sm['side_a']} vs {b}",
                str(sm["measured"]),
                f"{format_ratio(sm['mac_ratio_min'])}-{format_ratio(sm['mac_ratio_max'])}",
                f"{format_ratio(sm['time_ratio_min'])}-{format_ratio(sm['time_ratio_max'])}",
                f"{sm['faster_a']} / {sm['faster_b']} / {sm['time_tie']}",
                str(sm["disagree"]),
                format_ratio(sm["mac_error_median"]) if sm["mac_tie"] != sm["measured"] else "MACs equal",
            ]
        )
    headers = ["comparison (a vs b)", "cells", "MAC ratio a/b", "time ratio a/b", "faster: a / b / neither"]
    headers += ["MACs and time disagree", "median time ratio / MAC ratio"]
    out += ["", "Summary (every comparison, all measured cells):", ""]
    out.append(_md_table(headers, summary_rows, [False] + [True] * 6))
    for pair in data["pairs"]:
        a = pair["sides"][0]["label"]
        out += ["", f"### `{pair['name']}`: {pair['description']}", ""]
        out += ["Sides: " + "; ".join(f"**{sd['label']}**: {sd['description']}" for sd in pair["sides"]) + "."]
        if pair.get("claim"):
            out += ["", f"> {pair['claim']}"]
        out += ["", f"![{pair['name']} heatmaps]({stem}_{pair['name']}.png)"]
        for b, rows in by_name.get(pair["name"], []):
            out += ["", f"**{a} vs {b}**: {verdict(summarize_comparison(rows))}.", ""]
            headers = ["channels \\ px", *map(str, s["resolutions"])]
            out.append(_md_table(headers, _grid(rows, s["channels"], s["resolutions"]), [True] * len(headers)))
    return out


# --------------------------------------------------------------------------------------------
# Operator profile
# --------------------------------------------------------------------------------------------


def _share_ratio(k: dict) -> str:
    if k["mac_share"] <= 0:
        return "no MACs" if k["time_share"] > 0 else "-"
    return format_ratio(k["time_share"] / k["mac_share"])


def _profile_rows(data: dict) -> list[list[str]]:
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


_PROFILE_HEADERS = ["kind", "ops/call", "ms/call", "time %", "GMACs", "MACs %", "time% / MACs%"]


def _profile_head(data: dict) -> str:
    s = data["settings"]
    layout = "channels_last" if s["channels_last"] else "NCHW"
    h, w = s["image_size"]
    return (
        f"{data['model']}: batch {s['batch_size']} ({s['mode']}), {h}x{w}, eager {s['precision']} {layout}, "
        f"{data['params'] / 1e6:.2f}M params, {data['macs'] / 1e9:.3f} GMACs per image\n"
        f"wall time {data['wall_ms_p50']:.2f} ms per call (p10-p90 {data['wall_ms_p10']:.2f}-"
        f"{data['wall_ms_p90']:.2f}, {s['wall_iterations']} calls, no profiler); operator time "
        f"{data['profiled_ms_per_call']:.2f} ms per call over {s['iters']} profiled calls ({s['time_source']})"
    )


def format_profile(data: dict) -> str:
    env = data["environment"]
    head = f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, {env.get('date')}"
    table = render_table(_PROFILE_HEADERS, _profile_rows(data), [False] + [True] * 6)
    legend = "time% / MACs%: > 1 means the kind takes more of the time than of the MACs"
    return "\n".join([head, _profile_head(data), table, f"({legend})"])


def _profile_md(data: dict, image: str) -> list[str]:
    s = data["settings"]
    top = [
        [o["op"], profile_mod.KINDS.get(o["kind"], o["kind"]), str(o["calls"]), f"{o['time_ms']:.3f}"]
        for o in data["top_ops"]
    ]
    return [
        f"## Operator profile: `{data['model']}`, {s['mode']} (batch {s['batch_size']})",
        "",
        _environment_md(data["environment"], s),
        "",
        _profile_head(data).replace("\n", "; ") + ".",
        "",
        _md_table(_PROFILE_HEADERS, _profile_rows(data), [False] + [True] * 6),
        "",
        f"![{data['model']} operator profile]({image})",
        "",
        "Top operators (top-level ATen calls, time including their children):",
        "",
        _md_table(["operator", "kind", "calls", "ms/call"], top, [False, False, True, True]),
    ]


# --------------------------------------------------------------------------------------------
# Model sets
# --------------------------------------------------------------------------------------------


def _rank(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _models_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    batch = next((r.get("throughput_batch") for r in data["ranks"] if r.get("throughput_batch")), None)
    headers = ["model", "GMACs", "latency ms", f"img/s (batch {batch})", "rank MACs", "rank latency", "rank img/s"]
    rows = []
    for r in data["ranks"]:
        rows.append(
            [
                r["model"],
                "-" if r.get("macs") is None else f"{r['macs'] / 1e9:.3f}",
                "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}",
                "-" if r.get("throughput_img_s") is None else f"{r['throughput_img_s']:.1f}",
                _rank(r.get("rank_macs")),
                _rank(r.get("rank_latency")),
                _rank(r.get("rank_throughput")),
            ]
        )
    return headers, rows


def format_models(data: dict) -> str:
    bench = data["bench"]
    env = bench["environment"]
    head = f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, {env.get('date')}"
    headers, rows = _models_rows(data)
    parts = [head, render_table(headers, rows, [False] + [True] * 6)]
    parts.append("(rank 1 = fewest MACs / lowest latency / highest throughput)")
    corr = format_correlations(bench["correlations"])
    if corr:
        parts.append(corr)
    failed = [r for r in bench["results"] if r["status"] != "ok"]
    for r in failed:
        parts.append(f"{r['model']} {r['mode']}: {r['status']}: {r['error']}")
    if data.get("not_run"):
        parts.append(f"time budget spent: {len(data['not_run'])} configuration(s) not run")
    return "\n".join(parts)


def _models_md(data: dict, image: str) -> list[str]:
    bench = data["bench"]
    s = bench["settings"]
    headers, rows = _models_rows(data)
    h, w = s["image_sizes"][0]
    layout = "channels_last" if s["channels_last"] else "NCHW"
    out = [
        f"## Models: MACs vs latency and throughput ({h}x{w}, {s['backends'][0]} {s['precisions'][0]} {layout})",
        "",
        _environment_md(bench["environment"], {"threads": _threads_used(bench)}),
        "",
        _md_table(headers, rows, [False] + [True] * 6),
        "",
        "Rank 1 = fewest MACs / lowest latency / highest throughput. Rank correlation of MACs with measured "
        "time per call (1 = MACs order the models exactly as the clock does):",
        "",
    ]
    for c in bench["correlations"]:
        rho, tau = c["spearman_macs_latency"], c["kendall_macs_latency"]
        out.append(
            f"- {c['mode']}, batch {c['batch_size']}: Spearman rho **{_fmt(rho)}**, Kendall tau **{_fmt(tau)}** "
            f"over {len(c['models'])} models"
        )
    if data.get("not_run"):
        out += ["", f"Time budget spent: {len(data['not_run'])} configuration(s) not run."]
    out += ["", f"![MACs vs measured speed]({image})"]
    return out


def _threads_used(bench: dict) -> int | None:
    """Threads the timings ran with (the environment records the process default before the run)."""
    used = {r.get("threads") for r in bench["results"] if r.get("threads")}
    return used.pop() if len(used) == 1 else bench["environment"].get("torch_threads")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# --------------------------------------------------------------------------------------------
# The report of a directory
# --------------------------------------------------------------------------------------------


def _load(path: Path, schema: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _logger.warning("skipping %s: %s", path, e)
        return None
    return data if data.get("schema") == schema else None


def write_report(out_dir: str | Path, title: str = "MACs vs measured time") -> Path:
    """(Re)write `out_dir/report.md` from every analysis result in `out_dir`.

    Sections, in order: element sweeps (`elements-*.json`), operator profiles (`profile-*.json`),
    model sets (`models*.json`); each with its figures, which are expected next to the JSON.
    """
    out_dir = Path(out_dir)
    lines = [
        f"# {title}",
        "",
        "Written by `lowformer analyze` from the results in this directory. MACs are counted by "
        "`lowformer.measure.count_macs` (1 MAC = 1 fused multiply-add); times are measured, medians with "
        "their spread. Each section names the machine, the command and the date it was measured.",
    ]
    found = 0
    for path in sorted(out_dir.glob("elements-*.json")):
        data = _load(path, sweep_mod.SCHEMA)
        if data is not None:
            lines += ["", *_elements_md(data, path.stem)]
            found += 1
    for path in sorted(out_dir.glob("profile-*.json")):
        data = _load(path, profile_mod.SCHEMA)
        if data is not None:
            lines += ["", *_profile_md(data, path.with_suffix(".png").name)]
            found += 1
    for path in sorted(out_dir.glob("models*.json")):
        data = _load(path, models_mod.SCHEMA)
        if data is not None:
            lines += ["", *_models_md(data, path.with_suffix(".png").name)]
            found += 1
    if not found:
        lines += ["", "No results yet."]
    path = out_dir / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a report
    return path
