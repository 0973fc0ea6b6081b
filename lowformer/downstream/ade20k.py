"""Semantic-segmentation data in the ADE20K layout, with mmseg's ADE20K pipeline.

Layout (ADEChallengeData2016's; any dataset of images + single-channel label maps can be arranged so):

    ROOT/images/<split>/<name>.jpg          (or .png, .jpeg, .bmp)
    ROOT/annotations/<split>/<name>.png     one 8-bit label map per image (PIL mode L or P), same size
    ROOT/classes.txt                        optional: one class name per line (after reduce_zero_label)

Label values: with `reduce_zero_label` (ADE20K's convention, mmseg's `reduce_zero_label=True`),
0 means "other / unlabelled" and is ignored, and 1..K are the K classes (stored as 0..K-1);
without it the values are the classes 0..K-1 directly. `ignore_index` (255) is ignored either way.
Any other value is an error naming the file and the values.

Training (mmseg's ADE20K pipeline): resize to `scale` (long, short) with the aspect ratio kept,
times a random factor in `ratio_range`; a random crop of `crop_size`, re-drawn up to 10 times
while one class covers more than `cat_max_ratio` of its labelled pixels; horizontal flip;
photometric distortion; normalisation; padding to the crop size (label padding ignored).
Evaluation: resize to `scale` with the ratio kept, no randomness; the label map keeps its
original size (predictions are resized back to it, as mmseg scores them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ._data import DatasetError, Failed, seeded, take_failures

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
LABEL_MODES = ("L", "P")
CROP_TRIES = 10  # mmseg's RandomCrop


@dataclass(frozen=True)
class SegmentationSplit:
    """One split: (image, label map) file pairs, matched by file name stem."""

    name: str
    pairs: list[tuple[Path, Path]]


def ade_split(root: str | os.PathLike, split: str) -> SegmentationSplit:
    """The image/label pairs of `root/images/<split>` and `root/annotations/<split>`; DatasetError
    when a folder is missing, an image has no label map or a label map has no image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    missing = [str(p) for p in (image_dir, label_dir) if not p.is_dir()]
    if missing:
        have = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise DatasetError(
            f"{' and '.join(missing)} missing. Expected the ADE20K layout: ROOT/images/<split>/<name>.jpg and "
            f"ROOT/annotations/<split>/<name>.png (split {split!r}); {root} has: {have}"
        )
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in sorted(label_dir.iterdir()) if p.suffix.lower() == ".png"}
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    problems = []
    if no_label:
        problems.append(
            f"{len(no_label)} images without a label map (expected {label_dir}/<name>.png), e.g. "
            + ", ".join(images[s].name for s in no_label[:3])
        )
    if no_image:
        problems.append(
            f"{len(no_image)} label maps without an image in {image_dir}, e.g. "
            + ", ".join(labels[s].name for s in no_image[:3])
        )
    if problems:
        raise DatasetError(f"{root}, split {split!r}: " + "; ".join(problems))
    return SegmentationSplit(split, [(images[s], labels[s]) for s in sorted(images)])


def class_names(root: str | os.PathLike | None, num_classes: int) -> list[str]:
    """The names in `root/classes.txt` (one per line), or "0", "1", ... when there is no such file."""
    path = Path(root) / "classes.txt" if root is not None else None
    if path is None or not path.is_file():
        return [str(i) for i in range(num_classes)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != num_classes:
        raise DatasetError(
            f"{path} names {len(names)} classes but the recipe has num_classes {num_classes}; "
            "set num_classes (--set num_classes=N) or fix the file"
        )
    return names


def convert_labels(label: np.ndarray, num_classes: int, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """Stored label values -> class indices (mmseg's reduce_zero_label: 0 -> ignore, v -> v - 1)."""
    label = label.astype(np.int64)
    if reduce_zero_label:
        label = np.where(label == 0, ignore_index, label - 1)
        label[label == ignore_index - 1] = ignore_index  # a stored 255 stays ignored
    return label


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, path: Path, reduce: bool) -> str | None:
    """None, or why `label` (after conversion) holds values outside 0..num_classes-1 and ignore_index."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if not len(bad):
        return None
    stored = (bad + 1) if reduce else bad
    rule = (
        f"0 (ignored) and 1..{num_classes} (ADE20K's reduce_zero_label convention)"
        if reduce
        else f"0..{num_classes - 1}"
    )
    return (
        f"label map {path} has values {stored.tolist()[:10]} outside the class range: with num_classes "
        f"{num_classes} the valid values are {rule} and {ignore_index} (ignored). Fix the label maps or set "
        "num_classes / reduce_zero_label (--set KEY=VALUE)"
    )


# ------------------------------------------------------------------------------------------------
# Transforms (tensors: image (3, H, W) uint8, label (1, H, W) int64)
# ------------------------------------------------------------------------------------------------


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size whose long side <= max(scale) and short side <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    image = F.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
    if label is not None:
        label = F.resize(label, list(size), InterpolationMode.NEAREST_EXACT)
    return image, label


def _random_crop(image, label, crop: Sequence[int], cat_max_ratio: float, ignore_index: int):
    h, w = label.shape[-2:]
    ch, cw = min(crop[0], h), min(crop[1], w)
    for _ in range(CROP_TRIES):
        y = int(torch.randint(0, h - ch + 1, ()))
        x = int(torch.randint(0, w - cw + 1, ()))
        piece = label[..., y : y + ch, x : x + cw]
        if cat_max_ratio >= 1:
            break
        counts = torch.bincount(piece[piece != ignore_index].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return image[..., y : y + ch, x : x + cw], piece


class SegmentationTransform:
    """mmseg's ADE20K training or test pipeline (see the module docstring), on tensors."""

    def __init__(self, recipe, mean: Sequence[float], std: Sequence[float], *, train: bool) -> None:
        from torchvision.transforms import v2

        self.recipe, self.train = recipe, train
        self.mean, self.std = list(mean), list(std)
        # NOTE: torchvision's RandomPhotometricDistort (SSD's distortion, which mmseg's
        # PhotoMetricDistortion re-implements): each of brightness, contrast, saturation and hue with
        # probability 0.5, contrast before or after the rest. Ranges as mmseg's (contrast and saturation
        # 0.5-1.5, hue +-18 of OpenCV's 180 = +-0.1 of the circle), except brightness, which mmseg shifts
        # by +-32 grey levels and torchvision scales: 0.75-1.25 is that shift on a mid-grey pixel.
        self.photometric = v2.RandomPhotometricDistort(
            brightness=(0.75, 1.25), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.1, 0.1), p=0.5
        )

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as F

        r = self.recipe
        h, w = image.shape[-2:]
        if not self.train:
            image, _ = _resize(image, None, rescale_size(h, w, r.scale))
            return self._normalize(image), label
        lo, hi = r.ratio_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        image, label = _resize(image, label, rescale_size(h, w, [int(s * ratio) for s in r.scale]))
        image, label = _random_crop(image, label, r.crop_size, r.cat_max_ratio, r.ignore_index)
        if float(torch.rand(())) < r.hflip:
            image, label = F.horizontal_flip(image), F.horizontal_flip(label)
        if r.photometric:
            image = self.photometric(image)
        image = self._normalize(image)
        pad_h, pad_w = max(0, r.crop_size[0] - image.shape[-2]), max(0, r.crop_size[1] - image.shape[-1])
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=r.ignore_index)
        return image, label

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        return F.normalize(image.float() / 255, self.mean, self.std)


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """(image (3, H, W) normalised, label (H, W) int64 class indices / ignore_index) of a split.

    `dataset[i]` or `dataset[(i, seed)]` (the seed fixes the augmentation); a sample that cannot be
    used (unreadable file, label map of another size or mode, values outside the class range)
    comes back as `Failed` with the reason.
    """

    def __init__(self, split: SegmentationSplit, recipe, mean: Sequence[float], std: Sequence[float], *, train: bool):
        self.split, self.recipe, self.train = split, recipe, train
        self.transform = SegmentationTransform(recipe, mean, std, train=train)

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image_path, label_path = self.split.pairs[index]
        r = self.recipe
        try:
            with Image.open(image_path) as im:
                image = np.asarray(im.convert("RGB"))
            with Image.open(label_path) as lm:
                mode = lm.mode
                label = np.asarray(lm) if mode in LABEL_MODES else None
        except (OSError, ValueError, SyntaxError) as e:
            return Failed(f"cannot read {image_path} or {label_path}: {e}")
        if label is None:
            return Failed(
                f"label map {label_path} is a {mode} image; label maps are single-channel 8-bit PNGs (mode L or P) "
                "holding class indices"
            )
        if label.shape != image.shape[:2]:
            return Failed(
                f"label map {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        label = convert_labels(label, r.num_classes, r.reduce_zero_label, r.ignore_index)
        problem = check_label_values(label, r.num_classes, r.ignore_index, label_path, r.reduce_zero_label)
        if problem:
            return Failed(problem)
        image_t = torch.from_numpy(image.copy()).permute(2, 0, 1)  # (3, H, W) uint8
        label_t = torch.from_numpy(label)[None]  # (1, H, W) int64
        with seeded(seed):
            image_t, label_t = self.transform(image_t, label_t)
        return image_t, label_t[0]


def collate_segmentation(batch: list) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Lists of images and label maps (evaluation images differ in size), and failed samples' messages."""
    kept, failed = take_failures(batch)
    return [image for image, _ in kept], [label for _, label in kept], failed
