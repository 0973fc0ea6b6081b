"""Helpers for state-dict key maps: the (native key, foreign key) pairs each family enumerates
from its spec, and the lookups that convert in either direction."""

from __future__ import annotations

import torch

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def weight_bias(dst: str, src: str, bias: bool = True) -> list[tuple[str, str]]:
    return [(f"{dst}.weight", f"{src}.weight")] + ([(f"{dst}.bias", f"{src}.bias")] if bias else [])


def batchnorm(dst: str, src: str) -> list[tuple[str, str]]:
    return [(f"{dst}.{p}", f"{src}.{p}") for p in _BN_KEYS]


def detect_format(state_dict: dict[str, torch.Tensor], markers: dict[str, str]) -> str | None:
    """The first format whose marker key is in `state_dict`, or None."""
    return next((fmt for fmt, key in markers.items() if key in state_dict), None)


def unknown_layout(family: str, markers: dict[str, str]) -> ValueError:
    article = "an" if family[0].lower() in "aeiou" else "a"
    return ValueError(
        f"not {article} {family} state dict: found none of the keys "
        + ", ".join(f"{key!r} ({fmt})" for fmt, key in markers.items())
    )


def rename(state_dict: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Keys renamed by `mapping`; keys it lacks stay as they are, so strict loading reports them."""
    return {mapping.get(k, k): v for k, v in state_dict.items()}
