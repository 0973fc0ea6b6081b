"""`lowformer train`: train or fine-tune a model with an official recipe, on one or many processes.

Without --data it trains on the built-in digits (the `demo` recipe), so a new user sees a full run
in minutes on a CPU. With --data DIR (ImageFolder: DIR/train/<class>/..., DIR/val/<class>/...) the
default recipe is the model's official preset. Multi-GPU / multi-node: the same command under
`torchrun --nproc-per-node N -m lowformer train ...`. Details: docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXAMPLES = """examples:
  lowformer train --model lowformer_b0 --epochs 3 --output runs/digits      # built-in digits, CPU
  lowformer train --model lowformer_b1 --data /data/imagenet                 # official B1 recipe
  torchrun --nproc-per-node 8 -m lowformer train --model lowformer_b1 --data /data/imagenet --amp bf16
  lowformer train --model lowformer_b1 --data /data/flowers --checkpoint evalmodel.pt --recipe my.yaml
  lowformer train --model lowformer_b1 --data /data/imagenet --resume        # continue runs/... exactly
  lowformer train --recipe b3 --show-recipe > my_b3.yaml                     # a recipe to copy and edit
"""

# flag -> recipe key, for the overrides that have their own flag (any key: --set KEY=VALUE)
_FLAG_KEYS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "warmup_epochs": "warmup_epochs",
    "grad_accum": "grad_accum",
    "eval_image_size": "eval_image_size",
    "workers": "workers",
    "seed": "seed",
    "amp": "amp",
    "checkpoint_every": "checkpoint_every",
    "keep_last": "keep_last",
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
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT", help="continue a run (default: OUTPUT/last.pt)")
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
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe key (YAML value)")

    p.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT/tensorboard (needs tensorboard)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-recipes", action="store_true", help="list the preset recipes and exit")
    p.add_argument("--show-recipe", action="store_true", help="print the effective recipe as YAML and exit")
    p.set_defaults(run=run)


def _overrides(args: argparse.Namespace) -> dict:
    from ..train.recipe import parse_override

    changes = {}
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            changes[key] = value
    for flag in ("channels_last", "compile", "grad_checkpointing"):
        if getattr(args, flag):
            changes[flag] = True
    if args.image_size:
        changes["image_size"] = list(args.image_size)
        changes.setdefault("eval_image_size", max(args.image_size))
    for text in args.set:
        key, value = parse_override(text)
        changes[key] = value
    return changes


def run(args: argparse.Namespace) -> int:
    from ..train import NonFiniteLossError, list_recipes, load_recipe, recipe_for_model, train

    if args.list_recipes:
        for name in list_recipes():
            recipe = load_recipe(name)
            print(f"{name:6s} {recipe.model or '-':14s} {recipe.description}")
        return 0

    recipe_name = args.recipe
    if recipe_name is None:
        if args.data is None or args.resume:
            recipe_name = "demo"
        else:
            if args.model is None:
                raise ValueError("pass --model (and optionally --recipe)")
            recipe_name = recipe_for_model(args.model)
            if recipe_name is None:
                raise ValueError(
                    f"no preset recipe for {args.model}; pass --recipe NAME or FILE "
                    f"(presets: {', '.join(list_recipes())})"
                )
    recipe = load_recipe(recipe_name)
    changes = _overrides(args)
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
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", stream=sys.stdout)
    try:
        result = train(
            model,
            recipe,
            data_dir=args.data,
            output_dir=output,
            resume=args.resume,
            init_checkpoint=args.checkpoint,
            pretrained=args.pretrained,
            num_classes=args.num_classes,
            device=args.device,
            tensorboard=args.tensorboard,
            progress=not args.no_progress,
            explicit_keys=set(changes),
        )
    except NonFiniteLossError as e:
        print(f"lowformer train: stopped: {e}", file=sys.stderr)
        return 3
    except ImportError as e:
        print(f"lowformer train: error: {e}", file=sys.stderr)
        return 2
    if is_main:
        best = f"{result.best_top1:.2f}% (epoch {result.best_epoch})" if result.best_top1 is not None else "n/a"
        print(f"best top-1 {best}: {result.best_checkpoint}")
        print(f"last checkpoint: {result.last_checkpoint}   log: {result.output_dir / 'log.csv'}")
        if result.skipped_images:
            print(f"skipped {result.skipped_images} unreadable images (see the warnings above)")
        print(f"done in {result.wall_s:.1f} s")
    return 0
