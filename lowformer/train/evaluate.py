"""Evaluation: top-1/top-5 and loss over a validation set, reduced over processes.

`evaluate_model` is what the trainer calls after each epoch; `evaluate` is `lowformer eval`: it
builds the model from any checkpoint format, evaluates with the data config the checkpoint records
(every checkpoint the trainer writes records its input size, crop, interpolation, mean/std and
class names; other files get the model's defaults: 224, crop 0.95, bicubic) on `DIR/val` or,
without a data directory, on the held-out digits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..factory import check_image_size, create_model
from ..weights import CheckpointError, data_config_of, read_checkpoint
from .augment import eval_transform
from .data import EvalDataset, ImageSource, collate, eval_batches, load_sources
from .distributed import DistInfo, all_reduce_sum, process_group
from .lifecycle import ignore_stop_signals
from .pipeline import DeviceBatches, check_gpu_decode, decode_on_device, gpu_decode_parts

__all__ = ["EvalResult", "autocast", "eval_decoder", "eval_loader", "evaluate", "evaluate_model"]

_logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Metrics of one evaluation; accuracies in percent."""

    top1: float
    top5: float
    loss: float
    images: int
    skipped_images: int = 0
    skipped_paths: list[str] = field(default_factory=list)
    image_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    topk: int = 5

    def to_dict(self) -> dict:
        return asdict(self)


def autocast(amp: str | None, device: torch.device):
    """torch.autocast for "bf16"/"fp16", a no-op context for None."""
    if amp is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    info: DistInfo,
    amp: str | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Cross-entropy loss, top-1 and top-k (k = min(5, classes)) of `model` over `loader`, all processes.

    `loader` yields (normalised images, labels, unreadable paths), on any device (`DeviceBatches`
    gives them on the model's). The sums stay on the device until the end: one synchronisation.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top-1 hits, top-k hits, images
    skipped: list[str] = []
    k = 5
    bar = tqdm(loader, desc=desc, unit="batch", disable=not (progress and info.is_main), leave=False, file=sys.stderr)
    for images, labels, bad in bar:
        skipped += bad
        if images.numel() == 0:
            continue
        images = images.to(info.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(info.device, non_blocking=True)
        with autocast(amp, info.device):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        hits = logits.topk(k, dim=-1).indices.eq(labels[:, None])
        batch = [F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(), hits.any(dim=-1).sum()]
        sums[:3] += torch.stack([v.double() for v in batch])
        sums[3] += labels.numel()
    model.train(was_training)
    totals = all_reduce_sum([*sums.tolist(), len(skipped)], info)
    loss_sum, correct1, correctk, seen, n_skipped = totals.tolist()
    if seen == 0:
        raise ValueError(f"no evaluation image could be read ({int(n_skipped)} skipped, e.g. {skipped[:3]})")
    return EvalResult(
        top1=100.0 * correct1 / seen,
        top5=100.0 * correctk / seen,
        loss=loss_sum / seen,
        images=int(seen),
        skipped_images=int(n_skipped),
        skipped_paths=skipped[:20],
        topk=k,
    )


def eval_loader(
    source: ImageSource, transform: Callable, batch_size: int, workers: int, info: DistInfo, encoded: bool = False
) -> DataLoader:
    """This process's share of `source`, in order, as uint8 images (encoded JPEGs with `encoded`);
    unreadable images are left out."""
    batches = eval_batches(len(source), batch_size, info.world_size, info.rank)
    return DataLoader(
        EvalDataset(source, transform, encoded=encoded),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )


def eval_decoder(info: DistInfo) -> Callable:
    """How a batch of encoded evaluation images becomes pixels on the device: a file nothing can
    decode is left out (and reported)."""
    return functools.partial(decode_on_device, device=info.device, recover=lambda image: None)


def _model_name(given: str | None, meta: dict[str, str], path: Path) -> str:
    """The model to build: `given`, which must be the one the checkpoint records, else the recorded one."""
    recorded = meta.get("variant") if meta.get("format") == "lowformer" else None
    if given is None:
        if recorded is None:
            raise ValueError(f"{path} does not name its model; pass --model")
        return recorded
    if recorded is not None and recorded != given:
        raise CheckpointError(f"{path} holds {recorded!r}, not {given!r}; pass --model {recorded}")
    return given


def _pick(flag: str, given: object, recorded: object, default: object, path: Path) -> object:
    """An evaluation setting: the flag when given (with a warning if the checkpoint records another
    value), else what the checkpoint records, else the model's default."""
    if given is None:
        return recorded if recorded is not None else default
    if recorded is not None and given != recorded:
        _logger.warning(
            "%s %s differs from %s, the value %s records (what the model was trained and evaluated with); "
            "using %s as asked",
            flag,
            given,
            recorded,
            path,
            given,
        )
    return given


def evaluate(
    model_name: str | None,
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 128,
    workers: int = 0,
    device: str | None = None,
    amp: str | None = None,
    channels_last: bool = False,
    progress: bool = True,
    gpu_decode: bool = False,
) -> EvalResult:
    """Evaluate a checkpoint (any format) on `data_dir/val`, or on the held-out digits when None.

    The transform (size, crop, interpolation, mean/std) and the class order are what the checkpoint
    records (our training checkpoints and safetensors files do), else the model's defaults;
    `image_size`, `crop_pct` and `interpolation` override them, with a warning where they contradict
    the checkpoint. `gpu_decode`: JPEGs are decoded and resized on the CUDA device (pipeline.py).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    with process_group(device) as info:
        if gpu_decode:
            check_gpu_decode(info.device, data_dir)
        path = Path(checkpoint)
        _, meta = read_checkpoint(path)
        model_name = _model_name(model_name, meta, path)
        model = create_model(model_name, checkpoint_path=path).to(info.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # `create_model` put the recorded data config on the model; `recorded` tells what was recorded
        recorded, cfg = data_config_of(meta), model.pretrained_cfg
        recorded_size = recorded["input_size"][-1] if "input_size" in recorded else None
        size = _pick("--image-size", image_size, recorded_size, cfg["input_size"][-1], path)
        crop = _pick("--crop-pct", crop_pct, recorded.get("crop_pct"), cfg.get("crop_pct", 0.95), path)
        interp = _pick(
            "--interpolation", interpolation, recorded.get("interpolation"), cfg.get("interpolation", "bicubic"), path
        )
        try:
            check_image_size(model, (size, size))
        except ValueError as e:
            raise ValueError(f"--image-size {size}: {e}" if image_size is not None else str(e)) from None
        mean = cfg.get("mean") or IMAGENET_DEFAULT_MEAN
        std = cfg.get("std") or IMAGENET_DEFAULT_STD

        _, val = load_sources(data_dir, classes=recorded.get("label_names"), need_train=False)
        if model.num_classes != len(val.classes):
            where = str(data_dir) if data_dir is not None else "the built-in digits (no --data)"
            raise ValueError(
                f"the model has {model.num_classes} classes but {where} has {len(val.classes)}; "
                + ("pass --data DIR with the data it was trained on" if data_dir is None else "is it the right data?")
            )
        transform = eval_transform(size, crop, interp)
        if gpu_decode:
            gpu_decode_parts({"evaluation": transform})
        loader = eval_loader(val, transform, batch_size, workers, info, encoded=gpu_decode)
        batches = DeviceBatches(mean, std, info.device, channels_last)(loader, eval_decoder(info))
        result = evaluate_model(model, batches, info, amp=amp, progress=progress)
        result.image_size, result.crop_pct, result.interpolation = int(size), float(crop), str(interp)
        if result.skipped_images:
            _logger.warning("skipped %d unreadable images, e.g. %s", result.skipped_images, result.skipped_paths[:5])
        return result
