"""`lowformer analyze`: the papers' "Beyond MACs" study as a tool, run on your own device.

MACs mispredict execution time. This package puts counted MACs beside measured time at three
levels, all built on the measuring core (`lowformer.measure`: the MAC counter, timers, the
interleaved rounds, the run context, the profiler) and the benchmark's backends and runner:

    from lowformer.analyze import analyze_elements, profile_model, analyze_models
    from lowformer.report import format_elements, plot_element_heatmaps, write_report

    report = analyze_elements(["fused-mbconv"], channels=[16, 64], resolutions=[14, 56], device="cpu")
    print(format_elements(report.to_dict())); report.write_csv("out/elements-latency.csv")
    plot_element_heatmaps(report.to_dict(), "out")
    profile = profile_model("lowformer_b1", device="cpu")
    models = analyze_models(["lowformer_b1", "timm:fastvit_t8", "timm:repvit_m1_1"])
    write_report("out")                    # out/report.md from every result in out/

Layout: `elements` (pairs of design elements and their registry), `sweep` (plan and run the grid:
interleaved timing, per-cell cache, time budget), `cells` (the sweep's records and rows),
`profile` (time per operator kind vs MAC share), `roofline` (every operator call against the
device's measured ceilings), `opkinds` and `latency` (the analytic latency model: operator kinds,
the single-operator sweep, the fit), `element_fit` (its refit on element sweeps), `predict`
(models' predicted time), `models` (MACs, parameters and the prediction vs latency/throughput
across models). Records only: tables, figures
and report.md are `lowformer.report`'s. Method and outputs: docs/analyze.md.
"""

from .cells import ROW_COLUMNS, CellResult, ElementReport, SideResult, element_rows, summarize_comparison
from .element_fit import refine_latency_model
from .elements import (
    BUILTIN_PAIRS,
    ElementPair,
    MultiHeadSelfAttention,
    Side,
    get_pair,
    list_pairs,
    register_pair,
    unregister_pair,
)
from .latency import LatencyModel, build_latency_model, cached_latency_model, fit_latency_model
from .models import MODEL_SETS, ModelsPlan, ModelsReport, analyze_models, model_set, plan_models, run_models
from .opkinds import FIT_KINDS, KINDS, classify_op, fit_kind
from .predict import PredictionReport, predict_models
from .profile import ModelProfile, profile_model
from .sweep import (
    DEFAULT_CHANNELS,
    DEFAULT_RESOLUTIONS,
    ElementPlan,
    ElementTiming,
    analyze_elements,
    count_sides,
    default_element_timing,
    plan_cells,
    plan_elements,
    run_elements,
)

__all__ = [
    "BUILTIN_PAIRS",
    "DEFAULT_CHANNELS",
    "DEFAULT_RESOLUTIONS",
    "FIT_KINDS",
    "KINDS",
    "MODEL_SETS",
    "ROW_COLUMNS",
    "CellResult",
    "ElementPair",
    "ElementPlan",
    "ElementReport",
    "ElementTiming",
    "LatencyModel",
    "ModelProfile",
    "ModelsPlan",
    "ModelsReport",
    "MultiHeadSelfAttention",
    "PredictionReport",
    "Side",
    "SideResult",
    "analyze_elements",
    "analyze_models",
    "build_latency_model",
    "refine_latency_model",
    "cached_latency_model",
    "classify_op",
    "count_sides",
    "default_element_timing",
    "element_rows",
    "fit_kind",
    "fit_latency_model",
    "get_pair",
    "list_pairs",
    "model_set",
    "plan_cells",
    "plan_elements",
    "plan_models",
    "predict_models",
    "profile_model",
    "register_pair",
    "run_elements",
    "run_models",
    "summarize_comparison",
    "unregister_pair",
]
