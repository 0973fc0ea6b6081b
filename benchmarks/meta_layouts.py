"""Which ATen operators' meta kernels lay out their output unlike the CPU kernels a model runs: every
ATen call of each model is run on the CPU and again on meta tensors with the same shapes and strides,
and the calls whose output strides differ are listed per operator, with an example.

    python benchmarks/meta_layouts.py --set isomacs24 --set isomacs24-large --batch-size 1 --uncorrected \
        --out docs/analysis/cpu-latency-model/channels-last/meta-layouts/uncorrected-batch1

The operator-cost walk (`lowformer.measure.opcost`) runs on the meta device, and the latency model picks
some kinds by the layout of a call's input (`lowformer.analyze.opkinds.fit_kind`): an operator whose meta
output is laid out otherwise hands every call after it the wrong layout. The walk corrects the ones
this found (`lowformer.measure.opcost._EAGER_LAYOUT`) before it records a call, so with the correction
in place, this lists none of them; run it after a torch upgrade. Calls a meta kernel cannot run (an
operator without one) are counted as skipped. Writes meta-layouts.json and meta-layouts.md.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _models_arg import add_model_arguments, model_names
from _record import measure_and_write
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from lowformer.bench.models import build_source
from lowformer.measure.opcost import _EAGER_LAYOUT, _tensors


def _on_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


class _Compare(TorchDispatchMode):
    """Runs each call on its CPU arguments, then on meta copies of them, and records where the first
    output tensor's strides differ (with `corrected`, after the walk's correction of the meta output)."""

    def __init__(self, model: str, found: dict, counts: dict, corrected: bool) -> None:
        super().__init__()
        self.model, self.found, self.counts, self.corrected = model, found, counts, corrected

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = next(_tensors(out), None)
        if first is None or first.numel() < 2:
            return out
        self.counts["calls"] += 1
        try:
            meta_args = tree_map(_on_meta, args)
            meta = func(*meta_args, **tree_map(_on_meta, kwargs))
        except Exception:  # noqa: BLE001 - an operator without a meta kernel: nothing to compare
            self.counts["skipped"] += 1
            return out
        name = func.overloadpacket.__name__
        if self.corrected and name in _EAGER_LAYOUT:
            meta = _EAGER_LAYOUT[name](meta_args, meta)
        meta_first = next(_tensors(meta), None)
        if meta_first is not None and meta_first.stride() != first.stride():
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            entry = self.found.setdefault(str(func), {"calls": 0, "models": [], "example": None})
            entry["calls"] += 1
            if self.model not in entry["models"]:
                entry["models"].append(self.model)
            entry["example"] = entry["example"] or {
                "model": self.model,
                "input_shape": list(x.shape) if x is not None else None,
                "input_strides": list(x.stride()) if x is not None else None,
                "cpu_strides": list(first.stride()),
                "meta_strides": list(meta_first.stride()),
            }
        return out


def meta_layouts(names: list, batch: int, corrected: bool) -> dict:
    """Every call of each model (a name, or a module) at this batch size on 224 x 224 images, compared;
    `corrected`: the meta output after the walk's correction, as the walk records it."""
    found: dict = {}
    counts = {"calls": 0, "skipped": 0}
    labels = [name if isinstance(name, str) else type(name).__name__ for name in names]
    for name, label in zip(names, labels):
        model = build_source(name).eval()
        x = torch.zeros(batch, getattr(model, "in_chans", 3), 224, 224)
        with torch.no_grad(), _Compare(label, found, counts, corrected):
            model(x)
    return {"models": labels, "batch_size": batch, "corrected": corrected, **counts, "operators": found}


def to_markdown(result: dict, command: str, date: str, load: float) -> str:
    state = "with" if result["corrected"] else "without"
    lines = [
        f"Command: `{command}` ({date}, load average {load:.1f})",
        "",
        f"{len(result['models'])} models at batch {result['batch_size']}, {state} the walk's correction: "
        f"{result['calls']} calls compared, {result['skipped']} without a meta kernel.",
        "",
    ]
    if not result["operators"]:
        return "\n".join([*lines, "Every compared call's meta output is laid out as on the CPU."]) + "\n"
    lines += ["| operator | calls | models | example input strides | CPU output strides | meta output strides |"]
    lines += ["|---|---:|---|---|---|---|"]
    for op, e in sorted(result["operators"].items(), key=lambda kv: -kv[1]["calls"]):
        ex = e["example"]
        lines.append(
            f"| {op} | {e['calls']} | {', '.join(e['models'])} | {ex['input_strides']} | {ex['cpu_strides']} | "
            f"{ex['meta_strides']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--uncorrected", action="store_true", help="compare the meta kernels' own outputs, without the correction"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    names = model_names(p, args)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    measure_and_write(
        args.out,
        "meta-layouts",
        argv,
        lambda: meta_layouts(names, args.batch_size, not args.uncorrected),
        to_markdown,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
