"""The `lowformer` command line, run as a user would (a subprocess of the installed script)."""

import json
import subprocess
import sys

import pytest


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
        (("info", "lowformer_b0", "--image-size", "16", "16"), "at least 32"),
        (("info", "lowformer_b0", "--image-size", "big", "7"), "invalid int"),
        (("nonsense",), "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, text):
    r = _run(*args)
    assert r.returncode == 2
    assert text in r.stderr
