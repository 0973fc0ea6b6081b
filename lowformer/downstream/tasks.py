"""The two dense-prediction tasks the downstream trainer runs, each as data -> model -> loss -> metrics.

`DetectionTask`: COCO-format data (`coco`), a torchvision RetinaNet / Faster R-CNN / Mask R-CNN over
one of our backbones (`detection`), the detector's own training losses, COCO AP through pycocotools
with predictions as COCO results JSON. `SegmentationTask`: the ADE20K layout (`ade20k`), Semantic
FPN (`segmentation`), pixel-wise cross-entropy with the ignore index, mIoU / pixel accuracy
(`seg_metrics`), whole-image or sliding-window inference.

The trainer (`engine`) knows nothing task-specific beyond this interface: `load_data`,
`build_model`, `loss`, `evaluate`, and the metric that picks the best checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..train.distributed import DistInfo, all_reduce_sum
from . import synthetic
from ._data import DatasetError, raise_failures, shard
from .ade20k import SegmentationDataset, ade_split, class_names, collate_segmentation
from .coco import CocoDetectionDataset, check_coco, coco_split, collate_detection, evaluate_coco, to_coco_results
from .detection import DETECTOR_BUILDERS
from .recipe import DetectionRecipe, DownstreamRecipe, SegmentationRecipe
from .seg_metrics import confusion_matrix, segmentation_metrics
from .segmentation import GroupNorm32, semantic_fpn_lowformer, slide_inference

_logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """What a task found in a dataset: classes, and how to make its training and evaluation datasets."""

    root: Path
    splits: tuple[str, str]
    num_classes: int  # as the model counts them
    names: list[str]  # the object / segmentation classes, for reports
    meta: dict[str, Any]  # saved in checkpoints; a resumed run must find the same
    train: Any = None  # the checked split objects (task-specific)
    val: Any = None


@dataclass
class Evaluation:
    """One evaluation: flat metrics for the log, the one that picks the best checkpoint, what to print
    and files to write into the run folder ({file name: JSON-able data})."""

    metrics: dict[str, float | None]
    primary: float
    text: str
    files: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def _mean_std(model: nn.Module) -> tuple[list[float], list[float]]:
    for m in model.modules():
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
            return list(cfg["mean"]), list(cfg["std"])
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def _eval_loader(dataset: Dataset, batch_size: int, workers: int, info: DistInfo, collate) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=shard(len(dataset), batch_size, info.world_size, info.rank),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
    )


class DetectionTask:
    name = "detection"
    recipe_type = DetectionRecipe
    default_splits = ("train2017", "val2017")
    metric = "bbox_AP"  # picks the best checkpoint
    columns = ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "segm_AP", "segm_AP50")

    def write_demo(self, root: Path, seed: int) -> None:
        synthetic.write_coco_shapes(root, seed=seed, splits=self.default_splits)

    def model_label(self, recipe: DetectionRecipe) -> str:
        return recipe.detector

    def load_data(self, recipe: DetectionRecipe, root: Path, splits: Sequence[str], train: bool = True) -> TaskData:
        masks = recipe.detector == "maskrcnn"
        train_split = coco_split(root, splits[0]) if train else None
        val_split = coco_split(root, splits[1])
        val_info = check_coco(val_split, need_masks=masks)  # mask AP needs the masks
        categories = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in val_info.categories]
        train_info = None
        if train_split is not None:
            train_info = check_coco(train_split, need_masks=masks)
            train_cats = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in train_info.categories]
            if train_cats != categories:
                raise DatasetError(
                    f"{train_split.annotations} and {val_split.annotations} have different categories; "
                    "both splits need the same category list"
                )
            if train_info.dropped:
                _logger.info(
                    "%s: %s left out of training (as torchvision's references and mmdet do)",
                    train_split.name,
                    ", ".join(f"{n} {kind} annotations" for kind, n in sorted(train_info.dropped.items())),
                )
        return TaskData(
            root,
            (splits[0], splits[1]),
            num_classes=len(categories) + 1,
            names=[c["name"] for c in categories],
            meta={"categories": categories},
            train=(train_split, train_info),
            val=(val_split, val_info),
        )

    def build_model(
        self,
        recipe: DetectionRecipe,
        model_name: str,
        data: TaskData,
        *,
        checkpoint_path: str | os.PathLike | None = None,
        pretrained: bool = False,
    ) -> nn.Module:
        build = DETECTOR_BUILDERS[recipe.detector]
        return build(
            model_name,
            data.num_classes,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            frozen_bn=recipe.frozen_bn,
            trainable_stages=recipe.trainable_stages,
            fpn_channels=recipe.fpn_channels,
            min_size=recipe.min_size,
            max_size=recipe.max_size,
            **recipe.detector_options,
        )

    def train_dataset(self, recipe: DetectionRecipe, data: TaskData, model: nn.Module) -> Dataset:
        split, info = data.train
        return CocoDetectionDataset(split, info, train=True, masks=recipe.detector == "maskrcnn", hflip=recipe.hflip)

    def val_dataset(self, recipe: DetectionRecipe, data: TaskData, model: nn.Module) -> Dataset:
        split, info = data.val
        return CocoDetectionDataset(split, info, train=False)

    collate = staticmethod(collate_detection)

    def loss(self, model: nn.Module, batch: tuple, recipe: DetectionRecipe, device: torch.device) -> torch.Tensor:
        images, targets = _to(batch[0], device), _to(batch[1], device)
        losses = model(images, targets)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, dataset: CocoDetectionDataset, recipe: DetectionRecipe, info: DistInfo, *,
        workers: int = 0, progress: bool = False, data: TaskData | None = None,
    ) -> Evaluation:  # fmt: skip
        was_training = model.training
        model.eval()
        loader = _eval_loader(dataset, recipe.eval_batch_size, workers, info, collate_detection)
        results: list[dict] = []
        bar = tqdm(loader, desc="eval", unit="batch", leave=False, disable=not (progress and info.is_main),
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        for images, targets, failed in bar:
            raise_failures(failed)
            outputs = model(_to(images, info.device))
            ids = [t["image_id"] for t in targets]
            results += to_coco_results(outputs, ids, dataset.info.category_ids)
        bar.close()
        model.train(was_training)
        results = _gather(results, info)
        iou_types = ("bbox", "segm") if recipe.detector == "maskrcnn" else ("bbox",)
        metrics = evaluate_coco(dataset.coco, results, iou_types) if info.is_main else {}
        metrics = _broadcast(metrics, info)
        flat = {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.to_dict().items()}
        text = "\n".join(m.line() for m in metrics.values())
        summaries = {t: m.summary for t, m in metrics.items()}
        return Evaluation(
            flat,
            primary=flat["bbox_AP"] or 0.0,
            text=text,
            files={"predictions.json": results},
            details={"coco_summary": summaries, "images": len(dataset), "detections": len(results)},
        )


class SegmentationTask:
    name = "segmentation"
    recipe_type = SegmentationRecipe
    default_splits = ("training", "validation")
    metric = "mIoU"
    columns = ("mIoU", "pixel_accuracy", "mean_accuracy")

    def write_demo(self, root: Path, seed: int) -> None:
        synthetic.write_ade_shapes(root, seed=seed, splits=self.default_splits)

    def model_label(self, recipe: SegmentationRecipe) -> str:
        return "semantic_fpn"

    def load_data(self, recipe: SegmentationRecipe, root: Path, splits: Sequence[str], train: bool = True) -> TaskData:
        train_split = ade_split(root, splits[0]) if train else None
        val_split = ade_split(root, splits[1])
        names = class_names(root, recipe.num_classes)
        return TaskData(
            root,
            (splits[0], splits[1]),
            num_classes=recipe.num_classes,
            names=names,
            meta={"classes": names},
            train=train_split,
            val=val_split,
        )

    def build_model(
        self,
        recipe: SegmentationRecipe,
        model_name: str,
        data: TaskData,
        *,
        checkpoint_path: str | os.PathLike | None = None,
        pretrained: bool = False,
    ) -> nn.Module:
        return semantic_fpn_lowformer(
            model_name,
            data.num_classes,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            frozen_bn=recipe.frozen_bn,
            trainable_stages=recipe.trainable_stages,
            fpn_channels=recipe.fpn_channels,
            head_channels=recipe.head_channels,
            dropout=recipe.dropout,
            norm_layer=nn.BatchNorm2d if recipe.norm == "bn" else GroupNorm32,
        )

    def train_dataset(self, recipe: SegmentationRecipe, data: TaskData, model: nn.Module) -> Dataset:
        mean, std = _mean_std(model)
        return SegmentationDataset(data.train, recipe, mean, std, train=True)

    def val_dataset(self, recipe: SegmentationRecipe, data: TaskData, model: nn.Module) -> Dataset:
        mean, std = _mean_std(model)
        return SegmentationDataset(data.val, recipe, mean, std, train=False)

    collate = staticmethod(collate_segmentation)

    def loss(self, model: nn.Module, batch: tuple, recipe: SegmentationRecipe, device: torch.device) -> torch.Tensor:
        images, labels = torch.stack(batch[0]).to(device), torch.stack(batch[1]).to(device)
        return F.cross_entropy(model(images), labels, ignore_index=recipe.ignore_index)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, dataset: SegmentationDataset, recipe: SegmentationRecipe, info: DistInfo, *,
        workers: int = 0, progress: bool = False, data: TaskData | None = None,
    ) -> Evaluation:  # fmt: skip
        was_training = model.training
        model.eval()
        k = recipe.num_classes
        confusion = torch.zeros(k, k, dtype=torch.int64)
        loader = _eval_loader(dataset, recipe.eval_batch_size, workers, info, collate_segmentation)
        bar = tqdm(loader, desc="eval", unit="batch", leave=False, disable=not (progress and info.is_main),
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        for images, labels, failed in bar:
            raise_failures(failed)
            for image, label in zip(images, labels):
                logits = self.predict(model, image[None].to(info.device), recipe)
                logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
                confusion += confusion_matrix(logits.argmax(1)[0].cpu(), label, k, recipe.ignore_index)
        bar.close()
        model.train(was_training)
        confusion = all_reduce_sum(confusion.flatten().double(), info).round().long().view(k, k)
        names = data.names if data is not None else [str(i) for i in range(k)]
        m = segmentation_metrics(confusion, names)
        flat = {"mIoU": m.miou, "pixel_accuracy": m.pixel_accuracy, "mean_accuracy": m.mean_accuracy}
        return Evaluation(flat, primary=m.miou, text=m.summary(), files={}, details={"metrics": m})

    @staticmethod
    def predict(model: nn.Module, image: torch.Tensor, recipe: SegmentationRecipe) -> torch.Tensor:
        """(1, K, h, w) logits of one resized image: whole-image or sliding-window inference."""
        if recipe.eval_mode == "slide":
            return slide_inference(model, image, recipe.eval_crop, recipe.eval_stride)
        return model(image)


TASKS: dict[str, DetectionTask | SegmentationTask] = {"detection": DetectionTask(), "segmentation": SegmentationTask()}


def recipe_task(recipe: DownstreamRecipe) -> DetectionTask | SegmentationTask:
    return TASKS[recipe.task]


def _gather(results: list, info: DistInfo) -> list:
    """Every process's list, concatenated in rank order on every process."""
    if not info.distributed:
        return results
    import torch.distributed as dist

    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, results)
    return [r for part in parts for r in part]


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
