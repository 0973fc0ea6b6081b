"""What the detection and segmentation datasets share: the error a malformed dataset raises, the
order samples are read in, per-sample seeds, and how a failure inside a loader worker reaches the
training loop with its message intact.

Reproducibility: the samples of step t of epoch e, and every sample's augmentation, are functions
of (seed, epoch, t) alone, not of the number of loader workers or of an interruption, so a run
killed and resumed computes what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


class DatasetError(ValueError):
    """A dataset does not have the layout or content the loader reads; the message says what and where."""


@dataclass(frozen=True)
class Failed:
    """A sample that could not be loaded, carried to the main process as a value: an exception raised
    in a loader worker would arrive wrapped in the worker's traceback instead of its own message."""

    message: str


def sample_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers (run seed, epoch, sample index, ...)."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded for a block (the transforms draw from it), restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def take_failures(batch: list[tuple[Any, Any]]) -> tuple[list[tuple[Any, Any]], list[str]]:
    """The loadable samples of a batch, and the messages of those that failed."""
    failed = [s.message for s in batch if isinstance(s, Failed)]
    return [s for s in batch if not isinstance(s, Failed)], failed


def raise_failures(failed: list[str]) -> None:
    if failed:
        more = f" (and {len(failed) - 1} more in this batch)" if len(failed) > 1 else ""
        raise DatasetError(failed[0] + more)


class StepSampler(Sampler[list[tuple[int, int]]]):
    """This process's samples of each optimizer step, as (index, augmentation seed) pairs.

    Epoch e is a permutation seeded by (seed, e); step t takes the next `batch_size x world_size`
    indices and process r the r-th `batch_size` of them. The last incomplete batch of an epoch is
    dropped. `start_step` skips the steps a resumed run has done.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        world_size: int = 1,
        rank: int = 0,
        start_step: int = 0,
    ) -> None:
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.world_size, self.rank, self.start_step = world_size, rank, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0x5A3))
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        global_batch = self.batch_size * self.world_size
        for t in range(self.start_step, self.steps_per_epoch):
            first = t * global_batch + self.rank * self.batch_size
            yield [(i, sample_seed(self.seed, self.epoch, i, 1)) for i in perm[first : first + self.batch_size]]


def shard(num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's share of an evaluation set in batches (every sample exactly once over all processes)."""
    mine = list(range(rank, num_samples, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
