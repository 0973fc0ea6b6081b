"""Deployed packages: a tuned model as a file that production loads and runs without searching or
compiling again, with a record of what it is and how it was chosen.

Two formats, chosen by the file's suffix (`PACKAGE_FORMATS`):

- `.pt2`: an AOTInductor package (`torch.export`, then `torch._inductor.aoti_compile_and_package`;
  on CPU with freezing, so the weights are folded and packed for oneDNN inside the compiled code).
  The record is `extra/lowformer.json` inside the archive, readable without loading the code.
  NOTE: a .pt2 holds a compiled shared library that runs when the package is loaded: load only
  packages you built or trust, as you would a `.so`. It runs on the kind of device and CPU
  instruction set it was compiled for (both are in the record).
- `.onnx`: an ONNX graph written by `lowformer.export.export`, run by ONNX Runtime. The record is
  the `lowformer.deployed` entry of the graph's metadata_props. ONNX files are data, not code.

`save_tuned` writes the fastest verified candidate of a tuning (`lowformer.tune`) in the format the
path asks for: it copies the artifact the tuner already built and verified (nothing is compiled
twice) to its place atomically, through `lowformer._io`, with the record (`write_package`).
`check_package` loads the written file as production would and verifies it again; `load_deployed`
runs either format; `read_record` reads the record alone.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._io import atomic_write
from ..errors import LowformerRuntimeError, VerificationError

if TYPE_CHECKING:
    from .tuner import CandidateResult, TuneResult

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.deployed/1"
PACKAGE_FORMATS = {".pt2": "aoti", ".onnx": "onnxruntime"}  # suffix -> the tuner's backend that builds it
RECORD_FILE = "lowformer.json"  # inside a .pt2 archive, under extra/
ONNX_RECORD_KEY = "lowformer.deployed"


def package_backend(path: str | os.PathLike) -> str:
    """The backend whose artifact a package path asks for, from its suffix.

    Raises:
        ValueError: a suffix other than .pt2 or .onnx.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in PACKAGE_FORMATS:
        raise ValueError(
            f"a deployed package is .pt2 (AOTInductor) or .onnx (ONNX Runtime), got {str(path)!r}; "
            "choose the format by the file name"
        )
    return PACKAGE_FORMATS[suffix]


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (keys in order, then each tensor's dtype, shape and bytes): which
    weights a package was built from, independent of the file they came in."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# A tuning's winner as a package
# --------------------------------------------------------------------------------------------


def save_tuned(
    result: TuneResult, path: str | os.PathLike, model: nn.Module, name: str | None = None, **extra: Any
) -> tuple[Path, CandidateResult]:
    """Write the fastest verified candidate of `result` that builds `path`'s format (.pt2: AOTInductor,
    .onnx: ONNX Runtime) with its record; returns (path, that candidate).

    `model` is the model that was tuned (for the record: spec, data config, weights hash); `name`
    the model name to record (default: its variant); `extra` more record entries (e.g. checkpoint).

    Raises:
        ValueError: `path` is neither .pt2 nor .onnx, or the tuning did not try that format.
        VerificationError: every candidate of that format mismatched the reference.
        LowformerRuntimeError: every candidate of that format failed.
        OutputError: `path` cannot be written.
    """
    backend = package_backend(path)
    chosen = result.fastest(backend)
    if chosen is None or chosen.name not in result.prepared:
        tried = [c for c in result.candidates if c.backend == backend]
        why = "; ".join(f"{c.name}: {c.status}: {c.error}" for c in tried)
        if not tried or all(c.status == "skipped" for c in tried):
            raise ValueError(f"{path} needs a {backend} candidate, and the tuning ran none ({why or 'not asked for'})")
        error = VerificationError if any(c.status == "mismatch" for c in tried) else LowformerRuntimeError
        raise error(f"no {backend} candidate ran and verified, so {path} cannot be written ({why})")
    record = package_record(result, chosen, model, name, **extra)
    return write_package(result.prepared[chosen.name].artifact, path, record), chosen


def package_record(
    result: TuneResult, chosen: CandidateResult, model: nn.Module, name: str | None = None, **extra: Any
) -> dict:
    """What a package records: model, spec, data config, weights hash, device, precision, shapes,
    the candidate it runs, and the whole tuning table."""
    from .. import __version__
    from ..weights import DATA_CONFIG_KEYS

    settings = result.settings
    spec = getattr(model, "spec", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "model": name or getattr(model, "variant", type(model).__name__),
        "spec": spec.to_dict() if hasattr(spec, "to_dict") else None,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in DATA_CONFIG_KEYS},
        "weights_sha256": weights_sha256(model),
        "device": settings["device"],
        "device_name": result.environment.get("device_name"),
        "precision": settings["precision"],
        "input_shape": settings["input_shape"],
        "input_dtype": "float32",
        "output_shapes": settings.get("output_shapes"),
        "candidate": chosen.name,
        "max_rel_err": chosen.max_rel_err,
        "tolerance": settings["tolerance"],
        "latency_ms_p50": chosen.latency_ms_p50,
        "objective": settings["objective"],
        "threads": settings["threads"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lowformer": __version__,
        "torch": torch.__version__,
        **extra,
        "tuning": result.to_dict(),
    }


@dataclass
class PackageCheck:
    """A written package loaded as production loads it, and verified again."""

    load_s: float  # reading the file and loading the runtime (no compilation)
    first_call_s: float  # the first forward after loading
    max_rel_err: float  # against the fp32 eager model, on fresh random inputs
    bound: float

    @property
    def load_to_first_output_s(self) -> float:
        return self.load_s + self.first_call_s

    @property
    def passed(self) -> bool:
        return self.max_rel_err <= self.bound


def check_package(path: str | os.PathLike, model: nn.Module, verify_inputs: int = 2) -> PackageCheck:
    """Load `path` as production would, time the load and the first call, and compare it with the
    fp32 eager `model` on fresh random inputs of the recorded shape (the record's tolerance)."""
    from ..measure.session import make_input, run_context
    from .tuner import TOLERANCES, _max_rel_err, _references

    record = read_record(path)
    device = record.get("device", "cpu")
    x = make_input(record["input_shape"], device)
    start = time.perf_counter()
    deployed = load_deployed(path)
    loaded = time.perf_counter()
    deployed(x)
    first = time.perf_counter()
    with run_context(device, "fp32"):  # the reference: fp32 with TF32 off
        err = _max_rel_err(deployed, _references(model.eval(), x, verify_inputs))
    bound = record.get("tolerance", TOLERANCES[record.get("precision", "fp32")])
    return PackageCheck(loaded - start, first - loaded, err, bound)


# --------------------------------------------------------------------------------------------
# Writing and reading the record
# --------------------------------------------------------------------------------------------


def write_package(artifact: str | os.PathLike, path: str | os.PathLike, record: dict) -> Path:
    """Copy a built artifact (an AOTInductor package or an ONNX graph) to `path` with `record`,
    atomically: a failure leaves no partial file and an existing file untouched.

    Raises:
        ValueError: the suffix of `path` does not match the artifact's format.
        OutputError: `path` cannot be written.
    """
    backend = package_backend(path)
    if package_backend(artifact) != backend:
        raise ValueError(f"{artifact} is not a {Path(path).suffix} artifact")
    record = {"schema": SCHEMA, **record}
    if backend == "aoti":
        return atomic_write(path, lambda tmp: _copy_pt2_with_record(Path(artifact), tmp, record))
    return atomic_write(path, lambda tmp: _copy_onnx_with_record(Path(artifact), tmp, record))


def _copy_pt2_with_record(src: Path, dst: str, record: dict) -> None:
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(src)) as reader, PT2ArchiveWriter(dst) as writer:
        for name in reader.get_file_names():
            # the zip's own bookkeeping (.data/...) and records the writer adds itself are not copied
            if name.startswith(".data/") or writer.has_record(name) or name == f"extra/{RECORD_FILE}":
                continue
            writer.write_bytes(name, reader.read_bytes(name))
        writer.write_string(f"extra/{RECORD_FILE}", json.dumps(record))


def _copy_onnx_with_record(src: Path, dst: str, record: dict) -> None:
    import onnx

    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    props[ONNX_RECORD_KEY] = json.dumps(record)
    onnx.helper.set_model_props(proto, props)
    Path(dst).write_bytes(proto.SerializeToString())


def read_record(path: str | os.PathLike) -> dict:
    """The record a deployed package carries ({} for a package written elsewhere), read without
    loading or running the model.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a package of the format its suffix names.
    """
    path = Path(path)
    backend = package_backend(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deployed package at {path}")
    read, kind = (
        (_read_pt2_record, "an AOTInductor package") if backend == "aoti" else (_read_onnx_record, "an ONNX graph")
    )
    try:
        return read(path)
    except Exception as e:  # a zip reader, protobuf or JSON error: the file is not what its name says
        raise ValueError(f"{path} is not {kind} ({_first_line(e)})") from e


def _read_pt2_record(path: Path) -> dict:
    from torch.export.pt2_archive import PT2ArchiveReader

    with PT2ArchiveReader(str(path)) as reader:
        if f"extra/{RECORD_FILE}" not in reader.get_file_names():
            return {}
        return json.loads(reader.read_string(f"extra/{RECORD_FILE}"))


def _read_onnx_record(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    text = next((p.value for p in proto.metadata_props if p.key == ONNX_RECORD_KEY), None)
    return json.loads(text) if text else {}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class DeployedModel:
    """A loaded package: call it with an input of the recorded shape; `record` says what it is.

    Outputs are torch tensors on the input's device: one tensor for a model with one output, else a
    list. Nothing is compiled or searched when it is loaded or called.
    """

    def __init__(self, path: Path, record: dict, forward: Callable[[torch.Tensor], list[torch.Tensor]], keep: Any):
        self.path = path
        self.record = record
        self._forward = forward
        self._keep = keep  # the runtime object (AOTInductor loader or ONNX Runtime session)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shape = self.record.get("input_shape")
        return tuple(shape) if shape else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        expected = self.input_shape
        if expected is not None and tuple(x.shape) != expected:
            raise ValueError(
                f"{self.path.name} was compiled for input shape {list(expected)}, got {list(x.shape)}; "
                "tune and package again for that shape"
            )
        outputs = self._forward(x)
        return outputs[0] if len(outputs) == 1 else outputs

    def __repr__(self) -> str:
        what = self.record.get("candidate", "?")
        return f"DeployedModel({str(self.path)!r}, model={self.record.get('model', '?')!r}, candidate={what!r})"


def load_deployed(path: str | os.PathLike, threads: int | None = None) -> DeployedModel:
    """Load a package written by `lowformer tune --out` (or any AOTInductor .pt2 / ONNX file) to run.

    threads: ONNX Runtime's intra-op threads (default: torch's current number); an AOTInductor
    package uses torch's threads (`torch.set_num_threads`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a package of either format, or one compiled for a device this machine lacks.
    """
    path = Path(path)
    record = read_record(path)
    if package_backend(path) == "aoti":
        return _load_aoti(path, record)
    return _load_onnx(path, record, threads)


def _load_aoti(path: Path, record: dict) -> DeployedModel:
    device = record.get("device", "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{path} was compiled for {device}, and this machine has no CUDA device")
    try:
        loaded = torch._inductor.aoti_load_package(str(path))
    except RuntimeError as e:
        raise ValueError(f"cannot load {path} as an AOTInductor package: {_first_line(e)}") from e

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            out = loaded(x)
        return _as_list(out)

    return DeployedModel(path, record, forward, loaded)


def _load_onnx(path: Path, record: dict, threads: int | None) -> DeployedModel:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    cuda = str(record.get("device", "cpu")).startswith("cuda")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a bad graph
        raise ValueError(f"cannot load {path} with ONNX Runtime: {_first_line(e)}") from e
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = session.run(None, {name: x.detach().contiguous().cpu().numpy()})
        return [torch.from_numpy(o).to(x.device) for o in outputs]

    return DeployedModel(path, record, forward, session)


def _as_list(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Sequence):
        return list(out)
    raise TypeError(f"a deployed model returns tensors, got {type(out).__name__}")
