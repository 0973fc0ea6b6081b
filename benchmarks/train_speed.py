"""Training throughput of our models against timm's LowFormer port: interleaved rounds, medians.

    .venv/bin/python benchmarks/train_speed.py --models lowformer_b0 lowformer_b1 lowformer_e1 --batch-size 32

One training step = forward, cross-entropy, backward and an AdamW update, on a fixed random batch
(so the data pipeline is not measured). For each model the two implementations (ours from
`lowformer.create_model`, timm's from `timm.create_model`) are timed round by round in one
process, in alternating order (A B, then B A, ...): each round times `--calls` steps of each after
`--warmup` untimed ones. Reported: the median over rounds of each round's median step time as
img/s, and the per-round ratio ours / timm (min / median / max). Prints a markdown table and, with
--out, writes every sample and the environment as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import lowformer
from lowformer._io import check_writable, write_text
from lowformer.measure.env import environment
from lowformer.measure.stats import ratio_summary
from lowformer.measure.timing import PerfCounterTimer


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str | None):
    """One optimizer step on (x, y); returns a closure the timer calls."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lowformer_b0", "lowformer_b1", "lowformer_e1"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="timed steps per implementation per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", type=Path, help="write all samples and the environment to this JSON file")
    args = p.parse_args()
    if args.out:
        check_writable(args.out)  # now, not after the measurements

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timer = PerfCounterTimer(sync=sync)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    results, rows = {"environment": environment(str(device)), "args": vars(args) | {"out": str(args.out)}}, []
    for name in args.models:
        impls = {
            "ours": lowformer.create_model(name),
            "timm": timm.create_model(name),
        }
        steps = {k: make_step(m.to(device, memory_format=fmt), x, y, args.amp) for k, m in impls.items()}
        samples: dict[str, list[list[float]]] = {k: [] for k in steps}
        for r in range(args.rounds):
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            for key in order:
                for _ in range(args.warmup):
                    timer.time(steps[key])
                samples[key].append([timer.time(steps[key]) for _ in range(args.calls)])
            print(f"{name} round {r + 1}/{args.rounds}", flush=True)
        round_medians = {k: [statistics.median(s) for s in v] for k, v in samples.items()}
        img_s = {k: args.batch_size / statistics.median(v) for k, v in round_medians.items()}
        ratios = [t / o for o, t in zip(round_medians["ours"], round_medians["timm"])]  # >1: ours faster
        summary = ratio_summary(ratios)
        results[name] = {"step_s": samples, "throughput_img_s": img_s, "speedup_ours_over_timm": summary}
        rows.append(
            f"| {name} | {img_s['ours']:.1f} | {img_s['timm']:.1f} | "
            f"{summary['min']:.2f} / **{summary['median']:.2f}** / {summary['max']:.2f} |"
        )
        del impls, steps

    print()
    print(f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.device}, amp {args.amp}, "
          f"channels_last {args.channels_last}, {args.rounds} rounds x {args.calls} steps")  # fmt: skip
    print("| model | ours img/s | timm img/s | speedup min / median / max |")
    print("|---|---:|---:|---|")
    print("\n".join(rows))
    if args.out:
        write_text(args.out, json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
