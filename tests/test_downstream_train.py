"""`lowformer detect` / `segment` / `retrieval` end to end, as a user runs them: the built-in demos
learning (detection box AP50 >= 0.5, segmentation mIoU >= 0.6), evaluation of the checkpoints they
write, exact resume after an interruption (SIGTERM: exit 143, then --resume), Mask R-CNN and
RetinaNet on a timm backbone, two-process runs, run-folder protection and the exit codes of bad input.

Small on purpose: one thread, 48-96 px images, a few dozen steps (the figures are in the asserts)."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lowformer.cli import main
from lowformer.downstream import engine, synthetic
from lowformer.downstream.recipe import load_recipe
from lowformer.downstream.tasks import SegmentationTask
from lowformer.train import checkpoint as ckpt_io

ENV = {"OMP_NUM_THREADS": "1"}  # steady on a shared machine: two threads wait on each other under load


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _weights(path) -> dict[str, torch.Tensor]:
    return ckpt_io.load(path)["model"]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return synthetic.write_coco_shapes(tmp_path_factory.mktemp("coco"), num_train=8, num_val=2, image_size=64)


@pytest.fixture(scope="module")
def tiny_ade(tmp_path_factory):
    return synthetic.write_ade_shapes(tmp_path_factory.mktemp("ade"), num_train=8, num_val=2, image_size=48)


def _tiny_detection(**changes):
    base = dict(batch_size=2, epochs=1, lr_steps=[], warmup_iters=2, min_size=64, max_size=64, fpn_channels=32,
                eval_batch_size=2)  # fmt: skip
    return load_recipe("detection", "demo").replace(**{**base, **changes})


def _tiny_segmentation(**changes):
    base = dict(batch_size=2, iterations=6, eval_every=6, scale=[48, 48], crop_size=[32, 32], warmup_iters=2,
                fpn_channels=32, head_channels=32)  # fmt: skip
    return load_recipe("segmentation", "demo").replace(**{**base, **changes})


# --------------------------------------------------------------------------------------------
# the built-in demos learn, and their checkpoints evaluate to the same numbers
# --------------------------------------------------------------------------------------------


def test_detection_demo_reaches_ap50_and_eval_reproduces_it(tmp_path, capsys):
    out = tmp_path / "shapes"
    # one of the demo's three epochs (60 steps of 4 images, ~25 s on one core); the full demo is in the docs
    rc = main(["detect", "train", "--epochs", "1", "--set", "lr_steps=[]", "--output", str(out), "--no-progress"])
    assert rc == 0
    assert "best bbox_AP" in capsys.readouterr().out
    (row,) = _rows(out / "log.csv")
    assert float(row["bbox_AP50"]) >= 0.5, row  # reached 0.84-0.90 in development runs
    for name in ("best.pt", "last.pt", "recipe.yaml", "metrics.json", "predictions.json"):
        assert (out / name).is_file(), name
    assert (out / "demo_data" / "annotations" / "instances_train2017.json").is_file()  # COCO's own layout

    rc = main(["detect", "eval", "--checkpoint", str(out / "best.pt"), "--predictions", str(tmp_path / "dets.json"),
               "--json", "--no-progress"])  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bbox_AP50"] == pytest.approx(float(row["bbox_AP50"]), abs=1e-4)
    assert result["images"] == 48 and result["split"] == "val2017"
    detections = json.loads((tmp_path / "dets.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {d["category_id"] for d in detections} <= {1, 2, 3}

    # the run folder is never silently reused
    rc = main(["detect", "train", "--output", str(out), "--no-progress"])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err


def test_segmentation_demo_reaches_miou_and_slide_inference_agrees(tmp_path, capsys):
    out = tmp_path / "shapes"
    # 3 of the demo's 4 epochs (120 steps of 4 crops, ~25 s on one core)
    rc = main(["segment", "train", "--iterations", "120", "--set", "eval_every=120", "--output", str(out),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    (row,) = _rows(out / "log.csv")
    assert float(row["mIoU"]) >= 0.6, row  # reached 0.80 in development runs
    assert (out / "demo_data" / "annotations" / "training").is_dir()  # ADE20K's layout

    rc = main(["segment", "eval", "--checkpoint", str(out / "best.pt"), "--json", "--no-progress"])
    assert rc == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["mIoU"] == pytest.approx(float(row["mIoU"]), abs=1e-4)
    assert [c["class"] for c in whole["metrics"]["per_class"]] == ["background", "rectangle", "ellipse", "triangle"]
    # sliding 48x48 windows, 16 px apart, over the 64x64 images: nine overlapping windows each
    rc = main(["segment", "eval", "--checkpoint", str(out / "best.pt"), "--set", "eval_mode=slide",
               "--set", "eval_crop=[48,48]", "--set", "eval_stride=[16,16]", "--no-progress"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    slide = float(re.search(r"mIoU ([\d.]+)", text).group(1))
    assert abs(slide - whole["mIoU"]) < 0.15 and "triangle" in text, text


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------


def test_detection_resume_is_exact(tiny_coco, tmp_path):
    recipe = _tiny_detection(hflip=0.5)  # flips, RPN / RoI sampling: all random
    kwargs = dict(data_dir=tiny_coco, progress=False)
    ref = engine.train("detection", "lowformer_b0", recipe, output_dir=tmp_path / "ref", **kwargs)
    assert ref.global_step == 4 and ref.last_evaluation is not None
    part = engine.train("detection", "lowformer_b0", recipe, output_dir=tmp_path / "run", max_steps=2, **kwargs)
    assert part.global_step == 2 and ckpt_io.load(tmp_path / "run" / "last.pt")["global_step"] == 2
    done = engine.train("detection", None, recipe, output_dir=tmp_path / "run", resume="auto", **kwargs)
    assert done.global_step == 4
    a, b = _weights(tmp_path / "ref" / "last.pt"), _weights(tmp_path / "run" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert done.history[-1]["bbox_AP"] == ref.history[-1]["bbox_AP"]


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_finishes_exactly(tiny_ade, tmp_path, caplog):
    recipe = _tiny_segmentation(iterations=12, eval_every=12, checkpoint_every=1, keep_last=100)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    args = ["segment", "train", "--model", "lowformer_b0", "--recipe", path, "--data", tiny_ade, "--no-progress"]
    # the uninterrupted run needs no checkpoint per step: checkpoint_every is a runtime key, the run is the same
    ref = engine.train("segmentation", "lowformer_b0", recipe.replace(checkpoint_every=0), data_dir=tiny_ade,
                       output_dir=tmp_path / "ref", progress=False)  # fmt: skip

    run = tmp_path / "run"
    victim = subprocess.Popen(
        [sys.executable, "-m", "lowformer", *map(str, args), "--output", str(run)],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / ckpt_io.step_name(3)).exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 143, err[-3000:]
    assert "SIGTERM: stopped at step" in out and "continue with --resume" in out
    stopped = ckpt_io.load(run / "last.pt")["global_step"]
    assert 3 <= stopped < 12

    caplog.set_level(logging.INFO)
    assert main(["segment", "train", "--resume", str(run / "last.pt"), "--no-progress"]) == 0
    assert f"resuming from {run / 'last.pt'} (step {stopped} of 12)" in caplog.text
    a, b = _weights(tmp_path / "ref" / "last.pt"), _weights(run / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(_rows(run / "log.csv")[-1]["mIoU"]) == pytest.approx(ref.history[-1]["mIoU"], abs=1e-5)


# --------------------------------------------------------------------------------------------
# other detectors and backbones, and two processes
# --------------------------------------------------------------------------------------------


def test_mask_rcnn_and_retinanet_on_a_timm_backbone(tiny_coco, tmp_path):
    recipe = _tiny_detection(detector="maskrcnn", epochs=1, detector_options={"rpn_batch_size_per_image": 32})
    result = engine.train("detection", "lowformer_b0", recipe, data_dir=tiny_coco, output_dir=tmp_path / "mask",
                          progress=False)  # fmt: skip
    assert {"segm_AP", "segm_AP50", "bbox_AP"} <= set(result.history[-1])
    predictions = json.loads((tmp_path / "mask" / "predictions.json").read_text())
    assert all("segmentation" in p and p["segmentation"]["size"] == [64, 64] for p in predictions)

    recipe = _tiny_detection(detector="retinanet", detector_options={}, trainable_stages=2)
    result = engine.train("detection", "timm:test_resnet", recipe, data_dir=tiny_coco, output_dir=tmp_path / "retina",
                          progress=False)  # fmt: skip
    assert result.global_step == 4 and result.history[-1]["bbox_AP"] is not None
    assert ckpt_io.load(tmp_path / "retina" / "last.pt")["model_name"] == "timm:test_resnet"


def test_two_processes_train_and_evaluate(tiny_ade, tmp_path):
    recipe = _tiny_segmentation(iterations=2, eval_every=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lowformer",
         "segment", "train", "--model", "lowformer_b0", "--recipe", str(path), "--data", str(tiny_ade), "--output",
         str(tmp_path / "ddp"), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **ENV},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "effective batch 4 = 2 per process x 2 processes" in r.stdout
    assert r.stdout.count("step 2/2") == 1  # only rank 0 logs
    state = ckpt_io.load(tmp_path / "ddp" / "last.pt")
    assert state["world_size"] == 2 and state["global_step"] == 2
    # the evaluation is the same whether one or two processes share the images
    evaluation, _ = engine.evaluate_checkpoint("segmentation", tmp_path / "ddp" / "last.pt", progress=False)
    assert evaluation.metrics["mIoU"] == pytest.approx(float(_rows(tmp_path / "ddp" / "log.csv")[-1]["mIoU"]),
                                                       abs=1e-5)  # fmt: skip


# --------------------------------------------------------------------------------------------
# exit codes and messages (in-process: the same `main` the script runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["detect", "train", "--recipe", "retinanet_2x"], 2, "unknown recipe 'retinanet_2x'. Did you mean"),
        (["segment", "train", "--set", "crop_sise=[64,64]"], 2, "did you mean 'crop_size'?"),
        (["segment", "train", "--iterations", "0"], 2, "must be >= 1"),
        (["detect", "train", "--data", "{tmp}/nowhere", "--model", "lowformer_b0"], 2, "dataset folder not found"),
        (["detect", "train", "--data", "{tmp}"], 2, "names no backbone; pass --model"),
        (["detect", "eval", "--checkpoint", "{tmp}/none.pt"], 2, "checkpoint not found"),
        (["detect"], 2, "required: ACTION"),
        (["retrieval", "eval", "--model", "lowformer_b0", "--data", "{tmp}/nowhere"], 2, "is not a directory"),
        (["detect", "eval", "--checkpoint", "{tmp}/x.pt", "--predictions", "{tmp}/file/dets.json"], 1, "cannot write"),
    ],
)
def test_bad_input_exits_with_a_message(tmp_path, capsys, args, code, text):
    (tmp_path / "file").write_text("a file where a folder is expected")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == code
    assert text in capsys.readouterr().err


def test_bad_data_and_checkpoints_exit_with_a_message(tiny_coco, tiny_ade, tmp_path, capsys, monkeypatch):
    # a malformed annotation file: refused before training, with what to fix
    import shutil

    coco = shutil.copytree(tiny_coco, tmp_path / "coco")
    ann = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [60, 60, 30, 30]
    ann.write_text(json.dumps(data))
    rc = main(["detect", "train", "--model", "lowformer_b0", "--data", str(coco), "--output", str(tmp_path / "a")])
    assert rc == 2 and "boxes outside their image" in capsys.readouterr().err

    # a label map with values outside the class range: found when it is read, reported with the file
    from PIL import Image

    ade = shutil.copytree(tiny_ade, tmp_path / "ade")
    for label in (ade / "annotations" / "training").iterdir():
        Image.new("L", (48, 48), 77).save(label)
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(_tiny_segmentation().to_yaml())
    rc = main(["segment", "train", "--model", "lowformer_b0", "--recipe", str(recipe), "--data", str(ade),
               "--output", str(tmp_path / "b"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "has values [77] outside the class range" in err and ".png" in err

    # a checkpoint of the other task; evaluation keys only; --overwrite replaces a run
    one_step = tmp_path / "one_step.yaml"
    one_step.write_text(_tiny_segmentation(iterations=1, eval_every=1).to_yaml())
    seg = ["segment", "train", "--model", "lowformer_b0", "--recipe", str(one_step), "--data", str(tiny_ade),
           "--output", str(tmp_path / "seg"), "--no-progress"]  # fmt: skip
    assert main(seg) == 0
    first = (tmp_path / "seg" / "last.pt").stat().st_mtime_ns
    assert main(seg + ["--overwrite"]) == 0 and (tmp_path / "seg" / "last.pt").stat().st_mtime_ns != first
    capsys.readouterr()
    rc = main(["segment", "eval", "--checkpoint", str(tmp_path / "seg" / "last.pt"), "--set", "num_classes=5"])
    assert rc == 2 and "cannot change num_classes=5 when evaluating a checkpoint" in capsys.readouterr().err
    rc = main(["detect", "eval", "--checkpoint", str(tmp_path / "seg" / "last.pt")])
    err = capsys.readouterr().err
    assert rc == 1 and "is a segmentation checkpoint, not a detection one; use `lowformer segment`" in err
    # ... and the classification commands refuse it too, with the same kind of message
    rc = main(["eval", "--checkpoint", str(tmp_path / "seg" / "last.pt"), "--model", "lowformer_b0"])
    err = capsys.readouterr().err
    assert rc == 1 and "is a segmentation training checkpoint" in err and "lowformer segment eval" in err, err
    rc = main(["train", "--resume", str(tmp_path / "seg" / "last.pt"), "--output", str(tmp_path / "cls")])
    err = capsys.readouterr().err
    assert rc == 1 and "is a segmentation checkpoint, not a classification one; use `lowformer segment`" in err, err

    # a non-finite loss stops the run with exit code 1, saving nothing broken
    monkeypatch.setattr(SegmentationTask, "loss", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    rc = main(["segment", "train", "--model", "lowformer_b0", "--recipe", str(recipe), "--data", str(tiny_ade),
               "--output", str(tmp_path / "c"), "--no-progress"])  # fmt: skip
    assert rc == 1 and "the loss became nan at step 1" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*.pt"))
