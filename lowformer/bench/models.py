"""Model names a benchmark accepts: ours (`lowformer.list_models()`) and timm's (`timm:NAME`), and what
is timed for each task: the classifier, or (task "detection") the backbone + RetinaNet FPN neck."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..factory import create_model
from ..models import list_models

TIMM_PREFIX = "timm:"

# "classification": the whole classifier. "detection": the dense-prediction part of a detector, the
# backbone's stride 8-32 maps + RetinaNet's FPN (P3-P7, 256 channels), as the papers time detection
# backbones; the heads and post-processing are the same for every backbone and left out.
TASKS = ("classification", "detection")

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
    return DETECTION_MODELS if task == "detection" else DEFAULT_MODELS


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def model_source(name: str) -> str:
    return "timm" if name.startswith(TIMM_PREFIX) else "lowformer"


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def check_model_name(name: str) -> None:
    """Raise ValueError, with close matches, unless `name` can be built."""
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX) :]
        if arch and timm.is_model(arch.split(".")[0]):
            return
        close = difflib.get_close_matches(arch, _timm_names(), n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {arch!r}.{hint} (see timm.list_models())")
    ours = list_models()
    if name in ours:
        return
    timm_names = _timm_names()
    if name in timm_names:
        raise ValueError(f"unknown model {name!r}: it is a timm model, write {TIMM_PREFIX}{name}")
    candidates = ours + [TIMM_PREFIX + n for n in timm_names]
    close = difflib.get_close_matches(name, ours, n=3, cutoff=0.5)
    close += [c for c in difflib.get_close_matches(TIMM_PREFIX + name, candidates, n=3, cutoff=0.6) if c not in close]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Ours: {', '.join(ours)}; timm's: {TIMM_PREFIX}NAME")


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
    if name.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(name[len(TIMM_PREFIX) :], pretrained=False)
    else:
        model = create_model(name)
    return model.eval()
