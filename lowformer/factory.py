"""Model names, resolved in one place, and `create_model` / `load_model`.

A model name means the same in every command and function of the package:

- one of ours, as `list_models()` gives it ("lowformer_b1", "edgevit_xs");
- `timm:NAME` for any timm model ("timm:resnet50", "timm:fastvit_t8.apple_in1k").

`parse_model_name` splits a name, `check_model_name` refuses an unknown one with close matches (and
the `timm:` hint for a timm name written bare), `create_model` builds either kind.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Sequence

from timm.models._features import FeatureGetterNet
from torch import nn

from .models import get_entry, list_models
from .models._layers import MIN_IMAGE_SIZE, check_input_size  # noqa: F401  (MIN_IMAGE_SIZE: re-exported)
from .weights import (
    CheckpointError,
    convert_checkpoint,
    data_config_of,
    find_pretrained,
    load_state_dict_into,
    num_classes_in,
    read_checkpoint,
)

_logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
SOURCES = ("lowformer", "timm")


def parse_model_name(name: str) -> tuple[str, str]:
    """("lowformer", "lowformer_b1") or ("timm", "resnet50.a1_in1k"); checks the name exists.

    Raises:
        ValueError: an unknown name, with close matches, or a timm name without the `timm:` prefix.
    """
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, got {type(name).__name__}")
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX) :]
        _check_timm_name(arch)
        return "timm", arch
    if name in list_models():
        return "lowformer", name
    timm_names = _timm_names()
    if name in timm_names or _timm_is_model(name):
        raise ValueError(f"unknown model {name!r}: it is a timm model, write {TIMM_PREFIX}{name}")
    ours = list_models()
    close = difflib.get_close_matches(name, ours, n=3, cutoff=0.5)
    candidates = [TIMM_PREFIX + n for n in timm_names]
    close += [c for c in difflib.get_close_matches(TIMM_PREFIX + name, candidates, n=3, cutoff=0.6) if c not in close]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Ours: {', '.join(ours)}; any timm model: {TIMM_PREFIX}NAME")


def check_model_name(name: str) -> str:
    """Raise ValueError (with close matches) unless `name` can be built; returns its source."""
    return parse_model_name(name)[0]


def model_source(name: str) -> str:
    """ "timm" for `timm:NAME`, else "lowformer" (no check; see `check_model_name`)."""
    return "timm" if name.startswith(TIMM_PREFIX) else "lowformer"


def require_ours(name: str, what: str, where_timm_works: str) -> str:
    """`name` must be one of our models for `what`; a timm name is refused with the reason and where
    timm models do work. Returns the name."""
    if parse_model_name(name)[0] == "timm":
        raise ValueError(
            f"{what} needs one of our models ({', '.join(list_models())}), got {name!r}; "
            f"timm models work in {where_timm_works}"
        )
    return name


def size_divisor_of(model: nn.Module | str) -> int:
    """Input height and width must be multiples of this (EdgeViT: 32; LowFormer and timm models: 1)."""
    if isinstance(model, str):
        source, arch = parse_model_name(model)
        return get_entry(arch).size_divisor if source == "lowformer" else 1
    divisors = [m.size_divisor for m in model.modules() if isinstance(getattr(m, "size_divisor", None), int)]
    return max(divisors, default=1)


def check_image_size(model: nn.Module | str, image_size: Sequence[int] | int) -> tuple[int, int]:
    """The one input-size rule of the package, for a model or a model name before it is built (bench,
    export, train and info ask it; our models' forward applies the same `check_input_size`): height
    and width >= `MIN_IMAGE_SIZE` (32) and multiples of the model's size divisor. Returns (H, W).

    Raises:
        ValueError: naming the size, the rule, and the nearest sizes that satisfy it.
    """
    h, w = (int(image_size), int(image_size)) if isinstance(image_size, int) else map(int, image_size)
    label = model if isinstance(model, str) else getattr(model, "variant", type(model).__name__)
    check_input_size(h, w, size_divisor_of(model), label)
    return h, w


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_is_model(arch: str) -> bool:
    import timm

    return bool(arch) and timm.is_model(arch.split(".")[0])


def _check_timm_name(arch: str) -> None:
    if _timm_is_model(arch):
        return
    close = difflib.get_close_matches(arch, _timm_names(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
    raise ValueError(f"unknown timm model {arch!r}.{hint} (see timm.list_models())")


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | int | None = None,
    **overrides,
) -> nn.Module:
    """Build a registered model, as `timm.create_model` does, or any timm model as "timm:NAME".

    Args:
        name: a name from `list_models()`, e.g. "lowformer_b1", or "timm:NAME" (built by
            `timm.create_model`, which gets every other argument; `pretrained=True` is timm's and
            may download).
        pretrained: load the official weights from the local weights dir (see `weights_dir()`);
            nothing is downloaded, a missing file raises an error saying what to get and where.
        checkpoint_path: load this file instead: official release, timm state dict or our own
            safetensors, detected automatically, loaded strictly.
        num_classes: classifier size. Default: the checkpoint's, else 1000. A size that differs
            from the checkpoint's drops its classifier (with a warning).
        features_only: return a feature extractor giving the stage maps in `out_indices`
            (default: all four stages of ours; timm's default for timm models).
        **overrides: model arguments such as `drop_path_rate`, `drop_rate`, `in_chans`;
            an unknown one raises TypeError.
    """
    source, arch = parse_model_name(name)
    if pretrained and checkpoint_path is not None:
        raise ValueError("give either pretrained=True or checkpoint_path, not both")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices applies with features_only=True")
    if source == "timm":
        return _create_timm(arch, pretrained, checkpoint_path, num_classes, features_only, out_indices, overrides)
    entry = get_entry(name)
    path = find_pretrained(entry) if pretrained else checkpoint_path
    state_dict, meta = None, {}
    if path is not None:
        state_dict, fmt, meta = convert_checkpoint(path, entry)
    if num_classes is None and state_dict is not None:
        num_classes = num_classes_in(state_dict, entry.classifier)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = entry.builder(**overrides)
    model.variant, model.family = entry.name, entry.family
    if state_dict is not None:
        load_state_dict_into(model, state_dict, fmt, classifier=entry.classifier)
        # the data config the checkpoint was trained with (input size, crop, mean/std, class names)
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            **data_config_of(meta),
            "file": str(path),
            "checkpoint_format": fmt,
        }
        _logger.info("loaded %s weights (%s) from %s", name, fmt, path)
    if features_only:
        cfg = model.pretrained_cfg
        # out_indices are checked by the model (`_layers.take_indices`): in range, ascending, each once
        model = FeatureGetterNet(model, out_indices=out_indices)
        model.pretrained_cfg = cfg  # resolve_data_config(model=extractor) sees the data config too
    return model


def _create_timm(
    arch: str,
    pretrained: bool,
    checkpoint_path: str | os.PathLike | None,
    num_classes: int | None,
    features_only: bool,
    out_indices: Sequence[int] | int | None,
    overrides: dict,
) -> nn.Module:
    """timm builds the model; a `checkpoint_path` is read and loaded by our reader and strict loader,
    so a bad file gets the same messages as for our models, and safetensors files work too."""
    import timm

    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if features_only:
        kwargs["features_only"] = True
        if out_indices is not None:
            kwargs["out_indices"] = out_indices
    state_dict = meta = None
    if checkpoint_path is not None:
        state_dict, meta = read_checkpoint(checkpoint_path)
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel / DDP saves
    model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    if state_dict is not None:
        classifier = model.pretrained_cfg.get("classifier")
        if features_only:  # the extractor has no head: the checkpoint's head keys have nowhere to go
            own = model.state_dict()
            state_dict, classifier = {k: v for k, v in state_dict.items() if k in own}, None
        elif num_classes is None and classifier:  # as for ours: the checkpoint's class count by default
            ckpt_classes = num_classes_in(state_dict, classifier)
            if ckpt_classes is not None and ckpt_classes != model.num_classes:
                model.reset_classifier(ckpt_classes)
        load_state_dict_into(model, state_dict, "timm state dict", classifier=classifier)
        cfg = {**model.pretrained_cfg, **data_config_of(meta), "file": str(checkpoint_path)}
        model.pretrained_cfg = {**cfg, "checkpoint_format": "timm state dict"}
    model.variant, model.family = TIMM_PREFIX + arch, "timm"
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
