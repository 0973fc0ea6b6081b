"""`lowformer train` / `lowformer eval` end to end, as a user runs them: the digits demo to >= 95 %,
a run killed mid-epoch (SIGKILL, Ctrl-C, SIGTERM) and resumed (bit-identical weights), 2-process DDP
(Gloo) against one process with the same effective batch, and the exit codes of bad input."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import make_image_folder

from lowformer.cli import main
from lowformer.train import checkpoint as ckpt_io
from lowformer.train import trainer as trainer_mod

TINY = [
    "--recipe",
    "demo",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--set",
    "eval_batch_size=16",
    "--set",
    "reset_bn_samples=32",
]


def _cli(*args, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The script as a user runs it. `timeout` only guards against a hang: on a loaded shared CPU the
    digits demo takes minutes, not the 45 s it takes on an idle one."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lowformer", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def _params(path) -> dict[str, torch.Tensor]:
    """Trained weights of a checkpoint: parameters and EMA, not the BN running statistics."""
    state = ckpt_io.load(path)
    return {k: v for k, v in state["model"].items() if "running_" not in k and "num_batches" not in k}


def test_digits_demo_reaches_95_percent_and_eval_reports_it(tmp_path):
    out = tmp_path / "digits"
    r = _cli(
        "train", "--model", "lowformer_b0", "--image-size", "32", "--epochs", "4", "--output", out, "--no-progress"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "effective batch 32 = 32 per process x 1 process x 1 accumulation step; lr 0.002" in r.stdout
    assert "built-in digits" in r.stdout and "best top-1" in r.stdout
    for name in ("best.pt", "last.pt", "best.safetensors", "recipe.yaml", "log.csv"):
        assert (out / name).is_file(), name
    header, *rows = (out / "log.csv").read_text().splitlines()
    assert header.split(",")[:8] == ["epoch", "global_step", "train_loss", "train_top1", "val_loss", "val_top1",
                                     "val_top5", "lr"]  # fmt: skip
    assert len(rows) == 4

    r = _cli("eval", "--model", "lowformer_b0", "--checkpoint", out / "best.pt", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    top1 = float(re.search(r"top-1 ([\d.]+)%", r.stdout).group(1))
    assert top1 >= 95.0, r.stdout
    assert "on 360 images of the built-in digits held-out split (32x32" in r.stdout


@pytest.fixture(scope="module")
def reference(module_dir) -> tuple[list, dict, object]:
    """(training arguments, environment, the run folder of an uninterrupted run with them)."""
    root = module_dir
    data = make_image_folder(root / "data", classes=(0, 1, 2, 3), per_class_train=16, per_class_val=2)
    args = ["train", "--model", "lowformer_b0", "--data", data, *TINY, "--epochs", "3", "--no-progress"]
    args += ["--set", "ema_decay=0.99", "--set", "drop_path=0.1"]
    env = {"OMP_NUM_THREADS": "1"}
    # checkpoints at epoch ends only: --checkpoint-every is a runtime option that leaves the run as it is
    # (the interrupted runs add it where they need a checkpoint mid-epoch), and each one writes ~100 MB
    ref = _cli(*args, "--output", root / "ref", env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return args, env, root / "ref"


def _assert_same_run(ref, run) -> None:
    """Model, EMA and evaluation weights bit-identical; the same accuracies every epoch."""
    a, b = ckpt_io.load(ref / "last.pt"), ckpt_io.load(run / "last.pt")
    assert a["global_step"] == b["global_step"] == 24
    for part in ("model", "ema", "state_dict"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [h["val_top1"] for h in a["history"]] == [h["val_top1"] for h in b["history"]]


def test_killed_mid_epoch_and_resumed_ends_bit_identical(tmp_path, reference):
    args, env, ref = reference
    args = [*args, "--checkpoint-every", "3", "--keep-last", "100"]
    victim = subprocess.Popen(
        [sys.executable, "-m", "lowformer", *map(str, args), "--output", str(tmp_path / "run")],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "run" / "checkpoint-00000003.pt"  # step 3 of 8 in epoch 1
    deadline = time.monotonic() + 300
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # every checkpoint on disk is complete (written to a temporary name, then renamed)
    for path in ckpt_io.find_checkpoints(tmp_path / "run"):
        assert ckpt_io.load(path)["global_step"] < 24
    assert ckpt_io.load(first)["step_in_epoch"] == 3
    # what a kill in the middle of the next write leaves behind (the kill above may have left one too)
    (tmp_path / "run" / ".checkpoint-00000006.pt.k1ll3d00.tmp").write_bytes(b"half a checkpoint")

    resumed = _cli("train", "--resume", first, "--no-progress", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(epoch 1, step 3)" in resumed.stdout
    assert not list((tmp_path / "run").glob(".*.tmp"))  # cleaned when the run folder was used again
    _assert_same_run(ref, tmp_path / "run")


def _train_until_running(args: list, out, env: dict, workers: int = 0) -> subprocess.Popen:
    """A training process in its own process group (as a terminal runs it), once its first step runs."""
    victim = subprocess.Popen(
        [sys.executable, "-m", "lowformer", *map(str, args), "--workers", str(workers), "--output", str(out)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in victim.stdout:
        if "optimizer steps" in line:  # the last line before the first step
            return victim
    victim.wait()
    raise AssertionError(f"training ended before it started: {victim.stderr.read()[-3000:]}")


def test_ctrl_c_saves_at_the_next_step_and_the_printed_command_resumes_exactly(tmp_path, reference):
    """Ctrl-C reaches the whole process group (loader workers too), as in a terminal."""
    args, env, ref = reference
    run = tmp_path / "run"
    victim = _train_until_running(args, run, env, workers=2)
    os.killpg(victim.pid, signal.SIGINT)
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 130, err[-3000:]
    saved = ckpt_io.load(run / "last.pt")
    assert saved["epoch"] == 0 and 1 <= saved["step_in_epoch"] < 8  # mid-epoch, not at its end
    assert f"lowformer train: stopped by Ctrl-C at epoch 1, step {saved['step_in_epoch']}" in err
    assert "Traceback" not in err
    command = re.search(r"^continue with: (.+)$", err, re.MULTILINE).group(1)
    assert command == f"lowformer train --resume {run / 'last.pt'} --no-progress"

    resumed = _cli(*shlex.split(command)[1:], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(ref, run)  # loader workers or not, interrupted or not: the same run


def test_sigterm_saves_and_exits_143(tmp_path, reference):
    args, env, _ = reference
    victim = _train_until_running(args, tmp_path / "run", env)
    victim.send_signal(signal.SIGTERM)  # as a job scheduler does, to the main process only
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 143, err[-3000:]
    assert "lowformer train: stopped by SIGTERM at epoch 1, step " in err
    saved = ckpt_io.load(tmp_path / "run" / "last.pt")
    assert saved["epoch"] == 0 and 1 <= saved["step_in_epoch"] < 8


def test_ddp_two_processes_match_one_process_with_the_same_effective_batch(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=(0, 1, 2, 3), per_class_train=16, per_class_val=2)
    args = ["train", "--model", "lowformer_b0", "--data", data, *TINY, "--epochs", "2", "--no-progress"]
    env = {"OMP_NUM_THREADS": "1"}
    single = _cli(*args, "--grad-accum", "2", "--output", tmp_path / "single", env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "effective batch 16 = 8 per process x 1 process x 2 accumulation steps" in single.stdout

    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lowformer"]
        + [str(a) for a in args]
        + ["--output", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "effective batch 16 = 8 per process x 2 processes x 1 accumulation step; lr 0.004" in ddp.stdout
    assert ddp.stdout.count("epoch 2/2:") == 1  # only rank 0 logs

    a, b = _params(tmp_path / "single" / "last.pt"), _params(tmp_path / "ddp" / "last.pt")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert ckpt_io.load(tmp_path / "ddp" / "last.pt")["world_size"] == 2


# -- exit codes and messages (in-process: the same `main` the script runs) ----------------------


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["train", "--model", "lowformer_b0", "--data", "{tmp}"], 2, "Expected DIR/train/<class>/<image>"),
        (["train", "--model", "lowformer_b0", "--set", "mixup_apha=1"], 2, "did you mean 'mixup_alpha'?"),
        (["train", "--model", "lowformer_b0", "--recipe", "b7"], 2, "unknown recipe 'b7'"),
        (["train", "--model", "edgevit_xs", "--data", "{tmp}"], 2, "no preset recipe for edgevit_xs"),
        (["train", "--model", "lowformer_b0", "--epochs", "x"], 2, "invalid int value"),
        (["eval", "--model", "lowformer_b0", "--checkpoint", "{tmp}/none.pt"], 2, "checkpoint not found"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, code, text):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == code
    assert text in capsys.readouterr().err


def test_tensorboard_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    rc = main(["train", "--model", "lowformer_b0", "--tensorboard", "--output", str(tmp_path), "--no-progress"])
    assert rc == 2 and "pip install 'lowformer[tensorboard]'" in capsys.readouterr().err


def test_non_finite_loss_exits_1_with_the_step(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=(0, 1), per_class_train=8, per_class_val=1)
    real = trainer_mod.train_criterion
    monkeypatch.setattr(
        trainer_mod,
        "train_criterion",
        lambda recipe, soft_targets: lambda x, y: real(recipe, soft_targets)(x, y) * float("inf"),
    )
    rc = main(["train", "--model", "lowformer_b0", "--data", str(data), *TINY, "--output", str(tmp_path / "run")])
    assert rc == 1
    assert "lowformer train: error: the loss became inf at epoch 1, step 1 (optimizer step 1" in capsys.readouterr().err


def test_show_recipe_prints_a_file_that_loads_back(tmp_path, capsys):
    assert main(["train", "--recipe", "b3", "--lr", "1e-4", "--show-recipe"]) == 0
    path = tmp_path / "mine.yaml"
    path.write_text(capsys.readouterr().out)
    from lowformer.train import load_recipe

    recipe = load_recipe(path)
    assert recipe.lr == 1e-4 and recipe.grad_accum == 4 and recipe.mesa_threshold == 0.25
