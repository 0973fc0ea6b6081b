"""Tuned deploy against what a timm user gets: eager, and `torch.compile` with inductor freezing.

    .venv/bin/python benchmarks/tuned_speed.py --out docs/perf/tuned

For each model and batch size, these configurations are timed round by round in one process (A B C
..., then ... C B A; `lowformer.bench.compare`):

    timm eager:    timm's port, eager, NCHW and channels_last
    timm compiled: timm's port + torch.compile (on CPU with inductor freezing), NCHW and
                   channels_last; on CUDA also compile's reduce-overhead mode (CUDA graphs) and a
                   captured CUDA graph of the eager model, in both layouts
    ours tuned:    `lowformer.tune` builds every candidate that runs here (deploy mode in each
                   layout; eager, torch.compile, AOTInductor, ONNX Runtime; CUDA graphs on a GPU),
                   verifies each against the fp32 eager model, times them interleaved and keeps the
                   fastest (its table is printed)

Speedups are per round, from round medians taken moments apart: ours tuned against the fastest
timm eager configuration of that round, and against the fastest timm compiled one. The table gives
the median of the per-round ratios and its min/max. On a GPU:

    python benchmarks/tuned_speed.py --device cuda --batch-sizes 256 --precision bf16 --out OUT
    python benchmarks/tuned_speed.py --device cuda --batch-sizes 1 --precision fp32 --out OUT

EdgeViT has no timm port:
its baseline is our EdgeViT as the official code computes it (no deploy mode), eager and compiled.
Each comparison writes a JSON (every round, the tuning table, the environment, the load before
and after) as soon as it is done, and the script prints a markdown table; `--table` prints the
table of every JSON already in --out (runs split over several invocations), timing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from lowformer._io import write_json
from lowformer.bench import TimingPolicy, compare
from lowformer.cli.tune import format_tune
from lowformer.measure.env import cpu_load
from lowformer.report import format_compare

MODELS = ["lowformer_b0", "lowformer_b1", "lowformer_e1", "lowformer_b3", "edgevit_xs"]


def baseline(name: str) -> str:
    """The name a user without our deploy mode runs: timm's port, or (EdgeViT) our plain model."""
    return name if name.startswith("edgevit") else f"timm:{name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 1])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=3, help="timed calls per configuration per round (batch > 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every configuration")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="fp32 (TF32 off), tf32, fp16, bf16 (autocast)")
    p.add_argument("--out", type=Path, default=Path("docs/perf/tuned"))
    p.add_argument("--table", action="store_true", help="print the table from the JSON already in --out, time nothing")
    args = p.parse_args()

    if args.table:
        print_table([json.loads(p.read_text()) for p in sorted(args.out.glob("tuned_*.json"))])
        return
    records = []
    for batch in args.batch_sizes:
        for name in args.models:
            base = baseline(name)
            eager = [base, f"{base}@channels_last"]
            compiled = [f"{base}@backend=compile", f"{base}@backend=compile,channels_last"]
            if args.device.startswith("cuda"):
                compiled += [f"{b},compile_mode=reduce-overhead" for b in compiled]
                compiled += [f"{base}@backend=cudagraphs", f"{base}@backend=cudagraphs,channels_last"]
            specs = [*eager, *compiled, f"{name}@backend=tuned"]
            calls = args.calls if batch > 1 else 10 * args.calls  # batch 1 calls are short: more per round
            load_before, _ = cpu_load()
            start = time.perf_counter()
            report = compare(
                specs,
                rounds=args.rounds,
                device=args.device,
                batch_size=batch,
                image_size=args.image_size,
                precision=args.precision,
                threads=args.threads,
                round_timing=TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=calls, min_s=0.0),
                progress=True,
            )
            load_after, _ = cpu_load()
            data = report.to_dict()
            data["groups"] = {"eager": eager, "compiled": compiled}
            data["load_avg_1m_before_after"] = [load_before, load_after]
            data["took_s"] = time.perf_counter() - start
            write_json(args.out / f"tuned_{name}_{args.device}_{args.precision}_bs{batch}.json", data)
            tuned = report.entries[-1]
            print(format_compare(report), flush=True)
            if tuned.tuning:
                print(format_tune(tuned.tuning), flush=True)
            records.append(data)
    print_table(records)


def summarize(data: dict) -> tuple | None:
    """One row of the table from a comparison's JSON: per-round speedups of ours tuned (the last
    entry) over the fastest timm eager and the fastest timm compiled configuration of each round."""
    entries = data["configs"]
    if not all(e["status"] == "ok" for e in entries):
        return None
    n_eager = len(data["groups"]["eager"]) if "groups" in data else 2  # the two layouts
    rounds = [e["round_medians_ms"] for e in entries]
    ours = rounds[-1]  # the compiled configurations are the ones between eager and ours
    best_eager = [min(r) for r in zip(*rounds[:n_eager])]
    best_compiled = [min(r) for r in zip(*rounds[n_eager:-1])]
    vs_eager = [b / o for b, o in zip(best_eager, ours)]
    vs_compiled = [b / o for b, o in zip(best_compiled, ours)]
    medians = [statistics.median(m) for m in rounds]
    pick = (entries[-1]["backend_note"] or "").removeprefix("tuned: ")
    eager_ms = " / ".join(f"{m:.1f}" for m in medians[:n_eager])
    compiled_ms = " / ".join(f"{m:.1f}" for m in medians[n_eager:-1])
    load_before, load_after = data["load_avg_1m_before_after"]
    return (
        entries[-1]["label"].split("@")[0],
        entries[-1]["config"]["batch_size"],
        eager_ms,
        compiled_ms,
        medians[-1],
        pick,
        vs_eager,
        vs_compiled,
        load_before,
        load_after,
    )


def print_table(records: list[dict]) -> None:
    """The markdown table of docs/performance.md, from the comparisons' JSON records."""
    head = ["model", "batch", "timm eager ms (NCHW / CL)", "timm compiled ms (NCHW / CL)", "ours tuned ms"]
    head += ["tuned pick", "vs timm eager min / median / max", "vs timm compiled min / median / max"]
    head += ["load before / after"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|---|---:|---:|---:|---:|---|---|---|---|")
    for data in records:
        row = summarize(data)
        if row is None:
            label, batch = data["configs"][-1]["label"], data["configs"][-1]["config"]["batch_size"]
            print(f"| {label.split('@')[0]} | {batch} | a configuration failed; see the JSON |")
            continue
        name, batch, eager_ms, compiled_ms, ours_ms, pick, ve, vc, lb, la = row
        print(
            f"| {name} | {batch} | {eager_ms} | {compiled_ms} | {ours_ms:.1f} | {pick} | "
            f"{min(ve):.2f} / **{statistics.median(ve):.2f}** / {max(ve):.2f} | "
            f"{min(vc):.2f} / **{statistics.median(vc):.2f}** / {max(vc):.2f} | {lb:.1f} / {la:.1f} |"
        )


if __name__ == "__main__":
    main()
