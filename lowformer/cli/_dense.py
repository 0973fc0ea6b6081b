"""What `lowformer detect` and `lowformer segment` share: the `train` and `eval` actions, their
arguments, and how a run's result is printed. Each command module gives its task's words."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

from ._args import non_negative_int, positive_float, positive_int


@dataclass(frozen=True)
class DenseCommand:
    """The words one task uses on the command line."""

    command: str  # "detect"
    task: str  # "detection"
    what: str  # "RetinaNet / Faster R-CNN / Mask R-CNN"
    data_help: str
    splits: tuple[str, str]
    default_recipe: str  # with --data
    length_flag: str  # "epochs" or "iterations"
    examples: str


def add_parsers(sub: argparse._SubParsersAction, cmd: DenseCommand, description: str) -> None:
    p = sub.add_parser(
        cmd.command,
        help=f"train and evaluate {cmd.what} (built-in demo without --data)",
        description=description,
        epilog=cmd.examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = actions.add_parser(
        "train",
        help="train (or continue with --resume); the built-in demo without --data",
        description=description,
        epilog=cmd.examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--model", help="backbone: one of ours or timm:NAME (default: the recipe's)")
    t.add_argument("--recipe", help=f"preset (see --list-recipes) or a YAML file (default: demo, or "
                                    f"{cmd.default_recipe} with --data)")  # fmt: skip
    t.add_argument("--data", metavar="DIR", help=f"{cmd.data_help} (default: the built-in demo)")
    t.add_argument("--train-split", default=None, metavar="NAME", help=f"default: {cmd.splits[0]}")
    t.add_argument("--val-split", default=None, metavar="NAME", help=f"default: {cmd.splits[1]}")
    t.add_argument("--output", metavar="DIR", help=f"run folder (default: runs/{cmd.command}-<model>-<recipe>)")
    t.add_argument("--resume", nargs="?", const="auto", metavar="CKPT", help="continue a run (default: OUTPUT/last.pt)")
    t.add_argument("--overwrite", action="store_true", help="delete an earlier run in the output folder first")
    init = t.add_mutually_exclusive_group()
    init.add_argument("--checkpoint", metavar="FILE", help="ImageNet weights for the backbone (any format)")
    init.add_argument("--pretrained", action="store_true", help="the backbone's official weights (local folder)")
    o = t.add_argument_group("recipe overrides")
    o.add_argument(f"--{cmd.length_flag}", type=positive_int, dest="length", metavar="N")
    o.add_argument("--batch-size", type=positive_int, help="per process")
    o.add_argument("--lr", type=positive_float, help="for a batch of lr_batch images (scaled to the effective batch)")
    o.add_argument("--workers", type=non_negative_int, help="data loader processes per training process")
    o.add_argument("--seed", type=int)
    o.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16 uses a gradient scaler)")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe key (YAML value)")
    t.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--list-recipes", action="store_true", help="list the preset recipes and exit")
    t.add_argument("--show-recipe", action="store_true", help="print the effective recipe as YAML and exit")
    t.set_defaults(run=lambda args: run_train(args, cmd))

    e = actions.add_parser(
        "eval",
        help="evaluate a checkpoint (on the data it was trained with, or --data)",
        description=description,
        epilog=cmd.examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--checkpoint", required=True, metavar="FILE", help=f"a `lowformer {cmd.command} train` checkpoint")
    e.add_argument("--data", metavar="DIR", help=f"{cmd.data_help} (default: the data of the training run)")
    e.add_argument("--split", metavar="NAME", help="default: the training run's validation split")
    e.add_argument("--batch-size", type=positive_int)
    e.add_argument("--workers", type=non_negative_int, default=0)
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="evaluation keys (e.g. eval_mode)")
    e.add_argument("--device", choices=("cpu", "cuda"))
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--no-progress", action="store_true")
    if cmd.task == "detection":
        e.add_argument("--predictions", metavar="FILE", help="also write the detections as COCO results JSON")
    e.set_defaults(run=lambda args: run_eval(args, cmd))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_train(args: argparse.Namespace, cmd: DenseCommand) -> int:
    from ..downstream import engine
    from ..downstream.recipe import list_recipes, load_recipe, parse_override

    if args.list_recipes:
        for name in list_recipes(cmd.task):
            recipe = load_recipe(cmd.task, name)
            print(f"{name:18s} {recipe.model or '-':14s} {recipe.description}")
        return 0
    recipe = load_recipe(cmd.task, args.recipe or ("demo" if args.data is None else cmd.default_recipe))
    changes: dict = {}
    for flag, key in (("length", cmd.length_flag), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("workers", "workers"), ("seed", "seed"), ("amp", "amp")):  # fmt: skip
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    for text in args.set:
        key, value = parse_override(text)
        changes[key] = value
    if changes:
        recipe = recipe.replace(**changes)
    if args.show_recipe:
        print(recipe.to_yaml(), end="")
        return 0

    model = args.model or recipe.model
    output = args.output
    if output is None and args.resume not in (None, "auto"):
        output = os.path.dirname(os.path.abspath(args.resume))  # continue writing next to the checkpoint
    if output is None:
        if model is None:
            raise ValueError(f"recipe {recipe.name!r} names no backbone; pass --model (and --output to name the run)")
        output = os.path.join("runs", f"{cmd.command}-{model.replace(':', '_')}-{recipe.name}")
    splits = None
    if args.train_split or args.val_split:
        splits = (args.train_split or cmd.splits[0], args.val_split or cmd.splits[1])
    logging.basicConfig(level=logging.INFO if _is_main() else logging.WARNING, format="%(message)s", stream=sys.stdout)
    result = engine.train(
        cmd.task,
        args.model,
        recipe,
        data_dir=args.data,
        splits=splits,
        output_dir=output,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_path=args.checkpoint,
        pretrained=args.pretrained,
        device=args.device,
        progress=not args.no_progress,
        explicit_keys=set(changes),
    )
    if _is_main():
        best = f"{result.best:.4f} (step {result.best_step})" if result.best is not None else "n/a"
        print(f"best {result.metric} {best}: {result.best_checkpoint}")
        print(f"last checkpoint: {result.last_checkpoint}   log: {result.output_dir / 'log.csv'}")
        print(f"{result.global_step} of {result.total_steps} steps done in {result.wall_s:.1f} s")
    return result.stopped_by or 0


def run_eval(args: argparse.Namespace, cmd: DenseCommand) -> int:
    from .._io import check_writable, write_text
    from ..downstream import engine
    from ..downstream.recipe import parse_override

    overrides = dict(parse_override(t) for t in args.set)
    if args.batch_size is not None:
        overrides["eval_batch_size"] = args.batch_size
    predictions = getattr(args, "predictions", None)
    if predictions is not None:
        check_writable(predictions)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    evaluation, described = engine.evaluate_checkpoint(
        cmd.task,
        args.checkpoint,
        data_dir=args.data,
        split=args.split,
        overrides=overrides,
        device=args.device,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if not _is_main():
        return 0
    if predictions is not None:
        write_text(predictions, json.dumps(evaluation.files["predictions.json"]))
    if args.json:
        details = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in evaluation.details.items()}
        print(json.dumps({**described, **evaluation.metrics, **details}, indent=2))
        return 0
    print(f"{evaluation.text}")
    where = f"{described['data']} (split {described['split']})"
    print(f"on {described['images']} images of {where}; {described['model']}, step {described['step']} of "
          f"{described['checkpoint']}")  # fmt: skip
    for summary in evaluation.details.get("coco_summary", {}).values():
        print(summary.rstrip())
    if "metrics" in evaluation.details:
        print(evaluation.details["metrics"].table())
    if predictions is not None:
        print(f"predictions: {predictions}")
    return 0
