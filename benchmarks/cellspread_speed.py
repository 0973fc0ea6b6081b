"""What the EdgeViT `CellSpread` rewrite buys: deploy mode with it against deploy mode with the
delegates' depthwise transposed conv put back, eager and under `torch.compile` (CPU: freezing).

    .venv/bin/python benchmarks/cellspread_speed.py --model edgevit_xs --batch-size 16 --threads 2

Both variants compute the same function (checked before timing); they are timed in interleaved
rounds (A B C D, then D C B A; `lowformer.measure.timing.interleave`), and the speedup is the
median of the per-round ratios with its min/max. Writes a JSON with every round and the environment.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch import nn

import lowformer
from lowformer._io import write_json
from lowformer.bench.backends import compile_model
from lowformer.measure.env import cpu_load, environment
from lowformer.measure.session import make_input, run_context
from lowformer.measure.timing import Candidate, PerfCounterTimer, Rounds, TimingPolicy, interleave
from lowformer.models.edgevit import CellSpread


def with_transposed_convs(model: nn.Module) -> nn.Module:
    """A copy of a deployed EdgeViT whose `CellSpread` modules are the transposed convs again."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, CellSpread):
                c, (rh, rw) = child.weight.shape[0], child.stride
                conv = nn.ConvTranspose2d(c, c, (rh, rw), stride=(rh, rw), groups=c, bias=child.bias is not None)
                conv.weight, conv.bias = child.weight, child.bias  # the same tensors, in their layout
                setattr(module, child_name, conv.eval())
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="edgevit_xs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layout", default="channels_last", help="deploy mode's memory format (compile traces plain ops)")
    p.add_argument("--out", type=Path, default=Path("docs/perf/cellspread"))
    args = p.parse_args()

    torch.manual_seed(0)
    model = lowformer.create_model(args.model).eval()
    ours = lowformer.deploy(model, memory_format=args.layout)
    conv = with_transposed_convs(ours)
    assert any(isinstance(m, CellSpread) for m in ours.modules())
    assert not any(isinstance(m, CellSpread) for m in conv.modules())
    x = make_input((args.batch_size, 3, 224, 224), "cpu")
    with run_context("cpu", "fp32", args.threads):
        ref = model(x)
        for m in (ours, conv):
            err = float((m(x) - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, err
        variants = {
            "eager, transposed conv": conv,
            "eager, CellSpread": ours,
            "compile, transposed conv": compile_model(conv, "cpu"),
            "compile, CellSpread": compile_model(ours, "cpu"),
        }
        for label, fn in variants.items():
            err = float((fn(x) - ref).abs().max() / ref.abs().max())  # compiles the compiled ones
            print(f"{label}: ready, max rel err {err:.1e}", flush=True)

    load_before, _ = cpu_load()
    candidates = [
        Candidate(label, lambda fn=fn: fn(x), PerfCounterTimer(), lambda: run_context("cpu", "fp32", args.threads))
        for label, fn in variants.items()
    ]
    burst = TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=args.calls, min_s=0.0)
    times = interleave(candidates, Rounds(args.rounds, burst=burst, warmup=TimingPolicy(1, 0.0, 1, 0.0)))
    load_after, _ = cpu_load()
    medians = {t.label: [s * 1e3 for s in t.round_medians_s] for t in times}
    result = {"settings": vars(args) | {"out": str(args.out)}, "environment": environment("cpu")}
    result |= {"round_medians_ms": medians, "load_avg_1m_before_after": [load_before, load_after]}
    for mode in ("eager", "compile"):
        ratios = [a / b for a, b in zip(medians[f"{mode}, transposed conv"], medians[f"{mode}, CellSpread"])]
        result[f"speedup_{mode}"] = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}
        a, b = (statistics.median(medians[f"{mode}, {v}"]) for v in ("transposed conv", "CellSpread"))
        print(
            f"{mode}: transposed conv {a:.1f} ms, CellSpread {b:.1f} ms; speedup min / median / max "
            f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"
        )
    print(f"load average before / after: {load_before:.1f} / {load_after:.1f}")
    print(f"wrote {write_json(args.out / f'cellspread_{args.model}_bs{args.batch_size}.json', result)}")


if __name__ == "__main__":
    main()
