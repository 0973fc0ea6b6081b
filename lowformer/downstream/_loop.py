"""The optimisation loop the downstream `train_*` functions share: short, flat and explicit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

_logger = logging.getLogger(__name__)


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield from `batches` forever, restarting it when exhausted (a DataLoader or a list)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no batches to train on")
        if iter(batches) is batches:  # a one-shot iterator cannot restart
            raise ValueError("the batch iterator ran out before the last step; pass a list or a DataLoader")


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors anywhere inside lists, tuples and dicts, moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def fit(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    grad_clip: float | None,
    device: str | torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    extra_params: Iterable[nn.Parameter] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """`steps` optimisation steps of `loss_fn(model, batch)`; returns each step's loss.

    The default optimiser is AdamW over the trainable parameters (frozen stages and frozen
    BatchNorms have `requires_grad=False` and are left out) plus `extra_params` (e.g. a loss's own
    weights). `on_step(step, loss)` is called after every step, for logging or early stopping.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    model.to(device).train()
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
        if not params:
            raise ValueError("the model has no trainable parameters (every stage frozen?)")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    clip_params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    for step, batch in zip(range(steps), _cycle(batches)):
        loss = loss_fn(model, to_device(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
        optimizer.step()
        losses.append(loss.item())
        _logger.debug("step %d loss %.4f", step, losses[-1])
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
