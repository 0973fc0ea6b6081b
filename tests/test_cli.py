"""The `lowformer` command line, run as a user would (a subprocess of the installed script, or `main`
in process where the test needs to change the machine's answers), and its exit-code contract."""

import json
import subprocess
import sys

import pytest
import torch

import lowformer
from lowformer.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lowformer.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    r = _run("--help")
    assert r.returncode == 0 and "info" in r.stdout


def test_info_table():
    r = _run("info", "lowformer_b1")
    assert r.returncode == 0, r.stderr
    assert "17.94M" in r.stdout and "1,410.98M" in r.stdout and "224x224" in r.stdout
    assert "transposed_conv" in r.stdout and "not counted" in r.stdout and "stride 32" in r.stdout


def test_info_json_schema_and_image_size():
    r = _run("info", "lowformer_e3", "--image-size", "97", "131", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {"params", "macs", "image_size", "by_op", "uncounted", "features", "convention"} <= set(info)
    assert info["image_size"] == [97, 131]
    assert info["macs"] == sum(info["by_op"].values())
    assert [f["shape"][-2:] for f in info["features"]] == [[25, 33], [13, 17], [7, 9], [4, 5]]


def test_info_list():
    r = _run("info", "--list")
    assert r.returncode == 0 and "lowformer_b15" in r.stdout.split()


@pytest.mark.parametrize(
    "args, text",
    [
        (("info", "lowformer_b7"), "Did you mean"),
        (
            ("info", "lowformer_b0", "--image-size", "16", "16"),
            "16x16 is too small for lowformer_b0: height and width must be >= 32",
        ),
        (("info", "edgevit_xs", "--image-size", "64", "80"), "multiples of 32, got 64x80 (e.g. 64x96)"),
        (("info", "lowformer_b0", "--image-size", "big", "7"), "invalid int"),
        (("nonsense",), "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, text):
    r = _run(*args)
    assert r.returncode == 2
    assert text in r.stderr


def _main(capsys, *args):
    """`lowformer ARGS` in process: (exit code, stdout, stderr)."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_any_timm_model():
    r = _run("info", "timm:resnet18", "--image-size", "64", "96", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model"] == "timm:resnet18" and info["family"] == "timm"
    assert round(info["params"] / 1e6, 2) == 11.69 and info["by_op"]["conv"] > 0
    assert [f["stride"] for f in info["features"]] == [2, 4, 8, 16, 32]
    assert info["features"][-1]["shape"] == [1, 512, 2, 3]
    r = _run("info", "timm:vit_tiny_patch16_224", "--image-size", "64", "64")
    assert r.returncode == 2
    assert "timm:vit_tiny_patch16_224 does not run on a 1x3x64x64 input: Input height (64)" in r.stderr


def test_info_refuses_a_size_that_does_not_fit_in_memory_before_running():
    # ~20 TB of activations: refused from a shape-only estimate, instead of being killed by the OOM killer
    r = _run("info", "lowformer_b1", "--image-size", "40000", "40000")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("lowformer info: error: counting lowformer_b1 at 40000x40000 needs ~")
    assert "GiB of memory, this machine has" in r.stderr and "GiB available; try a smaller --image-size" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_real_out_of_memory_is_one_line_and_exit_1(capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr("lowformer.cli.info.count_macs", oom)
    rc, out, err = _main(capsys, "info", "lowformer_b0", "--image-size", "64", "64")
    assert rc == 1 and out == ""
    assert err == (
        "lowformer info: error: counting lowformer_b0 at 64x64 ran out of memory (DefaultCPUAllocator: can't "
        "allocate memory: you tried to allocate 1099511627776 bytes.); try a smaller --image-size\n"
    )


def test_memory_estimate_is_the_real_peak_and_the_refusal_names_both_numbers(monkeypatch):
    from lowformer.errors import OutOfMemory
    from lowformer.measure import memory

    model = lowformer.create_model("lowformer_b0").eval()
    estimate = memory.forward_peak_bytes(model, (2, 3, 96, 128))
    counter = memory._LiveTensorBytes()  # the same bookkeeping on real CPU tensors
    with torch.no_grad(), counter:
        model(torch.zeros(2, 3, 96, 128))
    assert estimate == counter.peak > 2 * 3 * 96 * 128 * 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    assert memory.check_forward_fits(model, (1, 3, 224, 224), "x", "y") < 2**30
    with pytest.raises(OutOfMemory) as err:  # 8.5 GiB of tensors at 4096x4096, x 1.15
        memory.check_forward_fits(model, (1, 3, 4096, 4096), "counting at 4096x4096", "try smaller")
    assert (
        str(err.value)
        == "counting at 4096x4096 needs ~9.8 GiB of memory, this machine has 1.0 GiB available; try smaller"
    )


@pytest.fixture(scope="module")
def bad_checkpoint_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    files = {"empty": folder / "empty.pt", "random": folder / "random.pt", "folder": folder / "run"}
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(bytes(range(7, 256)) * 4)
    files["folder"].mkdir()
    model = lowformer.create_model("lowformer_b0")
    good = folder / "good.pt"
    torch.save(model.state_dict(), good)
    files["truncated"] = folder / "cut.pt"
    files["truncated"].write_bytes(good.read_bytes()[:1000])
    good_st = lowformer.save_checkpoint(model, folder / "good.safetensors")
    files["truncated safetensors"] = folder / "cut.safetensors"
    files["truncated safetensors"].write_bytes(good_st.read_bytes()[:-1000])
    files["missing"] = folder / "missing.pt"
    files["code"] = folder / "evil.pt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, files["code"])
    return files


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would run",))


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("empty", 1, "{} is empty (0 bytes), not a checkpoint: was its download or copy interrupted?"),
        ("random", 1, "{} is not a checkpoint: its first bytes (07 08 09 0a 0b 0c 0d 0e) are those of neither"),
        ("truncated", 1, "{} is truncated or damaged: the end of its zip archive"),
        ("truncated safetensors", 1, "{} is truncated: its safetensors header describes"),
        ("folder", 2, "checkpoint {} is a folder, not a file; give the checkpoint file itself"),
        ("missing", 2, "checkpoint not found: {}"),
        ("code", 1, "refused to load {}: it is a pickle that needs code execution to load"),
    ],
)
@pytest.mark.parametrize("command", ["info", "export"])
def test_unusable_checkpoint_in_the_cli(case, code, message, command, bad_checkpoint_files, tmp_path, capsys):
    path = bad_checkpoint_files[case]
    extra = ["--out", str(tmp_path / "m.onnx")] if command == "export" else []
    rc, out, err = _main(capsys, command, "lowformer_b0", "--checkpoint", str(path), *extra)
    assert rc == code
    assert err.startswith(f"lowformer {command}: error: " + message.format(path)) and len(err.splitlines()) == 1
    assert out == "" and ("code execution" in err) == (case == "code")
    assert not (tmp_path / "m.onnx").exists()
