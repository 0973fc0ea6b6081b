"""`lowformer bench`: timer accuracy, statistics, schema, error paths and every CPU backend.

Timing assertions use sleeps and spins with tolerant bounds, and models run with one thread at
32-64 px, so the file stays fast and steady on a shared 2-core machine.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lowformer
from lowformer.bench import (
    DEFAULT_MODELS,
    DETECTION_MODELS,
    BenchConfig,
    TimingPolicy,
    benchmark,
    compare,
    parse_spec,
    plan,
    reparameterize,
)
from lowformer.bench.backends import compile_note, compile_options
from lowformer.bench.compare import CompareEntry, pair_result
from lowformer.bench.result import CSV_COLUMNS, JSON_ONLY, SCHEMA
from lowformer.cli import main
from lowformer.factory import check_model_name
from lowformer.measure.session import classify_failure
from lowformer.models import list_models
from lowformer.report import format_bench, format_compare

TINY = TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=3, min_s=0.0)
SMALL_MODEL = "timm:test_resnet"


class SleepNet(nn.Module):
    """Takes a known time per call without using the CPU."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x.mean((2, 3)) * self.scale


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class FailsAboveBatch1(TinyConvNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError("this model refuses batches")
        return super().forward(x)


class OutOfMemoryNet(TinyConvNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise MemoryError("cannot allocate")


# --------------------------------------------------------------------------------------------
# planning, presets, names
# --------------------------------------------------------------------------------------------


def test_default_plan_uses_the_default_set():
    if all(m in list_models() for m in DEFAULT_MODELS if not m.startswith("timm:")):
        p = plan(device="cpu")
        assert [c.model for c in p.configs[::2]] == list(DEFAULT_MODELS)
        assert {(c.mode, c.batch_size) for c in p.configs} == {("throughput", 16), ("latency", 1)}
    else:  # a default model not registered yet gets the ordinary unknown-model error
        with pytest.raises(ValueError, match="unknown model"):
            plan(device="cpu")


def test_presets_and_explicit_arguments():
    p = plan([SMALL_MODEL], device="cpu", preset="paper-latency")
    (c,) = p.configs
    assert (c.mode, c.batch_size, c.backend, c.precision, c.image_size) == (
        "latency",
        1,
        "torchscript",
        "fp32",
        (224, 224),
    )
    assert c.timing.min_iters == 500
    p = plan([SMALL_MODEL], device="cpu", preset="paper-throughput", backends=["eager"], batch_sizes=[4])
    assert [(c.mode, c.batch_size, c.backend) for c in p.configs] == [("throughput", 4, "eager")]
    with pytest.raises(ValueError, match="unknown preset"):
        plan([SMALL_MODEL], device="cpu", preset="paper")


def test_sweep_expands_every_combination():
    p = plan([SMALL_MODEL], device="cpu", batch_sizes=[2, 4], image_sizes=[32, (48, 64)], threads=[1, 2])
    assert len(p.configs) == (2 + 1) * 2 * 2  # (two throughput batches + latency) x images x threads
    assert {c.image_size for c in p.configs} == {(32, 32), (48, 64)}


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="latency mode is batch 1"):
        plan([SMALL_MODEL], device="cpu", modes=["latency"], batch_sizes=[8])
    with pytest.raises(ValueError, match="nothing to run: tf32"):
        plan([SMALL_MODEL], device="cpu", precisions=["tf32"])
    with pytest.raises(ValueError, match="unknown backend"):
        plan([SMALL_MODEL], device="cpu", backends=["tensorrt"])
    with pytest.raises(ValueError, match="compile backend"):
        plan([SMALL_MODEL], device="cpu", compile_mode="max-autotune")
    with pytest.raises(ValueError, match="jobs"):
        plan([SMALL_MODEL], device="cpu", jobs=0)


def test_unknown_model_names_get_close_matches():
    with pytest.raises(ValueError, match="Did you mean.*lowformer_b1"):
        check_model_name("lowformer_b1x")
    with pytest.raises(ValueError, match="timm:fastvit_t8"):
        check_model_name("timm:fastvit_t9")
    with pytest.raises(ValueError, match="write timm:fastvit_t8"):
        check_model_name("fastvit_t8")
    check_model_name("timm:lowformer_b1")
    check_model_name("timm:resnet18.a1_in1k")  # a pretrained tag is fine


# --------------------------------------------------------------------------------------------
# running: results, schema, failures
# --------------------------------------------------------------------------------------------


def test_runner_times_a_sleeping_module():
    report = benchmark([("sleep20ms", SleepNet(0.020))], device="cpu", modes=["latency"], image_sizes=[32], timing=TINY)
    (r,) = report.results
    assert r.ok and r.source == "module" and r.timer == "perf_counter"
    # a sleep never returns early; on a loaded machine it may return late, so the upper bound is loose
    assert 20.0 <= r.latency_ms_p50 <= 30.0
    assert r.throughput_img_s == pytest.approx(1e3 / r.latency_ms_p50)
    assert r.latency_ms_min <= r.latency_ms_p10 <= r.latency_ms_p50 <= r.latency_ms_p90 <= r.latency_ms_max


def test_json_and_csv_schema(tmp_path):
    report = benchmark(
        [SMALL_MODEL], device="cpu", batch_sizes=[2], image_sizes=[32], threads=1, timing=TINY, preset=None
    )
    data = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert data["schema"] == SCHEMA
    for key in ("date", "command", "torch", "timm", "onnxruntime", "cpu", "device_name", "tf32_matmul", "cudnn"):
        assert key in data["environment"]
    assert data["settings"]["timing"] == TINY.to_dict()
    assert [r["mode"] for r in data["results"]] == ["throughput", "latency"]
    for r in data["results"]:
        assert [k for k in r if k not in JSON_ONLY] == [c for c in CSV_COLUMNS if not c.startswith("env_")]
        assert r["tuning"] is None  # a tuned row's table: JSON only, no CSV cell
        assert r["status"] == "ok" and r["latency_ms_p50"] > 0 and r["macs"] > 0 and r["params"] > 0
        assert r["threads"] == 1 and r["memory_source"].startswith(("proc_vmhwm", "ru_maxrss"))
        assert r["mfu"] is None  # no known CPU peak
    rows = list(csv.DictReader(open(report.write_csv(tmp_path / "r.csv"))))
    assert len(rows) == 2 and list(rows[0]) == CSV_COLUMNS
    assert rows[0]["env_torch"] == torch.__version__
    assert float(rows[1]["latency_ms_p50"]) == pytest.approx(data["results"][1]["latency_ms_p50"])


def test_mfu_from_a_given_peak():
    report = benchmark([SMALL_MODEL], device="cpu", modes=["latency"], image_sizes=[32], timing=TINY, peak_tflops=1.0)
    (r,) = report.results
    assert r.peak_tflops_source == "user"
    assert r.mfu == pytest.approx(2 * r.macs * r.throughput_img_s / 1e12)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_cpu_backends(backend):
    report = benchmark(
        [SMALL_MODEL], device="cpu", modes=["latency"], image_sizes=[32], backends=[backend], threads=1, timing=TINY
    )
    (r,) = report.results
    assert r.ok, r.error
    assert r.backend == backend and r.timer == "perf_counter" and r.latency_ms_p50 > 0
    if backend == "onnxruntime":
        assert r.backend_note == "CPUExecutionProvider"


def test_compile_backend_runs_or_records_its_failure():
    report = benchmark(
        [("tiny", TinyConvNet())], device="cpu", modes=["latency"], image_sizes=[32], backends=["compile"], timing=TINY
    )
    (r,) = report.results
    assert r.status in ("ok", "error")
    if r.ok:
        assert r.latency_ms_p50 > 0 and r.prepare_s > 0  # prepare_s holds the compilation
        assert r.backend_note == "torch.compile mode=default, freezing"
    else:
        assert r.error and r.latency_ms_p50 is None


def test_cli_compile_mode_reaches_torch_compile_and_the_record(tmp_path, monkeypatch, capsys):
    """`--compile-mode reduce-overhead` (latency) is what torch.compile is called with, and the
    result records it with freezing on CPU; torch.compile is replaced by a recorder, nothing compiles."""
    from torch._inductor import config as inductor_config

    calls = []

    def fake_compile(model, mode=None):
        def run(x):
            calls.append((mode, inductor_config.freezing))  # the switch as inductor would see it
            return model(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["bench", "-m", SMALL_MODEL, "--mode", "latency", "--image-size", "32", "--threads", "1"]
    argv += ["--backend", "compile", "--compile-mode", "reduce-overhead", "--iters", "2", "--seconds", "0"]
    argv += ["--warmup-iters", "1", "--warmup-seconds", "0", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert calls and set(calls) == {("reduce-overhead", True)}
    assert inductor_config.freezing is False  # restored after each call
    (r,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert (
        r["compile_mode"] == "reduce-overhead" and r["backend_note"] == "torch.compile mode=reduce-overhead, freezing"
    )
    assert compile_options("cpu", "reduce-overhead")["freezing"] is True
    assert compile_options("cuda", "reduce-overhead") is None  # on a GPU the mode alone (CUDA graphs)
    assert compile_note("cuda", "reduce-overhead") == "torch.compile mode=reduce-overhead"


def test_compile_on_cpu_really_freezes():
    """The frozen graph runs oneDNN convolutions with packed weights, not `aten::convolution`."""
    from torch.profiler import profile

    from lowformer.bench.backends import prepare

    with torch.no_grad():
        prepared = prepare(TinyConvNet().eval(), torch.randn(2, 3, 32, 32), "compile", "fp32", "cpu")
        with profile() as prof:
            prepared.step()
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_convolution_pointwise" in ops and "aten::convolution" not in ops, ops


def test_aoti_backend():
    report = benchmark(
        [("tiny", TinyConvNet())], device="cpu", modes=["latency"], image_sizes=[32], backends=["aoti"], timing=TINY
    )
    (r,) = report.results
    assert r.ok, r.error
    assert r.backend_note == "AOTInductor, freezing" and r.prepare_s > 0 and r.latency_ms_p50 > 0


@pytest.fixture
def eager_only_tuning(monkeypatch):
    """The tuner's candidates cut to the eager layouts: the tuned backend's plumbing, without compiling."""
    from lowformer.tuning import tuner

    monkeypatch.setattr(tuner, "candidate_options", lambda device_type: [tuner.Option("eager", "contiguous")])


def test_tuned_backend_records_the_choice(eager_only_tuning, tmp_path):
    report = benchmark(
        [("tiny", TinyConvNet())], device="cpu", modes=["latency"], image_sizes=[32], backends=["tuned"], timing=TINY
    )
    (r,) = report.results
    assert r.ok, r.error
    assert r.backend == "tuned" and r.backend_note == "tuned: eager/contiguous"
    assert r.tuning["best"] == "eager/contiguous" and r.tuning["candidates"][0]["max_rel_err"] <= 1e-4
    assert "tuning" in json.loads(report.write_json(tmp_path / "r.json").read_text())["results"][0]
    with open(report.write_csv(tmp_path / "r.csv")) as f:
        assert "tuning" not in next(csv.reader(f))  # nested: JSON only
    cmp = compare(
        [SMALL_MODEL, f"{SMALL_MODEL}@backend=tuned"],
        rounds=2,
        device="cpu",
        image_size=32,
        threads=1,
        warmup=TINY,
        round_timing=TINY,
    )
    a, b = cmp.entries
    assert a.tuning is None and b.tuning["best"] == "eager/contiguous" and b.backend_note == "tuned: eager/contiguous"


def test_tuned_backend_refuses_the_switches_it_decides():
    with pytest.raises(ValueError, match="drop channels_last"):
        plan([SMALL_MODEL], device="cpu", backends=["tuned"], channels_last=True)
    with pytest.raises(ValueError, match="drop --jobs"):
        plan([SMALL_MODEL], device="cpu", backends=["tuned"], jobs=2)
    with pytest.raises(ValueError, match="drop reparam"):
        compare([SMALL_MODEL, f"{SMALL_MODEL}@backend=tuned,reparam"], device="cpu")


def test_channels_last_bf16_and_skipped_combinations():
    report = benchmark(
        [SMALL_MODEL],
        device="cpu",
        modes=["latency"],
        image_sizes=[32],
        backends=["eager", "onnxruntime"],
        precisions=["fp32", "bf16"],
        channels_last=True,
        threads=1,
        timing=TINY,
    )
    by = {(r.backend, r.precision): r for r in report.results}
    assert by["eager", "fp32"].ok and by["eager", "bf16"].ok and by["eager", "bf16"].channels_last
    assert by["onnxruntime", "fp32"].status == "skipped" and "channels_last" in by["onnxruntime", "fp32"].error
    assert by["onnxruntime", "bf16"].status == "skipped"
    assert "skipped [" in format_bench(report)


def test_reparam_on_a_timm_model_and_the_fallbacks():
    plain, fused = (
        benchmark(
            ["timm:mobileone_s0"], device="cpu", modes=["latency"], image_sizes=[64], reparam=rep, timing=TINY
        ).results[0]
        for rep in (False, True)
    )
    assert fused.ok and fused.reparam_applied == "timm.utils.reparameterize_model"
    assert fused.macs < plain.macs and fused.params < plain.params  # branches folded into one conv
    assert reparameterize(TinyConvNet())[1] == "none-available"

    ours = lowformer.create_model("lowformer_b0").eval()
    assert reparameterize(ours)[1] == "timm.utils.reparameterize_model"  # a module given directly: its hooks
    model, applied = reparameterize(ours, source="lowformer")
    assert applied == "lowformer.deploy"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), rtol=1e-4, atol=1e-5)


def test_failing_configuration_is_recorded_and_the_run_goes_on():
    report = benchmark(
        [("fussy", FailsAboveBatch1()), ("oom", OutOfMemoryNet()), ("tiny", TinyConvNet())],
        device="cpu",
        batch_sizes=[2],
        image_sizes=[32],
        timing=TINY,
    )
    status = {(r.model, r.mode): r.status for r in report.results}
    assert status == {
        ("fussy", "throughput"): "error",
        ("fussy", "latency"): "ok",
        ("oom", "throughput"): "oom",
        ("oom", "latency"): "oom",
        ("tiny", "throughput"): "ok",
        ("tiny", "latency"): "ok",
    }
    fussy = next(r for r in report.results if r.model == "fussy" and not r.ok)
    assert fussy.error == "RuntimeError: this model refuses batches"
    assert classify_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))[0] == "oom"
    assert "error [1]" in format_bench(report)


def test_two_jobs_share_the_device():
    report = benchmark([SMALL_MODEL], device="cpu", modes=["latency"], image_sizes=[32], threads=1, jobs=2, timing=TINY)
    (r,) = report.results
    assert r.ok, r.error
    assert r.jobs == 2 and len(r.jobs_latency_ms_p50) == 2 and r.iterations >= 2 * TINY.min_iters
    assert r.throughput_img_s == pytest.approx(sum(1e3 / m for m in r.jobs_latency_ms_p50))


# --------------------------------------------------------------------------------------------
# task "detection": backbone + RetinaNet FPN neck
# --------------------------------------------------------------------------------------------


def test_detection_task_defaults_and_errors():
    p = plan(task="detection", device="cpu")
    assert [c.model for c in p.configs[::2]] == list(DETECTION_MODELS)
    assert {c.task for c in p.configs} == {"detection"} and p.settings["task"] == "detection"
    assert {c.image_size for c in p.configs} == {(512, 512)}  # the papers' detection speed setting
    assert {(c.mode, c.batch_size) for c in p.configs} == {("throughput", 4), ("latency", 1)}
    assert "RetinaNet FPN neck" in p.describe()
    # a preset's 224x224 is a classification protocol; detection keeps 512 unless asked
    (config,) = plan(["lowformer_b0"], task="detection", device="cpu", preset="paper-latency").configs
    assert config.image_size == (512, 512) and config.backend == "torchscript"
    with pytest.raises(ValueError, match="unknown task 'panoptic'"):
        plan(task="panoptic", device="cpu")


def test_segmentation_task_times_the_whole_semantic_fpn():
    p = plan(task="segmentation", device="cpu")
    assert [c.model for c in p.configs[::2]] == list(DETECTION_MODELS)
    assert {c.image_size for c in p.configs} == {(512, 512)}
    assert {(c.mode, c.batch_size) for c in p.configs} == {("throughput", 4), ("latency", 1)}
    assert "segmentation: Semantic FPN" in p.describe()
    report = benchmark(
        ["lowformer_b0"],
        task="segmentation",
        device="cpu",
        modes=["latency"],
        image_sizes=[64],
        threads=1,
        backends=["eager", "onnxruntime"],
        reparam=True,
        timing=TINY,
    )
    assert all(r.ok and r.task == "segmentation" for r in report.results), [r.error for r in report.results]
    assert {r.reparam_applied for r in report.results} == {"lowformer.deploy"}
    assert "all rows: task segmentation" in format_bench(report)


def test_detection_task_times_the_neck_on_every_cpu_backend(tmp_path):
    from lowformer.bench.models import build_model

    report = benchmark(
        ["edgevit_xxs", SMALL_MODEL],
        task="detection",
        device="cpu",
        modes=["latency"],
        image_sizes=[64],
        backends=["eager", "torchscript", "onnxruntime"],
        reparam=True,
        threads=1,
        timing=TINY,
    )
    assert all(r.ok and r.task == "detection" for r in report.results), [r.error for r in report.results]
    ours = [r for r in report.results if r.model == "edgevit_xxs"]
    assert {r.reparam_applied for r in ours} == {"lowformer.deploy"}  # deploy mode reaches inside the neck
    neck = build_model(SMALL_MODEL, task="detection")
    with torch.no_grad():
        maps = neck(torch.randn(1, 3, 64, 64))
    assert [m.shape[1:] for m in maps] == [(256, 8, 8), (256, 4, 4), (256, 2, 2), (256, 1, 1), (256, 1, 1)]  # P3-P7
    timm_row = next(r for r in report.results if r.model == SMALL_MODEL)
    assert timm_row.params == sum(p.numel() for p in neck.parameters())
    assert timm_row.macs > 0
    data = json.loads(report.write_json(tmp_path / "d.json").read_text())
    assert data["settings"]["task"] == "detection" and {r["task"] for r in data["results"]} == {"detection"}
    assert {c["task"] for c in data["correlations"]} <= {"detection"}
    assert "all rows: task detection" in format_bench(report)
    rows = list(csv.DictReader(open(report.write_csv(tmp_path / "d.csv"))))
    assert {row["task"] for row in rows} == {"detection"}


def test_cli_detection_task(tmp_path, capsys):
    argv = ["bench", "--task", "detection", "-m", SMALL_MODEL, "--mode", "latency", "--image-size", "64"]
    argv += ["--threads", "1", "--warmup-iters", "1", "--warmup-seconds", "0", "--iters", "2", "--seconds", "0"]
    argv += ["--no-progress", "--json", str(tmp_path / "d.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RetinaNet FPN neck" in out and "task detection" in out
    assert json.loads((tmp_path / "d.json").read_text())["results"][0]["task"] == "detection"
    argv = ["bench", "--task", "detection", "--compare", SMALL_MODEL, f"{SMALL_MODEL}@threads=1", "--image-size", "64"]
    argv += ["--rounds", "2", "--iters", "1", "--seconds", "0", "--warmup-iters", "1", "--warmup-seconds", "0"]
    assert main([*argv, "--no-save"]) == 0
    assert "detection neck, batch 1, 64x64" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# paired comparison
# --------------------------------------------------------------------------------------------


def test_parse_spec():
    base = BenchConfig(model="", device="cpu", batch_size=4)
    c = parse_spec("lowformer_b1@backend=torchscript,channels_last,threads=1", base)
    assert (c.model, c.backend, c.channels_last, c.threads, c.batch_size) == ("lowformer_b1", "torchscript", True, 1, 4)
    assert parse_spec("timm:fastvit_t8@reparam=false", base).reparam is False
    for bad, match in [
        ("lowformer_b1@batch_size=2", "unknown option"),
        ("lowformer_b1@threads=two", "not an integer"),
        ("lowformer_b1@backend=trt", "unknown backend"),
        ("lowformer_b1@channels_last=maybe", "not a boolean"),
        ("lowformr_b1", "Did you mean"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_spec(bad, base)


def test_pair_bookkeeping():
    a = CompareEntry("A", BenchConfig("a"), "lowformer", round_medians_ms=[2.0, 2.2, 1.8, 2.0])
    b = CompareEntry("B", BenchConfig("b"), "lowformer", round_medians_ms=[1.0, 1.0, 1.2, 2.5])
    p = pair_result(a, b)
    assert p.rounds == 4
    assert (p.speedup_min, p.speedup_max) == (pytest.approx(0.8), pytest.approx(2.2))
    assert p.speedup_median == pytest.approx((1.5 + 2.0) / 2)
    assert p.verdict.startswith("no consistent")
    b.round_medians_ms = [1.0, 1.0, 1.0]  # a failed config: pairs use the rounds both finished
    p = pair_result(a, b)
    assert p.rounds == 3 and p.verdict == "B faster in every round"


def test_compare_interleaves_rounds_in_one_process(tmp_path):
    specs = [SMALL_MODEL, f"{SMALL_MODEL}@backend=torchscript", f"{SMALL_MODEL}@precision=tf32"]
    report = compare(specs, rounds=3, device="cpu", image_size=32, threads=1, warmup=TINY, round_timing=TINY)
    a, b, c = report.entries
    assert a.ok and b.ok and c.status == "skipped"
    assert len(a.round_medians_ms) == len(b.round_medians_ms) == 3
    assert len(a.samples_s) == 3 * TINY.min_iters
    (p,) = report.pairs
    ratios = [x / y for x, y in zip(a.round_medians_ms, b.round_medians_ms)]
    assert (p.a, p.b, p.speedup_min, p.speedup_max) == (specs[0], specs[1], min(ratios), max(ratios))
    data = json.loads(report.write_json(tmp_path / "c.json").read_text())
    assert data["schema"] == "lowformer.bench.compare/1"
    assert [c["tag"] for c in data["configs"]] == ["A", "B", "C"]
    assert data["pairs"][0]["rounds"] == 3
    assert "speedup" in format_compare(report)
    with pytest.raises(ValueError, match="at least two"):
        compare([SMALL_MODEL], device="cpu")


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "lowformr_b1"], "Did you mean"),
        (["-m", "timm:fastvit_t9"], "timm:fastvit_t8"),
        (["--device", "tpu"], "unknown device"),
        (["--mode", "latency", "--batch-size", "8"], "latency mode is batch 1"),
        (["--rounds", "3"], "--rounds applies to --compare"),
        (["--compare", SMALL_MODEL, "timm:test_vit", "--batch-size", "1", "2"], "one --batch-size"),
        (["--compare", SMALL_MODEL, "timm:test_vit", "--model", SMALL_MODEL], "drop --model"),
        (["--tuned", "--backend", "eager"], "drop --backend"),
        (["--tuned", "--channels-last"], "drop channels_last"),
    ],
)
def test_cli_bad_arguments_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--batch-size", "0"], ["--image-size", "big"], ["--backend", "tensorrt"], ["--jobs", "-1"], ["--iters", "x"]],
)
def test_cli_unparsable_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_run_writes_json_csv_and_plot(tmp_path, capsys):
    argv = ["bench", "-m", SMALL_MODEL, "timm:test_efficientnet", "timm:test_byobnet", "--image-size", "32"]
    argv += ["--batch-size", "2", "--threads", "1", "--warmup-iters", "1", "--warmup-seconds", "0"]
    argv += ["--iters", "3", "--seconds", "0", "--no-progress", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "timing per configuration" in out and "Spearman rho" in out and "ms p50" in out
    (json_path,) = tmp_path.glob("bench-*.json")
    (png_path,) = tmp_path.glob("bench-*.png")
    data = json.loads(json_path.read_text())
    assert data["schema"] == SCHEMA and len(data["correlations"]) == 2  # throughput and latency, 3 models each
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # the MACs-vs-speed plot
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind


def test_cli_exit_code_1_when_a_configuration_fails(tmp_path, monkeypatch, capsys):
    import lowformer.bench.runner as runner

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(runner, "prepare", out_of_memory)
    argv = ["bench", "-m", SMALL_MODEL, "--mode", "latency", "--image-size", "32", "--iters", "1"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 1
    captured = capsys.readouterr()
    assert (
        "oom [1]" in captured.out and "[1] timm:test_resnet latency batch 1: OutOfMemoryError: CUDA out" in captured.out
    )
    assert captured.err == "lowformer bench: error: 1 of 1 configuration(s) failed (see the table above)\n"
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["status"] == "oom"  # written all the same


def test_cli_ctrl_c_exits_130(monkeypatch, capsys):
    import lowformer.bench.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_config", interrupted)
    assert main(["bench", "-m", SMALL_MODEL, "--mode", "latency", "--image-size", "32", "--no-save"]) == 130
    assert capsys.readouterr().err == "lowformer bench: interrupted\n"


# --------------------------------------------------------------------------------------------
# what a user gets wrong: one line, the right exit code, nothing timed, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seconds", "5", "--max-seconds", "2"], "--max-seconds (2) must be >= --seconds (5)"),
        (["--iters", "9", "--max-iters", "3"], "--max-iters (3) must be >= --iters (9)"),
        (["--compare", SMALL_MODEL, "timm:test_vit", "--seconds", "1", "--max-seconds", "0.5"], "--max-seconds (0.5)"),
        (["--image-size", "16"], "image size 16x16 is too small for timm:test_resnet: height and width must be >= 32"),
        (["-m", "edgevit_xxs", "--image-size", "200"], "edgevit_xxs needs height and width that are multiples of 32"),
        (["--compare", "edgevit_xxs", "edgevit_xxs@threads=1", "--image-size", "100"], "multiples of 32, got 100x100"),
        (["--compare", SMALL_MODEL, "timm:test_vit", "--compile-mode", "max-autotune"], "(--compile-mode"),
    ],
)
def test_cli_option_errors_name_the_flags(argv, message, capsys):
    if argv[0] != "--compare" and "-m" not in argv:
        argv = ["-m", SMALL_MODEL, *argv]
    assert main(["bench", *argv, "--no-save"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1
    assert "timing per configuration" not in captured.out and "comparing" not in captured.out  # refused before
    for internal in ("max_s", "min_s", "max_iters", "min_iters"):
        assert internal not in captured.err


def test_cli_rounds_below_2_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--compare", SMALL_MODEL, "timm:test_vit", "--rounds", "1"])
    assert e.value.code == 2 and "argument --rounds: must be >= 2, got 1" in capsys.readouterr().err


def test_cli_max_seconds_alone_lowers_the_default_floor(capsys):
    argv = ["bench", "-m", SMALL_MODEL, "--mode", "latency", "--image-size", "32", "--threads", "1", "--no-save"]
    assert main([*argv, "--warmup-seconds", "0", "--iters", "1", "--max-seconds", "0.2", "--no-progress"]) == 0
    assert "then >= 1 timed iters and >= 0.2 s (at most 100000 iters or 0.2 s)" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["json-is-a-folder", "out-dir-is-a-file", "disk-full"])
def test_cli_unwritable_output_fails_before_the_run(where, tmp_path, monkeypatch, capsys):
    argv = ["bench", "-m", SMALL_MODEL, "--mode", "latency", "--image-size", "32"]
    if where == "json-is-a-folder":
        (tmp_path / "r.json").mkdir()
        argv += ["--json", str(tmp_path / "r.json")]
        message = f"cannot write {tmp_path / 'r.json'}: it is a folder; give a file name"
    elif where == "out-dir-is-a-file":
        (tmp_path / "results").write_text("not a folder")
        argv += ["--out-dir", str(tmp_path / "results")]
        message = f"cannot write {tmp_path / 'results'}: it is a file, not a folder"
    else:
        import errno

        import lowformer._io

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(lowformer._io.tempfile, "mkstemp", full)
        argv += ["--csv", str(tmp_path / "r.csv")]
        message = f"cannot write {tmp_path / 'r.csv'}: no space left on device"
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == f"lowformer bench: error: {message}\n"
    assert captured.out == ""  # nothing planned, nothing timed
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("bench-*"))


def test_cli_read_only_output_folder(tmp_path):
    import os
    import sys

    from helpers import run_unprivileged

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    argv = [sys.executable, "-m", "lowformer", "bench", "-m", SMALL_MODEL, "--json", str(folder / "r.json")]
    package_root = str(Path(lowformer.__file__).resolve().parents[1])  # this checkout, in the child too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = run_unprivileged(argv, cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"lowformer bench: error: cannot write {folder / 'r.json'}: permission denied\n"
    assert done.stdout == "" and not list(folder.iterdir())


def test_cli_compare(capsys):
    argv = ["bench", "--compare", SMALL_MODEL, f"{SMALL_MODEL}@threads=1", "--image-size", "32", "--rounds", "2"]
    argv += ["--iters", "2", "--seconds", "0", "--warmup-iters", "1", "--warmup-seconds", "0", "--no-save"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "B vs A" in out and "paired comparison: 2 rounds" in out
