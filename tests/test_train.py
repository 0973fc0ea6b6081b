"""Training package, in-process: recipes, data order, the official techniques, checkpoints, and the
failure paths (unreadable images, wrong layout, non-finite loss). Whole runs use a tiny ImageFolder
of digits at 32 px so they take seconds; tests/test_train_e2e.py runs the command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import lowformer
from lowformer.models import list_models
from lowformer.models.lowformer import FusedMBConv, MBConv
from lowformer.train import DataLayoutError, NonFiniteLossError, Recipe, RecipeError, load_recipe, train
from lowformer.train import checkpoint as ckpt_io
from lowformer.train import trainer as trainer_mod
from lowformer.train.augment import PermutedMixup
from lowformer.train.data import StepBatchSampler, digits_arrays, digits_split, eval_batches, load_sources
from lowformer.train.distributed import DistInfo
from lowformer.train.recipe import from_dict, list_recipes, merge_for_resume, parse_override
from lowformer.train.techniques import DropPathSchedule, OfficialEma, apply_drop_path, official_init, reset_bn_stats

# ------------------------------------------------------------------------------------------------
# Helpers (also used by test_train_e2e.py): real digit images in an ImageFolder, a seconds-long recipe
# ------------------------------------------------------------------------------------------------


def make_image_folder(root: Path, classes=(0, 1, 2, 3), per_class_train: int = 16, per_class_val: int = 4) -> Path:
    """root/train/class_<d>/*.png and root/val/class_<d>/*.png from the built-in digits."""
    digits = digits_arrays()
    for split, count, offset in (("train", per_class_train, 0), ("val", per_class_val, per_class_train)):
        for c in classes:
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(digits["labels"] == c)[offset : offset + count]:
                pixels = np.clip(digits["images"][i] * (255 / 16), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{i}.png")
    return root


def tiny_recipe(**changes) -> Recipe:
    """The demo recipe at 32 px with small batches: a run over a few dozen images takes seconds."""
    base = dict(image_size=[32], eval_image_size=32, batch_size=8, eval_batch_size=16, reset_bn_samples=32)
    return load_recipe("demo").replace(**{**base, **changes})


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------


def test_every_preset_loads_and_names_its_model():
    assert {"b0", "b1", "b15", "b3", "e1", "e2", "e3", "demo"} <= set(list_recipes())
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.model is None or recipe.model in list_models()


# official configs/cls/imagenet/*.yaml merged onto default.yaml, key by key
OFFICIAL = {
    "b0": dict(batch_size=170, lr=3.32e-4, grad_accum=1, randaugment="rand-n1-m3-mstd1.0-inc1", random_erase=0.0,
               mixup_alpha=0.1, drop_path=0.05, drop_path_skip=0, mesa_threshold=None),
    "b1": dict(batch_size=128, lr=2.5e-4, grad_accum=1, randaugment="rand-n1-m3-mstd1.0-inc1", random_erase=0.0,
               mixup_alpha=0.1, drop_path=0.05, drop_path_skip=0, mesa_threshold=None),
    "b15": dict(batch_size=170, lr=1.66e-4, grad_accum=1, randaugment="rand-n2-m6-mstd1.0-inc1", random_erase=0.0,
                mixup_alpha=0.3, drop_path=0.1, drop_path_skip=0, mesa_threshold=None),
    "b3": dict(batch_size=75, lr=9.4e-5, grad_accum=4, randaugment="rand-n2-m5-mstd1.0-inc1", random_erase=0.2,
               mixup_alpha=0.2, drop_path=0.1, drop_path_skip=2, mesa_threshold=0.25),
    "e1": dict(batch_size=100, lr=1e-4, grad_accum=2, randaugment="rand-n2-m6-mstd1.0-inc1", random_erase=0.0,
               mixup_alpha=0.3, drop_path=0.1, drop_path_skip=0, mesa_threshold=None),
    "e2": dict(batch_size=50, lr=1e-4, grad_accum=4, randaugment="rand-n2-m5-mstd1.0-inc1", random_erase=0.2,
               mixup_alpha=0.2, drop_path=0.1, drop_path_skip=1, mesa_threshold=0.25),
    "e3": dict(batch_size=50, lr=6.25e-5, grad_accum=8, randaugment="rand-n2-m5-mstd1.0-inc1", random_erase=0.2,
               mixup_alpha=0.3, drop_path=0.1, drop_path_skip=2, mesa_threshold=0.25),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_presets_match_the_official_configs(name):
    r = load_recipe(name)
    for key, value in OFFICIAL[name].items():
        assert getattr(r, key) == pytest.approx(value) if isinstance(value, float) else getattr(r, key) == value, key
    # default.yaml, shared by all
    assert (r.epochs, r.warmup_epochs, r.image_size, r.eval_image_size) == (320, 20, [128, 160, 192, 224], 224)
    assert (r.eval_crop_pct, r.eval_interpolation, r.weight_decay, r.clip_grad, r.clip_mode) == (
        0.95, "bicubic", 0.1, 2.0, "value")  # fmt: skip
    assert (r.bce, r.label_smoothing, r.cutmix_alpha, r.mixup_switch_prob, r.ema_decay) == (
        True, 0.1, r.mixup_alpha, 0.5, 0.9998)  # fmt: skip
    assert r.reset_bn and (r.reset_bn_samples, r.reset_bn_batch_size) == (16000, 100)
    assert r.train_interpolation == ["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**load_recipe("demo").to_dict(), "warmup_epoch": 3}))
    with pytest.raises(RecipeError, match=r"unknown recipe key 'warmup_epoch' \(did you mean 'warmup_epochs'\?\)"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="did you mean 'label_smoothing'"):
        Recipe().replace(label_smooth=0.1)


@pytest.mark.parametrize(
    "changes, text",
    [
        ({"batch_size": "big"}, "batch_size=big is not int"),
        ({"amp": "fp8"}, "amp=fp8 must be null, bf16 or fp16"),
        ({"image_size": []}, "give at least one training size"),
        ({"mesa_threshold": 0.2, "ema_decay": None}, "mesa_threshold=0.2 needs an EMA, but ema_decay=null"),
        ({"warmup_epochs": 5, "epochs": 3}, "the warm-up, warmup_epochs=5, is longer than the whole run, epochs=3"),
    ],
)
def test_bad_values_are_refused(changes, text):
    with pytest.raises(RecipeError, match=re.escape(text)):
        Recipe().replace(**changes)


def test_recipe_errors_name_keys_the_way_the_caller_gave_them():
    with pytest.raises(RecipeError) as info:
        load_recipe("b0").replace(epochs=1)
    labels = {"epochs": lambda v: f"--epochs {v}", "warmup_epochs": lambda v: f"preset b0's {v}"}
    assert str(info.value.relabel(labels)) == (
        "the warm-up, preset b0's 20.0, is longer than the whole run, --epochs 1: "
        "shorten the warm-up or train for more epochs"
    )
    # a value with braces in it is text, not a format field
    with pytest.raises(RecipeError, match=re.escape("randaugment={x} must be a timm RandAugment string")):
        Recipe().replace(randaugment="{x}")


def test_the_recipe_file_machinery_takes_any_recipe_dataclass(tmp_path):
    @dataclasses.dataclass
    class DetRecipe:
        name: str = "det"
        epochs: int = 12
        lr: float = 0.01

        def __post_init__(self):
            if self.epochs < 1:
                raise RecipeError("{epochs} must be >= 1", {"epochs": self.epochs})

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "retina.yaml").write_text("name: retina\nepochs: 24\n")
    assert list_recipes(tmp_path / "presets") == ["retina"]
    assert load_recipe("retina", preset_dir=tmp_path / "presets", cls=DetRecipe) == DetRecipe("retina", 24, 0.01)
    with pytest.raises(RecipeError, match="unknown recipe key 'epoch' \\(did you mean 'epochs'\\?\\)"):
        from_dict({"epoch": 1}, cls=DetRecipe)
    with pytest.raises(RecipeError, match="override: epochs=0 must be >= 1"):
        from_dict({"epochs": 0}, origin="override", cls=DetRecipe)
    with pytest.raises(RecipeError, match="cannot change lr=0.5 when resuming"):
        merge_for_resume({"epochs": 24, "lr": 0.01}, DetRecipe(lr=0.5), {"lr"}, runtime_keys={"name"})


def test_yaml_details_and_overrides():
    r = from_dict({"lr": "1e-3", "image_size": 64, "train_interpolation": "random"})  # YAML 1.1 reads 1e-3 as str
    assert r.lr == 1e-3 and r.image_size == [64]
    assert parse_override("image_size=[128, 160]") == ("image_size", [128, 160])
    assert parse_override("ema_decay=null") == ("ema_decay", None)
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("lr")
    with pytest.raises(RecipeError, match="Did you mean b1"):
        load_recipe("b11")


def test_scaling_rule_multiplies_batch_and_lr_by_processes_and_accumulation():
    r = load_recipe("b3")
    assert r.scaled(world_size=8) == (75 * 8 * 4, pytest.approx(9.4e-5 * 8 * 4))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_and_stratified():
    train_a, val_a = digits_split()
    train_b, val_b = digits_split()
    assert (len(train_a), len(val_a)) == (1437, 360)
    assert np.array_equal(val_a.labels, val_b.labels) and np.array_equal(val_a.images, val_b.images)
    assert np.bincount(val_a.labels).min() >= 35  # every digit held out
    image, label = val_a.load(0)
    assert image.mode == "RGB" and image.size == (8, 8) and 0 <= label < 10


def test_the_shipped_digits_are_scikit_learns_with_its_split():
    """digits.npz replaces `sklearn.datasets.load_digits` (no dependency for the demo): same images,
    labels and order, and the split `train_test_split` makes."""
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split

    ref, shipped = datasets.load_digits(), digits_arrays()
    assert shipped["images"].dtype == np.uint8 and np.array_equal(shipped["images"], ref.images)
    assert np.array_equal(shipped["labels"], ref.target)
    train_idx, test_idx = train_test_split(
        np.arange(len(ref.target)), test_size=0.2, random_state=0, stratify=ref.target
    )
    assert np.array_equal(shipped["train_index"], train_idx) and np.array_equal(shipped["test_index"], test_idx)


def test_sampler_is_the_same_for_processes_and_accumulation():
    """2 processes x 1 accumulation step read exactly the micro-batches of 1 process x 2 steps."""
    common = dict(num_samples=100, batch_size=8, resolutions=[128, 160, 224], seed=3, epoch=1)
    single = list(StepBatchSampler(**common, world_size=1, grad_accum=2))
    rank0 = list(StepBatchSampler(**common, world_size=2, rank=0))
    rank1 = list(StepBatchSampler(**common, world_size=2, rank=1))
    assert len(single) == 2 * len(rank0) == 12  # 6 steps of 16 images; 4 images dropped
    assert single[0::2] == rank0 and single[1::2] == rank1
    flat = [i for batch in single for i, _, _ in batch]
    assert len(set(flat)) == len(flat) == 96
    # one resolution per optimizer step, drawn from the list
    assert all(len({s for _, s, _ in b}) == 1 for b in single)
    assert {single[2 * t][0][1] for t in range(6)} <= {128, 160, 224}
    # a resumed epoch skips the steps already done and continues identically
    assert list(StepBatchSampler(**common, world_size=1, grad_accum=2, start_step=4)) == single[8:]
    assert list(StepBatchSampler(**{**common, "epoch": 2}, world_size=1, grad_accum=2)) != single


def test_eval_batches_cover_every_image_once():
    shares = [b for r in range(3) for b in eval_batches(10, 2, world_size=3, rank=r)]
    assert sorted(i for b in shares for i in b) == list(range(10))


def test_wrong_layout_says_what_was_expected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataLayoutError, match=r"train is missing\. Expected DIR/train/<class>/<image>"):
        load_sources(tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="class folders but no images"):
        load_sources(tmp_path)
    with pytest.raises(DataLayoutError, match="data directory not found"):
        load_sources(tmp_path / "nope")


def test_an_empty_class_folder_is_an_error_not_a_class(tmp_path):
    make_image_folder(tmp_path, classes=(0, 1), per_class_train=2, per_class_val=1)
    (tmp_path / "train" / "class_9").mkdir()
    (tmp_path / "train" / "class_9" / "notes.txt").write_text("not an image")
    with pytest.raises(DataLayoutError, match=r"train has empty class folders: class_9 .*remove the folders"):
        load_sources(tmp_path)
    (tmp_path / "train" / "class_9" / "notes.txt").unlink()
    (tmp_path / "train" / "class_9").rmdir()
    (tmp_path / "val" / "class_1" / next((tmp_path / "val" / "class_1").iterdir()).name).unlink()
    with pytest.raises(DataLayoutError, match="val has empty class folders: class_1"):
        load_sources(tmp_path)


def test_val_classes_must_be_the_training_ones(tmp_path):
    make_image_folder(tmp_path, classes=(0, 1), per_class_train=2, per_class_val=1)
    (tmp_path / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "z.png")
    with pytest.raises(DataLayoutError, match="classes the training split does not: zebra"):
        load_sources(tmp_path)


# ------------------------------------------------------------------------------------------------
# The official techniques
# ------------------------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_and_biases_as_the_official_rule():
    """timm's filter (1-d parameters and biases) equals the official no_wd_keys [norm, bias] here."""
    for name in list_models():
        model = lowformer.create_model(name)
        timm_rule = {k for k, p in model.named_parameters() if p.ndim <= 1 or k.endswith(".bias")}
        official = {k for k, _ in model.named_parameters() if "norm" in k or "bias" in k}
        assert timm_rule == official, name


def test_drop_path_on_stages_only_linear_with_skip_and_scheduled():
    model = lowformer.create_model("lowformer_b3")
    rates = apply_drop_path(model, "lowformer", 0.1, skip=2)
    assert rates[:2] == [0.0, 0.0] and rates[-1] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(rates[2:], rates[3:]))
    assert isinstance(model.stem.blocks[0].drop_path, torch.nn.Identity)  # the official skips the stem
    schedule = DropPathSchedule(model)
    assert len(schedule.sites) == len(rates) - 2
    schedule.update(0.5)
    assert schedule.sites[-1][0].drop_prob == pytest.approx(0.05)
    schedule.update(2.0)
    assert schedule.sites[-1][0].drop_prob == pytest.approx(0.1)


def test_official_init_starts_residual_conv_blocks_as_identity():
    model = lowformer.create_model("lowformer_b1").eval()
    official_init(model, std=0.02, zero_last_gamma=True)
    blocks = [m for m in model.modules() if isinstance(m, (FusedMBConv, MBConv)) and getattr(m, "has_skip", True)]
    assert len(blocks) >= 5
    for block in blocks:
        x = torch.randn(2, block.conv_pwl.conv.out_channels, 8, 8)
        assert torch.equal(block(x), x)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 10_000]
    assert all(abs(w.std().item() - 0.02) < 0.002 for w in convs)  # nn.init.trunc_normal_(std=0.02), as official
    # blocks without a shortcut keep their init: there is no identity for them to start as
    no_skip = [m for m in model.modules() if isinstance(m, FusedMBConv) and not m.has_skip]
    assert no_skip and all(m.conv_pwl.norm.weight.abs().min() > 0 for m in no_skip)


def test_official_init_asks_each_block_through_its_hook():
    """Generic code calls `zero_init_last()` wherever a module has one (timm's convention)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(4, 4, 1)
            self.calls = 0

        def zero_init_last(self):
            self.calls += 1
            torch.nn.init.zeros_(self.proj.weight)

    model = torch.nn.Sequential(Block(), torch.nn.Sequential(Block()), torch.nn.Conv2d(4, 4, 1))
    official_init(model, zero_last_gamma=True)
    assert [model[0].calls, model[1][0].calls] == [1, 1]
    assert not model[0].proj.weight.any() and model[2].weight.any()
    official_init(model, zero_last_gamma=False)
    assert model[0].calls == 1 and model[0].proj.weight.any()


def test_ema_decay_warms_up_as_the_official():
    ema = OfficialEma(torch.nn.Linear(2, 2), decay=0.9998, warmup_steps=2000)
    assert ema.get_decay(0) == 0.0
    assert ema.get_decay(2000) == pytest.approx(0.9998 * (1 - np.exp(-1)))
    assert ema.get_decay(10**7) == pytest.approx(0.9998)


def test_reset_bn_stats_are_the_data_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).eval()
    batches = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(4)]
    seen = reset_bn_stats(model, batches, DistInfo())
    assert seen == 32 and not model.training and not model[1].training
    feats = torch.cat([model[0](b) for b in batches])
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([model[0](b).var((0, 2, 3)) for b in batches]).mean(0)  # unbiased, per batch
    assert torch.allclose(model[1].running_var, per_batch_var, rtol=1e-4)


def test_permuted_mixup_handles_odd_batches_and_keeps_labels_normalised():
    mix = PermutedMixup(mixup_alpha=0.2, cutmix_alpha=0.2, label_smoothing=0.1, num_classes=10)
    x, y = torch.randn(75, 3, 8, 8), torch.randint(0, 10, (75,))
    x2, t = mix(x.clone(), y)
    assert x2.shape == x.shape and t.shape == (75, 10)
    assert torch.allclose(t.sum(-1), torch.ones(75))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def test_checkpoint_roundtrip_weights_only_rng_and_pruning(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    state = {"format": ckpt_io.FORMAT, "rng": ckpt_io.capture_rng(), "x": torch.arange(3)}
    expected = (torch.rand(2), np.random.rand(2))
    for step in (1, 2, 3):
        ckpt_io.save(state, tmp_path / ckpt_io.step_name(step))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    ckpt_io.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["checkpoint-00000002.pt", "checkpoint-00000003.pt"]
    loaded = ckpt_io.load(tmp_path / "checkpoint-00000003.pt")  # weights_only=True inside
    ckpt_io.restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(lowformer.CheckpointError, match="not a lowformer training checkpoint"):
        ckpt_io.load(tmp_path / "plain.pt")


# ------------------------------------------------------------------------------------------------
# Runs: unreadable images, fine-tuning, non-finite loss
# ------------------------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", classes=(0, 1, 2), per_class_train=8, per_class_val=3)
    (data / "train" / "class_1" / "broken.png").write_bytes(b"not an image")
    (data / "train" / "class_2" / "empty.jpg").write_bytes(b"")
    (data / "val" / "class_0" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with caplog.at_level(logging.WARNING, logger="lowformer.train"):
        result = train(
            "lowformer_b0", tiny_recipe(epochs=1), data_dir=data, output_dir=tmp_path / "run", progress=False
        )
    assert result.skipped_images == 3  # 2 in training (replaced), 1 in evaluation (left out)
    assert result.history[0]["skipped_images"] == 3
    assert "broken.png" in caplog.text and "truncated.png" in caplog.text
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].split(",")[-1] == "skipped_images" and log[1].endswith(",3")


def test_finetune_from_any_checkpoint_with_new_classes(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", classes=(3, 5), per_class_train=8, per_class_val=2)
    source = lowformer.create_model("lowformer_b0")  # a 1000-class model, saved as a plain state dict
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    with caplog.at_level(logging.WARNING):
        result = train(
            "lowformer_b0",
            tiny_recipe(epochs=1, lr=1e-4),
            data_dir=data,
            output_dir=tmp_path / "run",
            init_checkpoint=tmp_path / "imagenet.pth",
            progress=False,
        )
    assert "does not fit num_classes=2" in caplog.text  # the 1000-class head was dropped on purpose
    state = ckpt_io.load(result.best_checkpoint)
    assert state["state_dict"]["head.fc.weight"].shape[0] == 2 and state["classes"] == ["class_3", "class_5"]
    model = lowformer.load_model(tmp_path / "run" / "best.safetensors")  # the exported deploy file
    assert model.num_classes == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=16, per_class_val=2)
    real = trainer_mod.train_criterion
    calls = {"n": 0}

    def poisoned(recipe, soft_targets):
        loss_fn = real(recipe, soft_targets)

        def forward(logits, target):
            calls["n"] += 1
            loss = loss_fn(logits, target)
            return loss * float("nan") if calls["n"] == 5 else loss

        return forward

    monkeypatch.setattr(trainer_mod, "train_criterion", poisoned)
    recipe = tiny_recipe(epochs=1, batch_size=4, checkpoint_every=2)  # 8 steps
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1, step 5 .*last\.pt, optimizer step 4\)"):
        train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", progress=False)
    state = ckpt_io.load(tmp_path / "run" / "last.pt")
    assert state["global_step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list((tmp_path / "run").glob("checkpoint-0000000[5-9].pt"))


def test_resume_refuses_changes_that_would_alter_the_run(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=4, per_class_val=1)
    recipe = tiny_recipe(epochs=1, batch_size=4)
    train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", progress=False)
    with pytest.raises(RecipeError, match="cannot change lr=1 when resuming"):
        train(
            None, recipe.replace(lr=1.0), data_dir=data, output_dir=tmp_path / "run", resume="auto",
            explicit_keys={"lr"}, progress=False,
        )  # fmt: skip


def test_an_official_preset_runs_with_every_technique(tmp_path):
    """The B3 recipe (mixup/cutmix, BCE, EMA, mesa, drop path with skip, multi-resolution, RandAugment,
    random erasing, six random interpolations, accumulation 4, an odd batch) shrunk to seconds."""
    data = make_image_folder(tmp_path / "data", classes=(0, 1, 2), per_class_train=10, per_class_val=2)
    recipe = load_recipe("b3").replace(
        image_size=[32, 40], eval_image_size=32, batch_size=7, epochs=1, warmup_epochs=0, workers=0,
        eval_batch_size=16, reset_bn_samples=16, mesa_threshold=0.0,
    )  # fmt: skip
    result = train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", progress=False)
    (row,) = result.history
    assert row["train_top1"] is None and np.isfinite(row["train_loss"])  # mixed targets: no training top-1
    state = ckpt_io.load(result.last_checkpoint)
    assert state["ema"] is not None and state["global_step"] == 1  # 30 images // (7 x 4)
    assert all(torch.equal(state["state_dict"][k], state["ema"][k]) for k in state["ema"])


def test_bf16_channels_last_and_gradient_checkpointing(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=8, per_class_val=2)
    recipe = tiny_recipe(epochs=1, amp="bf16", channels_last=True, grad_checkpointing=True)
    result = train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", progress=False)
    assert np.isfinite(result.history[0]["train_loss"]) and result.best_top1 is not None


def test_eval_any_checkpoint_format_on_an_image_folder(tmp_path, capsys):
    """A plain state dict (no recipe inside): the model's data config (224, crop 0.95, bicubic) is used."""
    from lowformer.cli import main

    data = make_image_folder(tmp_path / "data", classes=(0, 1, 2), per_class_train=1, per_class_val=3)
    torch.save(lowformer.create_model("lowformer_b0", num_classes=3).state_dict(), tmp_path / "w.pth")
    args = ["eval", "--model", "lowformer_b0", "--checkpoint", str(tmp_path / "w.pth"), "--data", str(data)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["image_size"], result["crop_pct"], result["interpolation"]) == (
        9, 224, 0.95, "bicubic")  # fmt: skip
    assert result["topk"] == 3 and result["top5"] == 100.0  # top-k is capped at the class count
    assert main([*args[:-1], str(tmp_path)]) == 2  # no val/ there
    assert "val is missing" in capsys.readouterr().err


def test_tensorboard_gets_every_epoch_metric_and_the_loss_and_lr_of_every_step(tmp_path, monkeypatch):
    import sys
    import types

    scalars: dict[str, dict[int, float]] = {}

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an extra)
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.setdefault(tag, {})[step] = value

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=12, per_class_val=1)
    result = train("lowformer_b0", tiny_recipe(epochs=1, log_every=2), data_dir=data, output_dir=tmp_path / "run",
                   tensorboard=True, progress=False)  # fmt: skip
    (row,) = result.history
    for key in ("train_loss", "train_top1", "val_top1", "val_top5", "lr", "train_img_s"):
        assert scalars[key] == {1: row[key]}, key  # x axis: the epoch
    # per step (x axis: the optimizer step): 24 images / batch 8 = 3 steps, read in two syncs
    assert sorted(scalars["step/loss"]) == sorted(scalars["step/lr"]) == [1, 2, 3]
    assert np.mean(list(scalars["step/loss"].values())) == pytest.approx(row["train_loss"], abs=1e-6)
    # the lr each update used: warm-up (0.3 epochs = 1 update) from warmup_lr 0, then the peak, then the cosine
    assert [scalars["step/lr"][t] for t in (1, 2)] == [0.0, pytest.approx(0.002)] and scalars["step/lr"][3] < 0.002


# ------------------------------------------------------------------------------------------------
# Run lifecycle: signals and the resume command
# ------------------------------------------------------------------------------------------------


def test_a_signal_delivered_twice_counts_once_and_a_later_one_stops_at_once():
    import os
    import signal
    import time

    from lowformer.train.lifecycle import StopSignals

    with StopSignals(repeat_window_s=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the Ctrl-C its workers already got
        time.sleep(0.05)
        assert stop.requested and stop.exit_code == 130
        time.sleep(0.5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user pressing Ctrl-C again
            time.sleep(0.5)


def test_the_resume_command_starts_the_run_as_it_was_started(monkeypatch):
    from lowformer.train.lifecycle import resume_command

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert resume_command("train", "runs/my run/last.pt", ["--device", "cpu"]) == (
        "lowformer train --resume 'runs/my run/last.pt' --device cpu"
    )
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command("train", "r/last.pt") == "torchrun --nproc-per-node 8 -m lowformer train --resume r/last.pt"
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert resume_command("train", "r/last.pt").startswith("torchrun --nproc-per-node 8 --nnodes 2 <your rendezvous")
