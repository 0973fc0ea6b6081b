"""Model families. Importing this package registers every variant."""

from . import edgevit, lowformer  # noqa: F401  (importing registers their presets)
from ._registry import ModelEntry, get_entry, list_models, register_model
from .edgevit import EdgeViT, EdgeViTSpec, EdgeViTStageSpec
from .lowformer import LowFormer, LowFormerSpec, StageSpec

__all__ = [
    "EdgeViT",
    "EdgeViTSpec",
    "EdgeViTStageSpec",
    "LowFormer",
    "LowFormerSpec",
    "ModelEntry",
    "StageSpec",
    "get_entry",
    "list_models",
    "register_model",
]
