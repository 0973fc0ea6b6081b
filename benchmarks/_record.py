"""What the measuring benchmarks write: the command that ran, when and at what load, beside what it
measured, as STEM.json and STEM.md in the output folder (the Markdown printed too)."""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from pathlib import Path

from lowformer._io import write_json, write_text
from lowformer.measure.env import cpu_load


def measure_and_write(
    out: str | Path, stem: str, argv: list[str] | None, measure: Callable[[], dict], to_markdown: Callable[..., str]
) -> None:
    """Run `measure()`, then write its result with the context; `to_markdown(result, command, date, load)`."""
    load = cpu_load()[0]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = measure()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    write_json(Path(out) / f"{stem}.json", {"command": command, "date": date, "load_avg_1m": load, **result})
    md = to_markdown(result, command, date, load)
    write_text(Path(out) / f"{stem}.md", md)
    print(md)
