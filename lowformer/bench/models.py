"""What a benchmark times: a model name (ours, `lowformer.list_models()`, or timm's, `timm:NAME`,
resolved by `lowformer.factory`) or a module given directly, and for each task what is timed: the
classifier, the backbone + RetinaNet FPN neck (detection), or the whole Semantic FPN (segmentation)."""

from __future__ import annotations

import torch
from torch import nn

from ..factory import check_model_name, create_model, model_source

Source = str | nn.Module  # what builds a model: a name, or the module itself

# "classification": the whole classifier. "detection": the dense-prediction part of a detector, the
# backbone's stride 8-32 maps + RetinaNet's FPN (P3-P7, 256 channels), as the papers time detection
# backbones; the heads and post-processing are the same for every backbone and left out.
# "segmentation": the whole Semantic FPN (backbone, FPN, head, upsampling to full resolution), since
# its head and upsampling are part of what a segmenter costs.
TASKS = ("classification", "detection", "segmentation")
DENSE_TASKS = ("detection", "segmentation")
TASK_DESCRIPTIONS = {
    "classification": "the classifier",
    "detection": "backbone + RetinaNet FPN neck, P3-P7 at 256 channels",
    "segmentation": "Semantic FPN: backbone, FPN, head and upsampling to full resolution, 150 classes",
}

# The README's comparison: our families against the efficient peers the papers compare with.
DEFAULT_MODELS = (
    "lowformer_b0",
    "lowformer_b1",
    "lowformer_e1",
    "edgevit_xs",
    "timm:mobilenetv3_large_100",
    "timm:efficientvit_b1",
    "timm:fastvit_t8",
    "timm:repvit_m1_1",
    "timm:mobileone_s1",
)

# Dense prediction: ours against ResNet-50 (RetinaNet's reference backbone) and one efficient peer.
DETECTION_MODELS = (
    "lowformer_b0",
    "lowformer_b1",
    "lowformer_e1",
    "edgevit_xs",
    "timm:resnet50",
    "timm:efficientvit_b1",
)


def default_models(task: str = "classification") -> tuple[str, ...]:
    check_task(task)
    return DETECTION_MODELS if task in DENSE_TASKS else DEFAULT_MODELS


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


class NeckOutputs(nn.Module):
    """A backbone + FPN whose maps come back as a tuple: TorchScript tracing and ONNX export take
    tensors, not the ordered dict torchvision's FPN returns."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.neck(x).values())


def build_model(name: str, task: str = "classification") -> nn.Module:
    """A randomly initialised model for `task` in eval mode (benchmarks need no weights)."""
    check_model_name(name)
    check_task(task)
    if task == "detection":
        from ..downstream.detection import retinanet_neck

        return NeckOutputs(retinanet_neck(name)).eval()
    if task == "segmentation":
        from ..downstream.segmentation import semantic_fpn_timing_model

        return semantic_fpn_timing_model(name)
    return create_model(name).eval()


def build_source(source: Source, task: str = "classification") -> nn.Module:
    """The model a name builds for `task`; a module given directly is timed as it is."""
    return build_model(source, task) if isinstance(source, str) else source.eval()


def source_kind(source: Source) -> str:
    """Where a model comes from: "lowformer" or "timm" for a name (see `lowformer.factory`), "module"
    for a module given directly."""
    return model_source(source) if isinstance(source, str) else "module"
