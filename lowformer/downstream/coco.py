"""COCO-format detection data and COCO's box/mask AP, through torchvision and pycocotools.

Layout (COCO's own; any COCO-format dataset can be arranged so, symlinks work):

    ROOT/annotations/instances_<split>.json     e.g. instances_train2017.json, instances_val2017.json
    ROOT/<split>/<file_name>                    the images the JSON's "images" entries name

Reading: `check_coco` validates the annotation file before anything trains (every problem found is
reported with what to fix: missing image files, boxes outside their image, unknown image or
category ids, duplicate ids, missing keys); `CocoDetectionDataset` reads images and targets with
torchvision's `CocoDetection` and its transforms-v2 wrapper (boxes XYXY, masks from polygons or
RLE). Category ids (COCO's run 1..90 with gaps) map to contiguous labels 1..K in id order; label 0
is the background of the R-CNNs and unused by RetinaNet, so every detector gets `num_classes = K + 1`.

Training drops crowd annotations and boxes without area (as torchvision's references and mmdet do)
and images left without any box. Evaluation keeps every image.

Metrics: `evaluate_coco` runs pycocotools' `COCOeval` (the reference implementation: 101-point
interpolated precision, IoU 0.50:0.05:0.95, 100 detections per image, small/medium/large by
area) and returns AP, AP50, AP75, APs, APm, APl per IoU type ("bbox", "segm"). Predictions are
COCO results JSON: {"image_id", "category_id", "bbox": [x, y, w, h], "score"} (+ "segmentation" RLE).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection, VisionDataset

from ._data import DatasetError, Failed, seeded, take_failures

_logger = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # pixels a box may reach past its image's border (rounding in real annotation files)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class CocoSplit:
    """One split of a COCO-format dataset: its image folder and its annotation file."""

    images: Path
    annotations: Path
    name: str = ""


def coco_split(root: str | os.PathLike, split: str) -> CocoSplit:
    """`root/annotations/instances_<split>.json` and `root/<split>/`, or a DatasetError saying what is there."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    ann = root / "annotations" / f"instances_{split}.json"
    images = root / split
    missing = [str(p) for p in (ann, images) if not p.exists()]
    if missing:
        have = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        found = sorted(p.name for p in (root / "annotations").glob("instances_*.json")) if ann.parent.is_dir() else []
        raise DatasetError(
            f"{' and '.join(missing)} missing. Expected COCO's layout: ROOT/annotations/instances_<split>.json "
            f"and ROOT/<split>/<images> (split {split!r}); {root} has: {have}"
            + (
                f"; annotation files found: {', '.join(found)} (choose the split with --train-split/--val-split)"
                if found
                else ""
            )  # fmt: skip
        )
    return CocoSplit(images, ann, split)


# ------------------------------------------------------------------------------------------------
# Checking an annotation file
# ------------------------------------------------------------------------------------------------


@dataclass
class CocoInfo:
    """A checked annotation file: the raw dict (for pycocotools) and what training needs from it."""

    data: dict[str, Any]
    categories: list[dict[str, Any]]  # sorted by id; label = position + 1
    num_images: int
    num_annotations: int
    dropped: Counter = field(default_factory=Counter)  # crowd / no-area annotations training leaves out

    @property
    def num_classes(self) -> int:
        """Object classes + 1: label 0 is the background (R-CNN) or unused (RetinaNet)."""
        return len(self.categories) + 1

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self.categories]


def _problem(kind: str, examples: list[str], count: int, fix: str) -> str:
    shown = "; ".join(examples[:3]) + (f"; ... ({count} in all)" if count > 3 else "")
    return f"{kind}: {shown}. {fix}"


def check_coco(split: CocoSplit, *, need_masks: bool = False, check_files: bool = True) -> CocoInfo:
    """Read and validate `split.annotations`; DatasetError listing every kind of problem found.

    Checks: valid JSON with "images", "annotations" and "categories" lists; every image has id,
    file_name, width, height, unique ids, and (`check_files`) its file exists; every category has
    a unique integer id; every annotation has an id, a known image_id and category_id, a bbox
    [x, y, w, h] of finite numbers inside its image (within BOX_TOLERANCE pixels), and with
    `need_masks` a segmentation (polygons or RLE).
    """
    path = split.annotations
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not a text (JSON) file: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file is a JSON object, got {type(data).__name__}")
    lists = {k: data.get(k) for k in ("images", "annotations", "categories")}
    bad = [k for k, v in lists.items() if not isinstance(v, list)]
    if bad:
        raise DatasetError(
            f"{path}: {', '.join(repr(k) for k in bad)} missing or not a list; a COCO instances file has "
            "'images', 'annotations' and 'categories' lists"
        )
    problems: list[str] = []

    # -- categories --
    cat_ids: set[int] = set()
    bad_cats, dup_cats = [], []
    for c in lists["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int):
            bad_cats.append(repr(c)[:80])
        elif cid in cat_ids:
            dup_cats.append(str(cid))
        else:
            cat_ids.add(cid)
    if bad_cats:
        problems.append(_problem("categories without an integer 'id'", bad_cats, len(bad_cats), "Fix the file."))
    if dup_cats:
        problems.append(_problem("duplicate category ids", dup_cats, len(dup_cats), "Each category needs its own id."))
    if not cat_ids and not bad_cats:
        problems.append("no categories: a detector needs at least one object class")

    # -- images --
    images: dict[int, dict] = {}
    bad_imgs, dup_imgs, missing_files = [], [], []
    for im in lists["images"]:
        if not isinstance(im, dict) or any(k not in im for k in ("id", "file_name", "width", "height")):
            bad_imgs.append(repr(im)[:80])
            continue
        if im["id"] in images:
            dup_imgs.append(str(im["id"]))
            continue
        images[im["id"]] = im
        if check_files and not (split.images / im["file_name"]).is_file():
            missing_files.append(str(split.images / im["file_name"]))
    if bad_imgs:
        problems.append(
            _problem("images without id, file_name, width and height", bad_imgs, len(bad_imgs), "Fix the file.")
        )
    if dup_imgs:
        problems.append(_problem("duplicate image ids", dup_imgs, len(dup_imgs), "Each image needs its own id."))
    if missing_files:
        problems.append(
            _problem(
                f"missing image files ({len(missing_files)} of {len(images)})",
                missing_files,
                len(missing_files),
                f"Put the images in {split.images} or remove their entries from the annotation file.",
            )
        )

    # -- annotations --
    kinds: dict[str, list[str]] = {}
    dropped: Counter = Counter()
    ann_ids: set = set()
    for a in lists["annotations"]:
        where = f"annotation {a.get('id')!r}" if isinstance(a, dict) else repr(a)[:60]
        if not isinstance(a, dict) or any(k not in a for k in ("id", "image_id", "category_id", "bbox")):
            kinds.setdefault("annotations without id, image_id, category_id and bbox", []).append(where)
            continue
        if a["id"] in ann_ids:
            kinds.setdefault("duplicate annotation ids", []).append(where)
        ann_ids.add(a["id"])
        image = images.get(a["image_id"])
        if image is None:
            kinds.setdefault("annotations of unknown image ids", []).append(f"{where}: image_id {a['image_id']!r}")
        if a["category_id"] not in cat_ids:
            kinds.setdefault("unknown category ids", []).append(f"{where}: category_id {a['category_id']!r}")
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            kinds.setdefault("malformed boxes (a bbox is [x, y, width, height])", []).append(f"{where}: {box!r}")
            continue
        x, y, w, h = box
        if image is not None and (
            x < -BOX_TOLERANCE
            or y < -BOX_TOLERANCE
            or x + w > image["width"] + BOX_TOLERANCE
            or y + h > image["height"] + BOX_TOLERANCE
        ):
            kinds.setdefault("boxes outside their image", []).append(
                f"{where} in image {a['image_id']} ({image['width']}x{image['height']}): bbox {box}"
            )
        if need_masks and not a.get("segmentation"):
            kinds.setdefault("annotations without a segmentation (Mask R-CNN needs masks)", []).append(where)
        if a.get("iscrowd", 0):
            dropped["crowd"] += 1
        elif w <= 0 or h <= 0:
            dropped["no area"] += 1
    fixes = {
        "boxes outside their image": "Boxes are [x, y, width, height] in pixels of the image; fix the boxes or "
        "the image's width/height.",
        "unknown category ids": f"The file's categories are {sorted(cat_ids)[:20]}; add the category or fix the id.",
    }
    for kind, examples in kinds.items():
        problems.append(_problem(kind, examples, len(examples), fixes.get(kind, "Fix the file.")))
    if problems:
        raise DatasetError(f"{path} has problems:\n  - " + "\n  - ".join(problems))
    categories = sorted((c for c in lists["categories"]), key=lambda c: c["id"])
    return CocoInfo(data, categories, len(images), len(lists["annotations"]), dropped)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def coco_api(info: CocoInfo):
    """pycocotools' `COCO` over the already-checked dict (no second read of the file)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = info.data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


def detection_transform(train: bool, hflip: float = 0.5):
    """transforms v2 on (PIL image, target): tensor in [0, 1], horizontal flip for training.

    Resizing (shorter side to min_size, longer at most max_size) is done by the torchvision
    detector itself (`GeneralizedRCNNTransform`), for training and evaluation alike.
    """
    from torchvision.transforms import v2

    steps: list = [v2.ToImage()]
    if train and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True)]
    if train:
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)


class _CheckedCoco(CocoDetection):
    """torchvision's `CocoDetection` over an already checked `COCO` object instead of re-reading the file."""

    def __init__(self, root: str, coco) -> None:
        VisionDataset.__init__(self, root)
        self.coco = coco
        self.ids = sorted(coco.imgs.keys())


class CocoDetectionDataset(Dataset):
    """Images and torchvision detection targets of a checked COCO split.

    `dataset[i]` or `dataset[(i, seed)]` (the seed fixes the augmentation) returns
    (image (3, H, W) float in [0, 1], {"boxes": (N, 4) XYXY, "labels": (N,) in 1..K,
    "image_id": int, "masks": (N, H, W) uint8 with `masks`}), or a `Failed` with the reason.
    """

    def __init__(
        self, split: CocoSplit, info: CocoInfo, *, train: bool, masks: bool = False, hflip: float = 0.5
    ) -> None:
        from torchvision.datasets import wrap_dataset_for_transforms_v2

        keys = {"image_id", "boxes", "labels", "iscrowd"} | ({"masks"} if masks else set())
        self.coco = coco_api(info)
        self.base = wrap_dataset_for_transforms_v2(_CheckedCoco(str(split.images), self.coco), target_keys=keys)
        self.split, self.info, self.train, self.masks = split, info, train, masks
        self.transform = detection_transform(train, hflip)
        self.label_of = {cid: i + 1 for i, cid in enumerate(info.category_ids)}
        self.image_ids: list[int] = list(self.coco.getImgIds())
        self.indices = list(range(len(self.image_ids)))  # positions in self.base
        if train:  # images with at least one usable box (mmdet's filter_empty_gt)
            usable = {
                a["image_id"]
                for a in info.data["annotations"]
                if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
            }
            self.indices = [i for i, image_id in enumerate(self.base.ids) if image_id in usable]
            left_out = len(self.base.ids) - len(self.indices)
            if left_out:
                _logger.info("%s: %d images without a usable box are left out of training", split.name, left_out)
            if not self.indices:
                raise DatasetError(f"{split.annotations}: no image has a usable (non-crowd, non-empty) box to train on")

    def __len__(self) -> int:
        return len(self.indices)

    def image_id(self, index: int) -> int:
        return self.base.ids[self.indices[index]]

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image_id = self.image_id(index)
        entry = self.coco.imgs[image_id]
        path = self.split.images / entry["file_name"]
        try:
            image, target = self.base[self.indices[index]]
        except (OSError, ValueError, SyntaxError) as e:
            return Failed(f"cannot read image {path}: {e}")
        if (image.height, image.width) != (entry["height"], entry["width"]):
            return Failed(
                f"image {path} is {image.width}x{image.height} but the annotation file says "
                f"{entry['width']}x{entry['height']}; fix the file's width/height"
            )
        target = self._target(target, image_id, (image.height, image.width))
        with seeded(seed):
            image, target = self.transform(image, target)
        boxes = target["boxes"].as_subclass(torch.Tensor).float()
        out = {"boxes": boxes, "labels": target["labels"], "image_id": image_id}
        if self.masks:
            out["masks"] = target["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        return image, out

    def _target(self, target: dict, image_id: int, size: tuple[int, int]) -> dict:
        """Contiguous labels; crowd annotations left out of training; an image without boxes gets empty ones."""
        from torchvision import tv_tensors

        if "boxes" not in target:  # torchvision's wrapper returns only the id for an image without annotations
            target = {
                "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size),
                "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": [],
                **({"masks": tv_tensors.Mask(torch.zeros(0, *size, dtype=torch.uint8))} if self.masks else {}),
            }
        keep = torch.tensor([not c for c in target["iscrowd"]], dtype=torch.bool)
        if not self.train:
            keep = torch.ones_like(keep)
        out = {
            "boxes": tv_tensors.wrap(target["boxes"][keep], like=target["boxes"]),
            "labels": torch.tensor([self.label_of[int(c)] for c in target["labels"][keep]], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            out["masks"] = tv_tensors.Mask(target["masks"][keep])
        return out


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    """Lists of images and targets (detectors take lists), and the messages of failed samples."""
    kept, failed = take_failures(batch)
    return [image for image, _ in kept], [target for _, target in kept], failed


# ------------------------------------------------------------------------------------------------
# Predictions and COCO metrics
# ------------------------------------------------------------------------------------------------


def to_coco_results(
    outputs: Sequence[dict[str, torch.Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detector outputs -> COCO results (boxes XYWH, labels back to category ids, masks as RLE)."""
    from pycocotools import mask as mask_util

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        scores, labels = out["scores"].tolist(), out["labels"].tolist()
        rles = None
        if "masks" in out:
            binary = (out["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # (N, H, W)
            rles = [mask_util.encode(np.asfortranarray(m)) for m in binary]
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            if not 1 <= label <= len(category_ids):
                continue  # RetinaNet's unused class 0
            r = {
                "image_id": int(image_id),
                "category_id": int(category_ids[label - 1]),
                "bbox": [round(v, 2) for v in box],
                "score": round(float(score), 5),
            }
            if rles is not None:
                r["segmentation"] = {"size": list(rles[k]["size"]), "counts": rles[k]["counts"].decode("ascii")}
            results.append(r)
    return results


@dataclass
class CocoMetrics:
    """COCO AP for one IoU type, in [0, 1]; None where COCO has nothing to measure (e.g. APs without small objects)."""

    iou_type: str
    AP: float | None
    AP50: float | None
    AP75: float | None
    APs: float | None
    APm: float | None
    APl: float | None
    summary: str = ""  # pycocotools' 12-line summary

    def to_dict(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in METRICS}

    def line(self) -> str:
        return f"{self.iou_type} " + " ".join(f"{k} {_fmt(getattr(self, k))}" for k in METRICS)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def evaluate_coco(
    coco_gt, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",)
) -> dict[str, CocoMetrics]:
    """COCO AP of `results` against the ground truth `coco_gt` (pycocotools `COCO`), per IoU type.

    Every image of the ground truth is evaluated (an image without predictions counts its objects
    as missed). No predictions at all scores 0.
    """
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for iou_type in iou_types:
        dets = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not dets:
            metrics[iou_type] = CocoMetrics(iou_type, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "no detections")
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes([dict(d) for d in dets])  # loadRes adds keys to the dicts it gets
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = sorted(coco_gt.getImgIds())
            evaluator.evaluate()
            evaluator.accumulate()
            summary_start = buf.tell()
            evaluator.summarize()
        stats = [None if s < 0 else float(s) for s in evaluator.stats[:6]]  # -1: nothing to measure
        metrics[iou_type] = CocoMetrics(iou_type, *stats, summary=buf.getvalue()[summary_start:])
    return metrics
