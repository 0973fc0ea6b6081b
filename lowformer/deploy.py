"""Deploy mode: an inference-optimised copy of a model that computes the same function.

Every BatchNorm is folded into the conv before it (or, in EdgeViT, into the 1x1 conv after it),
GroupNorm/LayerNorm affines are folded into the following 1x1 conv or linear layer where that is
exact, and dropout / drop-path are removed. The folding lives in the blocks' `fuse()` /
`reparameterize()` methods, so `timm.utils.reparameterize_model` finds them too, also inside
feature extractors and downstream wrappers.
"""

from __future__ import annotations

import copy

from timm.layers import DropPath
from timm.models._manipulate import reparameterize_model
from torch import nn


def check_deployable(model: nn.Module) -> None:
    """Raise ValueError if `model` is in training mode or has parts that cannot be folded."""
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"deploy needs an eval-mode model, but {training[0]} is in training mode "
            f"({len(training)} modules in all): call model.eval() first, since BatchNorm is folded "
            "with its running statistics"
        )
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ValueError(
                f"{name} is a BatchNorm without running statistics (track_running_stats=False): it "
                "normalises with batch statistics even in eval mode and cannot be folded"
            )


def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Inference-optimised model with the same outputs (relative error ~1e-6 in fp32).

    Idempotent; works on classifiers, `features_only` extractors and wrappers holding them.
    Raises ValueError for a model in training mode.
    """
    check_deployable(model)
    if not inplace:
        model = copy.deepcopy(model)
    reparameterize_model(model, inplace=True)
    _strip(model)
    return model


def _strip(module: nn.Module) -> None:
    """Replace dropout and drop-path (no-ops in eval mode) by Identity, saving their calls."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Dropout, DropPath)):
            setattr(module, name, nn.Identity().train(child.training))
        else:
            _strip(child)
