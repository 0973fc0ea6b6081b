"""Does splitting a batch across the cores beat intra-op threads? One forward pass of the whole batch
with 2 intra-op threads, against the two halves of the batch run at once on 2 Python threads with 1
intra-op thread each (what throughput "streams" do in other runtimes), per runtime:

    .venv/bin/python benchmarks/batch_split.py --model lowformer_b0 --batch-size 16 --out docs/perf/batch-split

- eager:        ours in deploy mode (packed oneDNN convs); the halves share the module
- onnxruntime:  one session of 2 threads against two sessions of 1 thread (ONNX Runtime releases
                the GIL while it runs)
- aoti:         one AOTInductor package compiled at 2 threads against two packages compiled at 1
                thread for half the batch (`--aoti`; compiling takes about a minute)

The split outputs are checked against the whole-batch ones; timing is interleaved by the measuring
core (`lowformer.measure.timing.interleave`), 2 calls per configuration per round, and the speedup
is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import lowformer
from lowformer._io import write_json
from lowformer.measure.env import cpu_load, environment
from lowformer.measure.timing import Candidate, PerfCounterTimer, Rounds, TimingPolicy, interleave


def one_thread(fn, x):
    torch.set_num_threads(1)  # the worker thread's own OpenMP setting
    return fn(x)


def split(pool: ThreadPoolExecutor, fns, x):
    halves = [pool.submit(one_thread, fn, part) for fn, part in zip(fns, x.chunk(2))]
    return torch.cat([torch.as_tensor(h.result()) for h in halves])


def onnxruntime_runs(model, x: torch.Tensor, folder: str):
    import onnxruntime as ort

    from lowformer.export import export

    def session(batch: torch.Tensor, threads: int):
        path = export(model, os.path.join(folder, f"b{len(batch)}.onnx"), "onnx", example_input=batch)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda t: s.run(None, {"input": np.ascontiguousarray(t.numpy())})[0]

    half = x[: len(x) // 2]
    return session(x, 2), [session(half, 1), session(half, 1)]


def aoti_runs(model, x: torch.Tensor, folder: str):
    from lowformer.bench.backends import compile_aoti_package

    torch.set_num_threads(2)
    whole = torch._inductor.aoti_load_package(str(compile_aoti_package(model, x, Path(folder) / "whole.pt2")))
    torch.set_num_threads(1)  # inductor fixes its kernels' thread count when it compiles them
    half = compile_aoti_package(model, x[: len(x) // 2], Path(folder) / "half.pt2")
    torch.set_num_threads(2)
    return whole, [torch._inductor.aoti_load_package(str(half)) for _ in range(2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lowformer_b0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--aoti", action="store_true", help="also AOTInductor packages (compiles two)")
    p.add_argument("--out", type=Path, default=Path("docs/perf/batch-split"))
    args = p.parse_args()

    torch.manual_seed(0)
    model = lowformer.deploy(lowformer.create_model(args.model).eval())
    x = torch.randn(args.batch_size, 3, 224, 224)
    torch.set_num_threads(2)
    pool = ThreadPoolExecutor(2)
    folder = tempfile.TemporaryDirectory()
    load_before, _ = cpu_load()
    with torch.inference_mode():
        reference = model(x)
        runtimes = {"eager": (model, [model, model])}
        runtimes["onnxruntime"] = onnxruntime_runs(lowformer.deploy(model, memory_format="keep"), x, folder.name)
        if args.aoti:
            runtimes["aoti"] = aoti_runs(lowformer.deploy(model, memory_format="keep"), x, folder.name)
        configs = {}
        for name, (whole, halves) in runtimes.items():
            configs[f"{name} whole batch, 2 threads"] = lambda t, f=whole: torch.as_tensor(f(t))
            configs[f"{name} split, 2 x 1 thread"] = lambda t, fs=halves: split(pool, fs, t)
        errors = {k: float((f(x) - reference).abs().max() / reference.abs().max()) for k, f in configs.items()}
        burst = TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=2, min_s=0.0)
        candidates = [Candidate(k, functools.partial(f, x), PerfCounterTimer()) for k, f in configs.items()]
        times = interleave(candidates, Rounds(args.rounds, burst=burst))
        samples = {t.label: [m * 1e3 for m in t.round_medians_s] for t in times}
    load_after, _ = cpu_load()
    rows = []
    for name in runtimes:
        whole, halves = samples[f"{name} whole batch, 2 threads"], samples[f"{name} split, 2 x 1 thread"]
        ratios = [w / s for w, s in zip(whole, halves)]
        rows.append((name, statistics.median(whole), statistics.median(halves), ratios))
    record = {
        "model": args.model,
        "batch_size": args.batch_size,
        "round_medians_ms": samples,
        "max_rel_err": errors,
        "load_avg_1m_before_after": [load_before, load_after],
        "environment": environment("cpu"),
    }
    write_json(args.out / f"batch_split_{args.model}_bs{args.batch_size}.json", record)
    print(f"{args.model}, batch {args.batch_size}, {args.rounds} rounds (load {load_before:.1f} / {load_after:.1f})")
    print("| runtime | whole batch, 2 threads ms | split, 2 x 1 thread ms | split speedup min / median / max |")
    print("|---|---:|---:|---|")
    for name, whole, halves, ratios in rows:
        print(
            f"| {name} | {whole:.1f} | {halves:.1f} | "
            f"{min(ratios):.2f} / **{statistics.median(ratios):.2f}** / {max(ratios):.2f} |"
        )
    print(
        "max rel err of each configuration against the whole batch in eager mode:",
        ", ".join(f"{k}: {v:.1e}" for k, v in errors.items()),
    )


if __name__ == "__main__":
    main()
