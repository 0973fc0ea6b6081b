"""The training loop: `train(model_name, recipe, ...)`, from one CPU process to many GPUs on many nodes.

Reads top to bottom: processes and data -> model, EMA, optimizer, schedule -> resume -> for each
epoch: micro-batches (mix, forward, loss, mesa, backward, accumulate), optimizer steps, periodic
checkpoints -> BN reset and evaluation -> epoch checkpoint, best, log.

Reproducibility: every micro-batch's randomness (which images, their augmentation, the
resolution, mixing, drop path) is a function of (seed, epoch, step, virtual shard), not of the
process layout. So on CPU a run killed and resumed ends with the same weights as an
uninterrupted one, and 2 processes x 1 accumulation step compute what 1 process x 2 steps does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._io import atomic_write
from ..factory import create_model
from ..models import get_entry
from ..weights import save_checkpoint
from . import checkpoint as ckpt_io
from .augment import build_mixup, eval_transform, mean_std, train_criterion, train_transform
from .data import (
    DataLayoutError,
    EvalDataset,
    ImageSource,
    StepBatchSampler,
    TrainDataset,
    collate,
    eval_batches,
    load_sources,
    sample_seed,
    subset_indices,
)
from .distributed import DistInfo, all_reduce_sum, any_process, barrier, process_group
from .evaluate import EvalResult, autocast, eval_loader, evaluate_model
from .recipe import RUNTIME_KEYS, Recipe, RecipeError, from_dict
from .techniques import DropPathSchedule, OfficialEma, apply_drop_path, mesa_targets, official_init, reset_bn_stats

__all__ = ["NonFiniteLossError", "TrainResult", "train"]

_logger = logging.getLogger(__name__)

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


class NonFiniteLossError(RuntimeError):
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


@dataclass
class _EpochStats:
    """Running sums of one epoch on this process (saved in mid-epoch checkpoints)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    labelled: float = 0.0  # images with hard labels (no mixing), for the training top-1
    images: float = 0.0
    train_s: float = 0.0
    skipped: list[str] = field(default_factory=list)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _merge_resume_recipe(saved: dict[str, Any], given: Recipe, explicit: set[str]) -> Recipe:
    """The checkpoint's recipe, with the runtime keys the user set now; other changes are refused
    (they would make the resumed run differ from the one that was interrupted)."""
    changed = sorted(k for k in explicit if k not in RUNTIME_KEYS and getattr(given, k) != saved.get(k))
    if changed:
        raise RecipeError(
            f"cannot change {', '.join(changed)} when resuming (the run would no longer continue "
            f"exactly); only {', '.join(sorted(RUNTIME_KEYS))} may change"
        )
    return from_dict({**saved, **{k: getattr(given, k) for k in explicit if k in RUNTIME_KEYS}}, "resumed recipe")


def _csv_text(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
) -> TrainResult:
    """Train `model_name` with `recipe` on `data_dir` (ImageFolder train/ val/) or the built-in digits.

    Args:
        resume: a training checkpoint to continue from, or "auto" for `output_dir/last.pt`.
        init_checkpoint: fine-tune from this file (any format the loader reads); a classifier of
            another size is dropped and re-initialised.
        pretrained: fine-tune from the official weights in the local weights folder.
        num_classes: must equal the number of class folders when given (default: that number).
        device: "cpu" or "cuda" (default: CUDA when available); torchrun processes use cuda:LOCAL_RANK.
        explicit_keys: the recipe keys the user set on the command line (only runtime keys may
            change on resume).
    """
    with process_group(device) as info:
        return _train(
            info, model_name, recipe, data_dir, Path(output_dir), resume, init_checkpoint, pretrained,
            num_classes, tensorboard, progress, explicit_keys or set(),
        )  # fmt: skip


def _train(
    info: DistInfo,
    model_name: str | None,
    recipe: Recipe,
    data_dir: str | Path | None,
    out: Path,
    resume: str | Path | None,
    init_checkpoint: str | Path | None,
    pretrained: bool,
    num_classes: int | None,
    tensorboard: bool,
    progress: bool,
    explicit_keys: set[str],
) -> TrainResult:
    wall_start = time.perf_counter()
    log = _logger.info if info.is_main else _logger.debug

    # -- resume: the checkpoint's recipe wins ----------------------------------------------------
    state: dict[str, Any] | None = None
    if resume is not None:
        path = out / "last.pt" if str(resume) == "auto" else Path(resume)
        state = ckpt_io.load(path)
        recipe = _merge_resume_recipe(state["recipe"], recipe, explicit_keys)
        if model_name not in (None, state["model_name"]):
            raise ValueError(f"{path} trains {state['model_name']!r}, not {model_name!r}")
        model_name = state["model_name"]
        if init_checkpoint is not None or pretrained:
            raise ValueError("--resume continues a run; it cannot be combined with --checkpoint or --pretrained")
        log("resuming from %s (epoch %d, step %d)", path, state["epoch"] + 1, state["step_in_epoch"])
    model_name = model_name or recipe.model
    if model_name is None:
        raise ValueError(f"recipe {recipe.name!r} names no model; pass --model")
    entry = get_entry(model_name)

    if recipe.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = info.device.type == "cuda"  # the official trainer's setting
    if tensorboard and info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "--tensorboard needs the tensorboard package: pip install 'lowformer[tensorboard]'"
            ) from None

    # -- data ---------------------------------------------------------------------------------------
    if state is not None and data_dir is None:
        data_dir = state.get("data_dir")  # the data the run was started on
    train_src, val_src = load_sources(data_dir, classes=state["classes"] if state else None)
    classes = train_src.classes
    if state is not None and list(classes) != list(state["classes"]):
        raise DataLayoutError(f"the checkpoint was trained on classes {state['classes'][:5]}..., {data_dir} differs")
    if num_classes is not None and num_classes != len(classes):
        raise DataLayoutError(f"--num-classes {num_classes} but the data has {len(classes)} class folders")
    num_classes = len(classes)
    if recipe.mixup_enabled and recipe.batch_size < 2:
        raise RecipeError("mixup/cutmix pairs images within a batch: batch_size must be >= 2")

    # -- model ----------------------------------------------------------------------------------------
    torch.manual_seed(recipe.seed)  # the same initial weights on every process
    overrides: dict[str, Any] = {}
    if entry.family != "lowformer" and recipe.drop_path > 0:
        if recipe.drop_path_skip:
            raise RecipeError(f"drop_path_skip applies to LowFormer; {entry.family} rises from 0 over all blocks")
        overrides["drop_path_rate"] = recipe.drop_path
    model = create_model(
        model_name,
        pretrained=pretrained,
        checkpoint_path=init_checkpoint,
        num_classes=num_classes,
        **overrides,
    )
    if init_checkpoint is None and not pretrained and state is None and recipe.init_std is not None:
        official_init(model, recipe.init_std, zero_last_gamma=recipe.zero_last_gamma)
    if entry.family == "lowformer":
        apply_drop_path(model, entry.family, recipe.drop_path, recipe.drop_path_skip)
    drop_schedule = DropPathSchedule(model)
    model.to(info.device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{model_name} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    ema = OfficialEma(model, recipe.ema_decay, recipe.ema_warmup_steps) if recipe.ema_decay else None
    mean, std = mean_std(recipe, model)

    train_ds = TrainDataset(train_src, {s: train_transform(recipe, s, mean, std) for s in recipe.image_size})
    val_tf = eval_transform(recipe.eval_image_size, recipe.eval_crop_pct, recipe.eval_interpolation, mean, std)
    eval_bs = recipe.eval_batch_size or 2 * recipe.batch_size
    val_loader = eval_loader(val_src, val_tf, eval_bs, recipe.workers, info)
    sampler_args = dict(
        num_samples=len(train_src),
        batch_size=recipe.batch_size,
        resolutions=recipe.image_size,
        seed=recipe.seed,
        world_size=info.world_size,
        rank=info.rank,
        grad_accum=recipe.grad_accum,
    )
    steps_per_epoch = StepBatchSampler(epoch=0, **sampler_args).steps_per_epoch
    eff_batch, eff_lr = recipe.scaled(info.world_size)
    if steps_per_epoch == 0:
        raise DataLayoutError(
            f"the training set has {len(train_src)} images, fewer than one effective batch ({eff_batch}); "
            "lower batch_size or grad_accum"
        )

    # -- optimizer, schedule, scaler ------------------------------------------------------------------
    opt_kwargs: dict[str, Any] = {}
    if "adam" in recipe.optimizer or "lamb" in recipe.optimizer:
        opt_kwargs = {"eps": recipe.opt_eps, "betas": tuple(recipe.opt_betas)}
    # timm's filter: no weight decay on 1-d parameters and biases, i.e. exactly the official
    # no_wd_keys [norm, bias] for every registered model (tests/test_train.py checks it)
    optimizer = create_optimizer_v2(
        model, opt=recipe.optimizer, lr=eff_lr, weight_decay=recipe.weight_decay, **opt_kwargs
    )
    total_updates = recipe.epochs * steps_per_epoch
    warmup_updates = min(total_updates, round(recipe.warmup_epochs * steps_per_epoch))
    cosine_updates = max(1, total_updates - warmup_updates)
    # NOTE: scheduled per optimizer update; the official scheduler steps per micro-batch (the same
    # curve when grad_accum is 1). Warm-up starts at warmup_lr one update earlier than the official.
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cosine_updates,
        lr_min=recipe.min_lr,
        warmup_t=warmup_updates,
        warmup_lr_init=recipe.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    use_scaler = recipe.amp == "fp16"
    scaler = torch.amp.GradScaler(info.device.type, enabled=use_scaler)
    mixup = build_mixup(recipe, num_classes)
    criterion = train_criterion(recipe, soft_targets=mixup is not None)
    soft_criterion = train_criterion(recipe, soft_targets=True)  # mesa's targets are the EMA's predictions

    # -- restore --------------------------------------------------------------------------------------
    start_epoch, start_step, global_step = 0, 0, 0
    best_top1, best_epoch, history = None, None, []
    stats = _EpochStats()
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best_top1, best_epoch, history = state["best_top1"], state["best_epoch"], list(state["history"])
        if start_step >= steps_per_epoch:  # saved at the end of an epoch
            start_epoch, start_step = start_epoch + 1, 0
        else:
            stats = _EpochStats(**state["epoch_stats"]) if info.world_size == state["world_size"] else stats
        ckpt_io.restore_rng(state["rng"])
        if state["world_size"] != info.world_size:
            _logger.warning(
                "resuming with %d processes; the checkpoint was written by %d: the effective batch and lr change",
                info.world_size,
                state["world_size"],
            )

    train_model: torch.nn.Module = model
    if info.distributed:
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if recipe.compile:
        train_model = torch.compile(train_model)

    # -- output ---------------------------------------------------------------------------------------
    writer = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
        if tensorboard:
            writer = SummaryWriter(str(out / "tensorboard"))
    n_params = sum(p.numel() for p in model.parameters())
    log(
        "%s: %.2fM params, %d classes; %d training / %d validation images (%s)",
        model_name,
        n_params / 1e6,
        num_classes,
        len(train_src),
        len(val_src),
        data_dir if data_dir is not None else "built-in digits",
    )
    log(
        "effective batch %d = %d per process x %d process%s x %d accumulation step%s; "
        "lr %.3g = %.3g x %d (processes x accumulation steps)",
        eff_batch,
        recipe.batch_size,
        info.world_size,
        "es" if info.world_size > 1 else "",
        recipe.grad_accum,
        "s" if recipe.grad_accum > 1 else "",
        eff_lr,
        recipe.lr,
        info.world_size * recipe.grad_accum,
    )
    log(
        "%d epochs x %d steps = %d optimizer steps (%d warm-up); recipe %r; output %s",
        recipe.epochs,
        steps_per_epoch,
        total_updates,
        warmup_updates,
        recipe.name,
        out,
    )

    last_ckpt: Path | None = out / "last.pt" if (out / "last.pt").exists() else None
    last_ckpt_step = global_step if last_ckpt is not None else None
    best_ckpt: Path | None = out / "best.pt" if (out / "best.pt").exists() else None
    total_skipped = 0

    def snapshot(epoch: int, step_in_epoch: int) -> dict[str, Any]:
        eval_weights = ema.module.state_dict() if ema is not None else model.state_dict()
        return {
            "format": ckpt_io.FORMAT,
            "version": 1,
            "model_name": model_name,
            "num_classes": num_classes,
            "classes": list(classes),
            "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
            "state_dict": eval_weights,
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "rng": ckpt_io.capture_rng(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": info.world_size,
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "history": history,
            "epoch_stats": asdict(stats),
            "recipe": recipe.to_dict(),
        }

    def write_checkpoint(epoch: int, step_in_epoch: int, is_best: bool = False) -> None:
        nonlocal last_ckpt, best_ckpt, last_ckpt_step
        last_ckpt_step = global_step
        if info.is_main:
            path = ckpt_io.save(snapshot(epoch, step_in_epoch), out / ckpt_io.step_name(global_step))
            last_ckpt = ckpt_io.link_or_copy(path, out / "last.pt")
            if is_best:
                best_ckpt = ckpt_io.link_or_copy(path, out / "best.pt")
            ckpt_io.prune(out, recipe.keep_last)
        barrier(info)

    # -- epochs -------------------------------------------------------------------------------------------
    scheduler.step_update(global_step)
    for epoch in range(start_epoch, recipe.epochs):
        sampler = StepBatchSampler(epoch=epoch, start_step=start_step, **sampler_args)
        loader = DataLoader(
            train_ds,
            batch_sampler=sampler,
            num_workers=recipe.workers,
            collate_fn=collate,
            pin_memory=info.device.type == "cuda",
            # the loader's worker seeds come from here, not from the global RNG the loop uses
            generator=torch.Generator().manual_seed(sample_seed(recipe.seed, epoch, 0x10AD)),
        )
        train_model.train()
        bar = tqdm(
            total=steps_per_epoch,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{recipe.epochs}",
            unit="step",
            disable=not (progress and info.is_main),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        step = start_step
        for micro, (images, labels, bad) in enumerate(loader):
            accum_step = micro % recipe.grad_accum
            stats.skipped += bad
            shard = accum_step * info.world_size + info.rank
            _seed_all(sample_seed(recipe.seed, epoch, step, shard, 2))
            progress_frac = max(0, global_step - warmup_updates) / cosine_updates
            drop_schedule.update(progress_frac if recipe.drop_path_scheduled else 1.0)

            images = images.to(info.device, non_blocking=True)
            if recipe.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(info.device, non_blocking=True)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            last_micro = accum_step == recipe.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or not info.distributed else train_model.no_sync()
            with sync:
                with autocast(recipe.amp, info.device):
                    logits = train_model(images)
                    loss = criterion(logits, targets)
                    if recipe.mesa_threshold is not None and progress_frac >= recipe.mesa_threshold:
                        mesa = soft_criterion(logits, mesa_targets(ema.module, images, recipe.bce))
                        loss = loss + recipe.mesa_ratio * mesa
                loss_value = loss.detach().float()
                if any_process(not bool(torch.isfinite(loss_value)), info):
                    lr = optimizer.param_groups[0]["lr"]
                    good = f"{last_ckpt}, optimizer step {last_ckpt_step}" if last_ckpt else "none written yet"
                    raise NonFiniteLossError(
                        f"the loss became {loss_value.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(optimizer step {global_step + 1}, lr {lr:.3g}) on at least one process. Training "
                        f"stopped; nothing was saved after the last good checkpoint ({good}). Lower the lr, "
                        "set clip_grad, or use --amp bf16 instead of fp16."
                    )
                scaler.scale(loss / recipe.grad_accum).backward()

            n = labels.shape[0]
            stats.loss_sum += loss_value.item() * n
            stats.images += n
            if mixup is None:
                stats.correct += (logits.detach().argmax(-1) == labels).sum().item()
                stats.labelled += n
            if not last_micro:
                continue

            # -- optimizer step --
            if recipe.clip_grad is not None:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), recipe.clip_grad, mode=recipe.clip_mode)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            step += 1
            if ema is not None:
                ema.update(model, step=global_step * recipe.grad_accum)
            scheduler.step_update(global_step)
            bar.update(1)
            if bar.n % 10 == 0 or step == steps_per_epoch:
                bar.set_postfix(loss=f"{stats.loss_sum / max(stats.images, 1):.3f}", res=images.shape[-1])
            if recipe.checkpoint_every and global_step % recipe.checkpoint_every == 0 and step < steps_per_epoch:
                stats.train_s += time.perf_counter() - t_start
                t_start = time.perf_counter()
                write_checkpoint(epoch, step)
        bar.close()
        stats.train_s += time.perf_counter() - t_start
        start_step = 0

        # -- end of epoch: reduce, evaluate, save --
        loss_sum, correct, labelled, seen, train_s, n_bad = all_reduce_sum(
            [stats.loss_sum, stats.correct, stats.labelled, stats.images, stats.train_s, len(set(stats.skipped))], info
        ).tolist()
        train_s /= info.world_size
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "train_loss": round(loss_sum / max(seen, 1), 6),
            "train_top1": round(100 * correct / labelled, 4) if labelled else None,
            "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"),
            "train_img_s": round(seen / max(train_s, 1e-9), 2),
            "skipped_images": int(n_bad),
        }
        total_skipped += int(n_bad)
        if n_bad:
            _logger.warning(
                "epoch %d: skipped %d unreadable training images (replaced by the next readable ones), e.g. %s",
                epoch + 1,
                int(n_bad),
                sorted(set(stats.skipped))[:5],
            )
        is_best = False
        if (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs:
            eval_model = ema.module if ema is not None else model
            if recipe.reset_bn:
                _reset_bn(eval_model, train_src, recipe, mean, std, info)
            result: EvalResult = evaluate_model(
                eval_model, val_loader, info, amp=recipe.amp, channels_last=recipe.channels_last, progress=progress
            )
            row.update(val_loss=round(result.loss, 6), val_top1=round(result.top1, 4), val_top5=round(result.top5, 4))
            if result.skipped_images:
                _logger.warning(
                    "evaluation left out %d unreadable images, e.g. %s",
                    result.skipped_images,
                    result.skipped_paths[:5],
                )
                row["skipped_images"] += result.skipped_images
                total_skipped += result.skipped_images
            is_best = best_top1 is None or result.top1 > best_top1
            if is_best:
                best_top1, best_epoch = result.top1, epoch + 1
        row["epoch_s"] = round(train_s, 2)
        history.append(row)
        stats = _EpochStats()
        write_checkpoint(epoch, steps_per_epoch, is_best=is_best)
        if info.is_main:
            _write_text_atomic(out / "log.csv", _csv_text(history))
            if writer is not None:
                for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "train_img_s"):
                    if row.get(key) is not None:
                        writer.add_scalar(key, row[key], epoch + 1)
                writer.flush()
        val = (
            f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
            if "val_top1" in row
            else "no evaluation"
        )
        top1 = f" top-1 {row['train_top1']:.2f}%" if row["train_top1"] is not None else ""
        log(
            "epoch %d/%d: train loss %.4f%s | %s | lr %.3g | %.1f img/s | %.1f s",
            epoch + 1,
            recipe.epochs,
            row["train_loss"],
            top1,
            val,
            row["lr"],
            row["train_img_s"],
            row["epoch_s"],
        )

    if writer is not None:
        writer.close()
    if info.is_main and best_ckpt is not None:
        _export_best(model_name, num_classes, best_ckpt, out / "best.safetensors")
    barrier(info)
    return TrainResult(
        output_dir=out,
        best_top1=best_top1,
        best_epoch=best_epoch,
        best_checkpoint=best_ckpt,
        last_checkpoint=last_ckpt,
        history=history,
        skipped_images=total_skipped,
        effective_batch=eff_batch,
        effective_lr=eff_lr,
        world_size=info.world_size,
        wall_s=time.perf_counter() - wall_start,
    )


def _reset_bn(
    model: torch.nn.Module,
    train_src: ImageSource,
    recipe: Recipe,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    info: DistInfo,
) -> None:
    """Official `reset_bn`: a fixed subset of training images, training transform at the eval size."""
    subset = subset_indices(len(train_src), recipe.reset_bn_samples, recipe.seed)
    source = _Subset(train_src, subset)
    transform = train_transform(recipe, recipe.eval_image_size, mean, std)
    loader = DataLoader(
        EvalDataset(source, transform, seed=sample_seed(recipe.seed, 0xB9)),
        batch_sampler=eval_batches(len(source), recipe.reset_bn_batch_size, info.world_size, info.rank),
        num_workers=recipe.workers,
        collate_fn=collate,
    )

    def batches():
        for images, _, _ in loader:
            if images.numel():
                images = images.to(info.device, non_blocking=True)
                yield images.contiguous(memory_format=torch.channels_last) if recipe.channels_last else images

    with autocast(recipe.amp, info.device):
        reset_bn_stats(model, batches(), info)


class _Subset:
    """Some indices of a source, itself a source."""

    def __init__(self, source: ImageSource, indices: list[int]) -> None:
        self.source, self.indices, self.classes = source, indices, source.classes

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return self.source.load(self.indices[i])

    def describe(self, i: int) -> str:
        return self.source.describe(self.indices[i])


def _export_best(model_name: str, num_classes: int, best: Path, path: Path) -> None:
    """best.pt's evaluation weights as a safetensors file `lowformer.load_model` reads."""
    model = create_model(model_name, num_classes=num_classes)
    model.load_state_dict(ckpt_io.load(best)["state_dict"])
    save_checkpoint(model, path)
