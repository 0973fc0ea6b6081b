"""Judge latency models against timings already measured: the same stored `analyze models` runs, predicted
by each model, so that two latency models are compared on identical measurements (no timing noise
between them).

    python benchmarks/latency_model_rejudge.py \
        --runs docs/analysis/cpu-latency-model/isomacs24 docs/analysis/cpu-latency-model/default-protocol \
        --models operators=OPERATOR_FIT.json elements=REFINED.json --out docs/analysis/cpu-latency-model/rejudged

A latency model file is what `lowformer analyze calibrate` caches (its path is printed), or the
calibration-*.json it writes to --out. `--first-calls` adds, for each model whose sweep timed a hot
call, the same samples refitted on their first calls alone (NAME-first: the overhead as well as the
efficiencies from the first calls, as the first sweep version did), so the two fits compare on one
sweep; `--without-pages` adds, for each model with a fresh-page cost, its sweep refitted with that cost
at 0 (NAME-nopages: no page-fault term), likewise; `--without-serial` adds, for each model fitted with
a serial share, its sweep refitted without one (NAME-noserial: every call on all threads); `--with-reuse`
adds, for each model fitted without hot-call factors (sweep version 4 and before) whose sweep timed hot
calls, its sweep refitted with them and this machine's private cache size (NAME-reuse: the cache reuse of
sweep version 5), and `--without-reuse`, for each model with them, the same model without cache reuse
(NAME-noreuse: every call at its first-call time). `--without-layout` adds, for each model with the
kinds split off by an input's layout (`FALLBACK_KINDS`: sweep versions 7-9), the same model without
their factors (NAME-nolayout: those calls at the factors of the kind they were split off, as files of
version 6 and before predict them); `--without-kind KIND[,KIND...]` (repeatable, split-off kinds) adds
the same model without those kinds' factors (NAME-no-KIND, NAME-no-KIND+KIND). `--refit` adds, for each
model whose sweep timed hot calls, its sweep refitted with this version's fit (NAME-refit: a new fit
judged on the samples an older one was fitted on, with the cache size the model has). `--bias` also splits
every judged model's error into what stays the same whichever latency model and run predict it (its
bias: the log of predicted over measured time, less the run's median of it, averaged) and what moves
between latency models (say, calibrations repeated on one machine) and between runs (timing noise),
written as bias.md and bias.json. Per run, mode and batch size: the Spearman and Kendall rank
correlation of MACs and of each model's prediction with the measured time, and each prediction's median
and largest absolute error; written as rejudged.json and rejudged.md in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

from lowformer._io import write_json, write_text
from lowformer.analyze.latency import LatencyModel, Sample, fit_latency_model, read_latency_model
from lowformer.analyze.opkinds import FALLBACK_KINDS
from lowformer.analyze.predict import predict_costs
from lowformer.bench.models import build_source
from lowformer.measure import stats
from lowformer.measure.env import private_cache_bytes
from lowformer.measure.opcost import count_op_costs
from lowformer.measure.session import input_shape


def _measured(run: Path) -> list[dict]:
    data = json.loads((run / "models.json").read_text())
    return [r for r in data["bench"]["results"] if r.get("status") == "ok" and r.get("latency_ms_p50")]


def _costs(source: str, batch: int, size: tuple[int, int], cache: dict) -> list:
    """A model's operator costs at this batch and size, counted once for every latency model."""
    key = (source, batch, size)
    if key not in cache:
        module = build_source(source)
        cache[key] = count_op_costs(module, input_shape(module, batch, size))
    return cache[key]


def judge(runs: list[Path], models: dict[str, LatencyModel]) -> list[dict]:
    cache: dict = {}
    out = []
    for run in runs:
        groups: dict[tuple[str, int], list[dict]] = {}
        for r in _measured(run):
            groups.setdefault((r["mode"], r["batch_size"]), []).append(r)
        for (mode, batch), rs in sorted(groups.items(), key=lambda kv: kv[0][1], reverse=True):
            measured = [r["latency_ms_p50"] for r in rs]
            entry = {"run": str(run), "mode": mode, "batch_size": batch, "models": len(rs)}
            entry["spearman_macs"] = stats.spearman([float(r["macs"]) for r in rs], measured)
            entry["kendall_macs"] = stats.kendall([float(r["macs"]) for r in rs], measured)
            for name, model in models.items():
                predicted = []
                for r in rs:
                    costs = _costs(r["model"], batch, (r["image_height"], r["image_width"]), cache)
                    predicted.append(predict_costs(costs, model)["predicted_ms"])
                errors = [p / m - 1 for p, m in zip(predicted, measured)]
                entry[name] = {
                    "spearman": stats.spearman(predicted, measured),
                    "kendall": stats.kendall(predicted, measured),
                    "median_abs_error": stats.median([abs(e) for e in errors]),
                    "max_abs_error": max(abs(e) for e in errors),
                    "errors": {r["model"]: e for r, e in zip(rs, errors)},
                }
            out.append(entry)
    return out


def to_markdown(entries: list[dict], names: list[str], command: str) -> str:
    head = ["run", "mode", "models", "Spearman: MACs"] + [f"Spearman: {n}" for n in names]
    head += [f"Kendall: {n}" for n in names] + [f"median error: {n}" for n in names]
    rows = []
    for e in entries:
        row = [
            "/".join(Path(e["run"]).parts[-2:]),
            f"{e['mode']}, batch {e['batch_size']}",
            str(e["models"]),
            f"{e['spearman_macs']:.2f}",
        ]
        row += [f"{e[n]['spearman']:.2f}" for n in names] + [f"{e[n]['kendall']:.2f}" for n in names]
        row += [f"{100 * e[n]['median_abs_error']:.0f}%" for n in names]
        rows.append(row)
    lines = [f"Command: `{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bias(entries: list[dict], names: list[str], batch: int) -> list[dict]:
    """Per judged model at this batch size: `bias`, the mean over latency models of its mean over runs of
    log(predicted / measured) less that run's median over the judged models (0: ranked where the run
    ranks it, relative to the others); `across_models`, the spread (standard deviation) of those means
    between latency models; `across_runs`, the mean over latency models of the spread between runs.
    Sorted by bias."""
    logs: dict[str, dict[str, list[float]]] = {}
    for e in entries:
        if e["batch_size"] != batch:
            continue
        for name in names:
            errors = {m: math.log1p(x) for m, x in e[name]["errors"].items()}
            centre = statistics.median(errors.values())
            for m, x in errors.items():
                logs.setdefault(m, {}).setdefault(name, []).append(x - centre)
    rows = []
    for model, by_name in logs.items():
        means = [statistics.fmean(v) for v in by_name.values()]
        runs = [statistics.pstdev(v) for v in by_name.values() if len(v) > 1]
        rows.append(
            {
                "model": model,
                "runs": max(len(v) for v in by_name.values()),
                "bias": statistics.fmean(means),
                "across_models": statistics.pstdev(means) if len(means) > 1 else None,
                "across_runs": statistics.fmean(runs) if runs else None,
            }
        )
    return sorted(rows, key=lambda r: r["bias"])


def bias_markdown(entries: list[dict], names: list[str], command: str) -> str:
    def spread(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    def median_spread(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows if r[key] is not None]
        return spread(statistics.median(values) if values else None)

    lines = [f"Command: `{command}`", ""]
    for batch in sorted({e["batch_size"] for e in entries}):
        rows = bias(entries, names, batch)
        spearman = {n: [e[n]["spearman"] for e in entries if e["batch_size"] == batch] for n in names}
        lines += [f"## Batch {batch}", "", "Mean Spearman over the runs, per latency model: "]
        lines[-1] += ", ".join(f"{n} {statistics.fmean(v):.3f}" for n, v in spearman.items()) + "."
        lines += [
            "",
            f"Median over the judged models: |bias| {statistics.median(abs(r['bias']) for r in rows):.2f}, "
            f"spread across latency models {median_spread(rows, 'across_models')}, across runs "
            f"{median_spread(rows, 'across_runs')} (natural log units; 0.10 = about 10%).",
        ]
        lines += [
            "",
            "| model | runs | bias | spread across latency models | spread across runs |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [
                r["model"],
                str(r["runs"]),
                f"{r['bias']:+.2f}",
                spread(r["across_models"]),
                spread(r["across_runs"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs", nargs="+", required=True, metavar="DIR", help="folders holding an `analyze models` models.json"
    )
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=FILE", help="latency model files to compare")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--first-calls", action="store_true", help="also refit each model on its first calls alone")
    p.add_argument(
        "--without-pages", action="store_true", help="also refit each model with a fresh-page cost of 0 (no page term)"
    )
    p.add_argument("--without-serial", action="store_true", help="also refit each model without a serial share (h = 0)")
    p.add_argument(
        "--with-reuse", action="store_true", help="also refit each model with hot-call factors (cache reuse)"
    )
    p.add_argument("--without-reuse", action="store_true", help="also predict with each model's cache reuse off")
    p.add_argument(
        "--without-layout",
        action="store_true",
        help="also predict with each model's layout kinds dropped (their calls at the kind they were split off)",
    )
    p.add_argument(
        "--without-kind",
        action="append",
        default=[],
        metavar="KIND[,KIND...]",
        help="also predict with these split-off kinds dropped together (repeatable: one variant each; kinds: "
        f"{', '.join(sorted(FALLBACK_KINDS))})",
    )
    p.add_argument("--refit", action="store_true", help="also refit each model's sweep with this version's fit")
    p.add_argument(
        "--bias",
        action="store_true",
        help="also split each judged model's error into bias and spreads (bias.md, bias.json)",
    )
    args = p.parse_args(argv)
    dropped = [tuple(dict.fromkeys(group.split(","))) for group in dict.fromkeys(args.without_kind)]
    for group in dropped:
        if unknown := [k for k in group if k not in FALLBACK_KINDS]:
            p.error(
                f"--without-kind: {', '.join(unknown)} is not a split-off kind; "
                f"one of {', '.join(sorted(FALLBACK_KINDS))}"
            )
    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "models.json").is_file():
            p.error(f"{r}: no models.json here")
    models = {}
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"--models {spec!r}: give NAME=FILE with an existing latency model file")
        models[name] = read_latency_model(path)
        if args.first_calls and all(x.hot_time_s for x in models[name].samples):
            first = [Sample(**{**x.to_dict(), "hot_time_s": None}) for x in models[name].samples]
            models[f"{name}-first"] = fit_latency_model(first, models[name].ceilings, models[name].settings)
        if args.without_pages and models[name].ceilings.fresh_page_s:
            ceilings = dataclasses.replace(models[name].ceilings, fresh_page_s=0.0)
            models[f"{name}-nopages"] = fit_latency_model(
                models[name].samples, ceilings, models[name].settings, cache_bytes=models[name].cache_bytes
            )
        if args.without_serial and any(
            f.half_parallel_s or f.half_parallel_bytes for f in models[name].factors.values()
        ):
            models[f"{name}-noserial"] = fit_latency_model(
                models[name].samples,
                models[name].ceilings,
                models[name].settings,
                serial=False,
                cache_bytes=models[name].cache_bytes,
            )
        lm = models[name]
        if args.with_reuse and not lm.cache_bytes and lm.samples and all(x.hot_time_s for x in lm.samples):
            cache = private_cache_bytes(lm.ceilings.device, lm.ceilings.threads)
            models[f"{name}-reuse"] = fit_latency_model(lm.samples, lm.ceilings, lm.settings, cache_bytes=cache)
        if args.without_reuse and lm.cache_bytes:
            models[f"{name}-noreuse"] = dataclasses.replace(lm, cache_bytes=0)
        variants = {f"{name}-no-{'+'.join(group)}": group for group in dropped}
        if args.without_layout:
            variants[f"{name}-nolayout"] = tuple(FALLBACK_KINDS)
        for variant, group in variants.items():
            if lm.factors.keys() & set(group):  # the model has one of them: its calls fall back without it
                factors = {k: f for k, f in lm.factors.items() if k not in group}
                models[variant] = dataclasses.replace(lm, factors=factors)
        if args.refit and lm.samples and all(x.hot_time_s for x in lm.samples):
            models[f"{name}-refit"] = fit_latency_model(
                lm.samples, lm.ceilings, lm.settings, cache_bytes=lm.cache_bytes
            )
    entries = judge(runs, models)
    out = Path(args.out)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    write_json(out / "rejudged.json", {"command": command, "entries": entries})
    md = to_markdown(entries, list(models), command)
    write_text(out / "rejudged.md", md)
    print(md)
    if args.bias:
        batches = sorted({e["batch_size"] for e in entries})
        rows = {str(b): bias(entries, list(models), b) for b in batches}
        write_json(out / "bias.json", {"command": command, "batch_sizes": rows})
        md = bias_markdown(entries, list(models), command)
        write_text(out / "bias.md", md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
