"""`report.md` of an analysis folder: every result the folder holds, as markdown.

Everything here works on the plain dicts the analyses write as JSON, so `write_report(out_dir)`
rebuilds the report from whatever results a directory holds (element sweeps, operator profiles,
model sets), each section naming the machine, command and date it was measured on, with its
figures, which are expected next to the JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from .._io import write_text
from ..analyze import cells, models, opkinds, predict, profile
from ..analyze.cells import comparisons, summarize_comparison
from ..analyze.sweep import ElementTiming
from ..measure.env import is_busy
from ..measure.timing import TimingPolicy
from .tables import (
    PREDICT_HEADERS,
    PROFILE_HEADERS,
    ROOFLINE_HEADERS,
    cache_reuse_formula,
    calibration_rows,
    ceilings_line,
    element_fit_line,
    format_number,
    format_ratio,
    has_cache_reuse,
    has_serial_share,
    hot_factors_apart,
    models_rows,
    not_measured,
    overhead_from_hot_calls,
    prediction_rows,
    probe_line,
    profile_head,
    profile_rows,
    ratio_grid,
    roofline_rows,
    serial_share_formula,
    serial_share_note,
    verdict,
)

_logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
CALIBRATION_SCHEMA = "lowformer.analyze.calibration/1"  # what `lowformer analyze calibrate` writes to --out


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


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
        if is_busy(env.get("device", "cpu"), load, cpus):
            text += (
                f". **The machine was busy with other work** (load {load:.1f} on {cpus} CPUs): absolute times are "
                "inflated and single measurements can be off by several times; trust the patterns, not one number"
            )
    return text + "."


def _elements_md(data: dict, stem: str) -> list[str]:
    s = data["settings"]
    timing = ElementTiming(
        warmup=TimingPolicy(**s["timing"]["warmup"]),
        round=TimingPolicy(**s["timing"]["round"]),
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
    for pair, b, rows in comparisons(data):
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
            out.append(_md_table(headers, ratio_grid(rows, s["channels"], s["resolutions"]), [True] * len(headers)))
    return out


def _roofline_md(data: dict, image: str) -> list[str]:
    roof = data["roofline"]
    headers = [*ROOFLINE_HEADERS, "bound (share of time)"]
    right = [True] * 10 + [False]
    return [
        "",
        f"**Roofline.** Ceilings measured on this device: {ceilings_line(roof['ceilings'])}. Bytes are compulsory "
        "traffic: each call reads its inputs and weights and writes its outputs once, nothing is kept in caches "
        "between calls. *Bound* is what would limit a call at the ceilings (compute above the ridge, memory below "
        "it, overhead when both would take less than one call's overhead).",
        "",
        f"![{data['model']} roofline]({image})",
        "",
        _md_table(["kind", *headers], roofline_rows(roof["by_kind"], "kind"), [False, *right]),
        "",
        _md_table(["stage", *headers], roofline_rows(roof["by_stage"], "stage"), [False, *right]),
    ]


def _profile_md(data: dict, image: str, roofline_image: str) -> list[str]:
    s = data["settings"]
    top = [
        [o["op"], opkinds.KINDS.get(o["kind"], o["kind"]), str(o["calls"]), f"{o['time_ms']:.3f}"]
        for o in data["top_ops"]
    ]
    return [
        f"## Operator profile: `{data['model']}`, {s['mode']} (batch {s['batch_size']})",
        "",
        _environment_md(data["environment"], s),
        "",
        profile_head(data).replace("\n", "; ") + ".",
        "",
        _md_table(PROFILE_HEADERS, profile_rows(data), [False] + [True] * 6),
        "",
        f"![{data['model']} operator profile]({image})",
        "",
        "Top operators (top-level ATen calls, time including their children):",
        "",
        _md_table(["operator", "kind", "calls", "ms/call"], top, [False, False, True, True]),
        *(_roofline_md(data, roofline_image) if data.get("roofline") else []),
    ]


def _models_md(data: dict, image: str) -> list[str]:
    bench = data["bench"]
    s = bench["settings"]
    headers, rows = models_rows(data)
    h, w = s["image_sizes"][0]
    layout = "channels_last" if s["channels_last"] else "NCHW"
    out = [
        f"## Models: MACs vs latency and throughput ({h}x{w}, {s['backends'][0]} {s['precisions'][0]} {layout})",
        "",
        _environment_md(bench["environment"], {"threads": _threads_used(bench)}) + _timing_md(s),
        "",
        _md_table(headers, rows, [False] + [True] * (len(headers) - 1)),
        "",
        "Rank 1 = fewest MACs / lowest latency / highest throughput. Rank correlation of MACs with measured "
        "time per call (1 = MACs order the models exactly as the clock does):",
        "",
    ]
    if data.get("judgement"):
        out += [_judgement_md(data)]
        if data.get("predictions"):
            out += ["", f"![measured against MACs and the prediction]({image.replace('.png', '-predicted.png')})"]
        out += ["", f"![MACs vs measured speed]({image})"]
        return out
    for c in bench["correlations"]:
        rho, tau = c["spearman_macs_latency"], c["kendall_macs_latency"]
        out.append(
            f"- {c['mode']}, batch {c['batch_size']}: Spearman rho **{format_number(rho, '.2f')}**, "
            f"Kendall tau **{format_number(tau, '.2f')}** over {len(c['models'])} models"
        )
    if data.get("not_run"):
        out += ["", f"Time budget spent: {len(data['not_run'])} configuration(s) not run."]
    out += ["", f"![MACs vs measured speed]({image})"]
    return out


def _timing_md(settings: dict) -> str:
    if not settings.get("interleaved"):
        return ""
    clock = "the thread's CPU time" if settings.get("clock") == "cpu" else "the wall clock"
    memory = (
        "; freed memory kept in the process (no page faults from the allocator)"
        if settings.get("memory") == "keep"
        else ""
    )
    return f" Timing: per mode, the models interleaved in {settings['rounds']} rounds, on {clock}{memory}."


def _error_cell(j: dict) -> str:
    if "median_abs_error" not in j:
        return "-"
    text = f"{100 * j['median_abs_error']:.0f}%"
    if "median_abs_error_at_probe_speed" in j:
        text += f" ({100 * j['median_abs_error_at_probe_speed']:.0f}%)"
    return text


def _judgement_md(data: dict) -> str:
    headers = [
        "mode",
        "models",
        "Spearman rho: MACs",
        "params",
        "prediction",
        "Kendall tau: MACs",
        "prediction",
        "median error",
        "max error",
    ]
    rows = []
    for j in data["judgement"]:
        rows.append(
            [
                f"{j['mode']}, batch {j['batch_size']}",
                str(len(j["models"])),
                format_number(j.get("spearman_macs"), ".2f"),
                format_number(j.get("spearman_params"), ".2f"),
                format_number(j.get("spearman_predicted"), ".2f"),
                format_number(j.get("kendall_macs"), ".2f"),
                format_number(j.get("kendall_predicted"), ".2f"),
                _error_cell(j),
                "-" if "max_abs_error" not in j else f"{100 * j['max_abs_error']:.0f}%",
            ]
        )
    lm = data.get("latency_model") or {}
    text = _md_table(headers, rows, [False] + [True] * 8)
    if lm:
        text += (
            "\n\nPrediction: the analytic latency model (`lowformer analyze predict`), calibrated on "
            f"{ceilings_line(lm['ceilings'])}; its per-kind factors were fitted on single operators"
            + (" and design-element sweeps" if lm.get("settings", {}).get("elements") else "")
            + ", never on these models."
        )
    if data.get("probes"):
        text += (
            " The "
            + probe_line(data["probes"], subject="compute ceiling (the calibration's matmul)")
            + "; the median error of the prediction scaled to that speed is in parentheses."
        )
    return text


def _predict_md(data: dict) -> list[str]:
    s = data["settings"]
    lm = data["latency_model"]
    return [
        f"## Predicted time: batch {s['batch_size']}, {s['image_size'][0]}x{s['image_size'][1]}",
        "",
        _environment_md(data["environment"], {"threads": s.get("threads")}),
        "",
        f"Nothing was timed: every call's FLOPs and bytes (counted on the meta device) at the ceilings of "
        f"{ceilings_line(lm['ceilings'])}, with the per-kind factors below.",
        "",
        _md_table(PREDICT_HEADERS, prediction_rows(data["models"]), [False] + [True] * 11),
        "",
        *_factors_md(lm),
    ]


def _factors_md(lm: dict) -> list[str]:
    """The latency model's per-kind factors, and its refinement on element sweeps if it has one."""
    headers, rows = calibration_rows(lm)
    refined = element_fit_line(lm)
    return [_md_table(headers, rows, [False] + [True] * (len(headers) - 1))] + (
        ["", refined.replace("\n", "  \n") + "."] if refined else []
    )


def _calibration_md(data: dict) -> list[str]:
    lm = data["latency_model"]
    c = lm["ceilings"]
    curve = sorted((int(k), v) for k, v in c.get("bandwidth_curve", {}).items())
    s = lm.get("settings", {})
    out = [
        f"## Device calibration: {c['device_name']} ({c['device']}), {c['precision']}",
        "",
        f"Measured {c.get('date', '')}: {ceilings_line(c)}.",
    ]
    if curve:
        points = ", ".join(f"{n / 2**20:g} MiB: {v / 1e9:.1f}" for n, v in curve)
        out += ["", f"Copy bandwidth by bytes moved (GB/s): {points}."]
    out += [
        "",
        f"Per-kind factors of the latency model, fitted on {len(lm.get('samples', []))} single-operator cases at batch "
        f"{', '.join(map(str, s.get('batch_sizes', [])))} ({s.get('seconds', 0):.0f} s)"
        + (
            "; the efficiencies on each case's first call of a round (after the other cases), the overhead on its "
            "second (right after itself):"
            if overhead_from_hot_calls(lm)
            else "; the factors on each case's first call of a round (after the other cases), the hot ones on its "
            "second (right after itself):"
            if hot_factors_apart(lm)
            else ":"
        ),
        "",
        *_factors_md(lm),
    ]
    if has_serial_share(lm):
        out += [
            "",
            f"Half parallel at: {serial_share_note(lm)}; a call takes its roofline time {serial_share_formula(lm)}.",
        ]
    if has_cache_reuse(lm):
        out += [
            "",
            f"Hot compute/memory eff.{', hot overhead' if hot_factors_apart(lm) else ''}: the same factors fitted on "
            "each case's hot call (inputs and weights in cache); "
            f"a call's time is its time at the first-call factors {cache_reuse_formula(lm)}.",
        ]
    return out


def _threads_used(bench: dict) -> int | None:
    """Threads the timings ran with (the environment records the process default before the run)."""
    used = {r.get("threads") for r in bench["results"] if r.get("threads")}
    return used.pop() if len(used) == 1 else bench["environment"].get("torch_threads")


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

    Sections, in order: element sweeps (`elements-*.json`), device calibrations (`calibration*.json`),
    operator profiles (`profile-*.json`), predictions (`predict*.json`), model sets (`models*.json`);
    each with its figures, which are expected next to the JSON.
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
        data = _load(path, cells.SCHEMA)
        if data is not None:
            lines += ["", *_elements_md(data, path.stem)]
            found += 1
    for path in sorted(out_dir.glob("calibration*.json")):
        data = _load(path, CALIBRATION_SCHEMA)
        if data is not None:
            lines += ["", *_calibration_md(data)]
            found += 1
    for path in sorted(out_dir.glob("profile-*.json")):
        data = _load(path, profile.SCHEMA)
        if data is not None:
            roofline_png = path.with_name(path.stem + "-roofline.png").name
            lines += ["", *_profile_md(data, path.with_suffix(".png").name, roofline_png)]
            found += 1
    for path in sorted(out_dir.glob("predict*.json")):
        data = _load(path, predict.SCHEMA)
        if data is not None:
            lines += ["", *_predict_md(data)]
            found += 1
    for path in sorted(out_dir.glob("models*.json")):
        data = _load(path, models.SCHEMA)
        if data is not None:
            lines += ["", *_models_md(data, path.with_suffix(".png").name)]
            found += 1
    if not found:
        lines += ["", "No results yet."]
    return write_text(out_dir / REPORT_NAME, "\n".join(lines) + "\n")
