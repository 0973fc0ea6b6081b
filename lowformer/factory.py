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


MIN_IMAGE_SIZE = 32  # every model here downsamples by 32: a smaller input leaves no pixel in the last stage


def size_divisor_of(model: nn.Module | str) -> int:
    """Input height and width must be multiples of this (EdgeViT: 32; LowFormer and timm models: 1)."""
    if isinstance(model, str):
        source, arch = parse_model_name(model)
        return get_entry(arch).size_divisor if source == "lowformer" else 1
    divisors = [m.size_divisor for m in model.modules() if isinstance(getattr(m, "size_divisor", None), int)]
    return max(divisors, default=1)


def check_image_size(model: nn.Module | str, image_size: Sequence[int]) -> tuple[int, int]:
    """The one input-size rule of the package (models, bench, export, train and info ask it): height and
    width >= `MIN_IMAGE_SIZE` and multiples of the model's size divisor. Returns (H, W).

    Raises:
        ValueError: naming the size, the rule, and the nearest sizes that satisfy it.
    """
    h, w = (int(image_size), int(image_size)) if isinstance(image_size, int) else map(int, image_size)
    label = model if isinstance(model, str) else getattr(model, "variant", type(model).__name__)
    if h < MIN_IMAGE_SIZE or w < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {h}x{w} is too small for {label}: height and width must be >= {MIN_IMAGE_SIZE}")
    divisor = size_divisor_of(model)
    if h % divisor or w % divisor:
        up = lambda v: -(-v // divisor) * divisor  # noqa: E731
        raise ValueError(
            f"{label} needs height and width that are multiples of {divisor}, got {h}x{w} (e.g. {up(h)}x{up(w)})"
        )
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
        model = FeatureGetterNet(model, out_indices=(0, 1, 2, 3) if out_indices is None else out_indices)
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
    import timm

    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if features_only:
        kwargs["features_only"] = True
        if out_indices is not None:
            kwargs["out_indices"] = out_indices
    model = timm.create_model(arch, pretrained=pretrained, checkpoint_path=str(checkpoint_path or ""), **kwargs)
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
