"""`lowformer train`: train or fine-tune a model with an official recipe, on one or many processes.

Without --data it trains on the built-in digits (the `demo` recipe), so a new user sees a full run
in minutes on a CPU. With --data DIR (ImageFolder: DIR/train/<class>/..., DIR/val/<class>/...) the
default recipe is the model's official preset. Multi-GPU / multi-node: the same command under
`torchrun --nproc-per-node N -m lowformer train ...`. Details: docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ._args import positive_int

EXAMPLES = """examples:
  lowformer train --model lowformer_b0 --epochs 3 --output runs/digits      # built-in digits, CPU
  lowformer train --model lowformer_b1 --data /data/imagenet                 # official B1 recipe
  torchrun --nproc-per-node 8 -m lowformer train --model lowformer_b1 --data /data/imagenet --amp bf16
  lowformer train --model lowformer_b1 --data /data/flowers --checkpoint evalmodel.pt --recipe my.yaml
  lowformer train --model lowformer_b1 --data /data/imagenet --resume        # continue runs/... exactly
  lowformer train --model lowformer_b0 --output runs/digits --overwrite      # replace an earlier run
  lowformer train --recipe b3 --show-recipe > my_b3.yaml                     # a recipe to copy and edit
"""

# recipe key -> the flag that sets it (any key: --set KEY=VALUE); messages name keys by these flags
_FLAGS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "warmup_epochs": "--warmup-epochs",
    "grad_accum": "--grad-accum",
    "image_size": "--image-size",
    "eval_image_size": "--eval-image-size",
    "workers": "--workers",
    "seed": "--seed",
    "amp": "--amp",
    "channels_last": "--channels-last",
    "compile": "--compile",
    "grad_checkpointing": "--grad-checkpointing",
    "checkpoint_every": "--checkpoint-every",
    "keep_last": "--keep-last",
    "log_every": "--log-every",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune with the official recipes (built-in digits without --data)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model name (default: the recipe's)")
    p.add_argument("--recipe", help="preset name (see --list-recipes) or a YAML file")
    p.add_argument("--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: built-in digits)")
    p.add_argument("--output", metavar="DIR", help="run folder (default: runs/<model>-<recipe>)")
    run_folder = p.add_mutually_exclusive_group()
    run_folder.add_argument(
        "--resume", nargs="?", const="auto", metavar="CKPT", help="continue a run (default: OUTPUT/last.pt)"
    )
    run_folder.add_argument("--overwrite", action="store_true", help="delete the run in --output and start again")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--checkpoint", metavar="FILE", help="fine-tune from these weights (any format)")
    init.add_argument("--pretrained", action="store_true", help="fine-tune from the official weights")
    p.add_argument("--num-classes", type=int, help="check the class count (default: the data's class folders)")

    o = p.add_argument_group("recipe overrides")
    o.add_argument("--epochs", type=int)
    o.add_argument("--batch-size", type=int, help="per process")
    o.add_argument("--lr", type=float, help="per process batch; scaled by processes x grad accumulation")
    o.add_argument("--warmup-epochs", type=float)
    o.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    o.add_argument("--image-size", type=int, nargs="+", metavar="S", help="training size(s); eval uses the largest")
    o.add_argument("--eval-image-size", type=int, metavar="S")
    o.add_argument("--workers", type=int, help="data loader processes per training process")
    o.add_argument("--seed", type=int)
    o.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16 uses a gradient scaler)")
    o.add_argument("--channels-last", action="store_true", default=None)
    o.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    o.add_argument("--grad-checkpointing", action="store_true", default=None)
    o.add_argument("--checkpoint-every", type=int, metavar="N", help="also save every N optimizer steps")
    o.add_argument("--keep-last", type=int, metavar="N", help="step checkpoints kept besides best.pt")
    o.add_argument(
        "--log-every", type=int, metavar="N", help="read and check the losses every N steps (the host's only wait)"
    )
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe key (YAML value)")

    p.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT/tensorboard (needs tensorboard)")
    p.add_argument(
        "--wandb",
        nargs="?",
        const="lowformer",
        metavar="PROJECT",
        help="also log to Weights & Biases (default project: lowformer; files in OUTPUT/wandb; needs wandb)",
    )
    p.add_argument(
        "--gpu-decode",
        action="store_true",
        help="decode and crop JPEGs on the CUDA device (nvJPEG) where the recipe's transforms allow it",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op CPU threads (torch.set_num_threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-recipes", action="store_true", help="list the preset recipes and exit")
    p.add_argument("--show-recipe", action="store_true", help="print the effective recipe as YAML and exit")
    p.set_defaults(run=run)


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """(recipe changes from the command line, key -> how it was given: its flag, "--set" or "derived")."""
    from ..train.recipe import parse_override

    changes: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, flag in _FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            changes[key] = list(value) if isinstance(value, list) else value
            given[key] = flag
    if args.image_size and "eval_image_size" not in changes:
        changes["eval_image_size"] = max(args.image_size)
        given["eval_image_size"] = "derived"
    for text in args.set:
        key, value = parse_override(text)
        changes[key] = value
        given[key] = "--set"
    return changes, given


def _labels(recipe_origin: str, given: dict[str, str]) -> dict[str, Callable[[Any], str]]:
    """How messages name each recipe key: the way the user gave it (`--epochs 1`, `--set lr=0.1`), else
    as the recipe's value, with the flag that changes it (`warmup_epochs=20 (preset 'b0'; --warmup-epochs
    changes it)`)."""
    from ..train.recipe import Recipe, show_value

    def as_flag(flag: str) -> Callable[[Any], str]:
        def label(value: Any) -> str:
            if isinstance(value, bool):
                return flag
            if isinstance(value, list):
                return f"{flag} {' '.join(show_value(v) for v in value)}"
            return f"{flag} {show_value(value)}"

        return label

    labels: dict[str, Callable[[Any], str]] = {}
    for key in (f.name for f in dataclasses.fields(Recipe)):
        how = given.get(key)
        if how == "--set":
            labels[key] = lambda v, k=key: f"--set {k}={show_value(v)}"
        elif how == "derived":
            labels[key] = lambda v, k=key: f"{k}={show_value(v)} (the largest --image-size)"
        elif how is not None:
            labels[key] = as_flag(how)
        else:
            hint = f"; {_FLAGS[key]} changes it" if key in _FLAGS else ""
            labels[key] = lambda v, k=key, h=hint: f"{k}={show_value(v)} ({recipe_origin}{h})"
    return labels


def _recipe_name(args: argparse.Namespace) -> str:
    from ..train import list_recipes, recipe_for_model

    if args.recipe is not None:
        return args.recipe
    if args.data is None or args.resume:
        return "demo"
    if args.model is None:
        raise ValueError("pass --model (and optionally --recipe)")
    name = recipe_for_model(args.model)
    if name is None:
        raise ValueError(
            f"no preset recipe for {args.model}; pass --recipe NAME or FILE (presets: {', '.join(list_recipes())})"
        )
    return name


def _resume_extra(args: argparse.Namespace) -> list[str]:
    """The options a resumed run needs again: the ones the checkpoint does not record."""
    extra = ["--device", args.device] if args.device else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    extra += ["--tensorboard"] if args.tensorboard else []
    extra += ["--wandb", args.wandb] if args.wandb else []
    extra += ["--gpu-decode"] if args.gpu_decode else []
    extra += ["--no-progress"] if args.no_progress else []
    return extra


def run(args: argparse.Namespace) -> int:
    from ..train import RecipeError, list_recipes, load_recipe, train
    from ..train.lifecycle import RunInterrupted, resume_command

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.list_recipes:
        for name in list_recipes():
            recipe = load_recipe(name)
            print(f"{name:6s} {recipe.model or '-':14s} {recipe.description}")
        return 0

    recipe_name = _recipe_name(args)
    changes, given = _overrides(args)
    if args.resume:
        origin = "the resumed run's recipe"
    else:
        origin = f"preset {recipe_name!r}" if recipe_name in list_recipes() else recipe_name
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        recipe = load_recipe(recipe_name)
        if changes:
            recipe = recipe.replace(**changes)
        if args.show_recipe:
            print(recipe.to_yaml(), end="")
            return 0
        model = args.model or recipe.model
        if model is None and not args.resume:
            raise ValueError(f"recipe {recipe.name!r} names no model; pass --model")
        output = args.output
        if output is None and args.resume not in (None, "auto"):
            output = os.path.dirname(os.path.abspath(args.resume))  # continue writing next to the checkpoint
        if output is None:
            if model is None:
                raise ValueError("--resume without a checkpoint path needs --output (the run folder) or --model")
            output = os.path.join("runs", f"{model}-{recipe.name}")
        logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", stream=sys.stdout)
        result = train(
            model,
            recipe,
            data_dir=args.data,
            output_dir=output,
            resume=args.resume,
            overwrite=args.overwrite,
            init_checkpoint=args.checkpoint,
            pretrained=args.pretrained,
            num_classes=args.num_classes,
            device=args.device,
            tensorboard=args.tensorboard,
            wandb=args.wandb,
            gpu_decode=args.gpu_decode,
            progress=not args.no_progress,
            explicit_keys=set(changes),
        )
    except RecipeError as e:
        raise e.relabel(_labels(origin, given)) from None
    except RunInterrupted as e:
        if is_main:
            print(f"lowformer train: {e}", file=sys.stderr)
            print(f"continue with: {resume_command('train', e.checkpoint, _resume_extra(args))}", file=sys.stderr)
        return e.exit_code
    if is_main:
        best = f"{result.best_top1:.2f}% (epoch {result.best_epoch})" if result.best_top1 is not None else "n/a"
        print(f"best top-1 {best}: {result.best_checkpoint}")
        print(f"last checkpoint: {result.last_checkpoint}   log: {result.output_dir / 'log.csv'}")
        if result.skipped_images:
            print(f"skipped {result.skipped_images} unreadable images (see the warnings above)")
        print(f"done in {result.wall_s:.1f} s")
    return 0
