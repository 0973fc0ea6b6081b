"""Synthetic data for trying the downstream models without a dataset: rectangles on a noisy grey
background, one colour per class (the class is visible in the colour, so a few dozen steps of
training show the loss falling). Used by the tests and the recipes in docs/downstream.md.

Class ids: object classes are 1..num_classes for detection and segmentation (0 is background, as
torchvision's detectors and most segmentation datasets count it), 0..num_classes-1 for retrieval.
Images are float tensors in [0, 1].
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import torch


def class_colours(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) RGB colours in [0, 1] with evenly spaced hues, full saturation."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return torch.tensor([colorsys.hsv_to_rgb(c / num_classes, 1.0, 1.0) for c in range(num_classes)])


def _background(batch_size: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return (0.5 + 0.1 * torch.randn(batch_size, 3, *size, generator=generator)).clamp(0, 1)


def _random_box(size: tuple[int, int], generator: torch.Generator, min_frac: float, max_frac: float) -> list[int]:
    """[x0, y0, x1, y1] in pixels, sides between min_frac and max_frac of the image side."""
    h, w = size
    bh = int(h * (min_frac + (max_frac - min_frac) * torch.rand((), generator=generator).item()))
    bw = int(w * (min_frac + (max_frac - min_frac) * torch.rand((), generator=generator).item()))
    y0 = int(torch.randint(0, h - bh + 1, (), generator=generator))
    x0 = int(torch.randint(0, w - bw + 1, (), generator=generator))
    return [x0, y0, x0 + bw, y0 + bh]


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def detection_batch(
    batch_size: int = 2,
    image_size: int | tuple[int, int] = 128,
    num_classes: int = 3,
    max_objects: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images and torchvision detection targets, one dict per image:
    {"boxes": (N, 4) float xyxy pixels, "labels": (N,) int64 in 1..num_classes}."""
    generator = generator or torch.Generator().manual_seed(0)
    size = _size(image_size)
    colours = class_colours(num_classes)
    images = _background(batch_size, size, generator)
    targets = []
    for img in images:
        n = int(torch.randint(1, max_objects + 1, (), generator=generator))
        boxes, labels = [], []
        for _ in range(n):
            label = int(torch.randint(1, num_classes + 1, (), generator=generator))
            x0, y0, x1, y1 = _random_box(size, generator, 0.2, 0.5)
            img[:, y0:y1, x0:x1] = colours[label - 1, :, None, None]
            boxes.append([x0, y0, x1, y1])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return list(images), targets


def segmentation_batch(
    batch_size: int = 2,
    image_size: int | tuple[int, int] = 128,
    num_classes: int = 3,
    max_objects: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and masks (B, H, W) int64: 0 background, 1..num_classes the rectangles
    (a later rectangle covers an earlier one, in the image and in the mask)."""
    generator = generator or torch.Generator().manual_seed(0)
    size = _size(image_size)
    colours = class_colours(num_classes)
    images = _background(batch_size, size, generator)
    masks = torch.zeros(batch_size, *size, dtype=torch.int64)
    for img, mask in zip(images, masks):
        for _ in range(int(torch.randint(1, max_objects + 1, (), generator=generator))):
            label = int(torch.randint(1, num_classes + 1, (), generator=generator))
            x0, y0, x1, y1 = _random_box(size, generator, 0.2, 0.5)
            img[:, y0:y1, x0:x1] = colours[label - 1, :, None, None]
            mask[y0:y1, x0:x1] = label
    return images, masks


def retrieval_batch(
    batch_size: int = 8,
    image_size: int | tuple[int, int] = 128,
    num_classes: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W), each one rectangle of its class colour, and labels (B,) in 0..num_classes-1."""
    generator = generator or torch.Generator().manual_seed(0)
    size = _size(image_size)
    colours = class_colours(num_classes)
    images = _background(batch_size, size, generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    for img, label in zip(images, labels):
        x0, y0, x1, y1 = _random_box(size, generator, 0.3, 0.7)
        img[:, y0:y1, x0:x1] = colours[label, :, None, None]
    return images, labels


def write_retrieval_folders(
    root: str | os.PathLike,
    num_classes: int = 4,
    query_per_class: int = 2,
    gallery_per_class: int = 4,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """PNG files in the query/gallery layout `evaluate_retrieval` reads: root/{query,gallery}/class_<i>/<n>.png."""
    from PIL import Image

    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    colours = class_colours(num_classes)
    for split, per_class in (("query", query_per_class), ("gallery", gallery_per_class)):
        for c in range(num_classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            images = _background(per_class, (image_size, image_size), generator)
            for n, img in enumerate(images):
                x0, y0, x1, y1 = _random_box((image_size, image_size), generator, 0.3, 0.7)
                img[:, y0:y1, x0:x1] = colours[c, :, None, None]
                array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                Image.fromarray(array).save(folder / f"{n}.png")
    return root
