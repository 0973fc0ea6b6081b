"""The one atomic writer, output errors, exit codes, and the one model-name resolver."""

import json
import os
import sys

import pytest
import torch
from helpers import run_unprivileged

import lowformer
from lowformer import _io
from lowformer.errors import CheckpointError, OutOfMemory, OutputError, VerificationError, exit_code, is_out_of_memory
from lowformer.factory import check_image_size, parse_model_name


def test_atomic_write_json_csv_and_no_temp_left(tmp_path):
    _io.write_json(tmp_path / "a" / "r.json", {"x": 1})
    _io.write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"a": 3}], ["a", "b"])
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,2", "3,"]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "r.json"
    _io.write_json(target, {"old": True})

    def boom(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*r\.json: no space left on device"):
        _io.atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"old": True}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_in_the_way_is_named(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OutputError, match="it is a folder"):
        _io.write_json(tmp_path / "out.json", {})
    with pytest.raises(OutputError, match="it is a folder"):
        _io.check_writable(tmp_path / "out.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        _io.check_writable_folder(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot write"):
        _io.check_writable(tmp_path / "file" / "sub" / "r.json")  # a file where a folder must be


def test_read_only_folder_fails_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code = f"from lowformer import _io; _io.check_writable({str(ro / 'r.json')!r})"
    # root writes anywhere: the check runs as an unprivileged user, as a real user's run would
    out = run_unprivileged([sys.executable, "-c", code], tmp_path)
    assert out.returncode == 1
    assert f"OutputError: cannot write {ro / 'r.json'}: permission denied" in out.stderr


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".checkpoint-00000010.pt.abcd1234.tmp").write_bytes(b"partial")
    (tmp_path / "keep.pt").write_bytes(b"x")
    removed = _io.remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".checkpoint-00000010.pt.abcd1234.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]


def test_exit_codes():
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(ValueError("bad")) == 2
    assert exit_code(FileNotFoundError("x")) == 2
    assert exit_code(CheckpointError("corrupt")) == 1  # a ValueError, but a bad file, not a bad argument
    assert exit_code(IsADirectoryError("a folder given as a checkpoint")) == 2
    assert exit_code(VerificationError("exported file differs")) == 1
    assert exit_code(OutOfMemory.needs("x", 3 * 2**30, 2**30, "this machine", "try smaller")) == 1
    assert str(OutOfMemory.needs("x", 3 * 2**30, 2**30, "this machine", "y")) == (
        "x needs ~3.0 GiB of memory, this machine has 1.0 GiB available; y"
    )
    assert exit_code(OutputError("p", "read-only file system")) == 1
    oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 bytes")
    assert is_out_of_memory(oom) and exit_code(oom) == 1
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_one_name_resolver():
    assert parse_model_name("lowformer_b1") == ("lowformer", "lowformer_b1")
    assert parse_model_name("timm:resnet18.a1_in1k") == ("timm", "resnet18.a1_in1k")
    with pytest.raises(ValueError, match="write timm:resnet18"):
        parse_model_name("resnet18")
    with pytest.raises(ValueError, match="Did you mean lowformer_b1"):
        parse_model_name("lowformer_b1x")
    with pytest.raises(ValueError, match="Did you mean timm:fastvit_t8"):
        parse_model_name("timm:fastvit_t9")
    model = lowformer.create_model("timm:resnet18", num_classes=7)
    assert model.variant == "timm:resnet18" and model.get_classifier().out_features == 7
    feats = lowformer.create_model("timm:resnet18", features_only=True, out_indices=(2, 3))
    assert [f.shape[1] for f in feats(torch.zeros(1, 3, 64, 64))] == [128, 256]


def test_one_input_size_rule():
    assert check_image_size("lowformer_b1", (33, 97)) == (33, 97)
    with pytest.raises(ValueError, match="too small .* >= 32"):
        check_image_size("lowformer_b1", (31, 64))
    with pytest.raises(ValueError, match="multiples of 32, got 100x64 \\(e.g. 128x64\\)"):
        check_image_size("edgevit_xs", (100, 64))
    assert check_image_size("timm:resnet18", 64) == (64, 64)


def test_run_folder_is_never_silently_reused(tmp_path):
    from lowformer.train.lifecycle import RunFolderExists, prepare_run_folder

    run = tmp_path / "run"
    assert prepare_run_folder(run) == run and run.is_dir()  # new: created
    prepare_run_folder(run)  # empty: fine
    (run / "best.pt").write_bytes(b"first run")
    (run / ".last.pt.0123abcd.tmp").write_bytes(b"half")
    with pytest.raises(RunFolderExists, match="--resume .* --overwrite"):
        prepare_run_folder(run)
    assert (run / "best.pt").read_bytes() == b"first run"
    prepare_run_folder(run, resume=True)  # kept, stale temp file cleared
    assert sorted(p.name for p in run.iterdir()) == ["best.pt"]
    prepare_run_folder(run, overwrite=True)
    assert list(run.iterdir()) == []
    with pytest.raises(ValueError, match="give one"):
        prepare_run_folder(run, resume=True, overwrite=True)


def test_stop_signals_become_a_flag_then_restore(tmp_path):
    import signal

    from lowformer.train.lifecycle import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before
