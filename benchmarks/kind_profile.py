"""Where a latency model's prediction of whole models goes wrong, per kind of operator: each model is
profiled by `lowformer.analyze.profile_model` (every top-level ATen call, its median over the
profiled passes, after the wall-clock measurement that warms it up) and each call predicted by the
latency model; both are summed per fit kind and printed side by side.

    python benchmarks/kind_profile.py lowformer_b1 timm:shvit_s4 timm:mobileone_s1 \
        --latency-model CALIBRATION.json --threads 2 --out docs/analysis/cpu-latency-model/kind-profile

The profiled times are host times of the ATen calls only: the Python between calls (module calls,
the model's own code) is in the model's wall time (printed beside) and in no call. The profiler
itself adds a few microseconds per call. A latency model file is what `lowformer analyze calibrate`
caches, or the calibration-*.json it writes to --out. Writes kind-profile.json and kind-profile.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lowformer._io import write_json, write_text
from lowformer.analyze.latency import LatencyModel, read_latency_model
from lowformer.analyze.opkinds import FIT_KINDS
from lowformer.analyze.profile import profile_model
from lowformer.bench.models import build_source
from lowformer.measure.opcost import count_op_costs
from lowformer.measure.session import input_shape


def profile_kinds(name: str, model: LatencyModel, batch: int, threads: int, iters: int) -> dict:
    """`lowformer.analyze.profile_model` with the latency model's ceilings (its roofline joins each
    profiled call to its cost), and the latency model's prediction of the same calls, per fit kind."""
    mode = "latency" if batch == 1 else "throughput"
    profile = profile_model(
        name, device="cpu", mode=mode, batch_size=None if batch == 1 else batch, threads=threads, iters=iters,
        ceilings=model.ceilings,
    )  # fmt: skip
    module = build_source(name)
    predicted = {
        op["index"]: op for op in model.predict(count_op_costs(module, input_shape(module, batch, (224, 224))))
    }
    kinds: dict[str, dict] = {}
    for record in profile.roofline["ops"]:
        op = predicted[record["index"]]
        k = kinds.setdefault(op["fit_kind"], {"calls": 0, "predicted_ms": 0.0, "profiled_ms": 0.0})
        k["calls"] += 1
        k["predicted_ms"] += op["predicted_s"] * 1e3
        k["profiled_ms"] += record["time_ms"] or 0.0
    return {
        "model": name,
        "batch_size": batch,
        "wall_ms": profile.wall_ms["p50"],
        "predicted_ms": sum(k["predicted_ms"] for k in kinds.values()),
        "profiled_ms": sum(k["profiled_ms"] for k in kinds.values()),
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["profiled_ms"])),
    }


def to_markdown(entries: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for e in entries:
        lines += [
            f"## {e['model']}, batch {e['batch_size']}",
            "",
            f"Wall time {e['wall_ms']:.1f} ms per call; profiled calls {e['profiled_ms']:.1f} ms; "
            f"predicted {e['predicted_ms']:.1f} ms.",
            "",
            "| kind | calls | predicted ms | profiled ms | predicted / profiled |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [_kind_row(kind, k) for kind, k in e["kinds"].items()] + [""]
    return "\n".join(lines)


def _kind_row(kind: str, k: dict) -> str:
    ratio = k["predicted_ms"] / k["profiled_ms"] if k["profiled_ms"] else float("nan")
    cells = [FIT_KINDS.get(kind, kind), str(k["calls"]), f"{k['predicted_ms']:.2f}", f"{k['profiled_ms']:.2f}"]
    return "| " + " | ".join([*cells, f"{ratio:.2f}"]) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="our model names or timm:NAME")
    p.add_argument("--latency-model", required=True, metavar="FILE", help="a latency model or calibration file")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--iters", type=int, default=20, help="profiled passes per model")
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    if not Path(args.latency_model).is_file():
        p.error(f"--latency-model {args.latency_model}: no such file")
    model = read_latency_model(args.latency_model)
    if model.ceilings.threads not in (None, args.threads):
        p.error(f"the latency model was calibrated with {model.ceilings.threads} threads; give --threads to match")
    entries = []
    for name in args.models:
        entries.append(profile_kinds(name, model, args.batch_size, args.threads, args.iters))
        e = entries[-1]
        print(f"{name}: wall {e['wall_ms']:.1f} ms, profiled {e['profiled_ms']:.1f}, predicted {e['predicted_ms']:.1f}")
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    write_json(out / "kind-profile.json", {"command": command, "latency_model": args.latency_model, "models": entries})
    md = to_markdown(entries, command)
    write_text(out / "kind-profile.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
