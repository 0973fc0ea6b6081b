"""Synthetic data for trying the downstream models without a dataset.

- In memory (`detection_batch`, `segmentation_batch`, `retrieval_batch`): rectangles on a noisy
  grey background, one colour per class (the class is visible in the colour, so a few dozen steps
  of training show the loss falling). Class ids: 1..num_classes for detection and segmentation
  (0 is background, as torchvision's detectors count it), 0..num_classes-1 for retrieval. Images
  are float tensors in [0, 1].
- On disk, in the standard formats the commands read (the built-in demos of `lowformer detect
  train` and `lowformer segment train`): `write_coco_shapes` (COCO: JPEG images, an instances JSON
  with boxes and polygon masks) and `write_ade_shapes` (ADE20K layout: JPEG images, single-channel
  PNG label maps). Rendered rectangles, ellipses and triangles, each kind in its own colour, placed
  without overlapping; the same files for the same seed on every machine.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path

import torch

from ._data import sample_seed


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


# --------------------------------------------------------------------------------------------
# Shapes in the standard formats (the built-in demos)
# --------------------------------------------------------------------------------------------

SHAPES = ("rectangle", "ellipse", "triangle")
# one colour per shape kind (RGB 0-255), jittered per object
SHAPE_COLOURS = ((220, 60, 50), (60, 180, 75), (70, 90, 220))
ELLIPSE_VERTICES = 24


def _shape_polygon(kind: str, box: list[int]) -> list[tuple[float, float]]:
    """The outline of a shape filling `box` = [x0, y0, x1, y1], as polygon vertices (pixels)."""
    x0, y0, x1, y1 = box
    if kind == "rectangle":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [
        (cx + rx * math.cos(2 * math.pi * k / ELLIPSE_VERTICES), cy + ry * math.sin(2 * math.pi * k / ELLIPSE_VERTICES))
        for k in range(ELLIPSE_VERTICES)
    ]


def render_shapes(
    size: int, generator: torch.Generator, max_objects: int = 3, min_frac: float = 0.25, max_frac: float = 0.55
):
    """A PIL image of 1..max_objects non-overlapping shapes on a noisy grey background, and the
    shapes as (kind index, polygon vertices)."""
    from PIL import Image, ImageDraw

    noise = (0.5 + 0.08 * torch.randn(size, size, 3, generator=generator)).clamp(0, 1)
    image = Image.fromarray((noise * 255).round().to(torch.uint8).numpy())
    draw = ImageDraw.Draw(image)
    placed: list[list[int]] = []
    shapes = []
    for _ in range(int(torch.randint(1, max_objects + 1, (), generator=generator))):
        for _attempt in range(20):
            box = _random_box((size, size), generator, min_frac, max_frac)
            box = [box[0], box[1], box[2] - 1, box[3] - 1]  # inclusive pixel corners
            if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in placed):
                break
        else:
            continue  # no room left
        kind = int(torch.randint(0, len(SHAPES), (), generator=generator))
        jitter = torch.randint(-25, 26, (3,), generator=generator).tolist()
        colour = tuple(max(0, min(255, c + j)) for c, j in zip(SHAPE_COLOURS[kind], jitter))
        polygon = _shape_polygon(SHAPES[kind], box)
        draw.polygon(polygon, fill=colour)
        placed.append(box)
        shapes.append((kind, polygon))
    return image, shapes


def write_coco_shapes(
    root: str | os.PathLike,
    num_train: int = 240,
    num_val: int = 48,
    image_size: int = 96,
    seed: int = 0,
    splits: tuple[str, str] = ("train2017", "val2017"),
) -> Path:
    """A COCO-format detection dataset of rendered shapes: root/annotations/instances_<split>.json
    and root/<split>/<n>.jpg, categories 1 rectangle, 2 ellipse, 3 triangle, polygon masks."""
    root = Path(root)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    for split, count in zip(splits, (num_train, num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for n in range(count):
            generator = torch.Generator().manual_seed(sample_seed(seed, zlib_crc(split), n))
            image, shapes = render_shapes(image_size, generator)
            file_name = f"{n:06d}.jpg"
            image.save(root / split / file_name, quality=95)
            images.append({"id": n + 1, "file_name": file_name, "width": image_size, "height": image_size})
            for kind, polygon in shapes:
                xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": n + 1,
                        "category_id": kind + 1,
                        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                        "area": _polygon_area(polygon),
                        "segmentation": [[round(v, 2) for p in polygon for v in p]],
                        "iscrowd": 0,
                    }
                )
        (root / "annotations").mkdir(exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def write_ade_shapes(
    root: str | os.PathLike,
    num_train: int = 160,
    num_val: int = 32,
    image_size: int = 64,
    seed: int = 0,
    splits: tuple[str, str] = ("training", "validation"),
) -> Path:
    """A segmentation dataset of rendered shapes in the ADE20K layout: root/images/<split>/<n>.jpg and
    root/annotations/<split>/<n>.png (mode L), with ADE's convention: 0 = unlabelled (here each
    shape's one-pixel outline), then 1 background, 2 rectangle, 3 ellipse, 4 triangle; and
    root/classes.txt naming the classes after reduce_zero_label (background, rectangle, ...)."""
    from PIL import Image, ImageDraw

    root = Path(root)
    for split, count in zip(splits, (num_train, num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            generator = torch.Generator().manual_seed(sample_seed(seed, zlib_crc(split), n))
            image, shapes = render_shapes(image_size, generator)
            label = Image.new("L", (image_size, image_size), 1)
            draw = ImageDraw.Draw(label)
            for kind, polygon in shapes:
                draw.polygon(polygon, fill=kind + 2, outline=0)
            image.save(root / "images" / split / f"{n:06d}.jpg", quality=95)
            label.save(root / "annotations" / split / f"{n:06d}.png")
    (root / "classes.txt").write_text("\n".join(("background", *SHAPES)) + "\n")
    return root


def _polygon_area(polygon: list[tuple[float, float]]) -> float:
    """Shoelace formula."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        area += x0 * y1 - x1 * y0
    return abs(area) / 2


def zlib_crc(text: str) -> int:
    """A stable integer for a split name (Python's hash() changes between processes)."""
    import zlib

    return zlib.crc32(text.encode())
