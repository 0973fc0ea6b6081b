"""Does a shared machine's speed drift, and does the compute probe follow it? One model at batch 1,
the calibration's matmul (`lowformer.measure.calibrate.compute_probe`) and a copy far larger than the
last-level cache, timed interleaved round by round (`lowformer.measure.timing.interleave`) for a while;
per round the median of each, and over the rounds the spread (max/min) of the model's time and of its
ratio to the matmul's and to the copy's. A probe that follows the drift leaves a steady ratio.

    python benchmarks/speed_drift.py --model lowformer_b1 --rounds 60 --threads 2 \
        --latency-model CALIBRATION.json --out docs/analysis/cpu-latency-model/ceiling-probe/drift

A latency model file is what `lowformer analyze calibrate` caches, or the calibration-*.json it writes
to --out (only its ceilings are used: the matmul size and precision). Writes drift.json and drift.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _record import measure_and_write

from lowformer.analyze.latency import LatencyModel, read_latency_model
from lowformer.bench.models import build_source
from lowformer.measure import stats
from lowformer.measure.calibrate import compute_probe
from lowformer.measure.session import input_shape, make_input, run_context
from lowformer.measure.timing import Candidate, Rounds, TimingPolicy, device_timer, interleave

COPY_BYTES = 64 << 20  # each of source and destination: twice the last-level cache of the machine measured


def drift(model_name: str, latency_model: LatencyModel, rounds: int, threads: int) -> dict:
    ceilings = latency_model.ceilings
    with run_context("cpu", ceilings.precision, threads), torch.inference_mode():
        model = build_source(model_name).eval()
        x = make_input(input_shape(model, 1, (224, 224)), "cpu")
        matmul, _ = compute_probe(ceilings)
        src = torch.ones(COPY_BYTES // 4)
        dst = torch.empty_like(src)
        timer = device_timer("cpu", "wall")
        candidates = [
            Candidate(model_name, lambda: model(x), timer),
            Candidate("matmul", matmul, timer),
            Candidate("copy", lambda: dst.copy_(src), timer),
        ]
        burst = TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=5, min_s=0.2)
        warmup = TimingPolicy(warmup_iters=3, warmup_s=0.5, min_iters=1, min_s=0.0)
        times = interleave(candidates, Rounds(rounds, burst=burst, warmup=warmup))
    per_round = [
        {"round": r, **{c.label: 1e3 * stats.median(t.rounds[r]) for c, t in zip(candidates, times)}}
        for r in range(rounds)
    ]
    model_ms = [row[model_name] for row in per_round]
    to_matmul = [row[model_name] / row["matmul"] for row in per_round]
    to_copy = [row[model_name] / row["copy"] for row in per_round]
    return {
        "model": model_name,
        "threads": threads,
        "rounds": per_round,
        "spread": {
            "model": max(model_ms) / min(model_ms),
            "model / matmul": max(to_matmul) / min(to_matmul),
            "model / copy": max(to_copy) / min(to_copy),
        },
        "median": {
            "model_ms": stats.median(model_ms),
            "model / matmul": stats.median(to_matmul),
            "model / copy": stats.median(to_copy),
        },
    }


def to_markdown(result: dict, command: str, date: str, load: float | None) -> str:
    name = result["model"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Measured {date} on this machine's CPU ({result['threads']} threads), load average "
        f"{'unknown' if load is None else f'{load:.1f}'} before.",
        "",
        "| spread over the rounds (max / min) | model | model / matmul | model / copy |",
        "|---|---:|---:|---:|",
        "| | " + " | ".join(f"{result['spread'][k]:.2f}x" for k in ("model", "model / matmul", "model / copy")) + " |",
        "",
        f"| round | {name} ms | matmul ms | copy ms | {name} / matmul | {name} / copy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rounds"]:
        m = row[name]
        lines.append(
            f"| {row['round']} | {m:.1f} | {row['matmul']:.2f} | {row['copy']:.2f} | "
            f"{m / row['matmul']:.2f} | {m / row['copy']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lowformer_b1", help="our name or timm:NAME (default lowformer_b1)")
    p.add_argument("--latency-model", required=True, metavar="FILE", help="a calibration or latency model file")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds: at least 2")
    path = Path(args.latency_model)
    if not path.is_file():
        p.error(f"--latency-model {path}: no such file")
    model = read_latency_model(path)
    measure_and_write(args.out, "drift", argv, lambda: drift(args.model, model, args.rounds, args.threads), to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
