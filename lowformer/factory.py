"""`create_model` and `load_model`: build a registered variant, optionally with weights."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from timm.models._features import FeatureGetterNet
from torch import nn

from .models import get_entry, list_models
from .weights import (
    CheckpointError,
    convert_checkpoint,
    find_pretrained,
    load_state_dict_into,
    num_classes_in,
    read_checkpoint,
)

_logger = logging.getLogger(__name__)


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | int = (0, 1, 2, 3),
    **overrides,
) -> nn.Module:
    """Build a registered model, as `timm.create_model` does.

    Args:
        name: a name from `list_models()`, e.g. "lowformer_b1".
        pretrained: load the official weights from the local weights dir (see `weights_dir()`);
            nothing is downloaded, a missing file raises an error saying what to get and where.
        checkpoint_path: load this file instead: official release, timm state dict or our own
            safetensors, detected automatically, loaded strictly.
        num_classes: classifier size. Default: the checkpoint's, else 1000. A size that differs
            from the checkpoint's drops its classifier (with a warning).
        features_only: return a feature extractor giving the stage maps in `out_indices`.
        **overrides: model arguments such as `drop_path_rate`, `drop_rate`, `in_chans`;
            an unknown one raises TypeError.
    """
    entry = get_entry(name)
    if pretrained and checkpoint_path is not None:
        raise ValueError("give either pretrained=True or checkpoint_path, not both")
    path = find_pretrained(entry) if pretrained else checkpoint_path
    state_dict = None
    if path is not None:
        state_dict, fmt, _ = convert_checkpoint(path, entry)
    if num_classes is None and state_dict is not None:
        num_classes = num_classes_in(state_dict, entry.classifier)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = entry.builder(**overrides)
    model.variant, model.family = entry.name, entry.family
    if state_dict is not None:
        load_state_dict_into(model, state_dict, fmt, classifier=entry.classifier)
        model.pretrained_cfg = {**model.pretrained_cfg, "file": str(path), "checkpoint_format": fmt}
        _logger.info("loaded %s weights (%s) from %s", name, fmt, path)
    if features_only:
        model = FeatureGetterNet(model, out_indices=out_indices)
    return model


def load_model(path: str | os.PathLike, **overrides) -> nn.Module:
    """Build the model a `save_checkpoint` file describes (its variant, or its own spec) and load it."""
    _, meta = read_checkpoint(path)
    if meta.get("format") != "lowformer":
        raise CheckpointError(
            f"{path} carries no lowformer metadata; use create_model(NAME, checkpoint_path={str(path)!r})"
        )
    variant = meta["variant"]
    if variant in list_models() and json.loads(meta["spec"]) == json.loads(
        json.dumps(get_entry(variant).spec.to_dict())
    ):
        return create_model(variant, checkpoint_path=path, **overrides)
    raise CheckpointError(
        f"{path} holds variant {variant!r}, which is not registered here; register its spec with "
        "lowformer.register_model, then call create_model"
    )
