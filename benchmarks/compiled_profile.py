"""Where the time of a compiled graph goes: timm's port against ours, both under `torch.compile` with
inductor freezing (the tuned candidates' compiler), profiled operator by operator.

    .venv/bin/python benchmarks/compiled_profile.py --models lowformer_b0 lowformer_b1 lowformer_e1 \
        --batch-size 16 --threads 2 --out docs/perf/compiled-profile

Both graphs are compiled with inductor's kernel profiling on, so every fused C++ kernel that
inductor generates shows up in `torch.profiler` next to the library calls it makes (oneDNN
convolutions, attention, matmuls). Times are the top-level events' CPU time per forward pass,
summed per operator group over `--iters` calls after two warm-up calls. The profiler's own overhead
is in the per-event times; the wall time per call is measured without it, interleaved
(`lowformer.measure.timing.interleave`).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

import lowformer
from lowformer._io import write_json
from lowformer.bench.backends import compile_model
from lowformer.measure.env import cpu_load, environment
from lowformer.measure.profiler import quiet_profiler
from lowformer.measure.timing import Candidate, PerfCounterTimer, Rounds, TimingPolicy, interleave

# operator groups of a frozen inductor graph on CPU, by event name
GROUPS = (
    # `_convolution_pointwise_` (in place) is the variant with the residual add fused
    ("oneDNN convolution (packed; activation or residual add fused)", ("mkldnn::_convolution_pointwise",)),
    ("oneDNN transposed convolution", ("mkldnn::_convolution_transpose_pointwise",)),
    ("linear (classifier head)", ("mkldnn::_linear_pointwise", "mkl::_mkl_linear", "aten::addmm", "aten::mm")),
    ("attention (SDPA)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("inductor fused C++ kernels (norms, activations, adds, layout)", ("cpp_fused_",)),
)


def group_of(name: str) -> str:
    for label, prefixes in GROUPS:
        if any(p in name for p in prefixes):
            return label
    return "other"


def profile_calls(fn, x: torch.Tensor, iters: int) -> dict[str, float]:
    """ms per call of each top-level event name (an event with no recorded parent)."""
    from torch.profiler import ProfilerActivity, profile

    quiet_profiler()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn(x)
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.cpu_parent is not None and "CompiledFxGraph" not in event.cpu_parent.name:
            continue
        if "CompiledFxGraph" in event.name or event.name.startswith("Torch-Compiled"):
            continue
        totals[event.name] = totals.get(event.name, 0.0) + event.cpu_time_total / 1e3 / iters
    return totals


def wall_ms(fns: dict[str, object], x: torch.Tensor, rounds: int = 6, calls: int = 2) -> dict[str, float]:
    """Median ms per call of each function, interleaved by the measuring core (A B, then B A)."""
    burst = TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=calls, min_s=0.0)
    candidates = [Candidate(k, functools.partial(f, x), PerfCounterTimer()) for k, f in fns.items()]
    times = interleave(candidates, Rounds(rounds, burst=burst))
    return {t.label: t.median_s * 1e3 for t in times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lowformer_b0", "lowformer_b1", "lowformer_e1"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/perf/compiled-profile"))
    args = p.parse_args()

    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # name every generated C++ kernel in the profile
    torch.set_num_threads(args.threads)
    cl = torch.channels_last
    for name in args.models:
        load_before, _ = cpu_load()
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(memory_format=cl)
        models = {
            "timm": lowformer.create_model(f"timm:{name}").eval(),
            "ours": lowformer.deploy(lowformer.create_model(name).eval(), memory_format="keep"),
        }
        fns = {}
        with torch.no_grad():
            for key, model in models.items():
                fns[key] = compile_model(model.to(memory_format=cl), "cpu")
                fns[key](x)  # compile
                fns[key](x)
            walls = wall_ms(fns, x)
            profiles = {key: profile_calls(fn, x, args.iters) for key, fn in fns.items()}
        load_after, _ = cpu_load()
        grouped = {key: {} for key in profiles}
        for key, totals in profiles.items():
            for event, ms in totals.items():
                g = group_of(event)
                grouped[key][g] = grouped[key].get(g, 0.0) + ms
        record = {
            "model": name,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "threads": args.threads,
            "layout": "channels_last",
            "compile": "torch.compile, inductor freezing, cpp.enable_kernel_profile",
            "wall_ms": walls,
            "grouped_ms": grouped,
            "events_ms": profiles,
            "load_avg_1m_before_after": [load_before, load_after],
            "environment": environment("cpu"),
        }
        write_json(args.out / f"compiled_profile_{name}_bs{args.batch_size}.json", record)
        print(f"\n{name}, batch {args.batch_size}, {args.threads} threads, channels_last, compiled with freezing")
        print(
            f"wall per call: timm {walls['timm']:.1f} ms, ours {walls['ours']:.1f} ms "
            f"(load {load_before:.1f} / {load_after:.1f})"
        )
        print("| operator group | timm ms (share) | ours ms (share) |")
        print("|---|---:|---:|")
        labels = sorted({g for k in grouped for g in grouped[k]}, key=lambda g: -grouped["ours"].get(g, 0.0))
        totals = {k: sum(v.values()) for k, v in grouped.items()}
        for g in labels:
            cells = [f"{grouped[k].get(g, 0.0):.1f} ({grouped[k].get(g, 0.0) / totals[k]:.0%})" for k in grouped]
            print(f"| {g} | {' | '.join(cells)} |")
        print(f"| total of profiled events | {totals['timm']:.1f} | {totals['ours']:.1f} |")


if __name__ == "__main__":
    main()
