"""Downstream tasks with our backbones: detection, semantic segmentation and retrieval.

    from lowformer.downstream import retinanet_lowformer, semantic_fpn_lowformer, embedding_lowformer
    detector = retinanet_lowformer("lowformer_b1", num_classes=91)        # torchvision RetinaNet
    segmenter = semantic_fpn_lowformer("lowformer_b1", num_classes=150)   # Semantic FPN
    embedder = embedding_lowformer("lowformer_b1", embed_dim=512)         # L2-normalised embeddings

Training and evaluating on standard datasets (what `lowformer detect` and `lowformer segment` run):

    from lowformer.downstream import load_recipe, train, evaluate_checkpoint
    result = train("detection", "lowformer_b1", load_recipe("detection", "retinanet_1x"),
                   data_dir="/data/coco", output_dir="runs/retinanet", checkpoint_path="evalmodel.pt")
    evaluation, _ = evaluate_checkpoint("detection", result.best_checkpoint)

Layout: models: `backbone` (features-only backbone, frozen BN / stages, FPN), `detection`
(RetinaNet, Faster R-CNN, Mask R-CNN), `segmentation` (Semantic FPN), `retrieval` (embeddings,
mAP / recall@k over folders and GPR1200). Data and metrics: `coco` (COCO format, COCO AP through
pycocotools), `ade20k` (ADE20K layout and pipeline), `seg_metrics` (mIoU, pixel accuracy),
`synthetic` (toy data and the built-in demo datasets). Training: `recipe` (YAML presets in
`recipes/`), `tasks` (data -> model -> loss -> metrics per task), `engine` (the resumable loop).
Everything uses only the timm feature contract, so "timm:NAME" backbones work too. Recipes,
commands and measured figures: docs/downstream.md.
"""

from ._data import DatasetError
from .backbone import BackboneWithFPN, FeatureBackbone, create_backbone
from .detection import (
    anchor_generator,
    fasterrcnn_lowformer,
    fasterrcnn_neck,
    maskrcnn_lowformer,
    retinanet_lowformer,
    retinanet_neck,
    train_detection,
)
from .engine import NonFiniteLossError, RunResult, evaluate_checkpoint, train
from .recipe import DetectionRecipe, RecipeError, SegmentationRecipe, list_recipes, load_recipe
from .retrieval import (
    AvgPool,
    EmbeddingModel,
    GeM,
    NormSoftmaxLoss,
    RetrievalResult,
    embedding_lowformer,
    evaluate_retrieval,
    retrieval_metrics,
    train_retrieval,
)
from .segmentation import (
    SemanticFPN,
    SemanticFPNHead,
    semantic_fpn_lowformer,
    semantic_fpn_timing_model,
    slide_inference,
    train_segmentation,
)

__all__ = [
    "AvgPool",
    "BackboneWithFPN",
    "DatasetError",
    "DetectionRecipe",
    "EmbeddingModel",
    "FeatureBackbone",
    "GeM",
    "NonFiniteLossError",
    "NormSoftmaxLoss",
    "RecipeError",
    "RetrievalResult",
    "RunResult",
    "SegmentationRecipe",
    "SemanticFPN",
    "SemanticFPNHead",
    "anchor_generator",
    "create_backbone",
    "embedding_lowformer",
    "evaluate_checkpoint",
    "evaluate_retrieval",
    "fasterrcnn_lowformer",
    "fasterrcnn_neck",
    "list_recipes",
    "load_recipe",
    "maskrcnn_lowformer",
    "retinanet_lowformer",
    "retinanet_neck",
    "retrieval_metrics",
    "semantic_fpn_lowformer",
    "semantic_fpn_timing_model",
    "slide_inference",
    "train",
    "train_detection",
    "train_retrieval",
    "train_segmentation",
]
