"""How much a second thread speeds each model up, from stored `analyze models` runs of one model set: a
one-thread run against one or more multi-thread runs (their geometric mean), per batch size, next to
the latency model's predicted speedup and its errors in both runs.

    python benchmarks/thread_speedup.py --one-thread docs/analysis/cpu-latency-model/isomacs24-one-thread \
        --threaded docs/analysis/cpu-latency-model/isomacs24 docs/analysis/cpu-latency-model/isomacs24-repeat \
        --out docs/analysis/cpu-latency-model/thread-speedup.md

Nothing is timed. The runs must have measured the same models at the same batch sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lowformer._io import write_text
from lowformer.measure import stats


def _load(run: Path) -> tuple[dict, dict]:
    data = json.loads((run / "models.json").read_text())
    measured = {
        (r["model"], r["batch_size"]): r["latency_ms_p50"] for r in data["bench"]["results"] if r["status"] == "ok"
    }
    predicted = {(p["model"], p["batch_size"]): p["predicted_ms"] for p in data["predictions"]}
    return measured, predicted


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def report(one: Path, threaded: list[Path]) -> str:
    m1, p1 = _load(one)
    runs = [_load(r) for r in threaded]
    lines = []
    for batch in sorted({b for _, b in m1}):
        keys = [k for k in m1 if k[1] == batch and all(k in m and k in p for m, p in runs) and k in p1]
        m2 = {k: _geomean([m[k] for m, _ in runs]) for k in keys}
        p2 = runs[0][1]
        speedup = {k: m1[k] / m2[k] for k in keys}
        one_vs_threaded = stats.spearman([m1[k] for k in keys], [m2[k] for k in keys])
        predicted_vs_threaded = stats.spearman([p2[k] for k in keys], [m2[k] for k in keys])
        ideal = stats.spearman([p1[k] / speedup[k] for k in keys], [m2[k] for k in keys])
        error_change = [(p2[k] / m2[k]) - (p1[k] / m1[k]) for k in keys]
        follows = stats.spearman([speedup[k] for k in keys], error_change)
        lines += [
            f"## Batch {batch}: {len(keys)} models",
            "",
            f"- measured speedup of the threaded runs over one thread: {min(speedup.values()):.2f}-"
            f"{max(speedup.values()):.2f} (median {stats.median(list(speedup.values())):.2f})",
            f"- Spearman of one-thread time with threaded time: {one_vs_threaded:.2f}",
            f"- Spearman of the prediction with threaded time: {predicted_vs_threaded:.2f}",
            f"- Spearman of the one-thread prediction over the measured speedup, with threaded time: {ideal:.2f}",
            f"- Spearman of the measured speedup with the change of the prediction's error from one thread to "
            f"threaded: {follows:.2f}",
            "",
            "| model | measured speedup | predicted speedup | prediction error, threaded | ... one thread |",
            "|---|---:|---:|---:|---:|",
        ]
        for k in sorted(keys, key=lambda k: speedup[k]):
            lines.append(
                f"| {k[0]} | {speedup[k]:.2f} | {p1[k] / p2[k]:.2f} | {100 * (p2[k] / m2[k] - 1):+.0f}% | "
                f"{100 * (p1[k] / m1[k] - 1):+.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one-thread", required=True, type=Path, metavar="DIR")
    p.add_argument("--threaded", required=True, nargs="+", type=Path, metavar="DIR")
    p.add_argument("--out", type=Path, metavar="FILE.md")
    args = p.parse_args(argv)
    for run in [args.one_thread, *args.threaded]:
        if not (run / "models.json").is_file():
            p.error(f"{run}: no models.json here")
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = f"# Speedup from threads, per model\n\nCommand: `{command}`\n\n" + report(args.one_thread, args.threaded)
    if args.out:
        write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
