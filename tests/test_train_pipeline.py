"""The input pipeline's device half and the loop's synchronisation: values kept on the device
(`DeviceLog`), uint8 batches normalised there (`DeviceBatches`), training steps that never wait for
the device, GPU JPEG decoding's validation, plans and fallbacks (run here with the CPU decoder: the
same code, `torchvision.io.decode_jpeg(device="cpu")`), and the W&B tracker."""

from __future__ import annotations

import io
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_image_folder, tiny_recipe
from torchvision import transforms as T

from lowformer.cli import main
from lowformer.train import NonFiniteLossError, load_recipe, train
from lowformer.train import checkpoint as ckpt_io
from lowformer.train import trainer as trainer_mod
from lowformer.train.augment import eval_transform, train_transform
from lowformer.train.data import EvalDataset, FolderSource, TrainDataset, collate
from lowformer.train.metrics import DeviceLog, first_non_finite
from lowformer.train.pipeline import (
    DeviceBatches,
    EncodedImage,
    check_gpu_decode,
    decode_on_device,
    empty_batch,
    gpu_decode_parts,
    plan_blocker,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# Values on the device, read in one transfer
# ------------------------------------------------------------------------------------------------


def test_device_log_reads_everything_added_in_one_transfer_in_order():
    log = DeviceLog()
    for step in range(1, 4):
        log.add(step, [torch.tensor(step / 2), torch.tensor(step * 3), 7])
    entries = log.collect()
    assert [e.key for e in entries] == [1, 2, 3] and entries[2].values == (1.5, 9.0, 7.0)
    assert len(log) == 0 and log.collect() == []
    assert first_non_finite(entries) is None
    log.add(4, [torch.tensor(1.0)])
    log.add(5, [torch.tensor(float("inf"))])
    log.add(6, [torch.tensor(float("nan"))])
    assert first_non_finite(log.collect()).key == 5


def test_device_batches_normalise_as_to_tensor_and_normalize_and_keep_the_paths_in_order():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(4), ["a.jpg"]),
        (empty_batch(), torch.empty(0, dtype=torch.long), ["b.jpg", "c.jpg"]),  # nothing readable
        (torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(2), []),
    ]
    out = list(DeviceBatches(MEAN, STD, torch.device("cpu"), channels_last=True)(batches))
    assert [paths for _, _, paths in out] == [["a.jpg"], ["b.jpg", "c.jpg"], []]
    reference = T.Normalize(MEAN, STD)
    for (uint8, labels, _), (images, labels_out, _) in zip(batches, out):
        assert images.dtype == torch.float32 and torch.equal(labels_out, labels)
        if uint8.numel():
            assert images.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(images, reference(uint8.float() / 255), atol=1e-6, rtol=1e-5)


def _spy_on_device_reads(monkeypatch) -> list[str]:
    """Record every read of a tensor's value (`.item()`, `.tolist()`, `bool()`, `float()`, `.cpu()`,
    `.numpy()`) made by the trainer, the models or timm while a training step runs. On a GPU each is a
    wait for the device. The optimizer's own `.item()` of its CPU step counter is not one."""
    reads: list[str] = []
    inside = {"step": False}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside["step"] and ("lowformer" in caller or "timm" in caller):
                reads.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for step_fn in ("_forward_backward", "_optimizer_step"):
        original = getattr(trainer_mod, step_fn)

        def during_step(*args, _original=original, **kwargs):
            inside["step"] = True
            try:
                return _original(*args, **kwargs)
            finally:
                inside["step"] = False

        monkeypatch.setattr(trainer_mod, step_fn, during_step)
    return reads


def test_a_training_step_never_waits_for_the_device_and_the_host_reads_once_per_log_interval(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=20, per_class_val=1)
    syncs = []
    real_collect = DeviceLog.collect

    def counted_collect(self):
        entries = real_collect(self)
        syncs.append([e.key.step for e in entries])
        return entries

    monkeypatch.setattr(DeviceLog, "collect", counted_collect)
    reads = _spy_on_device_reads(monkeypatch)
    # mixup and random erasing on: every per-step piece of the B3 recipe runs on the device
    recipe = tiny_recipe(epochs=1, batch_size=4, log_every=4, mixup_alpha=0.2, cutmix_alpha=0.2, random_erase=0.5)
    result = train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", progress=False)
    assert reads == []
    # 40 images / 4 = 10 steps: read at steps 4 and 8 (log_every) and 10 (the end of the epoch)
    assert syncs == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert np.isfinite(result.history[0]["train_loss"])


def test_a_non_finite_loss_between_syncs_stops_the_run_naming_its_step(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=16, per_class_val=1)
    real = trainer_mod.train_criterion
    calls = {"n": 0}

    def poisoned(recipe, soft_targets):
        loss_fn = real(recipe, soft_targets)

        def forward(logits, target):
            calls["n"] += 1
            return loss_fn(logits, target) * (float("nan") if calls["n"] == 2 else 1.0)

        return forward

    monkeypatch.setattr(trainer_mod, "train_criterion", poisoned)
    recipe = tiny_recipe(epochs=1, batch_size=4, log_every=5)  # 8 steps: the host reads at step 5
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1, step 2 \(optimizer step 2, lr "):
        train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", progress=False)
    assert calls["n"] == 5  # it ran on to the sync, within one log interval
    assert not ckpt_io.find_checkpoints(tmp_path / "run")  # and nothing was saved after the bad step


def test_a_run_resumed_between_syncs_with_device_erasing_and_mixing_ends_bit_identical(tmp_path):
    """Random erasing and mixing on the device, seeded per micro-batch; a checkpoint (step 2) that is
    not at a log interval (3): the resumed run's weights, EMA and metrics equal the uninterrupted one's."""
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=12, per_class_val=2)
    recipe = tiny_recipe(epochs=2, batch_size=4, log_every=3, checkpoint_every=2, keep_last=100, ema_decay=0.99,
                         random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=0.2)  # fmt: skip
    ref = train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "ref", progress=False)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint-00000002.pt").write_bytes((tmp_path / "ref" / "checkpoint-00000002.pt").read_bytes())
    run = train(None, recipe, output_dir=resumed, resume=resumed / "checkpoint-00000002.pt", progress=False)
    a, b = ckpt_io.load(tmp_path / "ref" / "last.pt"), ckpt_io.load(resumed / "last.pt")
    assert a["global_step"] == b["global_step"] == 12
    for part in ("model", "ema", "state_dict"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    timings = ("train_img_s", "epoch_s")
    strip = [{k: v for k, v in row.items() if k not in timings} for row in run.history]
    assert strip == [{k: v for k, v in row.items() if k not in timings} for row in ref.history]


# ------------------------------------------------------------------------------------------------
# GPU JPEG decoding: validation, plans, fallbacks (with the CPU decoder)
# ------------------------------------------------------------------------------------------------


def _photo(seed: int, size=(160, 120)) -> Image.Image:
    """An image with structure everywhere (gradients, a box, noise), so a different crop or flip shows."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 9 + yy / 13)], axis=-1)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jpeg_folder(root: Path, count: int = 6) -> FolderSource:
    samples = []
    root.mkdir(parents=True)
    for i in range(count):
        path = root / f"{i}.jpg"
        _photo(i).save(path, quality=95)
        samples.append((str(path), i % 2))
    return FolderSource(samples, ["a", "b"])


def test_gpu_decode_is_refused_without_a_cuda_device_or_image_files(tmp_path, capsys):
    with pytest.raises(ValueError, match="nvJPEG on a CUDA device, and this process runs on cpu"):
        check_gpu_decode(torch.device("cpu"), tmp_path)
    with pytest.raises(ValueError, match="the built-in digits are arrays in memory"):
        check_gpu_decode(torch.device("cuda"), None)
    rc = main(["train", "--model", "lowformer_b0", "--gpu-decode", "--device", "cpu", "--output", str(tmp_path / "r")])
    assert rc == 2 and "--gpu-decode decodes JPEGs with nvJPEG on a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_gpu_decode_is_used_where_the_recipes_transforms_allow_it(caplog):
    b1 = load_recipe("b1")  # RandAugment and the official six interpolations: training stays on the CPU
    parts = {
        "training": train_transform(b1, 224, MEAN),
        "evaluation": eval_transform(b1.eval_image_size, b1.eval_crop_pct, b1.eval_interpolation),
    }
    with caplog.at_level(logging.WARNING):
        assert gpu_decode_parts(parts) == {"evaluation"}
    assert (
        "the training images are decoded on the CPU as usual: its crop resamples with box, hamming, lanczos, "
        "which exist for PIL images only; RandAugment works on PIL images only"
    ) in caplog.text
    no_randaugment = b1.replace(randaugment=None)
    assert "box, hamming, lanczos, which exist for PIL images only" in plan_blocker(
        train_transform(no_randaugment, 224, MEAN)
    )
    plain = no_randaugment.replace(train_interpolation="random")  # timm's random: bilinear or bicubic
    assert plan_blocker(train_transform(plain, 224, MEAN)) is None
    with pytest.raises(ValueError, match="cannot be used with this recipe .*the evaluation transform: its resize uses"):
        gpu_decode_parts({"training": parts["training"], "evaluation": eval_transform(224, 0.95, "lanczos")})


def _decode_cpu(batch, dataset=None):
    images, labels, bad = collate(batch)
    recover = dataset.replacement if dataset is not None else (lambda image: None)
    return decode_on_device(images, labels, torch.device("cpu"), recover), bad


def test_device_decoding_picks_the_crops_and_flips_the_cpu_transform_picks(tmp_path):
    source = _jpeg_folder(tmp_path / "jpegs")
    recipe = tiny_recipe(train_interpolation=["bilinear", "bicubic"], hflip=0.5, rrc_scale=[0.3, 1.0])
    transforms = {48: train_transform(recipe, 48, MEAN)}
    on_cpu, encoded = TrainDataset(source, transforms), TrainDataset(source, transforms, encoded=True)
    items = [(i, 48, 1000 + i) for i in range(len(source))]
    expected = torch.stack([on_cpu[item][0] for item in items])
    batch = [encoded[item] for item in items]
    assert all(isinstance(image, EncodedImage) for image, _, _ in batch)  # the workers only read bytes
    (images, labels, bad), _ = _decode_cpu(batch, encoded)
    assert images.dtype == torch.uint8 and images.shape == expected.shape and bad == []
    assert labels.tolist() == [i % 2 for i in range(len(source))]
    diff = (images.float() - expected.float()).abs().mean(dim=(1, 2, 3))
    # another decoder and resampler: a few grey levels apart. Other seeds (another crop) are far apart:
    other = torch.stack([on_cpu[(i, 48, 7 + i)][0] for i in range(len(source))])
    assert diff.max() < 3, diff
    assert (other.float() - expected.float()).abs().mean(dim=(1, 2, 3)).min() > 3 * diff.max()

    evaluation = eval_transform(40, 0.875, "bicubic")
    expected = torch.stack([EvalDataset(source, evaluation)[i][0] for i in range(len(source))])
    (images, _, _), _ = _decode_cpu([EvalDataset(source, evaluation, encoded=True)[i] for i in range(len(source))])
    assert images.shape == expected.shape and (images.float() - expected.float()).abs().mean() < 3


def test_device_decoding_falls_back_per_file(tmp_path):
    """A PNG is decoded by the worker; a JPEG whose body is broken (header fine) is replaced by the next
    readable image in training and left out in evaluation, and reported either way."""
    source = _jpeg_folder(tmp_path / "jpegs", count=4)
    png = tmp_path / "jpegs" / "1.png"
    _photo(1).save(png)
    source.samples[1] = (str(png), 1)
    broken = Path(source.samples[2][0])
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    recipe = tiny_recipe(hflip=0.0)
    transforms = {32: train_transform(recipe, 32, MEAN)}
    on_cpu, encoded = TrainDataset(source, transforms), TrainDataset(source, transforms, encoded=True)

    image, label, _ = encoded[(1, 32, 5)]
    assert isinstance(image, torch.Tensor) and torch.equal(image, on_cpu[(1, 32, 5)][0]) and label == 1
    batch = [encoded[(i, 32, 5)] for i in range(4)]
    assert isinstance(batch[2][0], EncodedImage)  # its header reads: only decoding finds the damage
    (images, labels, bad), _ = _decode_cpu(batch, encoded)
    assert bad == [str(broken)] and images.shape[0] == 4
    assert labels[2] == 1 and torch.equal(images[2], on_cpu[(3, 32, 5)][0])  # the next readable image, on the CPU

    evaluation = eval_transform(32, 1.0, "bilinear")
    (images, labels, bad), _ = _decode_cpu([EvalDataset(source, evaluation, encoded=True)[i] for i in range(4)])
    assert bad == [str(broken)] and images.shape[0] == 3 and labels.tolist() == [0, 1, 1]


def test_an_all_unreadable_batch_on_the_device_is_empty(tmp_path):
    source = _jpeg_folder(tmp_path / "jpegs", count=1)
    path = Path(source.samples[0][0])
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 40])  # the header and a little: neither decoder reads it
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.size == (160, 120)
    (images, labels, bad), _ = _decode_cpu([EvalDataset(source, eval_transform(32, 1.0, "bilinear"), encoded=True)[0]])
    assert images.shape[0] == 0 and labels.numel() == 0 and bad == [str(path)]


# ------------------------------------------------------------------------------------------------
# Weights & Biases
# ------------------------------------------------------------------------------------------------


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records `init` arguments and every `log` call."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or "run-1"

            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_the_loss_and_lr_of_every_step_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=8, per_class_val=1)
    recipe = tiny_recipe(epochs=2, log_every=1)  # 2 steps per epoch
    result = train("lowformer_b0", recipe, data_dir=data, output_dir=tmp_path / "run", wandb="proj", progress=False)
    (init,) = fake.inits
    assert init["project"] == "proj" and init["dir"] == str(tmp_path / "run") and init["config"]["log_every"] == 1
    steps = [(step, v) for step, v in fake.logged if "train/loss" in v]
    assert [step for step, _ in steps] == [1, 2, 3, 4] and all(set(v) == {"train/loss", "train/lr"} for _, v in steps)
    epochs = [(step, v) for step, v in fake.logged if "epoch" in v]
    assert [(step, v["epoch"]) for step, v in epochs] == [(2, 1), (4, 2)]
    assert epochs[1][1]["epoch/val_top1"] == result.history[1]["val_top1"] and fake.finished == 1
    losses = [v["train/loss"] for _, v in steps]
    assert np.mean(losses[2:]) == pytest.approx(result.history[1]["train_loss"], abs=1e-6)

    # a run resumed from its epoch-1 checkpoint continues the same W&B run from step 3
    assert ckpt_io.load(tmp_path / "run" / "checkpoint-00000002.pt")["wandb_id"] == "run-1"
    before = len(fake.logged)
    train(None, recipe, output_dir=tmp_path / "run", resume=tmp_path / "run" / "checkpoint-00000002.pt",
          wandb="proj", progress=False)  # fmt: skip
    assert (fake.inits[1]["id"], fake.inits[1]["resume"]) == ("run-1", "allow")
    assert [step for step, v in fake.logged[before:] if "train/loss" in v] == [3, 4]


def test_wandb_missing_is_a_clear_error_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when wandb is not installed
    rc = main(["train", "--model", "lowformer_b0", "--wandb", "--output", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "pip install 'lowformer[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_wandb_offline_writes_the_run_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=8, per_class_val=1)
    train("lowformer_b0", tiny_recipe(epochs=1), data_dir=data, output_dir=tmp_path / "run", wandb="lowformer-test",
          progress=False)  # fmt: skip
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert record.stat().st_size > 0
    run_id = record.stem.removeprefix("run-")
    assert ckpt_io.load(tmp_path / "run" / "last.pt")["wandb_id"] == run_id
