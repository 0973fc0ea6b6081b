"""TorchScript: a traced, frozen module, written with its metadata, and run back for verification."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ._common import as_list, logged_warnings


def torchscript_module(model: nn.Module, example_input: torch.Tensor, optimize: bool = False) -> torch.jit.ScriptModule:
    """`torch.jit.trace`, `torch.jit.freeze`, and with `optimize` `torch.jit.optimize_for_inference`.

    NOTE: the official LowFormer code scripts (`torch.jit.script`); we trace, because not every timm
    peer scripts. Traced shapes stay symbolic (`aten::size`): LowTention's crop `out[..., :H, :W]`
    follows the input, which `verify` checks at an odd size. The optimised module cannot be saved:
    on CPU it bakes MKL-DNN weights into the graph, which `torch.jit.load` cannot read back.
    """
    model.eval()
    with torch.no_grad(), logged_warnings("torchscript"):
        # NOTE: the tracer warns about F.group_norm's batch-size check (a Python bool); it only
        # guards against one value per channel in training, so baking it in is harmless.
        traced = torch.jit.trace(model, example_input, check_trace=False)
        module = torch.jit.freeze(traced.eval())
        if optimize:
            module = torch.jit.optimize_for_inference(module)
    return module


def save_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, metadata: dict) -> None:
    """Trace and freeze `model`, then `torch.jit.save` it to `path` with `metadata` as the extra file
    "lowformer.json"."""
    module = torchscript_module(model, example_input, optimize=False)
    with logged_warnings("torchscript"):
        torch.jit.save(module, str(path), _extra_files={"lowformer.json": json.dumps(metadata)})


def torchscript_runner(path: str | os.PathLike, device: torch.device):
    """A function running the saved module: x -> (outputs, [] (no fp16 tensors to check))."""
    # map_location also moves a frozen module's constants, which .to() would not
    with logged_warnings("torchscript"):
        module = torch.jit.load(str(path), map_location=device)

    def run(x: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
        with torch.no_grad():
            return [t.float().cpu() for t in as_list(module(x))], []

    return run
