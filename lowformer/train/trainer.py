"""The training loop: `train(model_name, recipe, ...)`, from one CPU process to many GPUs on many nodes.

A run is a few named steps; `train` calls them in this order:

    _resume_from      the checkpoint a resumed run continues (its recipe wins)
    _check_request    model, image sizes, extras: refused before anything is written
    _claim_run_folder never another run's folder unless resuming or overwriting; writable
    _setup            data, model, EMA, optimizer, schedule -> one `_Run`
    _restore          weights, optimizer, counters and RNG of a resumed run
    _check_free_space room for a checkpoint, checked before the first step
    _start            DDP / torch.compile, recipe.yaml, TensorBoard, the plan printed
    for each epoch:
      train_one_epoch micro-batches (`_forward_backward`), every grad_accum of them an
                      `_optimizer_step`; every log_every steps `_sync` (losses checked,
                      summed, tracked); periodic checkpoints; Ctrl-C / SIGTERM saves and stops
      end_epoch       sums over processes, `evaluate_epoch` (BN reset, top-1/top-5),
                      `write_checkpoint`, log.csv
    _finish           best.safetensors

The device is never waited for between syncs: losses and hit counts stay on it (`DeviceLog`) until
`_sync` reads them, every `log_every` optimizer steps, before every checkpoint and at the end of an
epoch. Loader workers hand over uint8 images; normalisation and random erasing run on the device
(`pipeline.DeviceBatches`), and with `gpu_decode` JPEG decoding and cropping too.

Reproducibility: every micro-batch's randomness (which images, their augmentation, the
resolution, mixing, drop path) is a function of (seed, epoch, step, virtual shard), not of the
process layout. So on CPU a run killed and resumed ends with the same weights as an
uninterrupted one, and 2 processes x 1 accumulation step compute what 1 process x 2 steps does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._io import write_csv, write_text
from ..errors import LowformerRuntimeError, OutputError
from ..factory import check_image_size, create_model, require_ours
from ..models import get_entry
from ..weights import META_KEY, checkpoint_metadata
from ..weights import save_checkpoint as save_weights
from . import checkpoint as ckpt_io
from .augment import (
    PermutedMixup,
    build_erasing,
    build_mixup,
    eval_transform,
    mean_std,
    train_criterion,
    train_transform,
)
from .data import (
    DataLayoutError,
    EvalDataset,
    ImageSource,
    StepBatchSampler,
    SubsetSource,
    TrainDataset,
    collate,
    eval_batches,
    load_sources,
    sample_seed,
    seeded,
    subset_indices,
)
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, any_process, process_group
from .evaluate import EvalResult, autocast, eval_decoder, eval_loader, evaluate_model
from .lifecycle import RunInterrupted, StopSignals, ignore_stop_signals, prepare_run_folder
from .metrics import DeviceLog, Entry, first_non_finite
from .pipeline import DeviceBatches, check_gpu_decode, decode_on_device, gpu_decode_parts
from .recipe import Recipe, literal, merge_for_resume
from .techniques import DropPathSchedule, OfficialEma, apply_drop_path, mesa_targets, official_init, reset_bn_stats
from .trackers import Trackers, check_available

__all__ = ["NonFiniteLossError", "TrainResult", "train"]

_logger = logging.getLogger(__name__)

T = TypeVar("T")

CSV_COLUMNS = (
    "epoch",
    "global_step",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "train_img_s",
    "epoch_s",
    "skipped_images",
)


class NonFiniteLossError(LowformerRuntimeError):
    """The loss became NaN or infinite; training stopped without saving the broken state."""


@dataclass
class TrainResult:
    """What a finished run produced. Accuracies in percent."""

    output_dir: Path
    best_top1: float | None
    best_epoch: int | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    history: list[dict]
    skipped_images: int
    effective_batch: int
    effective_lr: float
    world_size: int
    wall_s: float


# ------------------------------------------------------------------------------------------------
# The state a run's steps share
# ------------------------------------------------------------------------------------------------


@dataclass
class _EpochStats:
    """Running sums of one epoch on this process (saved in mid-epoch checkpoints)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    labelled: float = 0.0  # images with hard labels (no mixing), for the training top-1
    images: float = 0.0
    train_s: float = 0.0
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Progress:
    """Where the run stands: what a checkpoint saves and a resumed run restores."""

    epoch: int = 0  # the epoch to run next (0-based)
    step: int = 0  # optimizer steps done in it
    global_step: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    stats: _EpochStats = field(default_factory=_EpochStats)


@dataclass(frozen=True)
class _Plan:
    """The run's shape, fixed at set-up."""

    steps_per_epoch: int
    total_updates: int
    warmup_updates: int
    cosine_updates: int
    effective_batch: int
    effective_lr: float


class _MicroBatch(NamedTuple):
    """What the host knows of a micro-batch when it is queued (its loss stays on the device)."""

    step: int  # the optimizer step it belongs to (global, from 1)
    images: int
    lr: float


@dataclass
class _Run:
    """Everything the steps of a run share. Built once by `_setup`; `progress` and the checkpoint
    paths change as the run goes."""

    info: DistInfo
    recipe: Recipe
    model_name: str
    classes: list[str]
    data_dir: str | Path | None
    out: Path
    model: nn.Module
    ema: OfficialEma | None
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    mixup: PermutedMixup | None
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    soft_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # mesa's targets: the EMA's predictions
    drop_schedule: DropPathSchedule
    train_src: ImageSource
    train_ds: TrainDataset
    val_loader: DataLoader
    sampler_args: dict[str, Any]
    plan: _Plan
    mean: tuple[float, ...]
    std: tuple[float, ...]
    progress_bars: bool
    to_device: DeviceBatches  # uint8 batches -> normalised on the device
    erasing: Callable[[torch.Tensor], torch.Tensor] | None  # timm's RandomErasing on the device
    device_decoded: frozenset[str] = frozenset()  # "training", "evaluation": the parts decoding JPEGs on the device
    train_model: nn.Module | None = None  # `model` as trained: wrapped by DDP and/or torch.compile
    trackers: Trackers | None = None  # TensorBoard, W&B (process 0)
    step_log: DeviceLog[_MicroBatch] = field(default_factory=DeviceLog)  # read by `_sync`
    progress: _Progress = field(default_factory=_Progress)
    last_ckpt: Path | None = None
    last_ckpt_step: int | None = None
    best_ckpt: Path | None = None
    skipped_images: int = 0

    @property
    def use_scaler(self) -> bool:
        return self.recipe.amp == "fp16"

    @property
    def eval_model(self) -> nn.Module:
        """The model evaluated, saved as `state_dict` and exported: the EMA when the recipe keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def log(self, message: str, *args: Any) -> None:
        (_logger.info if self.info.is_main else _logger.debug)(message, *args)

    def decoder(self, part: str) -> Callable | None:
        """How `part`'s batches of encoded JPEGs become pixels on the device (None: the workers decode)."""
        if part not in self.device_decoded:
            return None
        if part == "evaluation":
            return eval_decoder(self.info)
        # a training image nothing can decode is replaced by the next readable one, as in the workers
        return functools.partial(decode_on_device, device=self.info.device, recover=self.train_ds.replacement)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def train(
    model_name: str | None,
    recipe: Recipe,
    data_dir: str | Path | None = None,
    output_dir: str | Path = "runs/train",
    resume: str | Path | None = None,
    init_checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    device: str | None = None,
    tensorboard: bool = False,
    progress: bool = True,
    explicit_keys: set[str] | None = None,
    overwrite: bool = False,
    wandb: str | None = None,
    gpu_decode: bool = False,
) -> TrainResult:
    """Train `model_name` with `recipe` on `data_dir` (ImageFolder train/ val/) or the built-in digits.

    Args:
        output_dir: the run folder. One that holds another run is refused unless `resume` or
            `overwrite` is given.
        resume: a training checkpoint to continue from, or "auto" for `output_dir/last.pt`.
        init_checkpoint: fine-tune from this file (any format the loader reads); a classifier of
            another size is dropped and re-initialised.
        pretrained: fine-tune from the official weights in the local weights folder.
        num_classes: must equal the number of class folders when given (default: that number).
        device: "cpu" or "cuda" (default: CUDA when available); torchrun processes use cuda:LOCAL_RANK.
        explicit_keys: the recipe keys the user set on the command line (only runtime keys may
            change on resume).
        overwrite: delete the run in `output_dir` first.
        tensorboard: log to `output_dir/tensorboard` (the `tensorboard` extra).
        wandb: log to this Weights & Biases project (the `wandb` extra; files in `output_dir/wandb`).
        gpu_decode: decode and crop JPEGs on the CUDA device where the recipe's transforms allow it
            (pipeline.py); the other parts decode on the CPU, with a warning.

    Raises:
        RunInterrupted: SIGINT or SIGTERM arrived; a resumable checkpoint was saved first.
        NonFiniteLossError: the loss became NaN or infinite.
        RecipeError, DataLayoutError, ValueError: bad arguments, found before training starts.
        OutputError: the run folder cannot be written.
    """
    wall_start = time.perf_counter()
    out = Path(output_dir)
    with process_group(device) as info:
        saved, recipe, model_name = _resume_from(
            resume, out, recipe, model_name, explicit_keys or set(), init_checkpoint, pretrained, info
        )
        if saved is not None and data_dir is None:
            data_dir = saved.get("data_dir")  # the data the run was started on
        device_decoded = _check_request(model_name, recipe, tensorboard, wandb, gpu_decode, data_dir, info)
        _claim_run_folder(out, resume=resume is not None, overwrite=overwrite, info=info)
        run = _setup(
            info, model_name, recipe, data_dir, out, init_checkpoint, pretrained, num_classes, saved, progress,
            device_decoded,
        )  # fmt: skip
        if saved is not None:
            _restore(run, saved)
        _on_main(info, f"check the free space in {out}", lambda: _check_free_space(run))
        # from here on Ctrl-C / SIGTERM stop at the next step boundary, with a checkpoint (before
        # here, nothing is lost by stopping at once)
        with StopSignals() as stop:
            _start(run, tensorboard, wandb, saved.get("wandb_id") if saved else None)
            try:
                run.scheduler.step_update(run.progress.global_step)
                for epoch in range(run.progress.epoch, recipe.epochs):
                    train_one_epoch(run, epoch, stop)
                    end_epoch(run, epoch)
                    if epoch + 1 < recipe.epochs and any_process(stop.requested, info):
                        _stop(run, stop, f"after epoch {epoch + 1}")
            finally:
                if run.trackers is not None:
                    run.trackers.close()
        _finish(run)
        return TrainResult(
            output_dir=out,
            best_top1=run.progress.best_top1,
            best_epoch=run.progress.best_epoch,
            best_checkpoint=run.best_ckpt,
            last_checkpoint=run.last_ckpt,
            history=run.progress.history,
            skipped_images=run.skipped_images,
            effective_batch=run.plan.effective_batch,
            effective_lr=run.plan.effective_lr,
            world_size=info.world_size,
            wall_s=time.perf_counter() - wall_start,
        )


def _resume_from(
    resume: str | Path | None,
    out: Path,
    recipe: Recipe,
    model_name: str | None,
    explicit_keys: set[str],
    init_checkpoint: str | Path | None,
    pretrained: bool,
    info: DistInfo,
) -> tuple[dict[str, Any] | None, Recipe, str]:
    """(the checkpoint a resumed run continues or None, the recipe, the model name)."""
    if resume is None:
        model_name = model_name or recipe.model
        if model_name is None:
            raise ValueError(f"recipe {recipe.name!r} names no model; pass --model")
        return None, recipe, model_name
    if init_checkpoint is not None or pretrained:
        raise ValueError("--resume continues a run; it cannot be combined with --checkpoint or --pretrained")
    path = out / "last.pt" if str(resume) == "auto" else Path(resume)
    saved = ckpt_io.load(path, task="classification")
    recipe = merge_for_resume(saved["recipe"], recipe, explicit_keys)
    if model_name not in (None, saved["model_name"]):
        raise ValueError(f"{path} trains {saved['model_name']!r}, not {model_name!r}")
    if info.is_main:
        _logger.info("resuming from %s (epoch %d, step %d)", path, saved["epoch"] + 1, saved["step_in_epoch"])
    return saved, recipe, saved["model_name"]


def _check_request(
    model_name: str,
    recipe: Recipe,
    tensorboard: bool,
    wandb: str | None,
    gpu_decode: bool,
    data_dir: str | Path | None,
    info: DistInfo,
) -> frozenset[str]:
    """What can be refused before anything is written: a model we cannot train, image sizes the
    model does not take (the package's one rule, `check_image_size`), a missing extra, GPU decoding
    where it cannot work. Returns the parts of the run that decode JPEGs on the device."""
    require_ours(model_name, "lowformer train", "lowformer info, bench and analyze")
    if recipe.mixup_enabled and recipe.batch_size < 2:
        raise recipe.error("{batch_size} is too small for mixup/cutmix, which pair images within a batch: use >= 2")
    for key in ("image_size", "eval_image_size"):
        sizes = getattr(recipe, key)
        for size in sizes if isinstance(sizes, list) else [sizes]:
            try:
                check_image_size(model_name, (size, size))
            except ValueError as e:
                raise recipe.error(f"{{{key}}}: " + literal(str(e))) from None
    check_available(tensorboard, wandb)
    if not gpu_decode:
        return frozenset()
    check_gpu_decode(info.device, data_dir)
    # the transforms' kinds decide; their fill colour (the model's mean) does not matter here
    mean = mean_std(recipe)[0]
    transforms = {
        "training": train_transform(recipe, max(recipe.image_size), mean),
        "evaluation": eval_transform(recipe.eval_image_size, recipe.eval_crop_pct, recipe.eval_interpolation),
    }
    return frozenset(gpu_decode_parts(transforms))


def _on_main(info: DistInfo, what: str, fn: Callable[[], T]) -> T | None:
    """`fn()` on process 0 only. If it fails, every process raises (none waits for a process that gave
    up); the other processes wait until it is done."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every process
            error = e
    if any_process(error is not None, info):
        if error is not None:
            raise error
        raise LowformerRuntimeError(f"process 0 could not {what}; see its message")
    return result


def _claim_run_folder(out: Path, *, resume: bool, overwrite: bool, info: DistInfo) -> None:
    """An output folder that holds another run is refused (before any work), unless resuming or
    overwriting; stale temporary files of a killed write are removed; writability is checked now."""
    _on_main(info, f"prepare the run folder {out}", lambda: prepare_run_folder(out, resume=resume, overwrite=overwrite))


def _setup(
    info: DistInfo,
    model_name: str,
    recipe: Recipe,
    data_dir: str | Path | None,
    out: Path,
    init_checkpoint: str | Path | None,
    pretrained: bool,
    num_classes: int | None,
    saved: dict[str, Any] | None,
    progress_bars: bool,
    device_decoded: frozenset[str] = frozenset(),
) -> _Run:
    """Data, model, EMA, optimizer, schedule and losses of a run."""
    if recipe.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = info.device.type == "cuda"  # the official trainer's setting

    # -- data --
    train_src, val_src = load_sources(data_dir, classes=saved["classes"] if saved else None)
    classes = list(train_src.classes)
    if saved is not None and classes != list(saved["classes"]):
        raise DataLayoutError(f"the checkpoint was trained on classes {saved['classes'][:5]}..., {data_dir} differs")
    if num_classes is not None and num_classes != len(classes):
        raise DataLayoutError(f"--num-classes {num_classes} but the data has {len(classes)} class folders")

    # -- model and EMA --
    torch.manual_seed(recipe.seed)  # the same initial weights on every process
    model = _build_model(model_name, recipe, len(classes), init_checkpoint, pretrained, fresh=saved is None)
    drop_schedule = DropPathSchedule(model)
    model.to(info.device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{model_name} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    mean, std = mean_std(recipe, model)
    # what every checkpoint of this run records, so that it is used as it was trained and evaluated
    model.pretrained_cfg = {**model.pretrained_cfg, **_data_config(recipe, classes, mean, std)}
    ema = OfficialEma(model, recipe.ema_decay, recipe.ema_warmup_steps) if recipe.ema_decay else None

    # -- datasets and the step plan --
    train_tfs = {s: train_transform(recipe, s, mean) for s in recipe.image_size}
    train_ds = TrainDataset(train_src, train_tfs, encoded="training" in device_decoded)
    val_tf = eval_transform(recipe.eval_image_size, recipe.eval_crop_pct, recipe.eval_interpolation)
    val_loader = eval_loader(
        val_src,
        val_tf,
        recipe.eval_batch_size or 2 * recipe.batch_size,
        recipe.workers,
        info,
        encoded="evaluation" in device_decoded,
    )
    sampler_args = dict(
        num_samples=len(train_src),
        batch_size=recipe.batch_size,
        resolutions=recipe.image_size,
        seed=recipe.seed,
        world_size=info.world_size,
        rank=info.rank,
        grad_accum=recipe.grad_accum,
    )
    plan = _make_plan(recipe, StepBatchSampler(epoch=0, **sampler_args).steps_per_epoch, len(train_src), info)

    # -- optimizer, schedule, scaler, losses --
    optimizer, scheduler = _build_optimizer(model, recipe, plan)
    scaler = torch.amp.GradScaler(info.device.type, enabled=recipe.amp == "fp16")
    mixup = build_mixup(recipe, len(classes))
    return _Run(
        info=info,
        recipe=recipe,
        model_name=model_name,
        classes=classes,
        data_dir=data_dir,
        out=out,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        mixup=mixup,
        criterion=train_criterion(recipe, soft_targets=mixup is not None),
        soft_criterion=train_criterion(recipe, soft_targets=True),
        drop_schedule=drop_schedule,
        train_src=train_src,
        train_ds=train_ds,
        val_loader=val_loader,
        sampler_args=sampler_args,
        plan=plan,
        mean=mean,
        std=std,
        progress_bars=progress_bars,
        to_device=DeviceBatches(mean, std, info.device, channels_last=recipe.channels_last),
        erasing=build_erasing(recipe, info.device),
        device_decoded=device_decoded,
    )


def _make_plan(recipe: Recipe, steps_per_epoch: int, num_images: int, info: DistInfo) -> _Plan:
    """Steps per epoch and in all, the warm-up, and the effective batch and lr (the scaling rule)."""
    eff_batch, eff_lr = recipe.scaled(info.world_size)
    if steps_per_epoch == 0:
        raise recipe.error(
            f"the training set has {num_images} images, fewer than one effective batch ({eff_batch} = "
            f"{{batch_size}} x {info.world_size} process(es) x {{grad_accum}}): lower them"
        )
    total_updates = recipe.epochs * steps_per_epoch
    warmup_updates = min(total_updates, round(recipe.warmup_epochs * steps_per_epoch))
    return _Plan(
        steps_per_epoch=steps_per_epoch,
        total_updates=total_updates,
        warmup_updates=warmup_updates,
        cosine_updates=max(1, total_updates - warmup_updates),
        effective_batch=eff_batch,
        effective_lr=eff_lr,
    )


def _build_optimizer(model: nn.Module, recipe: Recipe, plan: _Plan) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """timm's optimizer at the effective lr, and the cosine schedule with warm-up, per optimizer update."""
    opt_kwargs: dict[str, Any] = {}
    if "adam" in recipe.optimizer or "lamb" in recipe.optimizer:
        opt_kwargs = {"eps": recipe.opt_eps, "betas": tuple(recipe.opt_betas)}
    # timm's filter: no weight decay on 1-d parameters and biases, i.e. exactly the official
    # no_wd_keys [norm, bias] for every registered model (tests/test_train.py checks it)
    optimizer = create_optimizer_v2(
        model, opt=recipe.optimizer, lr=plan.effective_lr, weight_decay=recipe.weight_decay, **opt_kwargs
    )
    # NOTE: scheduled per optimizer update; the official scheduler steps per micro-batch (the same
    # curve when grad_accum is 1). Warm-up starts at warmup_lr one update earlier than the official.
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=plan.cosine_updates,
        lr_min=recipe.min_lr,
        warmup_t=plan.warmup_updates,
        warmup_lr_init=recipe.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def _build_model(
    model_name: str,
    recipe: Recipe,
    num_classes: int,
    init_checkpoint: str | Path | None,
    pretrained: bool,
    fresh: bool,
) -> nn.Module:
    """The model with the recipe's drop path, and the official initialisation when it starts from scratch."""
    family = get_entry(model_name).family
    overrides: dict[str, Any] = {}
    # NOTE: LowFormer gets the official drop-path rule over its stages (`apply_drop_path`); other
    # families take the rate through their constructor, which applies their own official rule
    if family != "lowformer" and recipe.drop_path > 0:
        if recipe.drop_path_skip:
            raise recipe.error(
                "{drop_path_skip} applies to LowFormer only; " + literal(f"{family} rises from 0 over all blocks")
            )
        overrides["drop_path_rate"] = recipe.drop_path
    model = create_model(
        model_name, pretrained=pretrained, checkpoint_path=init_checkpoint, num_classes=num_classes, **overrides
    )
    if fresh and init_checkpoint is None and not pretrained and recipe.init_std is not None:
        official_init(model, recipe.init_std, zero_last_gamma=recipe.zero_last_gamma)
    if family == "lowformer":
        apply_drop_path(model, family, recipe.drop_path, recipe.drop_path_skip)
    return model


def _data_config(recipe: Recipe, classes: list[str], mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """The evaluation transform and class names, in timm's `pretrained_cfg` keys."""
    return {
        "input_size": (3, recipe.eval_image_size, recipe.eval_image_size),
        "crop_pct": recipe.eval_crop_pct,
        "crop_mode": "center",
        "interpolation": recipe.eval_interpolation,
        "mean": tuple(mean),
        "std": tuple(std),
        "label_names": list(classes),
    }


def _check_free_space(run: _Run) -> None:
    """Refuse now, not at the end of the first epoch, a disk without room for one checkpoint."""
    tensor_bytes = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    # the evaluation weights and the model's (and the EMA's); the optimizer's state comes on top
    need = tensor_bytes * (3 if run.ema is not None else 2)
    free = shutil.disk_usage(run.out).free
    if free < need:
        raise OutputError(
            run.out,
            f"no space left on device ({free / 1e6:.0f} MB free; each checkpoint of this run takes more "
            f"than {need / 1e6:.0f} MB)",
        )


def _restore(run: _Run, saved: dict[str, Any]) -> None:
    """Put a resumed run back where its checkpoint left it: weights, optimizer, counters, RNG."""
    run.model.load_state_dict(saved["model"])
    if run.ema is not None:
        run.ema.module.load_state_dict(saved["ema"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.use_scaler and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    p = run.progress
    p.epoch, p.step, p.global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
    p.best_top1, p.best_epoch, p.history = saved["best_top1"], saved["best_epoch"], list(saved["history"])
    if p.step >= run.plan.steps_per_epoch:  # saved at the end of an epoch
        p.epoch, p.step = p.epoch + 1, 0
    elif run.info.world_size == saved["world_size"]:
        p.stats = _EpochStats(**saved["epoch_stats"])
    ckpt_io.restore_rng(saved["rng"])
    if saved["world_size"] != run.info.world_size:
        _logger.warning(
            "resuming with %d processes; the checkpoint was written by %d: the effective batch and lr change",
            run.info.world_size,
            saved["world_size"],
        )
    last, best = run.out / "last.pt", run.out / "best.pt"
    run.last_ckpt = last if last.exists() else None
    run.last_ckpt_step = p.global_step if run.last_ckpt is not None else None
    run.best_ckpt = best if best.exists() else None


def _start(run: _Run, tensorboard: bool, wandb: str | None, wandb_id: str | None) -> None:
    """Wrap the model for training (DDP, torch.compile), write recipe.yaml, open the trackers, print the plan."""
    info, recipe, plan = run.info, run.recipe, run.plan
    train_model: nn.Module = run.model
    if info.distributed:
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(run.model, device_ids=device_ids)
    if recipe.compile:
        train_model = torch.compile(train_model)
    run.train_model = train_model
    if info.is_main:
        write_text(run.out / "recipe.yaml", recipe.to_yaml())
        if tensorboard or wandb is not None:
            run.trackers = Trackers(run.out, tensorboard, wandb, wandb_id, config=recipe.to_dict())
    run.log(
        "%s: %.2fM params, %d classes; %d training / %d validation images (%s)",
        run.model_name,
        sum(p.numel() for p in run.model.parameters()) / 1e6,
        len(run.classes),
        len(run.train_src),
        len(run.val_loader.dataset),
        run.data_dir if run.data_dir is not None else "built-in digits",
    )
    run.log(
        "effective batch %d = %d per process x %d process%s x %d accumulation step%s; "
        "lr %.3g = %.3g x %d (processes x accumulation steps)",
        plan.effective_batch,
        recipe.batch_size,
        info.world_size,
        "es" if info.world_size > 1 else "",
        recipe.grad_accum,
        "s" if recipe.grad_accum > 1 else "",
        plan.effective_lr,
        recipe.lr,
        info.world_size * recipe.grad_accum,
    )
    run.log(
        "%d epochs x %d steps = %d optimizer steps (%d warm-up); recipe %r; output %s",
        recipe.epochs,
        plan.steps_per_epoch,
        plan.total_updates,
        plan.warmup_updates,
        recipe.name,
        run.out,
    )


# ------------------------------------------------------------------------------------------------
# One epoch: micro-batches and optimizer steps
# ------------------------------------------------------------------------------------------------


def train_one_epoch(run: _Run, epoch: int, stop: StopSignals) -> None:
    """The optimizer steps of `epoch` (from `run.progress.step` when resuming inside it). A stop
    request saves a resumable checkpoint at the next step boundary and raises `RunInterrupted`
    (one process: at the next step; several: at the next sync, where they agree)."""
    recipe, info, p = run.recipe, run.info, run.progress
    loader = DataLoader(
        run.train_ds,
        batch_sampler=StepBatchSampler(epoch=epoch, start_step=p.step, **run.sampler_args),
        num_workers=recipe.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        # the loader's worker seeds come from here, not from the global RNG the loop uses
        generator=torch.Generator().manual_seed(sample_seed(recipe.seed, epoch, 0x10AD)),
        worker_init_fn=ignore_stop_signals,
    )
    run.train_model.train()
    bar = tqdm(
        total=run.plan.steps_per_epoch,
        initial=p.step,
        desc=f"epoch {epoch + 1}/{recipe.epochs}",
        unit="step",
        disable=not (run.progress_bars and info.is_main),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    for micro, (images, labels, bad) in enumerate(run.to_device(loader, run.decoder("training"))):
        accum_step = micro % recipe.grad_accum
        p.stats.skipped += bad
        _forward_backward(run, images, labels, epoch, accum_step)
        if accum_step < recipe.grad_accum - 1:
            continue
        _optimizer_step(run)
        bar.update(1)
        epoch_end = p.step == run.plan.steps_per_epoch
        periodic = bool(recipe.checkpoint_every) and p.global_step % recipe.checkpoint_every == 0
        # the only places the host waits for the device; one process needs no agreement to stop
        due = p.global_step % recipe.log_every == 0 or periodic or epoch_end
        if not (due or (stop.requested and not info.distributed)):
            continue
        stopping = _sync(run, epoch, stop)
        bar.set_postfix(loss=f"{p.stats.loss_sum / max(p.stats.images, 1):.3f}", res=images.shape[-1])
        # the epoch's last step is saved by `end_epoch`, after the evaluation
        if (periodic or stopping) and not epoch_end:
            p.stats.train_s += time.perf_counter() - t_start
            t_start = time.perf_counter()
            write_checkpoint(run, epoch, p.step)
            if stopping:
                bar.close()
                _stop(run, stop, f"at epoch {epoch + 1}, step {p.step}")
    bar.close()
    p.stats.train_s += time.perf_counter() - t_start


def _forward_backward(run: _Run, images: torch.Tensor, labels: torch.Tensor, epoch: int, accum_step: int) -> None:
    """One micro-batch (normalised, on the device): seed its randomness, erase, mix, forward, loss
    (+ mesa), backward (gradients add up over the accumulation steps). Its loss and hits are logged
    on the device; nothing here waits for it."""
    recipe, info, p = run.recipe, run.info, run.progress
    shard = accum_step * info.world_size + info.rank
    _seed_all(sample_seed(recipe.seed, epoch, p.step, shard, 2))
    progress_frac = max(0, p.global_step - run.plan.warmup_updates) / run.plan.cosine_updates
    run.drop_schedule.update(progress_frac if recipe.drop_path_scheduled else 1.0)

    if run.erasing is not None:
        # NOTE: the official erases in the loader, per image; here each image's box is drawn from
        # Python's RNG as seeded above, so it is a function of the micro-batch, not of the workers
        images = run.erasing(images)
    targets = labels
    if run.mixup is not None:
        images, targets = run.mixup(images, labels)
    last_micro = accum_step == recipe.grad_accum - 1
    sync = contextlib.nullcontext() if last_micro or not info.distributed else run.train_model.no_sync()
    with sync:
        with autocast(recipe.amp, info.device):
            logits = run.train_model(images)
            loss = run.criterion(logits, targets)
            if recipe.mesa_threshold is not None and progress_frac >= recipe.mesa_threshold:
                mesa = run.soft_criterion(logits, mesa_targets(run.ema.module, images, recipe.bce))
                loss = loss + recipe.mesa_ratio * mesa
        run.scaler.scale(loss / recipe.grad_accum).backward()

    values = [loss.detach()]
    if run.mixup is None:  # hard labels: the training top-1 counts
        values.append((logits.detach().argmax(-1) == labels).sum())
    lr = run.optimizer.param_groups[0]["lr"]
    run.step_log.add(_MicroBatch(p.global_step + 1, labels.shape[0], lr), values)


def _sync(run: _Run, epoch: int, stop: StopSignals) -> bool:
    """Read the losses (and hits) of the micro-batches since the last sync: the loop's one wait for
    the device. A non-finite loss on any process stops the run, naming its first step; the rest goes
    into the epoch's sums and the trackers. Every process calls this at the same steps; returns
    whether any of them was asked to stop."""
    info, p = run.info, run.progress
    entries = run.step_log.collect()
    bad = first_non_finite(entries)
    stopping, any_bad, minus_step = all_reduce_max(
        [float(stop.requested), float(bad is not None), -bad.key.step if bad is not None else -math.inf], info
    ).tolist()
    if any_bad:
        _non_finite_loss(run, epoch, int(-minus_step), entries)
    s = p.stats
    per_step: dict[int, list[float]] = {}
    for e in entries:
        loss, n = e.values[0], e.key.images
        s.loss_sum += loss * n
        s.images += n
        if run.mixup is None:
            s.correct += e.values[1]
            s.labelled += n
        sums = per_step.setdefault(e.key.step, [0.0, 0.0, e.key.lr])
        sums[0] += loss * n
        sums[1] += n
    if run.trackers is not None:
        run.trackers.log_steps({step: {"loss": t / n, "lr": lr} for step, (t, n, lr) in per_step.items()})
    return stopping > 0


def _optimizer_step(run: _Run) -> None:
    """Clip, update, zero the gradients; then the EMA and the learning rate follow the new step."""
    recipe, p = run.recipe, run.progress
    if recipe.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        dispatch_clip_grad(run.model.parameters(), recipe.clip_grad, mode=recipe.clip_mode)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    p.global_step += 1
    p.step += 1
    if run.ema is not None:
        run.ema.update(run.model, step=p.global_step * recipe.grad_accum)
    run.scheduler.step_update(p.global_step)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _non_finite_loss(run: _Run, epoch: int, step: int, entries: list[Entry[_MicroBatch]]) -> NoReturn:
    """Stop: the loss of optimizer step `step` (the first such step on any process) was not finite.
    The steps after it ran, but no checkpoint was written since (every write follows a sync)."""
    p = run.progress
    mine = [e for e in entries if e.key.step == step]
    seen = [e.values[0] for e in mine if not math.isfinite(e.values[0])]
    what = f"became {seen[0]}" if seen else "became NaN or infinite"
    lr = mine[0].key.lr if mine else run.optimizer.param_groups[0]["lr"]
    step_in_epoch = step - (p.global_step - p.step)
    good = f"{run.last_ckpt}, optimizer step {run.last_ckpt_step}" if run.last_ckpt else "none written yet"
    raise NonFiniteLossError(
        f"the loss {what} at epoch {epoch + 1}, step {step_in_epoch} (optimizer step {step}, lr {lr:.3g}) "
        f"on at least one process. Training stopped; nothing was saved after the last good checkpoint "
        f"({good}). Lower the lr, set clip_grad, or use --amp bf16 instead of fp16."
    )


def _stop(run: _Run, stop: StopSignals, where: str) -> NoReturn:
    raise RunInterrupted(
        f"stopped by {stop.name or 'a signal'} {where} (optimizer step {run.progress.global_step}); "
        f"a resumable checkpoint was saved: {run.last_ckpt}",
        exit_code=stop.exit_code,
        checkpoint=run.last_ckpt,
    )


# ------------------------------------------------------------------------------------------------
# End of an epoch: evaluate, save, log
# ------------------------------------------------------------------------------------------------


def end_epoch(run: _Run, epoch: int) -> None:
    """Sum the epoch over processes, evaluate when due, save the epoch checkpoint (best.pt when it is
    the best so far), append the row to log.csv and print it."""
    recipe, info, p = run.recipe, run.info, run.progress
    s = p.stats
    loss_sum, correct, labelled, seen, train_s, n_bad = all_reduce_sum(
        [s.loss_sum, s.correct, s.labelled, s.images, s.train_s, len(set(s.skipped))], info
    ).tolist()
    train_s /= info.world_size
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "global_step": p.global_step,
        "train_loss": round(loss_sum / max(seen, 1), 6),
        "train_top1": round(100 * correct / labelled, 4) if labelled else None,
        "lr": float(f"{run.optimizer.param_groups[0]['lr']:.6g}"),
        "train_img_s": round(seen / max(train_s, 1e-9), 2),
        "skipped_images": int(n_bad),
    }
    run.skipped_images += int(n_bad)
    if n_bad:
        _logger.warning(
            "epoch %d: skipped %d unreadable training images (replaced by the next readable ones), e.g. %s",
            epoch + 1,
            int(n_bad),
            sorted(set(s.skipped))[:5],
        )
    is_best = False
    if (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs:
        result = evaluate_epoch(run)
        row.update(val_loss=round(result.loss, 6), val_top1=round(result.top1, 4), val_top5=round(result.top5, 4))
        if result.skipped_images:
            _logger.warning(
                "evaluation left out %d unreadable images, e.g. %s", result.skipped_images, result.skipped_paths[:5]
            )
            row["skipped_images"] += result.skipped_images
            run.skipped_images += result.skipped_images
        is_best = p.best_top1 is None or result.top1 > p.best_top1
        if is_best:
            p.best_top1, p.best_epoch = result.top1, epoch + 1
    row["epoch_s"] = round(train_s, 2)
    p.history.append(row)
    p.stats = _EpochStats()
    write_checkpoint(run, epoch, run.plan.steps_per_epoch, is_best=is_best)
    p.step = 0
    if info.is_main:
        write_csv(run.out / "log.csv", p.history, CSV_COLUMNS)
        if run.trackers is not None:
            run.trackers.log_epoch(row)
    _log_epoch(run, row)


def evaluate_epoch(run: _Run) -> EvalResult:
    """Top-1/top-5 of the evaluated model (the EMA when kept), after the official BN-statistics reset."""
    if run.recipe.reset_bn:
        _reset_bn(run, run.eval_model)
    return evaluate_model(
        run.eval_model,
        run.to_device(run.val_loader, run.decoder("evaluation")),
        run.info,
        amp=run.recipe.amp,
        progress=run.progress_bars,
    )


def _log_epoch(run: _Run, row: dict[str, Any]) -> None:
    val = (
        f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
        if "val_top1" in row
        else "no evaluation"
    )
    top1 = f" top-1 {row['train_top1']:.2f}%" if row["train_top1"] is not None else ""
    run.log(
        "epoch %d/%d: train loss %.4f%s | %s | lr %.3g | %.1f img/s | %.1f s",
        row["epoch"],
        run.recipe.epochs,
        row["train_loss"],
        top1,
        val,
        row["lr"],
        row["train_img_s"],
        row["epoch_s"],
    )


def _reset_bn(run: _Run, model: nn.Module) -> None:
    """Official `reset_bn`: a fixed subset of training images, training transform at the eval size
    (random erasing included, seeded per batch)."""
    recipe, info = run.recipe, run.info
    subset = subset_indices(len(run.train_src), recipe.reset_bn_samples, recipe.seed)
    source = SubsetSource(run.train_src, subset)
    transform = train_transform(recipe, recipe.eval_image_size, run.mean)
    encoded = "training" in run.device_decoded
    loader = DataLoader(
        EvalDataset(source, transform, seed=sample_seed(recipe.seed, 0xB9), encoded=encoded),
        batch_sampler=eval_batches(len(source), recipe.reset_bn_batch_size, info.world_size, info.rank),
        num_workers=recipe.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )

    def batches():
        decode = eval_decoder(info) if encoded else None
        for i, (images, _, _) in enumerate(run.to_device(loader, decode)):
            if images.numel():
                if run.erasing is not None:
                    with seeded(sample_seed(recipe.seed, 0xB9, i)):
                        images = run.erasing(images)
                yield images

    with autocast(recipe.amp, info.device):
        reset_bn_stats(model, batches(), info)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def write_checkpoint(run: _Run, epoch: int, step_in_epoch: int, is_best: bool = False) -> None:
    """Save the resumable state as checkpoint-<global step>.pt (process 0); last.pt, and best.pt when
    `is_best`, become that file; only the newest `keep_last` step files stay."""
    run.last_ckpt_step = run.progress.global_step

    def write() -> None:
        name = ckpt_io.step_name(run.progress.global_step)
        path = ckpt_io.save(_snapshot(run, epoch, step_in_epoch), run.out / name)
        run.last_ckpt = ckpt_io.link_or_copy(path, run.out / "last.pt")
        if is_best:
            run.best_ckpt = ckpt_io.link_or_copy(path, run.out / "best.pt")
        ckpt_io.prune(run.out, run.recipe.keep_last)

    _on_main(run.info, "write a checkpoint", write)


def _snapshot(run: _Run, epoch: int, step_in_epoch: int) -> dict[str, Any]:
    """Everything `--resume` needs, the evaluation weights first (what weight loaders read), and the
    metadata a safetensors file would carry (variant, spec, data config) under `META_KEY`."""
    p, ema = run.progress, run.ema
    return {
        "format": ckpt_io.FORMAT,
        "version": 1,
        "model_name": run.model_name,
        "num_classes": len(run.classes),
        "classes": list(run.classes),
        "data_dir": str(Path(run.data_dir).resolve()) if run.data_dir is not None else None,
        "state_dict": run.eval_model.state_dict(),
        "model": run.model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.use_scaler else None,
        "rng": ckpt_io.capture_rng(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": p.global_step,
        "world_size": run.info.world_size,
        "best_top1": p.best_top1,
        "best_epoch": p.best_epoch,
        "history": p.history,
        "epoch_stats": asdict(p.stats),
        "recipe": run.recipe.to_dict(),
        "wandb_id": run.trackers.wandb_id if run.trackers is not None else None,
        META_KEY: checkpoint_metadata(run.model),
    }


def _finish(run: _Run) -> None:
    """best.pt's evaluation weights as best.safetensors, with the run's data config, for
    `lowformer.load_model` and every tool that reads our safetensors files."""

    def export() -> None:
        if run.best_ckpt is None:  # e.g. a resumed run whose best.pt was deleted
            return
        model = create_model(run.model_name, num_classes=len(run.classes))
        model.load_state_dict(ckpt_io.load(run.best_ckpt)["state_dict"])
        model.pretrained_cfg = dict(run.model.pretrained_cfg)
        save_weights(model, run.out / "best.safetensors")

    if run.progress.best_top1 is not None:  # the same on every process
        _on_main(run.info, "write best.safetensors", export)
