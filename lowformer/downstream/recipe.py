"""Recipes for `lowformer detect train` and `lowformer segment train`: typed, flat, read from YAML.

A recipe is a YAML mapping of the fields of `DetectionRecipe` or `SegmentationRecipe`. Unknown keys
are refused with the closest known key, as `lowformer train` does (its `RecipeError` and `KEY=VALUE`
override syntax are reused here); the dataclasses are separate because a detector's schedule is
counted in epochs with step decays and a segmenter's in iterations with a poly decay.

Presets (`recipes/detection/*.yaml`, `recipes/segmentation/*.yaml`) reproduce the settings the
papers' detection and segmentation tables were trained with (docs/downstream.md lists them and
their sources); `demo` trains the built-in shapes on a CPU in minutes.

Units: `batch_size` is per process, so the effective batch is `batch_size x processes`. `lr` is
the learning rate for a batch of `lr_batch` images and is scaled linearly to the effective batch
(mmdet's `auto_scale_lr`): the presets give the papers' lr with their batch (16 images on 8 GPUs
for detection, 32 for segmentation), so 8 GPUs reproduce them exactly and fewer get the linearly
scaled lr. `lr_batch: null` uses `lr` as it is. Both numbers are printed at the start of a run.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..train import recipe as train_recipe
from ..train.recipe import RecipeError, from_dict, merge_for_resume, parse_override

__all__ = [
    "DetectionRecipe",
    "DownstreamRecipe",
    "RecipeError",
    "Schedule",
    "SegmentationRecipe",
    "list_recipes",
    "load_recipe",
    "parse_override",
    "recipe_from_dict",
]

TASKS = ("detection", "segmentation")
DETECTORS = ("retinanet", "fasterrcnn", "maskrcnn")


@dataclass(frozen=True)
class Schedule:
    """A recipe turned into optimizer steps for a given dataset size: what the loop runs."""

    total_steps: int
    steps_per_epoch: int
    eval_every: int  # steps; the last step is always evaluated
    lr_at: Callable[[int], float]  # learning rate of (0-based) step t


@dataclass
class DownstreamRecipe:
    """What every downstream run has: the backbone, the batch, AdamW, warm-up and the runtime."""

    name: str = "custom"
    description: str = ""
    model: str | None = None  # the backbone this recipe was written for; `--model` may pick another

    # -- model ----------------------------------------------------------------------------------
    fpn_channels: int = 256
    frozen_bn: bool | None = None  # None: frozen when ImageNet weights are loaded (torchvision's rule)
    trainable_stages: int | None = None  # None: every stage trains (mmdet frozen_stages=-1)

    # -- data -----------------------------------------------------------------------------------
    batch_size: int = 2  # per process
    workers: int = 2  # data loader processes per training process
    hflip: float = 0.5

    # -- optimisation ---------------------------------------------------------------------------
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    lr: float = 1e-4  # for a batch of lr_batch images; scaled linearly to the effective batch
    lr_batch: int | None = None  # null: lr is used as it is, whatever the batch
    weight_decay: float = 1e-4  # on every parameter, as mmdet/mmseg's default optimizer
    clip_grad: float | None = None  # gradient-norm clip (null: off)
    warmup_iters: int = 0  # linear warm-up (mmcv: from lr x warmup_ratio to lr)
    warmup_ratio: float = 0.001

    # -- evaluation -----------------------------------------------------------------------------
    eval_batch_size: int = 1

    # -- runtime --------------------------------------------------------------------------------
    seed: int = 0
    amp: str | None = None  # None, "bf16" or "fp16"
    checkpoint_every: int = 0  # also save every N optimizer steps (0: only at evaluations and the end)
    keep_last: int = 2  # step checkpoints kept besides best.pt and last.pt

    # keys that change how a run executes but not what it computes: the only ones `--resume` may change
    RUNTIME_KEYS: typing.ClassVar[frozenset[str]] = frozenset(
        {"name", "description", "workers", "eval_batch_size", "checkpoint_every", "keep_last"}
    )
    task: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> DownstreamRecipe:
        """A copy with `changes` applied and checked like a file's keys (unknown keys refused)."""
        return recipe_from_dict(type(self), {**self.to_dict(), **changes}, origin="override")

    def scaled(self, world_size: int) -> tuple[int, float]:
        """(effective batch, effective lr): the lr scaled from `lr_batch` images to the effective batch."""
        batch = self.batch_size * world_size
        return batch, self.lr if self.lr_batch is None else self.lr * batch / self.lr_batch

    def warmup_factor(self, step: int) -> float:
        """mmcv's linear warm-up: lr x (1 - (1 - ratio) x (1 - step / warmup_iters)) for the first iterations."""
        if step >= self.warmup_iters:
            return 1.0
        return 1.0 - (1.0 - self.warmup_ratio) * (1.0 - step / self.warmup_iters)

    def schedule(self, steps_per_epoch: int, lr: float) -> Schedule:
        """The run in optimizer steps for `steps_per_epoch` steps an epoch, peaking at `lr`."""
        raise NotImplementedError

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.fpn_channels >= 1, "fpn_channels must be >= 1"),
            (self.trainable_stages is None or self.trainable_stages >= 0, "trainable_stages must be >= 0 or null"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.workers >= 0, "workers must be >= 0"),
            (0 <= self.hflip <= 1, "hflip is a probability"),
            (self.optimizer in ("adamw", "sgd"), "optimizer is adamw or sgd"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_batch is None or self.lr_batch >= 1, "lr_batch must be >= 1 (or null: no scaling)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 (or null: off)"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (0 < self.warmup_ratio <= 1, "warmup_ratio must be in (0, 1]"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.amp in (None, "bf16", "fp16"), "amp is null, bf16 or fp16"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
        ]

    def validate(self) -> None:
        """Refuse values the trainer cannot honour, with the reason."""
        for ok, message in self.checks():
            if not ok:
                raise RecipeError(f"recipe {self.name!r}: {message}")


@dataclass
class DetectionRecipe(DownstreamRecipe):
    """mmdet's epoch-based step schedule ("1x": 12 epochs, lr x 0.1 after epochs 8 and 11)."""

    detector: str = "retinanet"  # retinanet, fasterrcnn or maskrcnn (torchvision's)
    min_size: int = 800  # image scale (1333, 800): shorter side 800, longer at most 1333, ratio kept
    max_size: int = 1333
    epochs: int = 12
    lr_steps: list[float] = field(default_factory=lambda: [8, 11])  # epochs after which lr x lr_gamma
    lr_gamma: float = 0.1
    eval_every_epochs: int = 1
    # any other keyword of the torchvision detector (score_thresh, detections_per_img, rpn_*, box_*, ...)
    detector_options: dict[str, Any] = field(default_factory=dict)

    RUNTIME_KEYS = DownstreamRecipe.RUNTIME_KEYS | {"eval_every_epochs"}
    task = "detection"

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.detector in DETECTORS, f"detector is one of {', '.join(DETECTORS)}"),
            (32 <= self.min_size <= self.max_size, "image scale: 32 <= min_size <= max_size"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (all(0 < s <= self.epochs for s in self.lr_steps), "lr_steps are epochs in (0, epochs]"),
            (list(self.lr_steps) == sorted(self.lr_steps), "lr_steps must be increasing"),
            (0 < self.lr_gamma <= 1, "lr_gamma must be in (0, 1]"),
            (self.eval_every_epochs >= 1, "eval_every_epochs must be >= 1"),
        ]

    def schedule(self, steps_per_epoch: int, lr: float) -> Schedule:
        total = self.epochs * steps_per_epoch
        milestones = [round(s * steps_per_epoch) for s in self.lr_steps]

        def lr_at(step: int) -> float:
            decays = sum(step >= m for m in milestones)
            return lr * self.lr_gamma**decays * self.warmup_factor(step)

        return Schedule(total, steps_per_epoch, self.eval_every_epochs * steps_per_epoch, lr_at)


@dataclass
class SegmentationRecipe(DownstreamRecipe):
    """mmseg's iteration-based poly schedule and ADE20K pipeline (random rescale, crop, flip, colour)."""

    num_classes: int = 150  # ADE20K's 150 after reduce_zero_label
    reduce_zero_label: bool = True  # ADE20K: label 0 is "other" (ignored), 1..150 become 0..149
    ignore_index: int = 255
    iterations: int = 40000
    poly_power: float = 0.9
    min_lr: float = 0.0
    eval_every: int = 4000  # iterations
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (h, w) training crop
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # mmseg img_scale (long, short), ratio kept
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale of `scale`
    cat_max_ratio: float = 0.75  # re-draw a crop (10 tries) where one class covers more than this
    photometric: bool = True  # brightness, contrast, saturation, hue jitter
    head_channels: int = 128
    dropout: float = 0.1
    norm: str = "gn"  # head normalisation: "gn" (GroupNorm 32, Kirillov et al.) or "bn" (mmseg's)
    eval_mode: str = "whole"  # "whole" image or "slide" (sliding window)
    eval_crop: list[int] = field(default_factory=lambda: [512, 512])  # sliding window size (h, w)
    eval_stride: list[int] = field(default_factory=lambda: [341, 341])  # sliding window stride

    RUNTIME_KEYS = DownstreamRecipe.RUNTIME_KEYS | {"eval_every", "eval_mode", "eval_crop", "eval_stride"}
    task = "segmentation"

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.num_classes >= 1, "num_classes must be >= 1"),
            (
                0 <= self.ignore_index <= 255 and self.ignore_index >= self.num_classes,
                "ignore_index must be in [num_classes, 255] (label maps are 8-bit)",
            ),  # fmt: skip
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.poly_power > 0 and self.min_lr >= 0, "poly_power must be > 0 and min_lr >= 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (_pair(self.crop_size) and min(self.crop_size) >= 32, "crop_size: [h, w], each >= 32"),
            (_pair(self.scale) and min(self.scale) >= 32, "scale: [long, short] sides, each >= 32"),
            (_pair(self.ratio_range) and 0 < self.ratio_range[0] <= self.ratio_range[1], "ratio_range: [min, max]"),
            (0 < self.cat_max_ratio <= 1, "cat_max_ratio must be in (0, 1]"),
            (self.head_channels >= 1 and 0 <= self.dropout < 1, "head_channels >= 1, dropout in [0, 1)"),
            (self.norm in ("gn", "bn"), "norm is gn or bn"),
            (self.eval_mode in ("whole", "slide"), "eval_mode is whole or slide"),
            (_pair(self.eval_crop) and min(self.eval_crop) >= 32, "eval_crop: [h, w], each >= 32"),
            (
                _pair(self.eval_stride) and all(0 < s <= c for s, c in zip(self.eval_stride, self.eval_crop)),
                "eval_stride: [h, w], each in (0, eval_crop]",
            ),  # fmt: skip
        ]

    def schedule(self, steps_per_epoch: int, lr: float) -> Schedule:
        total = self.iterations

        def lr_at(step: int) -> float:
            poly = (lr - self.min_lr) * (1 - step / total) ** self.poly_power + self.min_lr
            return poly * self.warmup_factor(step)

        return Schedule(total, steps_per_epoch, self.eval_every, lr_at)


def _pair(values: list) -> bool:
    return len(values) == 2


RECIPE_TYPES: dict[str, type[DownstreamRecipe]] = {"detection": DetectionRecipe, "segmentation": SegmentationRecipe}


# ------------------------------------------------------------------------------------------------
# Parsing, resuming and presets: the classification trainer's machinery, with these dataclasses
# ------------------------------------------------------------------------------------------------


def recipe_from_dict(cls: type[DownstreamRecipe], data: Any, origin: str = "recipe") -> DownstreamRecipe:
    """A recipe of type `cls` from a mapping; unknown keys and wrong types raise RecipeError naming `origin`."""
    return from_dict(data, origin, cls=cls)


def merge_resumed(
    cls: type[DownstreamRecipe], saved: dict[str, Any], given: DownstreamRecipe, explicit: set[str], *,
    when: str = "resuming (the run would no longer continue exactly)",
) -> DownstreamRecipe:  # fmt: skip
    """The checkpoint's recipe with the runtime keys the user set now; other changes are refused
    (the resumed run would no longer continue the interrupted one; an evaluation would not be of
    the model the checkpoint holds)."""
    return merge_for_resume(saved, given, explicit, runtime_keys=cls.RUNTIME_KEYS, when=when)


def _preset_dir(task: str) -> Path:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return Path(str(resources.files("lowformer.downstream") / "recipes" / task))


def list_recipes(task: str) -> list[str]:
    """Names of the built-in presets of `task` ("detection" or "segmentation")."""
    return train_recipe.list_recipes(_preset_dir(task))


def load_recipe(task: str, name_or_path: str | os.PathLike) -> DownstreamRecipe:
    """A preset by name ("retinanet_1x", "demo") or a YAML file by path, as `task`'s recipe type."""
    return train_recipe.load_recipe(name_or_path, preset_dir=_preset_dir(task), cls=RECIPE_TYPES[task])
