"""Model families. Importing this package registers every variant."""

from . import lowformer  # noqa: F401  (registers the LowFormer presets)
from ._registry import ModelEntry, get_entry, list_models, register_model
from .lowformer import LowFormer, LowFormerSpec, StageSpec

__all__ = ["LowFormer", "LowFormerSpec", "ModelEntry", "StageSpec", "get_entry", "list_models", "register_model"]
