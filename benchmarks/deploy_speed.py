"""Deploy mode against timm's LowFormer port: interleaved paired runs, medians of per-round ratios.

    .venv/bin/python benchmarks/deploy_speed.py --models lowformer_b0 lowformer_b1 --out docs/perf

For each model, four configurations are timed round by round in one process (A B C D, then
D C B A, ...): timm's port in NCHW and channels_last, ours in deploy mode with plain NCHW convs and
in deploy mode's CPU layout (`@reparam,channels_last` on CPU = the packed oneDNN convs that
`lowformer.deploy(model)` gives; on CUDA, channels_last). Writes one JSON per model (every round,
environment included) and prints a markdown table of the speedups of ours over timm at timm's
better memory format.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lowformer.bench import TimingPolicy, compare
from lowformer.report import format_compare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lowformer_b0", "lowformer_b1", "lowformer_e1", "lowformer_b3"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=3, help="timed calls per configuration per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("docs/perf"))
    args = p.parse_args()

    rows = []
    for name in args.models:
        configs = [
            f"timm:{name}",
            f"timm:{name}@channels_last",
            f"{name}@reparam",
            f"{name}@reparam,channels_last",
        ]
        report = compare(
            configs,
            rounds=args.rounds,
            device=args.device,
            batch_size=args.batch_size,
            image_size=args.image_size,
            round_timing=TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=args.calls, min_s=0.0),
            progress=True,
        )
        report.write_json(args.out / f"deploy_{name}_{args.device}_bs{args.batch_size}.json")
        print(format_compare(report))
        # per-round ratio of ours (better format) over timm (better format), from the round medians
        rounds = [e.round_medians_ms for e in report.entries]
        per_round = [min(r[0], r[1]) / min(r[2], r[3]) for r in zip(*rounds)]
        medians = [statistics.median(r) for r in rounds]
        rows.append((name, medians, min(per_round), statistics.median(per_round), max(per_round)))

    print()
    head = ["model", "timm NCHW ms", "timm CL ms", "ours deploy NCHW ms", "ours deploy (auto) ms"]
    head.append("speedup min/median/max")
    print("| " + " | ".join(head) + " |")
    print("|---|---:|---:|---:|---:|---|")
    for name, m, lo, med, hi in rows:
        print(f"| {name} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} | {m[3]:.1f} | {lo:.2f} / **{med:.2f}** / {hi:.2f} |")


if __name__ == "__main__":
    main()
