"""Training values kept on the device until the host needs them.

Reading a CUDA tensor from Python (`.item()`, `bool(t)`, `.tolist()`) waits until every kernel queued
before it has run, so a loop that reads each micro-batch's loss lets the GPU run only one micro-batch
ahead of Python and idles it while Python prepares the next one. `DeviceLog.add` only queues a tiny
stack of the values; `collect` copies everything added since the last call to the host in one
transfer, the loop's only synchronisation. Nothing here is specific to classification: any loop
(the downstream engine's too) can log its losses this way and check them at its own intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

__all__ = ["DeviceLog", "Entry", "first_non_finite"]

K = TypeVar("K")


@dataclass(frozen=True)
class Entry(Generic[K]):
    """One `add`: the host-side key it was given (a step number, a record of the step) and its values."""

    key: K
    values: tuple[float, ...]


class DeviceLog(Generic[K]):
    """Scalar tensors of every micro-batch, held on their device; `collect` reads them all at once.

    Values are stored as float32 (a float32 loss and counts below 2**24 are exact).
    """

    def __init__(self) -> None:
        self._keys: list[K] = []
        self._rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, key: K, values: Sequence[torch.Tensor | float]) -> None:
        """Record `values` (scalar tensors on one device, or numbers) under `key`; no synchronisation.
        Every call of one log must give the same number of values."""
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        # a number becomes a fill kernel on the device: torch.tensor(v, device=...) would copy it from
        # pageable host memory, which waits for the queued work
        row = [
            v.detach().reshape(()).float()
            if isinstance(v, torch.Tensor)
            else torch.full((), float(v), dtype=torch.float32, device=device)
            for v in values
        ]
        self._keys.append(key)
        self._rows.append(torch.stack(row))

    def collect(self) -> list[Entry[K]]:
        """Everything added since the last call, in order, as host numbers; empties the log."""
        if not self._rows:
            return []
        table = torch.stack(self._rows).tolist()  # the one device-to-host copy (and wait)
        entries = [Entry(k, tuple(row)) for k, row in zip(self._keys, table)]
        self._keys, self._rows = [], []
        return entries


def first_non_finite(entries: Sequence[Entry[K]], column: int = 0) -> Entry[K] | None:
    """The first entry whose value in `column` (the loss, say) is NaN or infinite, or None."""
    return next((e for e in entries if not math.isfinite(e.values[column])), None)
