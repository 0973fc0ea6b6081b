"""The downstream training loop behind `lowformer detect train` and `lowformer segment train`.

Reads top to bottom: run folder and resume -> data (or the built-in demo, written in the standard
format into the run folder) -> model, optimizer, schedule -> restore -> steps (data, loss, clip,
update), with an evaluation, a checkpoint and a log row every `eval_every` steps -> the end.

The habits of `lowformer train`: a run folder is never silently reused (`--resume` continues it,
`--overwrite` replaces it); checkpoints are written atomically with everything `--resume` needs
(model, optimizer, scaler, RNG, step, history) and read with `weights_only=True`; Ctrl-C or SIGTERM
saves a resumable checkpoint at the next step and ends the run with exit code 130 / 143; torchrun
runs it on many processes (each reads its share of every batch; metrics are reduced over all).
Reproducibility: a step's samples, their augmentation and the step's own randomness (dropout, the
R-CNNs' box sampling) are functions of (seed, step), so on a CPU a run killed and resumed ends with
the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._io import write_csv, write_json, write_text
from ..errors import EXIT_INTERRUPTED, LowformerRuntimeError
from ..train import checkpoint as ckpt_io
from ..train.distributed import DistInfo, any_process, barrier, process_group
from ..train.lifecycle import RUN_FILES, StopSignals, prepare_run_folder
from ._data import DatasetError, StepSampler, raise_failures, sample_seed
from .recipe import DownstreamRecipe, RecipeError, merge_resumed, recipe_from_dict
from .tasks import TASKS, Evaluation, TaskData

__all__ = ["NonFiniteLossError", "RunResult", "evaluate_checkpoint", "train"]

_logger = logging.getLogger(__name__)

VERSION = 1
DEMO_FOLDER = "demo_data"
BASE_COLUMNS = ("step", "epoch", "train_loss", "lr", "step_s", "train_img_s")


class NonFiniteLossError(LowformerRuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the broken state."""


@dataclass
class RunResult:
    """What a run produced. Metrics in [0, 1]."""

    output_dir: Path
    metric: str  # the metric that picks best.pt ("bbox_AP", "mIoU")
    best: float | None
    best_step: int | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    last_evaluation: Evaluation | None
    history: list[dict]
    global_step: int
    total_steps: int
    effective_batch: int
    effective_lr: float
    world_size: int
    wall_s: float
    stopped_by: int | None = None  # exit code (130 / 143) when a signal stopped the run


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(amp: str | None, device: torch.device):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _data_root(task, data_dir: str | Path | None, out: Path, seed: int, info: DistInfo) -> tuple[Path, bool]:
    """The dataset folder, or the built-in demo written into the run folder (once, by rank 0)."""
    if data_dir is not None:
        return Path(data_dir), False
    root = out / DEMO_FOLDER
    if info.is_main and not (root / ".complete").exists():
        _logger.info("writing the built-in %s demo dataset to %s", task.name, root)
        task.write_demo(root, seed)
        write_text(root / ".complete", "")
    barrier(info)
    return root, True


def train(
    task_name: str,
    model_name: str | None,
    recipe: DownstreamRecipe,
    *,
    data_dir: str | Path | None = None,
    splits: tuple[str, str] | None = None,
    output_dir: str | Path,
    resume: str | Path | None = None,
    overwrite: bool = False,
    checkpoint_path: str | Path | None = None,
    pretrained: bool = False,
    device: str | None = None,
    progress: bool = True,
    explicit_keys: set[str] | None = None,
    max_steps: int | None = None,
) -> RunResult:
    """Train a detector ("detection") or a segmenter ("segmentation") with `recipe`.

    Args:
        model_name: the backbone ("lowformer_b1", "timm:resnet50", ...); default: the recipe's.
        data_dir: COCO-format (detection) or ADE20K-layout (segmentation) root; None: the built-in demo.
        splits: (training, validation) split names; default: the task's (train2017/val2017, training/validation).
        resume: a training checkpoint, or "auto" for `output_dir/last.pt`.
        overwrite: empty an output folder that holds an earlier run.
        checkpoint_path, pretrained: ImageNet weights for the backbone (any format the loader reads).
        explicit_keys: the recipe keys set on the command line (only runtime keys may change on resume).
        max_steps: stop (with a resumable checkpoint) after this many optimizer steps of this call.
    """
    with process_group(device) as info:
        return _train(
            TASKS[task_name], model_name, recipe, data_dir, splits, Path(output_dir), resume, overwrite,
            checkpoint_path, pretrained, info, progress, explicit_keys or set(), max_steps,
        )  # fmt: skip


def _train(
    task,
    model_name: str | None,
    recipe: DownstreamRecipe,
    data_dir: str | Path | None,
    splits: tuple[str, str] | None,
    out: Path,
    resume: str | Path | None,
    overwrite: bool,
    checkpoint_path: str | Path | None,
    pretrained: bool,
    info: DistInfo,
    progress: bool,
    explicit_keys: set[str],
    max_steps: int | None,
) -> RunResult:
    wall_start = time.perf_counter()
    log = _logger.info if info.is_main else _logger.debug

    # -- resume: the checkpoint's recipe, model and data win ---------------------------------------
    state: dict[str, Any] | None = None
    if resume is not None:
        path = out / "last.pt" if str(resume) == "auto" else Path(resume)
        state = load_checkpoint(path, task.name)
        recipe = merge_resumed(type(recipe), state["recipe"], recipe, explicit_keys)
        if model_name not in (None, state["model_name"]):
            raise ValueError(f"{path} trains {state['model_name']!r}, not {model_name!r}")
        if checkpoint_path is not None or pretrained:
            raise ValueError("--resume continues a run; it cannot be combined with --checkpoint or --pretrained")
        model_name = state["model_name"]
        if data_dir is None and not state["demo"]:
            data_dir = state["data_dir"]
        splits = splits or tuple(state["splits"])
    model_name = model_name or recipe.model
    if model_name is None:
        raise ValueError(f"recipe {recipe.name!r} names no backbone; pass --model")
    splits = tuple(splits or task.default_splits)
    if info.is_main:
        prepare_run_folder(out, resume=state is not None, overwrite=overwrite, run_files=(*RUN_FILES, DEMO_FOLDER))
    barrier(info)

    # -- data -------------------------------------------------------------------------------------------
    root, demo = _data_root(task, data_dir, out, recipe.seed, info)
    data: TaskData = task.load_data(recipe, root, splits)
    if state is not None and state["meta"] != data.meta:
        raise DatasetError(
            f"the checkpoint was trained on other classes than {root} has ({state['meta']} vs {data.meta})"
        )

    # -- model, optimizer, schedule ----------------------------------------------------------------------
    torch.manual_seed(recipe.seed)  # the same initial weights on every process
    model = task.build_model(recipe, model_name, data, checkpoint_path=checkpoint_path, pretrained=pretrained)
    model.to(info.device)
    train_ds = task.train_dataset(recipe, data, model)
    val_ds = task.val_dataset(recipe, data, model)
    eff_batch, eff_lr = recipe.scaled(info.world_size)
    steps_per_epoch = StepSampler(len(train_ds), recipe.batch_size, recipe.seed, 0, info.world_size).steps_per_epoch
    if steps_per_epoch == 0:
        raise DatasetError(
            f"the training split has {len(train_ds)} usable images, fewer than one effective batch ({eff_batch}); "
            "lower batch_size"
        )
    schedule = recipe.schedule(steps_per_epoch, eff_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("the model has no trainable parameters (trainable_stages 0 freezes the backbone only)")
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=eff_lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=eff_lr, momentum=0.9, weight_decay=recipe.weight_decay)
    scaler = torch.amp.GradScaler(info.device.type, enabled=recipe.amp == "fp16")

    # -- restore --------------------------------------------------------------------------------------------
    global_step, history, best, best_step = 0, [], None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        global_step, history = state["global_step"], list(state["history"])
        best, best_step = state["best"], state["best_step"]
        if state["world_size"] != info.world_size:
            _logger.warning(
                "resuming with %d processes; the checkpoint was written by %d: the batches differ from here on",
                info.world_size,
                state["world_size"],
            )
        log("resuming from %s (step %d of %d)", resume if str(resume) != "auto" else out / "last.pt",
            global_step, schedule.total_steps)  # fmt: skip

    train_model: torch.nn.Module = model
    if info.distributed:
        if task.name == "segmentation" and info.device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)

    # -- output ------------------------------------------------------------------------------------------------
    columns = BASE_COLUMNS + tuple(task.columns)
    if info.is_main:
        write_text(out / "recipe.yaml", recipe.to_yaml())
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    log(
        "%s %s on %s: %.2fM params (%.2fM trainable), %d classes; %d training / %d validation images (%s)",
        task.model_label(recipe), model_name, info.device.type, n_params / 1e6, n_train / 1e6,
        len(data.names), len(train_ds), len(val_ds), f"built-in demo, {root}" if demo else root,
    )  # fmt: skip
    lr_rule = f" = {recipe.lr:.3g} x {eff_batch} / {recipe.lr_batch} (lr_batch)" if recipe.lr_batch else ""
    log(
        "effective batch %d = %d per process x %d process%s; lr %.3g%s",
        eff_batch, recipe.batch_size, info.world_size, "es" if info.world_size > 1 else "", eff_lr, lr_rule,
    )  # fmt: skip
    log(
        "%d optimizer steps (%.2f epochs of %d steps), warm-up %d; evaluation every %d steps; recipe %r; output %s",
        schedule.total_steps, schedule.total_steps / steps_per_epoch, steps_per_epoch, recipe.warmup_iters,
        schedule.eval_every, recipe.name, out,
    )  # fmt: skip

    last_ckpt: Path | None = out / "last.pt" if (out / "last.pt").exists() else None
    best_ckpt: Path | None = out / "best.pt" if (out / "best.pt").exists() else None
    saved_step = global_step if state is not None else None

    def snapshot() -> dict[str, Any]:
        return {
            "format": ckpt_io.FORMAT,
            "task": task.name,
            "version": VERSION,
            "model_name": model_name,
            "recipe": recipe.to_dict(),
            "meta": data.meta,
            "data_dir": str(root.resolve()),
            "demo": demo,
            "splits": list(splits),
            "state_dict": model.state_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": ckpt_io.capture_rng(),
            "global_step": global_step,
            "epoch": global_step // steps_per_epoch,
            "step_in_epoch": global_step % steps_per_epoch,
            "world_size": info.world_size,
            "best": best,
            "best_step": best_step,
            "history": history,
        }

    def write_checkpoint(is_best: bool = False) -> None:
        nonlocal last_ckpt, best_ckpt, saved_step
        saved_step = global_step
        if info.is_main:
            path = ckpt_io.save(snapshot(), out / ckpt_io.step_name(global_step))
            last_ckpt = ckpt_io.link_or_copy(path, out / "last.pt")
            if is_best:
                best_ckpt = ckpt_io.link_or_copy(path, out / "best.pt")
            ckpt_io.prune(out, recipe.keep_last)
        barrier(info)

    # -- steps --------------------------------------------------------------------------------------------------
    if state is not None:
        ckpt_io.restore_rng(state["rng"])
    evaluation: Evaluation | None = None
    stopped_by: int | None = None
    loss_sum, loss_n, images_seen, t_window = 0.0, 0, 0, time.perf_counter()
    stop_at = schedule.total_steps if max_steps is None else min(schedule.total_steps, global_step + max_steps)
    bar = tqdm(
        total=schedule.total_steps, initial=global_step, desc=f"{task.name} {recipe.name}", unit="step",
        disable=not (progress and info.is_main), file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    train_model.train()
    with StopSignals() as stop:
        while global_step < stop_at and stopped_by is None:
            epoch, start = divmod(global_step, steps_per_epoch)
            sampler = StepSampler(
                len(train_ds), recipe.batch_size, recipe.seed, epoch, info.world_size, info.rank, start_step=start
            )
            loader = DataLoader(
                train_ds,
                batch_sampler=sampler,
                num_workers=recipe.workers,
                collate_fn=task.collate,
                pin_memory=info.device.type == "cuda",
            )
            for batch in loader:
                if any_process(bool(batch[2]), info):
                    raise_failures(batch[2] or ["a sample failed to load on another process (see its log)"])
                for group in optimizer.param_groups:
                    group["lr"] = schedule.lr_at(global_step)
                _seed_all(sample_seed(recipe.seed, global_step, info.rank, 7))  # dropout, R-CNN box sampling
                with _autocast(recipe.amp, info.device):
                    loss = task.loss(train_model, batch, recipe, info.device)
                value = loss.detach().float()
                if any_process(not bool(torch.isfinite(value)), info):
                    good = f"{last_ckpt} (step {saved_step})" if last_ckpt else "none written yet"
                    raise NonFiniteLossError(
                        f"the loss became {value.item()} at step {global_step + 1} (lr "
                        f"{optimizer.param_groups[0]['lr']:.3g}) on at least one process; nothing was saved after "
                        f"the last good checkpoint ({good}). Lower the lr or set clip_grad."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if recipe.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                global_step += 1
                loss_sum += value.item()
                loss_n += 1
                images_seen += len(batch[0]) * info.world_size
                bar.update(1)
                if loss_n % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")

                if global_step % schedule.eval_every == 0 or global_step == schedule.total_steps:
                    elapsed = time.perf_counter() - t_window
                    _broadcast_buffers(model, info)  # every process evaluates the weights rank 0 saves
                    evaluation = task.evaluate(
                        model, val_ds, recipe, info, workers=recipe.workers, progress=progress, data=data
                    )
                    row = {
                        "step": global_step,
                        "epoch": round(global_step / steps_per_epoch, 3),
                        "train_loss": round(loss_sum / max(loss_n, 1), 5),
                        "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"),
                        "step_s": round(elapsed / max(loss_n, 1), 4),
                        "train_img_s": round(images_seen / max(elapsed, 1e-9), 2),
                        **{k: (None if v is None else round(v, 5)) for k, v in evaluation.metrics.items()},
                    }
                    history.append(row)
                    is_best = best is None or evaluation.primary > best
                    if is_best:
                        best, best_step = evaluation.primary, global_step
                    write_checkpoint(is_best)
                    if info.is_main:
                        write_csv(out / "log.csv", history, columns)
                        write_json(out / "metrics.json", {"step": global_step, **evaluation.metrics,
                                                          **_jsonable(evaluation.details)})  # fmt: skip
                        for name, content in evaluation.files.items():  # data files: compact JSON
                            write_text(out / name, json.dumps(content))
                    log(
                        "step %d/%d (epoch %g): train loss %.4f | %s | lr %.3g | %.3f s/step",
                        global_step, schedule.total_steps, row["epoch"], row["train_loss"], evaluation.text,
                        row["lr"], row["step_s"],
                    )  # fmt: skip
                    loss_sum, loss_n, images_seen, t_window = 0.0, 0, 0, time.perf_counter()
                elif recipe.checkpoint_every and global_step % recipe.checkpoint_every == 0:
                    write_checkpoint()

                if any_process(stop.requested, info):
                    stopped_by = stop.exit_code if stop.requested else EXIT_INTERRUPTED
                if stopped_by is not None or global_step >= stop_at:
                    if saved_step != global_step:
                        write_checkpoint()
                    break
    bar.close()
    if stopped_by is not None:
        log("%s: stopped at step %d of %d; continue with --resume (%s)", stop.name or "a signal on another process",
            global_step, schedule.total_steps, last_ckpt)  # fmt: skip
    barrier(info)
    return RunResult(
        output_dir=out,
        metric=task.metric,
        best=best,
        best_step=best_step,
        best_checkpoint=best_ckpt,
        last_checkpoint=last_ckpt,
        last_evaluation=evaluation,
        history=history,
        global_step=global_step,
        total_steps=schedule.total_steps,
        effective_batch=eff_batch,
        effective_lr=eff_lr,
        world_size=info.world_size,
        wall_s=time.perf_counter() - wall_start,
        stopped_by=stopped_by,
    )


def _broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process: DDP syncs them only at the start of a
    training forward, so after the last step each process holds the statistics of its own batch."""
    if info.distributed:
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in details.items():
        out[k] = v.to_dict() if hasattr(v, "to_dict") else v
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints and evaluation
# ------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, task_name: str) -> dict[str, Any]:
    """A downstream training checkpoint of `task_name`; CheckpointError when it is another kind of file."""
    return ckpt_io.load(path, task=task_name)


def evaluate_checkpoint(
    task_name: str,
    checkpoint: str | Path,
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    workers: int = 0,
    progress: bool = True,
) -> tuple[Evaluation, dict[str, Any]]:
    """Evaluate a downstream checkpoint on the validation split it was trained with, or on `data_dir`/`split`.

    `overrides`: recipe keys that only change the evaluation (eval_batch_size, eval_mode, ...).
    Returns the evaluation and a description of what was evaluated.
    """
    task = TASKS[task_name]
    state = load_checkpoint(checkpoint, task_name)
    cls = task.recipe_type
    recipe = recipe_from_dict(cls, state["recipe"], origin=f"{checkpoint}'s recipe")
    if overrides:
        recipe = merge_resumed(
            cls, recipe.to_dict(), recipe.replace(**overrides), set(overrides), when="evaluating a checkpoint"
        )
    split = split or state["splits"][1]
    with process_group(device) as info:
        with contextlib.ExitStack() as stack:
            if data_dir is None:
                root = Path(state["data_dir"])
                if not root.is_dir():
                    if not state["demo"]:
                        raise FileNotFoundError(f"{root}, the data {checkpoint} was trained on, is gone; pass --data")
                    import tempfile

                    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lowformer-demo-")))
                    if info.is_main:
                        task.write_demo(root, recipe.seed)
                    barrier(info)
            else:
                root = Path(data_dir)
            data = task.load_data(recipe, root, (split, split), train=False)
            if data.meta != state["meta"]:
                raise DatasetError(
                    f"{root} (split {split}) has other classes than {checkpoint} was trained on: "
                    f"{data.meta} vs {state['meta']}"
                )
            model = task.build_model(recipe, state["model_name"], data)
            model.load_state_dict(state["state_dict"])
            model.to(info.device)
            dataset = task.val_dataset(recipe, data, model)
            evaluation = task.evaluate(model, dataset, recipe, info, workers=workers, progress=progress, data=data)
    described = {
        "checkpoint": str(checkpoint),
        "model": state["model_name"],
        "task": task_name,
        "data": "the built-in demo" if data_dir is None and state["demo"] else str(root),
        "split": split,
        "images": len(dataset),
        "step": state["global_step"],
    }
    if math.isnan(evaluation.primary):
        raise LowformerRuntimeError("the evaluation produced no number (an empty split?)")
    return evaluation, described
