"""Downstream tasks with our backbones: detection, semantic segmentation and retrieval.

    from lowformer.downstream import retinanet_lowformer, semantic_fpn_lowformer, embedding_lowformer
    detector = retinanet_lowformer("lowformer_b1", num_classes=91)        # torchvision RetinaNet
    segmenter = semantic_fpn_lowformer("lowformer_b1", num_classes=150)   # Semantic FPN
    embedder = embedding_lowformer("lowformer_b1", embed_dim=512)         # L2-normalised embeddings

Layout: `backbone` (features-only backbone, frozen BN / stages, FPN), `detection` (RetinaNet,
Faster R-CNN), `segmentation` (Semantic FPN), `retrieval` (embeddings, mAP / recall@k over
folders), `synthetic` (toy data for tests and recipes). Everything uses only the timm feature
contract, so "timm:NAME" backbones work too. Recipes and measured speed: docs/downstream.md.
"""

from .backbone import BackboneWithFPN, FeatureBackbone, create_backbone
from .detection import (
    anchor_generator,
    fasterrcnn_lowformer,
    fasterrcnn_neck,
    retinanet_lowformer,
    retinanet_neck,
    train_detection,
)
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
from .segmentation import SemanticFPN, SemanticFPNHead, semantic_fpn_lowformer, train_segmentation

__all__ = [
    "AvgPool",
    "BackboneWithFPN",
    "EmbeddingModel",
    "FeatureBackbone",
    "GeM",
    "NormSoftmaxLoss",
    "RetrievalResult",
    "SemanticFPN",
    "SemanticFPNHead",
    "anchor_generator",
    "create_backbone",
    "embedding_lowformer",
    "evaluate_retrieval",
    "fasterrcnn_lowformer",
    "fasterrcnn_neck",
    "retinanet_lowformer",
    "retinanet_neck",
    "retrieval_metrics",
    "semantic_fpn_lowformer",
    "train_detection",
    "train_retrieval",
    "train_segmentation",
]
