"""`lowformer train` / `lowformer eval` as a user meets them when something is off: the data config a
checkpoint carries, a second run into the same folder, an output that cannot be written, option errors
that name the flags, empty class folders, `--threads`. Each test does what the user does (the same
`main` the script runs, or the script itself) and checks the message, the exit code and the files.
Interruptions and resumes are in test_train_e2e.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import timm.data
import torch
from helpers import run_unprivileged
from PIL import Image
from test_train import make_image_folder

import lowformer
from lowformer.cli import main
from lowformer.train import checkpoint as ckpt_io
from lowformer.weights import data_config_of, read_checkpoint

TINY = ["--recipe", "demo", "--image-size", "32", "--batch-size", "8", "--no-progress"]
TINY += ["--set", "eval_batch_size=16", "--set", "reset_bn_samples=32"]
REPO = Path(__file__).resolve().parents[1]


def _main(args: list) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        return e.code


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def digits_run(module_dir) -> tuple[Path, Path]:
    """(data, run folder) of a finished 2-epoch run at 32 px, made by the command line."""
    root = module_dir
    data = make_image_folder(root / "data", classes=(0, 1, 2), per_class_train=8, per_class_val=4)
    out = root / "run"
    args = ["train", "--model", "lowformer_b0", "--data", data, *TINY, "--epochs", "2", "--output", out]
    assert _main([*args, "--checkpoint-every", "2", "--keep-last", "5"]) == 0
    return data, out


# ------------------------------------------------------------------------------------------------
# A checkpoint records what is needed to use it
# ------------------------------------------------------------------------------------------------


def test_every_checkpoint_records_its_data_config(digits_run):
    _, out = digits_run
    expected = {
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": timm.data.IMAGENET_DEFAULT_MEAN,
        "std": timm.data.IMAGENET_DEFAULT_STD,
        "label_names": ["class_0", "class_1", "class_2"],
    }
    files = ["best.pt", "last.pt", "best.safetensors", *(p.name for p in out.glob("checkpoint-*.pt"))]
    assert len(files) == 7  # steps 2, 4 (every 2) and 3, 6 (epoch ends)
    for name in files:
        _, meta = read_checkpoint(out / name)
        assert meta["variant"] == "lowformer_b0" and meta["num_classes"] == "3", name
        assert data_config_of(meta) == expected, name


@pytest.mark.parametrize("name", ["best.safetensors", "best.pt"])
def test_load_model_and_timm_resolve_the_trained_transform(digits_run, name):
    _, out = digits_run
    model = lowformer.load_model(out / name)
    cfg = timm.data.resolve_data_config(model=model)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ((3, 32, 32), 1.0, "bicubic")
    assert model.pretrained_cfg["label_names"] == ["class_0", "class_1", "class_2"]
    x = timm.data.create_transform(**cfg)(Image.new("RGB", (8, 8)))
    assert x.shape == (3, 32, 32)


def test_the_portable_checkpoint_evaluates_as_the_training_checkpoint(digits_run, capsys):
    """Before, best.safetensors was evaluated at 224 px, crop 0.95 (12 % instead of 97.5 % on digits)."""
    data, out = digits_run
    results = {}
    for name in ("best.safetensors", "best.pt"):
        assert _main(["eval", "--checkpoint", out / name, "--data", data, "--json"]) == 0  # no --model needed
        results[name] = json.loads(capsys.readouterr().out)
    a, b = results["best.safetensors"], results["best.pt"]
    assert (a["image_size"], a["crop_pct"], a["interpolation"]) == (32, 1.0, "bicubic")
    assert (a["top1"], a["loss"]) == (b["top1"], b["loss"])
    best = ckpt_io.load(out / "best.pt")
    assert a["top1"] == pytest.approx(best["best_top1"])  # what training measured


def test_a_flag_that_contradicts_the_checkpoint_warns_with_both_values_and_wins(digits_run, capsys, caplog):
    data, out = digits_run
    args = ["eval", "--checkpoint", out / "best.safetensors", "--data", data, "--json", "--image-size", "64"]
    assert _main([*args, "--interpolation", "bilinear"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 64
    assert "--image-size 64 differs from 32, the value" in caplog.text and "using 64 as asked" in caplog.text
    assert "--interpolation bilinear differs from bicubic" in caplog.text
    assert _main(["eval", "--checkpoint", out / "best.pt", "--data", data, "--image-size", "16"]) == 2
    assert "--image-size 16: image size 16x16 is too small" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# A second run never destroys the first
# ------------------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_kept(digits_run, capsys):
    data, out = digits_run
    before = _files(out)
    args = ["train", "--model", "lowformer_b0", "--data", data, *TINY, "--epochs", "2", "--output", out]
    assert _main(args) == 2
    err = capsys.readouterr().err
    assert f"the output folder {out} already holds a run" in err
    assert "Add --resume to continue it, --overwrite to delete it and start again" in err
    assert _files(out) == before


def test_overwrite_deletes_the_earlier_run_first(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=8, per_class_val=1)
    out = tmp_path / "run"
    args = ["train", "--model", "lowformer_b0", "--data", data, *TINY, "--output", out]
    assert _main([*args, "--epochs", "2", "--keep-last", "5"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]
    assert _main([*args, "--epochs", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000002.pt"]
    assert len((out / "log.csv").read_text().splitlines()) == 2  # header + the new run's one epoch
    assert ckpt_io.load(out / "last.pt")["recipe"]["epochs"] == 1
    assert _main([*args, "--resume", "--overwrite"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_overwrite_never_empties_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert _main(["train", "--model", "lowformer_b0", "--output", tmp_path, "--overwrite"]) == 2
    assert "holds files that no run writes (thesis.tex); nothing was changed" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------------
# Outputs that cannot be written: one line, exit 1, before training starts
# ------------------------------------------------------------------------------------------------


def test_a_read_only_output_is_one_line_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = run_unprivileged(
            [sys.executable, "-m", "lowformer", "train", "--model", "lowformer_b0", "--output", str(locked / "run")],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        locked.chmod(0o755)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"lowformer train: error: cannot write {locked / 'run'}: permission denied"
    assert r.stdout == ""  # nothing started


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    assert _main(["train", "--model", "lowformer_b0", "--output", tmp_path / "run"]) == 1
    assert f"cannot write {tmp_path / 'run'}: it is a file, not a folder" in capsys.readouterr().err


@contextlib.contextmanager
def _small_disk(path: Path, size_mb: int):
    """A tmpfs of `size_mb` at `path`; skips the test where mounting is not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=8, per_class_val=1)
    args = [sys.executable, "-m", "lowformer", "train", "--model", "lowformer_b0", "--data", str(data), *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # too small for even the weights of one checkpoint: refused before the first step
    with _small_disk(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", 20) as disk:
        r = subprocess.run([*args, "--output", str(disk / "run")], capture_output=True, text=True, env=env)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith(f"lowformer train: error: cannot write {disk / 'run'}: no space left on device (")
        assert "Traceback" not in r.stderr and "epoch 1/" not in r.stdout
    # room for the weights but not the optimizer state: the first checkpoint write fails for real
    with _small_disk(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", 120) as disk:
        r = subprocess.run([*args, "--output", str(disk / "run")], capture_output=True, text=True, env=env)
        assert r.returncode == 1, r.stderr
        target = disk / "run" / "checkpoint-00000002.pt"
        assert r.stderr.strip() == f"lowformer train: error: cannot write {target}: no space left on device"
        assert sorted(p.name for p in (disk / "run").iterdir()) == ["recipe.yaml"]  # no partial file


# ------------------------------------------------------------------------------------------------
# Option errors name the flags; the one input-size rule; data layout; --threads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, text",
    [
        (
            ["--recipe", "b0", "--epochs", "1"],
            "the warm-up, warmup_epochs=20 (preset 'b0'; --warmup-epochs changes it), is longer than the whole "
            "run, --epochs 1",
        ),
        (["--epochs", "2", "--warmup-epochs", "3"], "the warm-up, --warmup-epochs 3, is longer than the whole run"),
        (["--batch-size", "0"], "error: --batch-size 0 must be >= 1"),
        (["--set", "mixup_alpha=-1"], "error: --set mixup_alpha=-1 must be >= 0"),
        (["--set", "mixup_alpha=0.2", "--batch-size", "1"], "--batch-size 1 is too small for mixup/cutmix"),
        (["--image-size", "16"], "error: --image-size 16: image size 16x16 is too small for lowformer_b0"),
        (["--eval-image-size", "20"], "error: --eval-image-size 20: image size 20x20 is too small"),
        (
            ["--model", "edgevit_xs", "--recipe", "demo", "--image-size", "48"],
            "error: --image-size 48: edgevit_xs needs height and width that are multiples of 32, got 48x48",
        ),
        (["--model", "timm:resnet18"], "lowformer train needs one of our models"),
    ],
)
def test_option_errors_name_the_flags_and_both_values(tmp_path, capsys, args, text):
    assert _main(["train", "--model", "lowformer_b0", *args, "--output", tmp_path / "run"]) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_recipe_file_values_are_named_by_their_key_and_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 3\nwarmup_epochs: 5\n")
    assert _main(["train", "--model", "lowformer_b0", "--recipe", path, "--show-recipe"]) == 2
    assert (
        f"the warm-up, warmup_epochs=5 ({path}; --warmup-epochs changes it), is longer than the whole run, "
        f"epochs=3 ({path}; --epochs changes it)"
    ) in capsys.readouterr().err


def test_an_empty_class_folder_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=2, per_class_val=1)
    (data / "train" / "class_7").mkdir()
    assert _main(["train", "--model", "lowformer_b0", "--data", data, *TINY, "--output", tmp_path / "run"]) == 2
    assert f"{data / 'train'} has empty class folders: class_7" in capsys.readouterr().err


def test_threads_sets_torch_intra_op_threads(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert _main(["train", "--model", "lowformer_b0", "--threads", "3", "--show-recipe"]) == 0
    assert _main(["eval", "--checkpoint", tmp_path / "none.pt", "--threads", "2"]) == 2
    assert calls == [3, 2]
    assert _main(["eval", "--checkpoint", tmp_path / "none.pt", "--threads", "0"]) == 2
    assert "--threads: must be >= 1, got 0" in capsys.readouterr().err
