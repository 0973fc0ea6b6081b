"""Training recipes: one flat, typed set of hyperparameters, read from YAML files users can copy.

A recipe file is a YAML mapping of `Recipe` fields. Unknown keys are refused (with the closest
known key suggested): a typo must never silently fall back to a default. The presets in
`recipes/*.yaml` reproduce the official LowFormer configs (`configs/cls/imagenet/*.yaml`, each
merged onto the official `default.yaml`); docs/training.md lists them side by side.

Units, as in the official code: `batch_size` is per process and per micro-step, and `lr` is the
learning rate for that batch. The effective batch is `batch_size x world_size x grad_accum` and the
learning rate is scaled by the same factor (`Recipe.scaled`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Recipe", "RecipeError", "list_recipes", "load_recipe", "recipe_for_model", "RUNTIME_KEYS"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# the official `train_interpolate: random` picks one of these six per image
OFFICIAL_RANDOM_INTERPOLATION = list(INTERPOLATIONS)

# keys that change how a run executes but not what it computes; the only ones `--resume` may change
RUNTIME_KEYS = frozenset(
    {
        "name",
        "description",
        "workers",
        "compile",
        "grad_checkpointing",
        "checkpoint_every",
        "keep_last",
        "eval_batch_size",
        "eval_every",
    }
)


class RecipeError(ValueError):
    """A recipe file or override is malformed: unknown key, wrong type or value out of range."""


@dataclass
class Recipe:
    """Every hyperparameter of a training run. Field comments name the official key."""

    name: str = "custom"
    description: str = ""
    model: str | None = None  # the variant this recipe was written for; `--model` may pick another

    # -- data (official data_provider.*) -------------------------------------------------------
    image_size: list[int] = field(default_factory=lambda: [224])  # image_size; one drawn per optimizer step
    eval_image_size: int = 224  # run_config.eval_image_size
    eval_crop_pct: float = 0.95  # rrc_config.test_crop_ratio
    eval_interpolation: str = "bicubic"  # rrc_config.test_interpolate
    train_interpolation: str | list[str] = "bilinear"  # rrc_config.train_interpolate (random: one per image)
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale
    rrc_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    randaugment: str | None = None  # timm config string; data_aug randaug n, m -> "rand-n{n}-m{m}-mstd1.0-inc1"
    random_erase: float = 0.0  # data_aug erase p (timm RandomErasing, mode const)
    mean: list[float] | None = None  # None: the model's (ImageNet)
    std: list[float] | None = None
    batch_size: int = 128  # base_batch_size, per process
    grad_accum: int = 1  # run_config.bsizemult
    workers: int = 8  # n_worker

    # -- optimisation (official run_config.*) --------------------------------------------------
    epochs: int = 320  # n_epochs + warmup_epochs: the official loop runs both
    warmup_epochs: float = 20  # warmup_epochs
    lr: float = 2.5e-4  # base_lr, per process batch; scaled by world size x grad_accum
    warmup_lr: float = 0.0  # warmup_lr
    min_lr: float = 0.0  # cosine floor (official: 0)
    optimizer: str = "adamw"  # optimizer_name (any timm optimizer)
    opt_eps: float = 1e-8  # optimizer_params.eps
    opt_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # optimizer_params.betas
    weight_decay: float = 0.1  # weight_decay; never on norms and biases (no_wd_keys [norm, bias])
    clip_grad: float | None = 2.0  # grad_clip
    clip_mode: str = "value"  # the official clips each gradient value (clip_grad_value_); or "norm"

    # -- loss -------------------------------------------------------------------------------------
    bce: bool = True  # bce: binary cross-entropy on (smoothed, mixed) one-hot targets
    label_smoothing: float = 0.1  # label_smooth
    mixup_alpha: float = 0.0  # mixup_config.op mixup alpha
    cutmix_alpha: float = 0.0  # mixup_config.op cutmix alpha
    mixup_prob: float = 1.0  # the official mixes every batch
    mixup_switch_prob: float = 0.5  # share of cutmix batches (official op weights 1.0 : 1.0)

    # -- regularisation -----------------------------------------------------------------------
    drop_path: float = 0.0  # backbone_drop.drop_prob (linear in depth)
    drop_path_skip: int = 0  # backbone_drop.skip: the first residual branches of the stages get none
    drop_path_scheduled: bool = True  # the official scales drop path by training progress (0 -> 1)
    ema_decay: float | None = None  # ema_decay
    ema_warmup_steps: int = 2000  # official EMA: decay * (1 - exp(-step / 2000))
    mesa_threshold: float | None = None  # mesa.thresh: EMA self-distillation from this progress on
    mesa_ratio: float = 2.0  # mesa.ratio
    init_std: float | None = 0.02  # official --rand_init trunc_normal@0.02 (None: the model's own init)
    zero_last_gamma: bool = True  # official --last_gamma 0: last BN of each residual conv block starts at 0

    # -- evaluation -----------------------------------------------------------------------------
    reset_bn: bool = True  # reset_bn: recompute BN statistics on training images before evaluating
    reset_bn_samples: int = 16000  # reset_bn_size
    reset_bn_batch_size: int = 100  # reset_bn_batch_size
    eval_batch_size: int | None = None  # None: 2 x batch_size (official test_batch_size)
    eval_every: int = 1  # epochs

    # -- runtime --------------------------------------------------------------------------------
    seed: int = 0  # --manual_seed
    amp: str | None = None  # None, "bf16" or "fp16" (official --fp16)
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU runs become slower)
    checkpoint_every: int = 0  # also save every N optimizer steps (0: at the end of each epoch only)
    keep_last: int = 2  # checkpoints kept besides best.pt

    def __post_init__(self) -> None:
        self.validate()

    # -- derived quantities ---------------------------------------------------------------------

    def scaled(self, world_size: int) -> tuple[int, float]:
        """(effective batch, effective lr): both multiplied by world size and grad_accum (official rule)."""
        factor = world_size * self.grad_accum
        return self.batch_size * factor, self.lr * factor

    @property
    def mixup_enabled(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with `changes` applied and checked like a file's keys (unknown keys refused)."""
        return from_dict({**self.to_dict(), **changes}, origin="override")

    # -- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Refuse values the trainer cannot honour, with the reason."""
        checks = [
            (self.image_size and all(s >= 32 for s in self.image_size), "image_size: sizes must be >= 32"),
            (self.eval_image_size >= 32, "eval_image_size must be >= 32"),
            (0 < self.eval_crop_pct <= 1, "eval_crop_pct must be in (0, 1]"),
            (len(self.rrc_scale) == 2 and 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1, "rrc_scale: [min, max]"),
            (len(self.rrc_ratio) == 2 and 0 < self.rrc_ratio[0] <= self.rrc_ratio[1], "rrc_ratio: [min, max]"),
            (0 <= self.hflip <= 1, "hflip is a probability"),
            (0 <= self.random_erase <= 1, "random_erase is a probability"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_lr >= 0 and self.min_lr >= 0, "warmup_lr and min_lr must be >= 0"),
            (len(self.opt_betas) == 2, "opt_betas: [beta1, beta2]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 (or null: off)"),
            (self.clip_mode in ("value", "norm", "agc"), "clip_mode is value, norm or agc"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0"),
            (0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1, "mixup probabilities in [0, 1]"),
            (0 <= self.drop_path < 1, "drop_path must be in [0, 1)"),
            (self.drop_path_skip >= 0, "drop_path_skip must be >= 0"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay must be in (0, 1) (or null: off)"),
            (self.ema_warmup_steps >= 0, "ema_warmup_steps must be >= 0"),
            (self.mesa_threshold is None or 0 <= self.mesa_threshold <= 1, "mesa_threshold is a progress in [0, 1]"),
            (self.mesa_threshold is None or self.ema_decay is not None, "mesa distils from the EMA: set ema_decay"),
            (self.init_std is None or self.init_std > 0, "init_std must be > 0 (or null: the model's init)"),
            (self.reset_bn_samples >= 1 and self.reset_bn_batch_size >= 1, "reset_bn sizes must be >= 1"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.amp in (None, "bf16", "fp16"), "amp is null, bf16 or fp16"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.eval_interpolation in INTERPOLATIONS, f"eval_interpolation is one of {', '.join(INTERPOLATIONS)}"),
        ]
        interps = [self.train_interpolation] if isinstance(self.train_interpolation, str) else self.train_interpolation
        checks.append(
            (
                bool(interps) and all(i in (*INTERPOLATIONS, "random") for i in interps),
                f"train_interpolation is one of {', '.join(INTERPOLATIONS)}, 'random' (timm: bilinear or bicubic) "
                "or a list of them (one drawn per image)",
            )
        )
        if self.randaugment is not None:
            checks.append((self.randaugment.startswith("rand-"), "randaugment is a timm string like rand-n2-m9"))
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"recipe {self.name!r}: {message}")


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe)}


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    """`value` as the type `hint` names, or RecipeError. YAML 1.1 reads 1e-3 as a string; accept it."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option, origin)
            except RecipeError:
                continue
        raise RecipeError(f"{origin}: {key}={value!r} is not {_type_name(hint)}")
    if typing.get_origin(hint) is list:
        (item,) = args
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(key, v, item, origin) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{origin}: {key}={value!r} is not {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def from_dict(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    """A `Recipe` from a mapping; unknown keys and wrong types raise RecipeError naming `origin`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    known = _fields()
    unknown = [k for k in data if k not in known]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(known), n=1, cutoff=0.6)
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeError(
            f"{origin}: unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}. "
            f"Known keys: {', '.join(known)}"
        )
    values = {k: _coerce(k, v, known[k], origin) for k, v in data.items()}
    try:
        return Recipe(**values)
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` (value in YAML syntax, e.g. `image_size=[128,160]`, `ema_decay=null`) -> (key, value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"an override is KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.strip(), value


# ------------------------------------------------------------------------------------------------
# Presets and files
# ------------------------------------------------------------------------------------------------


def _preset_dir() -> Path:
    return Path(str(resources.files("lowformer.train") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the built-in presets (`lowformer train --recipe NAME`)."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A preset by name ("b1", "demo") or a YAML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        origin = str(path)
    else:
        path = _preset_dir() / f"{text}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(text, list_recipes(), n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise RecipeError(
                f"unknown recipe {text!r}.{hint} Presets: {', '.join(list_recipes())}; or give a YAML file path"
            )
        origin = f"preset {text!r}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: not valid YAML: {e}") from None
    return from_dict(data or {}, origin=origin)


def recipe_for_model(model: str) -> str | None:
    """The preset written for `model` (its `model:` key), or None."""
    for name in list_recipes():
        data = yaml.safe_load((_preset_dir() / f"{name}.yaml").read_text()) or {}
        if data.get("model") == model:
            return name
    return None
