"""Ways to run a model: eager, torch.compile, TorchScript, ONNX Runtime, CUDA graphs, AOTInductor;
plus the precision and reparameterisation switches that go with them.

`prepare` turns (model, input) into a zero-argument `step` that runs one forward pass, picks the
timer that measures it correctly on that backend and device, and gives `run`, the same forward on
another input of that shape (what the deploy tuner verifies against the eager model).

On CPU, `torch.compile` and AOTInductor run inductor with *freezing* (`compile_options`): weights
become constants, so inductor folds them and packs the convolution and linear weights for oneDNN
once, as a CPU user of the compiler would ask for.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..measure.timing import Candidate, CudaEventTimer, PerfCounterTimer, Timer, device_timer

_logger = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "torchscript", "onnxruntime", "cudagraphs", "aoti")
COMPILERS = ("compile", "aoti")  # the backends that run inductor, which needs a C++ compiler on CPU
# not a backend but the choice of one: each model in its own best configuration, found by
# `lowformer.tune` (deploy layout x backend, verified and timed interleaved) when it is prepared
TUNED = "tuned"
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def unsupported_reason(backend: str, precision: str, device: str, channels_last: bool) -> str | None:
    """Why this combination cannot run (it is then recorded as skipped), or None."""
    if backend not in (*BACKENDS, TUNED):
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)} (or {TUNED})")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if precision == "tf32" and not cuda:
        return "tf32 is a CUDA tensor-core mode; on CPU use fp32 or bf16"
    if backend == TUNED:  # the tuner skips, with the reason, each candidate that cannot run
        return None
    if backend == "cudagraphs" and not cuda:
        return "cudagraphs needs a CUDA device"
    if backend in ("torchscript", "onnxruntime") and precision in AUTOCAST_DTYPES:
        return f"{backend} runs the fp32 graph here (fp32 or tf32); autocast needs eager, compile, cudagraphs or aoti"
    if backend == "onnxruntime" and channels_last:
        return "channels_last does not apply to onnxruntime (it chooses its own layouts)"
    if backend in COMPILERS and not cuda and not cxx_compiler_available():
        return f"{backend} on CPU needs a C++ compiler (inductor builds C++ kernels); install g++ or set CXX"
    return None


@functools.cache
def cxx_compiler_available() -> bool:
    """Whether inductor finds the C++ compiler its CPU kernels are built with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False
    return True


def compile_options(device: str, compile_mode: str | None = None) -> dict[str, Any] | None:
    """The inductor options the package compiles with on `device`: None (torch's `mode` alone) on a
    GPU; on CPU, the mode's options plus `freezing`, which folds the weights as constants and packs
    the convolution and linear weights for oneDNN once (what a CPU user turns on for inference)."""
    if torch.device(device).type != "cpu":
        return None
    from torch._inductor import list_mode_options

    return {**list_mode_options(compile_mode or "default"), "freezing": True}


def compile_note(device: str, compile_mode: str | None) -> str:
    """How a compiled configuration was built, for the record (`backend_note`)."""
    freezing = ", freezing" if compile_options(device, compile_mode) else ""
    return f"torch.compile mode={compile_mode or 'default'}{freezing}"


class _Freezing:
    """A compiled model whose calls (where inductor compiles, and recompiles) run with inductor's
    `freezing` switch on.

    NOTE: `torch.compile(model, options={"freezing": True})` does not freeze (torch 2.14: the
    profile still shows `aten::mkldnn_convolution` with the plain weights, where the frozen graph
    runs `mkldnn::_convolution_pointwise` with packed ones), so the switch is set in inductor's
    config around each call; setting and restoring it costs microseconds.
    """

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        before = inductor_config.freezing
        inductor_config.freezing = True
        try:
            return self.compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = before


def compile_model(model: nn.Module, device: str, compile_mode: str | None = None) -> Callable:
    """`torch.compile(model, mode=compile_mode)` as this package runs it: on CPU with inductor
    freezing (see `compile_options`)."""
    compiled = torch.compile(model, mode=compile_mode)
    return _Freezing(compiled) if compile_options(device, compile_mode) else compiled


def autocast(precision: str, device: str, cache_enabled: bool = True):
    """The autocast context of a precision: a no-op for fp32 and tf32 (they are TF32 switches)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


_FUSE_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")


def reparameterize(model: nn.Module, layout: str = "keep", source: str = "module") -> tuple[nn.Module, str]:
    """Fold training-time branches into inference form, as a user of that model would; returns
    (model, what was applied).

    Our models (`source` "lowformer", see `models.source_kind`; also inside a detection neck built
    from our name) get `lowformer.deploy` (BatchNorm and norm-affine folding, dropout removed) with
    `layout` as its memory format (see `reparam_layout`). Any other model gets
    `timm.utils.reparameterize_model` when some submodule offers the hook it calls (`fuse`,
    `reparameterize` or `switch_to_deploy`: MobileOne, FastViT, RepViT, ..., and our blocks inside a
    module given directly); otherwise nothing is changed and the record says "none-available".
    """
    if source == "lowformer":
        from ..deploy import deploy

        applied = "lowformer.deploy" + (f" ({layout})" if layout != "keep" else "")
        return deploy(model.eval(), memory_format=layout), applied
    if any(hasattr(m, h) for m in model.modules() if m is not model for h in _FUSE_HOOKS):
        from timm.utils import reparameterize_model

        return reparameterize_model(model.eval()), "timm.utils.reparameterize_model"
    return model, "none-available"


def reparam_layout(backend: str, device: str, channels_last: bool) -> str:
    """The deploy layout that matches a benchmark configuration.

    In eager mode on CPU with channels_last, deploy mode's packed oneDNN convs (which run
    channels_last) are what a user of `lowformer.deploy` gets. Everywhere else the benchmark's
    own channels_last switch decides, and tracing or compiling needs the plain ops anyway.
    """
    from ..deploy import auto_layout

    if backend == "eager" and channels_last and device == "cpu" and auto_layout("cpu") == "packed":
        return "packed"
    return "keep"


@dataclass
class Prepared:
    """One forward pass ready to time: `step()` runs it, `timer` measures it; `run(x)` is the same
    forward on another input of the prepared shape, returning torch tensors (for verification)."""

    step: Callable[[], Any]
    timer: Timer
    run: Callable[[torch.Tensor], Any] | None = None
    note: str | None = None  # e.g. the ONNX Runtime provider actually used
    keep: Any = None  # objects the step needs alive (sessions, static outputs, graphs, temporary folders)
    artifact: Path | None = None  # the file the backend built and runs (ONNX graph, AOTInductor package)
    tuning: dict | None = None  # backend "tuned": the tuner's table (`TuneResult.to_dict`, no environment)

    def candidate(self, label: str, context: Callable[[], AbstractContextManager] = nullcontext) -> Candidate:
        """This step as a candidate of interleaved rounds (`lowformer.measure.timing.interleave`)."""
        return Candidate(label, self.step, self.timer, context)


def _forward(model: Callable, precision: str, device: str) -> Callable[[torch.Tensor], Any]:
    """`model` as a function of its input, under the precision's autocast."""
    if precision not in AUTOCAST_DTYPES:
        return model

    def forward(x: torch.Tensor):
        # NOTE: autocast is entered per call, as inference code does, so weight casts are timed
        with autocast(precision, device):
            return model(x)

    return forward


def _prepared(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, device: str, **kwargs) -> Prepared:
    return Prepared(functools.partial(forward, x), device_timer(device), run=forward, **kwargs)


def prepare(
    model: nn.Module,
    x: torch.Tensor,
    backend: str,
    precision: str,
    device: str,
    compile_mode: str | None = None,
    threads: int | None = None,
) -> Prepared:
    """Build the step for `backend`. The model and `x` are already on `device` and in their layout.

    Call in the run context (`lowformer.measure.session.run_context`: no_grad, the TF32 switch).
    """
    reason = unsupported_reason(backend, precision, device, channels_last=False)
    if reason is not None:
        raise ValueError(reason)
    if backend == "eager":
        return _prepared(_forward(model, precision, device), x, device)
    if backend == "compile":
        forward = _forward(compile_model(model, device, compile_mode), precision, device)
        prepared = _prepared(forward, x, device, note=compile_note(device, compile_mode))
        prepared.step()  # compile now, so that the warm-up times running, not compiling
        return prepared
    if backend == "torchscript":
        return _prepared(_forward(_torchscript(model, x), precision, device), x, device)
    if backend == "onnxruntime":
        return _onnxruntime(model, x, precision, device, threads)
    if backend == "cudagraphs":
        return _cuda_graph(model, x, precision, device)
    if backend == "aoti":
        return _aoti(model, x, precision, device)
    if backend == TUNED:
        return _tuned(model, x, precision, threads)
    raise ValueError(f"unknown backend {backend!r}")


# The tuned backend is `lowformer.tuning`'s: it builds its candidates from the backends here, so it
# registers itself (importing `lowformer` does) rather than being imported from this module.
_TUNED_PREPARE: Callable[[nn.Module, torch.Tensor, str, int | None], Prepared] | None = None


def register_tuned(prepare_tuned: Callable[[nn.Module, torch.Tensor, str, int | None], Prepared]) -> None:
    """Set what the "tuned" backend runs: (model, x, precision, threads) -> Prepared."""
    global _TUNED_PREPARE
    _TUNED_PREPARE = prepare_tuned


def _tuned(model: nn.Module, x: torch.Tensor, precision: str, threads: int | None) -> Prepared:
    if _TUNED_PREPARE is None:  # only where lowformer.tuning was never imported (importing lowformer does)
        raise RuntimeError("the tuned backend is registered by lowformer.tuning; import lowformer first")
    return _TUNED_PREPARE(model, x, precision, threads)


def _torchscript(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace, freeze and `optimize_for_inference`, as the LowFormer papers measured: the module
    `lowformer export --format torchscript` writes, optimised as after loading it."""
    from ..export import torchscript_module

    return torchscript_module(model, x, optimize=True)


def _onnxruntime(model: nn.Module, x: torch.Tensor, precision: str, device: str, threads: int | None) -> Prepared:
    import numpy as np
    import onnxruntime as ort

    from ..export import export

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    cuda = device.startswith("cuda")
    if cuda:
        index = torch.device(device).index or 0
        # NOTE: the CUDA EP uses TF32 by default; fp32 here means TF32 off, as for PyTorch
        providers = [("CUDAExecutionProvider", {"device_id": index, "use_tf32": int(precision == "tf32")})]
    else:
        providers = ["CPUExecutionProvider"]
    x = x.contiguous()
    # the graph stays on disk while the session lives: the deploy tuner writes it out as a package
    folder = tempfile.TemporaryDirectory(prefix="lowformer-onnx-")
    path = export(model, os.path.join(folder.name, "model.onnx"), "onnx", example_input=x)
    session = ort.InferenceSession(str(path), options, providers=providers)
    wanted = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    used = session.get_providers()[0]
    if used != wanted:
        raise RuntimeError(f"onnxruntime ran on {used}, not {wanted}: install onnxruntime-gpu for CUDA")

    def run(inp: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = session.run(None, {"input": inp.detach().contiguous().cpu().numpy()})
        tensors = tuple(torch.from_numpy(o).to(inp.device) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors  # as the model returns them

    if not cuda:
        feed = {"input": x.cpu().numpy()}
        step = functools.partial(session.run, None, feed)
        return Prepared(step, PerfCounterTimer(), run=run, note=used, keep=(session, folder), artifact=path)
    # Input and output stay on the GPU (no host copies in the timed call). `run_with_iobinding`
    # returns when the GPU work is done, so the host clock times it.
    binding = session.io_binding()
    binding.bind_input("input", "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
    for output in session.get_outputs():  # one for a classifier, one per level for a detection neck
        binding.bind_output(output.name, "cuda", index)
    step = functools.partial(session.run_with_iobinding, binding)
    timer = PerfCounterTimer(sync=torch.cuda.synchronize)
    return Prepared(step, timer, run=run, note=used, keep=(session, binding, x, folder), artifact=path)


class _Autocast(nn.Module):
    """`model` under autocast, so `torch.export` records the precision's casts in the graph."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x)


def compile_aoti_package(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, precision: str = "fp32") -> Path:
    """`torch.export` `model` at `x`'s shape and compile it with AOTInductor into a package at `path`
    (freezing on CPU). fp16/bf16 are autocast inside the graph; tf32 is the caller's switch.
    Takes tens of seconds on a small CPU."""
    device_type = x.device.type
    module = model
    if precision in AUTOCAST_DTYPES:
        module = _Autocast(model, device_type, AUTOCAST_DTYPES[precision])
    configs = {"freezing": True} if compile_options(device_type) else {}
    with torch.no_grad():
        program = torch.export.export(module, (x,))
        built = torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return Path(built)


def _aoti(model: nn.Module, x: torch.Tensor, precision: str, device: str) -> Prepared:
    """`torch.export` the model, compile it ahead of time with AOTInductor into a package (freezing
    on CPU, see `compile_options`) and load it: what `lowformer.load_deployed` runs."""
    folder = tempfile.TemporaryDirectory(prefix="lowformer-aoti-")
    path = compile_aoti_package(model, x, Path(folder.name) / "model.pt2", precision)
    loaded = torch._inductor.aoti_load_package(str(path))
    note = "AOTInductor" + (", freezing" if compile_options(device) else "")
    return _prepared(loaded, x, device, note=note, keep=(loaded, folder), artifact=path)


def _cuda_graph(model: nn.Module, x: torch.Tensor, precision: str, device: str) -> Prepared:
    """Capture one forward pass into a CUDA graph; each step replays it on the same static input."""
    # autocast's weight cache must be off while capturing (cached casts would outlive the graph)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up on a side stream, as torch.cuda.graphs requires
            with autocast(precision, device, cache_enabled=False):
                model(x)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast(precision, device, cache_enabled=False):
        out = model(x)

    def run(inp: torch.Tensor):
        x.copy_(inp)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    return Prepared(graph.replay, CudaEventTimer(), run=run, keep=(graph, x, out))
