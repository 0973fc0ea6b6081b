"""Deploy mode: an inference copy of a model computing the same function: BatchNorm and norm affines
folded, dropout removed, convolutions in a chosen layout (packed oneDNN on CPU, channels_last).

Running it the fastest verified way on a device (`torch.compile`, AOTInductor, ONNX Runtime, CUDA
graphs), and shipping the winner as a package, is `lowformer.tuning` (`lowformer.tune`,
`lowformer.load_deployed`). Method and measured speed: docs/deploy.md, docs/performance.md.
"""

from .mode import MEMORY_FORMATS, apply_layout, auto_layout, check_deployable, deploy, layouts, tune_layout

__all__ = ["MEMORY_FORMATS", "apply_layout", "auto_layout", "check_deployable", "deploy", "layouts", "tune_layout"]
