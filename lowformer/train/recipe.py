"""Training recipes: one flat, typed set of hyperparameters, read from YAML files users can copy.

A recipe file is a YAML mapping of `Recipe` fields. Unknown keys are refused (with the closest
known key suggested): a typo must never silently fall back to a default. The presets in
`recipes/*.yaml` reproduce the official LowFormer configs (`configs/cls/imagenet/*.yaml`, each
merged onto the official `default.yaml`); docs/training.md lists them side by side.

Units, as in the official code: `batch_size` is per process and per micro-step, and `lr` is the
learning rate for that batch. The effective batch is `batch_size x world_size x grad_accum` and the
learning rate is scaled by the same factor (`Recipe.scaled`).

The file machinery is not tied to `Recipe`: `from_dict`, `load_recipe`, `parse_override`,
`merge_for_resume` and `RecipeError` take any dataclass whose `__post_init__` validates by raising
`RecipeError` (a detection or segmentation recipe, say), and their own preset folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import string
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "RUNTIME_KEYS",
    "Recipe",
    "RecipeError",
    "from_dict",
    "list_recipes",
    "load_recipe",
    "merge_for_resume",
    "parse_override",
    "recipe_for_model",
    "show_value",
]

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
        "log_every",
    }
)

R = TypeVar("R")

# How a message names a recipe key and its value: key -> function of the value. The default writes
# `key=value`; the CLI passes the user's own words (`--epochs 1`, `--set lr=0.1`, "from preset 'b0'").
Labels = Mapping[str, Callable[[Any], str]]


def show_value(value: Any) -> str:
    """A value as YAML would write it in a flat recipe: null, true, 20 (not 20.0), [128, 160]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


class RecipeError(ValueError):
    """A recipe file or override is malformed: unknown key, wrong type or value out of range.

    The message names the keys it is about as `{key}` fields, filled from `values`; `relabel` writes
    it again with the names the user gave those values (a flag, `--set`, a file), so a command-line
    user reads `--warmup-epochs 20` where a Python user reads `warmup_epochs=20`.
    """

    def __init__(
        self,
        message: str,
        values: Mapping[str, Any] | None = None,
        *,
        origin: str | None = None,
        labels: Labels | None = None,
    ) -> None:
        self.template = message
        self.values = dict(values or {})
        self.origin = origin
        super().__init__(self._render(labels or {}))

    def _render(self, labels: Labels) -> str:
        text = self.template
        if self.values:
            text = text.format(
                **{k: labels[k](v) if k in labels else f"{k}={show_value(v)}" for k, v in self.values.items()}
            )
        return f"{self.origin}: {text}" if self.origin else text

    def relabel(self, labels: Labels, origin: str | None = None) -> RecipeError:
        """The same error, its keys named by `labels` and prefixed by `origin` (none by default)."""
        return RecipeError(self.template, self.values, origin=origin, labels=labels)


def literal(text: str) -> str:
    """`text` inside a `RecipeError` message template, its braces kept as they are."""
    return text.replace("{", "{{").replace("}", "}}")


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
    log_every: int = 50  # the host reads losses (and checks them) every N optimizer steps, not every step

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
        """Refuse values the trainer cannot honour, with the reason. Image sizes are checked by the
        trainer against the model (`lowformer.factory.check_image_size`), which knows its rule."""
        interps = [self.train_interpolation] if isinstance(self.train_interpolation, str) else self.train_interpolation
        checks = [
            (bool(self.image_size), "{image_size}: give at least one training size"),
            (0 < self.eval_crop_pct <= 1, "{eval_crop_pct} must be in (0, 1]"),
            (
                len(self.rrc_scale) == 2 and 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1,
                "{rrc_scale} must be [min, max] with 0 < min <= max <= 1",
            ),
            (
                len(self.rrc_ratio) == 2 and 0 < self.rrc_ratio[0] <= self.rrc_ratio[1],
                "{rrc_ratio} must be [min, max] with 0 < min <= max",
            ),
            (0 <= self.hflip <= 1, "{hflip} is a probability: it must be in [0, 1]"),
            (0 <= self.random_erase <= 1, "{random_erase} is a probability: it must be in [0, 1]"),
            (self.batch_size >= 1, "{batch_size} must be >= 1"),
            (self.grad_accum >= 1, "{grad_accum} must be >= 1"),
            (self.workers >= 0, "{workers} must be >= 0"),
            (self.epochs >= 1, "{epochs} must be >= 1"),
            (self.warmup_epochs >= 0, "{warmup_epochs} must be >= 0"),
            (
                self.warmup_epochs <= self.epochs,
                "the warm-up, {warmup_epochs}, is longer than the whole run, {epochs}: "
                "shorten the warm-up or train for more epochs",
            ),
            (self.lr > 0, "{lr} must be > 0"),
            (self.warmup_lr >= 0, "{warmup_lr} must be >= 0"),
            (self.min_lr >= 0, "{min_lr} must be >= 0"),
            (len(self.opt_betas) == 2, "{opt_betas} must be [beta1, beta2]"),
            (self.weight_decay >= 0, "{weight_decay} must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "{clip_grad} must be > 0 (or null: no clipping)"),
            (self.clip_mode in ("value", "norm", "agc"), "{clip_mode} must be value, norm or agc"),
            (0 <= self.label_smoothing < 1, "{label_smoothing} must be in [0, 1)"),
            (self.mixup_alpha >= 0, "{mixup_alpha} must be >= 0"),
            (self.cutmix_alpha >= 0, "{cutmix_alpha} must be >= 0"),
            (0 <= self.mixup_prob <= 1, "{mixup_prob} is a probability: it must be in [0, 1]"),
            (0 <= self.mixup_switch_prob <= 1, "{mixup_switch_prob} is a probability: it must be in [0, 1]"),
            (0 <= self.drop_path < 1, "{drop_path} must be in [0, 1)"),
            (self.drop_path_skip >= 0, "{drop_path_skip} must be >= 0"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "{ema_decay} must be in (0, 1) (or null: no EMA)"),
            (self.ema_warmup_steps >= 0, "{ema_warmup_steps} must be >= 0"),
            (
                self.mesa_threshold is None or 0 <= self.mesa_threshold <= 1,
                "{mesa_threshold} is a training progress: it must be in [0, 1] (or null: off)",
            ),
            (
                self.mesa_threshold is None or self.ema_decay is not None,
                "mesa distils from the EMA: {mesa_threshold} needs an EMA, but {ema_decay}",
            ),
            (self.init_std is None or self.init_std > 0, "{init_std} must be > 0 (or null: the model's own init)"),
            (self.reset_bn_samples >= 1, "{reset_bn_samples} must be >= 1"),
            (self.reset_bn_batch_size >= 1, "{reset_bn_batch_size} must be >= 1"),
            (
                self.eval_batch_size is None or self.eval_batch_size >= 1,
                "{eval_batch_size} must be >= 1 (or null: 2 x batch_size)",
            ),
            (self.eval_every >= 1, "{eval_every} must be >= 1"),
            (self.amp in (None, "bf16", "fp16"), "{amp} must be null, bf16 or fp16"),
            (self.checkpoint_every >= 0, "{checkpoint_every} must be >= 0 (0: at the end of each epoch only)"),
            (self.keep_last >= 1, "{keep_last} must be >= 1"),
            (self.log_every >= 1, "{log_every} must be >= 1"),
            (
                self.eval_interpolation in INTERPOLATIONS,
                "{eval_interpolation} must be one of " + ", ".join(INTERPOLATIONS),
            ),
            (
                bool(interps) and all(i in (*INTERPOLATIONS, "random") for i in interps),
                "{train_interpolation} must be one of " + ", ".join(INTERPOLATIONS) + ", 'random' (timm: bilinear "
                "or bicubic) or a list of them (one drawn per image)",
            ),
            (
                self.randaugment is None or self.randaugment.startswith("rand-"),
                "{randaugment} must be a timm RandAugment string like rand-n2-m9",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise self.error(message)

    def error(self, message: str) -> RecipeError:
        """A `RecipeError` about the keys `message` names as `{key}` fields, with their values here."""
        values = {k: getattr(self, k) for k in _fields_named(message)}
        return RecipeError(message, values, origin=f"recipe {self.name!r}")


def _fields_named(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def _fields(cls: type | None = None) -> dict[str, Any]:
    """The fields of a recipe dataclass and their types."""
    cls = Recipe if cls is None else cls
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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
        raise _not_a(key, value, hint, origin)
    if typing.get_origin(hint) is list:
        (item,) = args
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(key, v, item, origin) for v in items]
    if typing.get_origin(hint) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif hint is bool:
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
    raise _not_a(key, value, hint, origin)


def _not_a(key: str, value: Any, hint: Any, origin: str) -> RecipeError:
    return RecipeError(f"{{{key}}} is not {_type_name(hint)}", {key: value}, origin=origin)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def from_dict(data: dict[str, Any], origin: str = "recipe", cls: type[R] | None = None) -> R:
    """A recipe (`Recipe`, or the dataclass `cls`) from a mapping; unknown keys, wrong types and
    invalid values raise RecipeError naming `origin`."""
    cls = Recipe if cls is None else cls
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    known = _fields(cls)
    unknown = [k for k in data if k not in known]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(known), n=1, cutoff=0.6)
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeError(
            literal(
                f"{origin}: unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}. "
                f"Known keys: {', '.join(known)}"
            )
        )
    values = {k: _coerce(k, v, known[k], origin) for k, v in data.items()}
    try:
        return cls(**values)
    except RecipeError as e:
        raise RecipeError(e.template, e.values, origin=origin) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` (value in YAML syntax, e.g. `image_size=[128,160]`, `ema_decay=null`) -> (key, value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(literal(f"an override is KEY=VALUE, got {text!r}"))
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(literal(f"override {text!r}: the value is not valid YAML ({e})")) from None
    return key.strip(), value


def merge_for_resume(
    saved: Mapping[str, Any],
    given: Any,
    explicit: Collection[str],
    runtime_keys: Collection[str] = RUNTIME_KEYS,
    origin: str = "resumed recipe",
    when: str = "resuming (the run would no longer continue exactly)",
) -> Any:
    """The recipe a resumed run continues with: the checkpoint's (`saved`), with the runtime keys the
    user set now (`explicit` names them; their values are `given`'s). Changing any other key is refused:
    the resumed run would no longer continue the interrupted one exactly (an evaluation, `when` it says
    so, would no longer be of the model the checkpoint holds)."""
    changed = sorted(k for k in explicit if k not in runtime_keys and getattr(given, k) != saved.get(k))
    if changed:
        raise RecipeError(
            "cannot change " + ", ".join(f"{{{k}}}" for k in changed) + f" when {literal(when)}; "
            f"only {', '.join(sorted(runtime_keys))} may change",
            {k: getattr(given, k) for k in changed},
        )
    now = {k: getattr(given, k) for k in explicit if k in runtime_keys}
    return from_dict({**saved, **now}, origin, cls=type(given))


# ------------------------------------------------------------------------------------------------
# Presets and files
# ------------------------------------------------------------------------------------------------


def _preset_dir() -> Path:
    return Path(str(resources.files("lowformer.train") / "recipes"))


def list_recipes(preset_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the presets in `preset_dir` (default: the built-in ones, `lowformer train --recipe NAME`)."""
    return sorted(p.stem for p in Path(preset_dir or _preset_dir()).glob("*.yaml"))


def load_recipe(
    name_or_path: str | os.PathLike, preset_dir: str | os.PathLike | None = None, cls: type[R] | None = None
) -> R:
    """A preset by name ("b1", "demo") or a YAML file by path, as a `Recipe` (or as `cls`, with the
    presets of `preset_dir`)."""
    presets = Path(preset_dir or _preset_dir())
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        origin = str(path)
    else:
        path = presets / f"{text}.yaml"
        if not path.is_file():
            names = list_recipes(presets)
            close = difflib.get_close_matches(text, names, n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise RecipeError(
                literal(f"unknown recipe {text!r}.{hint} Presets: {', '.join(names)}; or give a YAML file path")
            )
        origin = f"preset {text!r}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(literal(f"{origin}: not valid YAML: {e}")) from None
    return from_dict(data or {}, origin=origin, cls=cls)


def recipe_for_model(model: str, preset_dir: str | os.PathLike | None = None) -> str | None:
    """The preset written for `model` (its `model:` key), or None."""
    presets = Path(preset_dir or _preset_dir())
    for name in list_recipes(presets):
        data = yaml.safe_load((presets / f"{name}.yaml").read_text()) or {}
        if data.get("model") == model:
            return name
    return None
