"""Training and evaluation with the official LowFormer recipes (see docs/training.md).

    from lowformer.train import load_recipe, train, evaluate
    result = train("lowformer_b0", load_recipe("demo"), output_dir="runs/digits")   # built-in digits
    print(evaluate("lowformer_b0", result.best_checkpoint).top1)

Multi-process: run the same code (or `lowformer train`) under `torchrun --nproc-per-node N`.
Ctrl-C or SIGTERM during `train` saves a resumable checkpoint and raises `RunInterrupted`.
"""

from .data import DataLayoutError
from .evaluate import EvalResult, evaluate, evaluate_model
from .lifecycle import RunInterrupted
from .recipe import Recipe, RecipeError, list_recipes, load_recipe, recipe_for_model
from .trainer import NonFiniteLossError, TrainResult, train

__all__ = [
    "DataLayoutError",
    "EvalResult",
    "NonFiniteLossError",
    "Recipe",
    "RecipeError",
    "RunInterrupted",
    "TrainResult",
    "evaluate",
    "evaluate_model",
    "list_recipes",
    "load_recipe",
    "recipe_for_model",
    "train",
]
