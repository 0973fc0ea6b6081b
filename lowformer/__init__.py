"""lowformer: hardware-efficient vision backbones (LowFormer, EdgeViT) and proof of their speed."""

from .deploy import deploy
from .factory import create_model, load_model
from .models import LowFormer, LowFormerSpec, StageSpec, get_entry, list_models, register_model
from .tuning import load_deployed, tune
from .weights import CheckpointError, read_checkpoint, save_checkpoint, weights_dir

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LowFormer",
    "LowFormerSpec",
    "StageSpec",
    "create_model",
    "deploy",
    "get_entry",
    "list_models",
    "load_deployed",
    "load_model",
    "read_checkpoint",
    "register_model",
    "save_checkpoint",
    "tune",
    "weights_dir",
]
