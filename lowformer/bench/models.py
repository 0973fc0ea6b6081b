"""Model names a benchmark accepts: ours (`lowformer.list_models()`) and timm's (`timm:NAME`)."""

from __future__ import annotations

import difflib

from torch import nn

from ..factory import create_model
from ..models import list_models

TIMM_PREFIX = "timm:"

# The README's comparison: our families against the efficient peers the papers compare with.
DEFAULT_MODELS = (
    "lowformer_b0",
    "lowformer_b1",
    "lowformer_e1",
    "edgevit_xs",
    "timm:mobilenetv3_large_100",
    "timm:efficientvit_b1",
    "timm:fastvit_t8",
    "timm:repvit_m1_1",
    "timm:mobileone_s1",
)


def model_source(name: str) -> str:
    return "timm" if name.startswith(TIMM_PREFIX) else "lowformer"


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def check_model_name(name: str) -> None:
    """Raise ValueError, with close matches, unless `name` can be built."""
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX) :]
        if arch and timm.is_model(arch.split(".")[0]):
            return
        close = difflib.get_close_matches(arch, _timm_names(), n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {arch!r}.{hint} (see timm.list_models())")
    ours = list_models()
    if name in ours:
        return
    timm_names = _timm_names()
    if name in timm_names:
        raise ValueError(f"unknown model {name!r}: it is a timm model, write {TIMM_PREFIX}{name}")
    candidates = ours + [TIMM_PREFIX + n for n in timm_names]
    close = difflib.get_close_matches(name, ours, n=3, cutoff=0.5)
    close += [c for c in difflib.get_close_matches(TIMM_PREFIX + name, candidates, n=3, cutoff=0.6) if c not in close]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Ours: {', '.join(ours)}; timm's: {TIMM_PREFIX}NAME")


def build_model(name: str) -> nn.Module:
    """A randomly initialised model in eval mode (benchmarks need no weights)."""
    check_model_name(name)
    if name.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(name[len(TIMM_PREFIX) :], pretrained=False)
    else:
        model = create_model(name)
    return model.eval()
