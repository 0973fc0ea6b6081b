"""Verification: run a written file (ONNX through ONNX Runtime, TorchScript through `torch.jit.load`)
on random inputs, at every shape its dynamic axes promise, and compare it with the PyTorch model."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..factory import size_divisor_of
from ._common import as_list, check_format, device_of, random_input
from .onnx import onnx_runner
from .torchscript import torchscript_runner

_logger = logging.getLogger(__name__)

FP32_BOUND = 1e-4
FP16_BOUND = 1e-2


@dataclass
class ShapeCheck:
    """The comparison at one input shape."""

    input_shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float  # max|exported - torch| / max|torch|, the worst output
    finite: bool  # outputs and, in an fp16 graph, every fp16 tensor inside it
    overflowed: list[str] = field(default_factory=list)  # fp16 tensors holding inf/nan


@dataclass
class VerifyReport:
    """The exported file against PyTorch on random standard-normal inputs."""

    format: str
    precision: str
    bound: float  # on max_rel_err
    checks: list[ShapeCheck] = field(default_factory=list)

    @property
    def max_abs_err(self) -> float:
        return max(c.max_abs_err for c in self.checks)

    @property
    def max_rel_err(self) -> float:
        return max(c.max_rel_err for c in self.checks)

    @property
    def finite(self) -> bool:
        return all(c.finite for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.finite and self.max_rel_err <= self.bound

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [c.input_shape for c in self.checks]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "finite": self.finite,
            "passed": self.passed,
        }

    def summary(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        overflowed = list(dict.fromkeys(name for c in self.checks for name in c.overflowed))  # graph order
        verdict = "ok" if self.passed else "FAILED"
        if overflowed:
            verdict += f": {len(overflowed)} fp16 tensors overflow, the first {overflowed[0]}"
        elif not self.finite:
            verdict += ": outputs not finite"
        op = "<=" if self.max_rel_err <= self.bound else ">"
        return (
            f"verify {self.format} {self.precision} vs PyTorch fp32 at {shapes}: max abs err {self.max_abs_err:.2e}, "
            f"max rel err {self.max_rel_err:.2e} {op} {self.bound:.0e}: {verdict}"
        )


def verify_shapes(
    image_size: tuple[int, int],
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    size_divisor: int = 1,
) -> list[tuple[int, int, int]]:
    """(B, H, W) to check: the export shape; with a dynamic batch, batch 3 (or 1); with a dynamic size,
    the next odd size (divisor 1: exercises LowFormer's crop) or the next multiple of the divisor."""
    h, w = image_size
    shapes = [(batch_size, h, w)]
    other_batch = batch_size
    if dynamic_batch:
        other_batch = 3 if batch_size != 3 else 1
        shapes.append((other_batch, h, w))
    if dynamic_size:
        if size_divisor == 1:
            shapes.append((other_batch, h + 1 + h % 2, w + 1 + w % 2))
        else:
            shapes.append((other_batch, h + size_divisor, w + 2 * size_divisor))
    return shapes


def verify(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    image_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    fp16: bool = False,
    *,
    batch_size: int = 1,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    bound: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run the exported file and `model` (fp32, eval mode) on the same random inputs and compare.

    The shapes tried are `verify_shapes(image_size, batch_size, dynamic_batch, dynamic_size,
    model's size_divisor)` unless `shapes` ((B, H, W) each) is given. The bound on the relative
    error max|exported - torch| / max|torch| is 1e-4 for fp32 and 1e-2 for fp16 unless `bound` is
    given. ONNX runs on ONNX Runtime's CPUExecutionProvider; TorchScript on the model's device.

    NOTE: ONNX Runtime's CPU provider computes most fp16 operators in fp32 and drops the fp16
    round trips between them, which would hide an overflow that a GPU shows. So in an fp16 graph
    every fp16 tensor is also fetched, and one holding inf or nan fails the check.
    """
    check_format(format)
    model.eval()
    if shapes is None:
        shapes = verify_shapes(image_size, batch_size, dynamic_batch, dynamic_size, size_divisor_of(model))
    run = onnx_runner(path) if format == "onnx" else torchscript_runner(path, device_of(model))
    report = VerifyReport(format, "fp16" if fp16 else "fp32", bound if bound is not None else _bound(fp16))
    for k, shape in enumerate(shapes):
        x = random_input(model, shape, seed=seed + k)
        with torch.no_grad():
            expected = [t.float().cpu() for t in as_list(model(x))]
        got, overflowed = run(x)
        if len(got) != len(expected):
            raise ValueError(f"{path} gives {len(got)} outputs, the model {len(expected)}")
        abs_err, rel_err, finite = 0.0, 0.0, True
        for a, b in zip(expected, got):
            if a.shape != b.shape:
                raise ValueError(
                    f"{path} gives an output of shape {tuple(b.shape)} at input {shape}, the model {tuple(a.shape)}"
                )
            finite = finite and bool(torch.isfinite(b).all())
            diff = float((a - b).abs().nan_to_num(nan=math.inf, posinf=math.inf).max())  # nan: infinitely wrong
            abs_err = max(abs_err, diff)
            rel_err = max(rel_err, diff / max(float(a.abs().max()), torch.finfo(torch.float32).tiny))
        report.checks.append(ShapeCheck(tuple(x.shape), abs_err, rel_err, finite and not overflowed, overflowed))
    _logger.info("%s", report.summary())
    return report


def _bound(fp16: bool) -> float:
    return FP16_BOUND if fp16 else FP32_BOUND
