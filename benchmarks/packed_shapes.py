"""Deploy mode's packed convolutions at a second input shape: a model first run at one batch size and
then used at another, against the same model packed for that batch size from the start.

    .venv/bin/python benchmarks/packed_shapes.py --model lowformer_b0 --first 16 --then 1 --out docs/perf/packed-shapes

oneDNN picks a packed weight layout for the input shape it is given (`lowformer.onednn`); the
question is whether a deployed model keeps running well when the shape changes. Both models are
deployed from the same weights, outputs are compared, and the two are timed at the second shape,
interleaved by the measuring core (`lowformer.measure.timing.interleave`).
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from pathlib import Path

import torch

import lowformer
from lowformer._io import write_json
from lowformer.measure.env import cpu_load, environment
from lowformer.measure.timing import Candidate, PerfCounterTimer, Rounds, TimingPolicy, interleave


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lowformer_b0")
    p.add_argument("--first", type=int, default=16, help="the batch size the first model runs at first")
    p.add_argument("--then", type=int, default=1, help="the batch size both are timed at")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/perf/packed-shapes"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lowformer.create_model(args.model).eval()
    shifted, direct = lowformer.deploy(copy.deepcopy(model)), lowformer.deploy(copy.deepcopy(model))
    cl = torch.channels_last
    first = torch.randn(args.first, 3, 224, 224).contiguous(memory_format=cl)
    x = torch.randn(args.then, 3, 224, 224).contiguous(memory_format=cl)
    load_before, _ = cpu_load()
    with torch.no_grad():
        shifted(first)  # packed for the first shape
        direct(x)  # packed for the timed shape
        max_diff = float((shifted(x) - direct(x)).abs().max())
        calls = 20 if args.then == 1 else 2
        burst = TimingPolicy(warmup_iters=2, warmup_s=0.0, min_iters=calls, min_s=0.0)
        labels = (f"run at batch {args.first} first", f"packed for batch {args.then}")
        models = zip(labels, (shifted, direct))
        candidates = [Candidate(k, functools.partial(m, x), PerfCounterTimer()) for k, m in models]
        times = interleave(candidates, Rounds(args.rounds, burst=burst))
    load_after, _ = cpu_load()
    ratios = [a / b for a, b in zip(times[0].round_medians_s, times[1].round_medians_s)]
    record = {
        "model": args.model,
        "first_batch": args.first,
        "timed_batch": args.then,
        "round_medians_ms": {t.label: [s * 1e3 for s in t.round_medians_s] for t in times},
        "max_abs_diff": max_diff,
        "load_avg_1m_before_after": [load_before, load_after],
        "environment": environment("cpu"),
    }
    write_json(args.out / f"packed_shapes_{args.model}_{args.first}_then_{args.then}.json", record)
    for t in times:
        print(f"{t.label}: {t.median_s * 1e3:.2f} ms per call at batch {args.then}")
    print(
        f"time ratio (first / second) min / median / max: {min(ratios):.3f} / {statistics.median(ratios):.3f} / "
        f"{max(ratios):.3f}; max abs diff {max_diff:.1e}; load {load_before:.1f} / {load_after:.1f}"
    )


if __name__ == "__main__":
    main()
