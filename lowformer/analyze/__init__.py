"""`lowformer analyze`: the papers' "Beyond MACs" study as a tool, run on your own device.

MACs mispredict execution time. This package puts counted MACs beside measured time at three
levels, all built on the benchmark's measuring core (`lowformer.bench`: timers, warm-up, backends,
precision, environment record) and the MAC counter (`lowformer.measure.count_macs`):

    from lowformer.analyze import analyze_elements, profile_model, analyze_models, write_report

    report = analyze_elements(["fused-mbconv"], channels=[16, 64], resolutions=[14, 56], device="cpu")
    print(report.table()); report.write_csv("out/elements-latency.csv"); report.plot("out")
    print(profile_model("lowformer_b1", device="cpu").table())
    print(analyze_models(["lowformer_b1", "timm:fastvit_t8", "timm:repvit_m1_1"]).table())
    write_report("out")                    # out/report.md from every result in out/

Layout: `elements` (pairs of design elements and their registry), `sweep` (grid, interleaved
timing, per-cell cache, time budget), `profile` (time per operator kind vs MAC share), `models`
(MACs vs latency/throughput across models), `plots` (heatmaps, bars) and `report` (terminal tables
and report.md). Method and outputs: docs/analyze.md.
"""

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
from .models import ModelsReport, analyze_models
from .profile import KINDS, ModelProfile, classify_op, profile_model
from .report import summarize_comparison, write_report
from .sweep import (
    DEFAULT_CHANNELS,
    DEFAULT_RESOLUTIONS,
    ROW_COLUMNS,
    CellResult,
    ElementReport,
    ElementTiming,
    SideResult,
    analyze_elements,
    count_sides,
    default_element_timing,
    plan_cells,
)

__all__ = [
    "BUILTIN_PAIRS",
    "DEFAULT_CHANNELS",
    "DEFAULT_RESOLUTIONS",
    "KINDS",
    "ROW_COLUMNS",
    "CellResult",
    "ElementPair",
    "ElementReport",
    "ElementTiming",
    "ModelProfile",
    "ModelsReport",
    "MultiHeadSelfAttention",
    "Side",
    "SideResult",
    "analyze_elements",
    "analyze_models",
    "classify_op",
    "count_sides",
    "default_element_timing",
    "get_pair",
    "list_pairs",
    "plan_cells",
    "profile_model",
    "register_pair",
    "summarize_comparison",
    "unregister_pair",
    "write_report",
]
