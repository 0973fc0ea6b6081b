"""Tuning: run a model the fastest verified way on this device, and ship it.

- `tune` (`tuner`): every way to run the model here (deploy mode in each layout; eager,
  `torch.compile`, AOTInductor, ONNX Runtime, CUDA graphs: the benchmark's backends) built,
  verified against the fp32 eager model and timed interleaved; the fastest verified one wins.
  It also is the benchmark's "tuned" backend (`lowformer bench --tuned`).
- `save_tuned` / `load_deployed` (`package`): the winner as an AOTInductor `.pt2` or an `.onnx`
  file with its record (model, spec, weights hash, device, precision, shapes, the tuning table),
  loaded and run without searching or compiling again.

Method and measured speed: docs/deploy.md, docs/performance.md.
"""

from .package import (
    PACKAGE_FORMATS,
    DeployedModel,
    PackageCheck,
    check_package,
    load_deployed,
    package_backend,
    package_record,
    read_record,
    save_tuned,
    write_package,
)
from .tuner import (
    OBJECTIVES,
    TOLERANCES,
    CandidateResult,
    Option,
    TuneResult,
    candidate_options,
    require_best,
    skip_reason,
    tune,
)

__all__ = [
    "OBJECTIVES",
    "PACKAGE_FORMATS",
    "TOLERANCES",
    "CandidateResult",
    "DeployedModel",
    "Option",
    "PackageCheck",
    "TuneResult",
    "candidate_options",
    "check_package",
    "load_deployed",
    "package_backend",
    "package_record",
    "read_record",
    "require_best",
    "save_tuned",
    "skip_reason",
    "tune",
    "write_package",
]
