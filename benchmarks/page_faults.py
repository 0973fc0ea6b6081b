"""How many page faults a model pays per call under glibc's allocator, and what they cost: every model
of a set timed at one batch size, interleaved round by round (`lowformer.measure.timing.interleave`),
first with the allocator's defaults (what `lowformer analyze models` measures unless --keep-memory),
then with freed memory kept in the process (`lowformer.measure.env.keep_freed_memory`, what
--keep-memory measures). The minor page faults of the process are counted around each burst, beside
the pages of the model's operator outputs larger than 32 MiB (counted on the meta device), which the
latency model charges at the calibrated fresh-page cost (`lowformer.measure.calibrate.Ceilings.fresh_pages_s`).

    python benchmarks/page_faults.py --set isomacs24 --batch-size 1 --threads 2 \
        --out docs/analysis/cpu-latency-model/ceiling-probe/page-faults

The latency model has no term for page faults, so a model that pays many is predicted too fast in the
default protocol. Order matters and is fixed: glibc adapts its thresholds to what the process freed
before (the default pass runs first, in a fresh process, after every model's warm-up), and setting the
thresholds back after the kept pass ends that adaptation. Writes page-faults.json and page-faults.md.
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from _models_arg import add_model_arguments, model_names
from _record import measure_and_write

from lowformer.bench.models import build_source
from lowformer.measure import stats
from lowformer.measure.calibrate import FRESH_PAGES_ABOVE, PAGE_BYTES
from lowformer.measure.env import keep_freed_memory, memory_mode
from lowformer.measure.opcost import count_op_costs
from lowformer.measure.session import input_shape, make_input, run_context
from lowformer.measure.timing import Candidate, Rounds, TimingPolicy, device_timer, interleave


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Counted:
    """A model's step that adds the process's minor page faults during each call to a total."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x
        self.faults = self.calls = 0

    def __call__(self) -> torch.Tensor:
        before = _faults()
        out = self.model(self.x)
        self.faults += _faults() - before
        self.calls += 1
        return out


def _pass(steps: dict[str, _Counted], rounds: int) -> dict[str, dict]:
    timer = device_timer("cpu", "wall")
    burst = TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=3, min_s=0.3)
    warmup = TimingPolicy(warmup_iters=2, warmup_s=0.3, min_iters=1, min_s=0.0)
    for step in steps.values():
        step.faults = step.calls = 0
    times = interleave(
        [Candidate(name, step, timer) for name, step in steps.items()], Rounds(rounds, burst=burst, warmup=warmup)
    )
    return {
        name: {"ms": 1e3 * stats.median(t.samples_s), "faults_per_call": step.faults / max(step.calls, 1)}
        for (name, step), t in zip(steps.items(), times)
    }


def page_faults(names: list[str], batch: int, threads: int, rounds: int) -> dict:
    with run_context("cpu", "fp32", threads), torch.inference_mode():
        steps, pages = {}, {}
        for name in names:
            model = build_source(name).eval()
            shape = input_shape(model, batch, (224, 224))
            costs = count_op_costs(model, shape)
            pages[name] = sum(c.bytes_written for c in costs if c.bytes_written > FRESH_PAGES_ABOVE) / PAGE_BYTES
            steps[name] = _Counted(model, make_input(shape, "cpu"))
        default = _pass(steps, rounds)
        with keep_freed_memory():
            mode = memory_mode()
            kept = _pass(steps, rounds)
    rows = [
        {
            "model": n,
            "default_ms": default[n]["ms"],
            "default_faults_per_call": default[n]["faults_per_call"],
            "kept_ms": kept[n]["ms"],
            "kept_faults_per_call": kept[n]["faults_per_call"],
            "default_over_kept": default[n]["ms"] / kept[n]["ms"],
            "output_pages_above_32mib": pages[n],
        }
        for n in names
    ]
    return {"batch_size": batch, "threads": threads, "rounds": rounds, "kept_memory_mode": mode, "models": rows}


def to_markdown(result: dict, command: str, date: str, load: float | None) -> str:
    rows = sorted(result["models"], key=lambda r: -r["default_faults_per_call"])
    ratios = [r["default_over_kept"] for r in rows]
    many = [r["default_over_kept"] for r in rows if r["default_faults_per_call"] >= 100]
    few = [r["default_over_kept"] for r in rows if r["default_faults_per_call"] < 100]
    summary = f"Default allocator over kept memory: median {stats.median(ratios):.2f}x"
    if many:
        summary += f"; the {len(many)} model(s) with >= 100 faults per call {stats.median(many):.2f}x"
    if few:
        summary += f"; the {len(few)} other(s) {stats.median(few):.2f}x"
    lines = [
        f"Command: `{command}`",
        "",
        f"Measured {date} on this machine's CPU ({result['threads']} threads, batch {result['batch_size']}), "
        f"load average {'unknown' if load is None else f'{load:.1f}'} before; {result['rounds']} interleaved rounds.",
        "",
        summary + ".",
        "",
        "| model | default ms | faults / call | pages of outputs > 32 MiB | kept memory ms | faults / call "
        "| default / kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['default_ms']:.1f} | {r['default_faults_per_call']:.0f} | "
            f"{r['output_pages_above_32mib']:.0f} | {r['kept_ms']:.1f} | "
            f"{r['kept_faults_per_call']:.0f} | {r['default_over_kept']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    names = model_names(p, args)
    measure_and_write(
        args.out,
        "page-faults",
        argv,
        lambda: page_faults(names, args.batch_size, args.threads, args.rounds),
        to_markdown,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
