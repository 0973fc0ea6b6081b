"""Datasets and the order they are read in.

- Sources: an ImageFolder tree (`DIR/train/<class>/<image>`, `DIR/val/<class>/<image>`) read
  through torchvision, or the built-in digits (`digits.npz` next to this file, a fixed stratified
  80/20 split; see `digits_split`).
- Datasets return uint8 tensors (normalisation runs on the device: `pipeline.DeviceBatches`), or
  with `encoded=True` a JPEG's bytes and its drawn crop (`pipeline.EncodedImage`), decoded on the
  device.
- An unreadable image never stops a run. In training it is replaced by the next readable image (a
  batch keeps its size, which DDP and mixing need); in evaluation it is left out. Either way its
  path is returned with the batch so the trainer counts and reports it.
- `StepBatchSampler` decides every micro-batch from (seed, epoch, step) alone: which images,
  which resolution and each image's augmentation seed. The run is therefore the same whether it
  uses 1 process with 8 accumulation steps or 8 processes, any number of loader workers, or is
  interrupted and resumed mid-epoch.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset, pil_loader

from .pipeline import EncodedImage, draw_plan, empty_batch, is_jpeg

__all__ = [
    "DataLayoutError",
    "DigitsSource",
    "EvalDataset",
    "FolderSource",
    "ImageSource",
    "StepBatchSampler",
    "SubsetSource",
    "TrainDataset",
    "collate",
    "digits_arrays",
    "digits_split",
    "eval_batches",
    "load_sources",
    "sample_seed",
    "seeded",
]

DIGITS_FILE = "digits.npz"


class DataLayoutError(ValueError):
    """The data directory does not have the layout the trainer reads."""


# ------------------------------------------------------------------------------------------------
# Sources: index -> (PIL image, label)
# ------------------------------------------------------------------------------------------------


class ImageSource(Protocol):
    """What the datasets read: images by index, with labels, and a name for error reports. Sources of
    files also have `read(index) -> (bytes, label)`, for decoding on the device."""

    classes: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]: ...

    def describe(self, index: int) -> str: ...


class FolderSource:
    """Image files with labels, opened on access (so an unreadable one fails only when read)."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> None:
        self.samples = list(samples)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return pil_loader(path), label

    def read(self, index: int) -> tuple[bytes, int]:
        """The file's bytes, undecoded."""
        path, label = self.samples[index]
        with open(path, "rb") as f:
            return f.read(), label

    def describe(self, index: int) -> str:
        return self.samples[index][0]


class DigitsSource:
    """The built-in handwritten digits as 8x8 RGB images (upsampled later by the transforms)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images  # (N, 8, 8) uint8
        self.labels = labels
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"digits[{index}]"


class SubsetSource:
    """Some images of a source (by index), itself a source: the BN-reset subset."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source, self.indices, self.classes = source, list(indices), source.classes

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.source.load(self.indices[index])

    def read(self, index: int) -> tuple[bytes, int]:
        return self.source.read(self.indices[index])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])


def digits_arrays() -> dict[str, np.ndarray]:
    """The built-in digits as shipped: `images` (1797, 8, 8) uint8 with values 0..16, `labels`, and
    the held-out split as `train_index` and `test_index`.

    `digits.npz` ships with the package so that the demo needs nothing else: the 1,797 images of
    the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin, C. Kaynak, 1998) as
    scikit-learn distributes them (`sklearn.datasets.load_digits`, BSD-3-Clause), in its order; the
    split is `sklearn.model_selection.train_test_split(test_size=0.2, random_state=0, stratify=labels)`.
    tests/test_train.py checks both against scikit-learn.
    """
    with resources.files(__package__).joinpath(DIGITS_FILE).open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in ("images", "labels", "train_index", "test_index")}


def digits_split() -> tuple[DigitsSource, DigitsSource]:
    """(train, held-out): a stratified 80/20 split with a fixed seed, the same on every machine."""
    d = digits_arrays()
    # pixel values are 0..16; spread them over 0..255 so ImageNet normalisation sees a normal range
    images = np.clip(np.rint(d["images"] * (255 / 16)), 0, 255).astype(np.uint8)
    labels = d["labels"].astype(np.int64)
    train, test = d["train_index"].astype(np.int64), d["test_index"].astype(np.int64)
    return DigitsSource(images[train], labels[train]), DigitsSource(images[test], labels[test])


def _listing(path: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


_LAYOUT = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (torchvision ImageFolder, one folder per class)"


def _folder(split_dir: Path, class_to_idx: dict[str, int] | None = None) -> FolderSource:
    """ImageFolder samples of one split; `class_to_idx` forces the training split's class indices."""
    if not split_dir.is_dir():
        raise DataLayoutError(
            f"{split_dir} is missing. Expected {_LAYOUT}; {split_dir.parent} has: {_listing(split_dir.parent)}"
        )
    try:
        classes, own = find_classes(str(split_dir))
    except FileNotFoundError:
        raise DataLayoutError(
            f"{split_dir} has no class folders. Expected {_LAYOUT}; it has: {_listing(split_dir)}"
        ) from None
    if class_to_idx is None:
        class_to_idx = own
    else:
        extra = sorted(set(classes) - set(class_to_idx))
        if extra:
            raise DataLayoutError(
                f"{split_dir} has classes the training split does not: {', '.join(extra[:10])}. "
                "Both splits must use the same class folder names."
            )
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataLayoutError(
            f"{split_dir} has class folders but no images ({', '.join(IMG_EXTENSIONS)}). Expected {_LAYOUT}"
        )
    # as torchvision's ImageFolder: an empty class folder is an error, not a class without examples
    counts = Counter(label for _, label in samples)
    empty = [c for c in classes if c in class_to_idx and counts[class_to_idx[c]] == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
        raise DataLayoutError(
            f"{split_dir} has empty class folders: {shown} (no {', '.join(IMG_EXTENSIONS)} files); each would be "
            "a class without a single image. Add their images or remove the folders"
        )
    names = sorted(class_to_idx, key=class_to_idx.get)
    return FolderSource(samples, names)


def load_sources(
    data_dir: str | Path | None, classes: Sequence[str] | None = None, need_train: bool = True
) -> tuple[FolderSource | DigitsSource | None, FolderSource | DigitsSource]:
    """(train, val) sources: the ImageFolder tree at `data_dir`, or the built-in digits when None.

    `classes` (a checkpoint's class list) fixes the label indices for evaluation.
    """
    if data_dir is None:
        train, val = digits_split()
        return (train if need_train else None), val
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"data directory not found: {root}. Expected {_LAYOUT}")
    class_to_idx = {c: i for i, c in enumerate(classes)} if classes is not None else None
    train = None
    if need_train:
        train = _folder(root / "train", class_to_idx)
        class_to_idx = {c: i for i, c in enumerate(train.classes)}
    return train, _folder(root / "val", class_to_idx)


# ------------------------------------------------------------------------------------------------
# Datasets: the sampler hands out (index, resolution, seed); unreadable images are reported
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with python, numpy and torch RNGs seeded, then restore them (the loader may run
    in the main process, whose RNG streams the training loop must not see disturbed)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def sample_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers (e.g. run seed, epoch, step, shard)."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _encoded(
    source: ImageSource, index: int, transform: T.Compose, seed: int | None, item: object
) -> tuple[EncodedImage | None, int]:
    """(the image's bytes and drawn plan, label) for a JPEG file; (None, label) for any other file,
    which the caller decodes itself. Raises a read error when the file or its header is unreadable.
    `item` is what the dataset was asked for (kept to find a replacement)."""
    data, label = source.read(index)
    if not is_jpeg(data):
        return None, label
    with Image.open(io.BytesIO(data)) as image:  # the header only: the pixels are decoded on the device
        with seeded(seed) if seed is not None else contextlib.nullcontext():
            plan = draw_plan(transform, image)
    pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return EncodedImage(pixels, plan, source.describe(index), item), label


class TrainDataset(Dataset):
    """Training images, augmented at the resolution and with the seed the sampler gives, as uint8
    tensors; with `encoded`, JPEGs come as `EncodedImage`s (decoded on the device)."""

    def __init__(self, source: ImageSource, transforms: dict[int, Callable], encoded: bool = False) -> None:
        self.source = source
        self.transforms = transforms  # resolution -> transform
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[torch.Tensor | EncodedImage, int, tuple[str, ...]]:
        return self.sample(*item, encoded=self.encoded)

    def sample(
        self, index: int, size: int, seed: int, encoded: bool = False, start: int = 0
    ) -> tuple[torch.Tensor | EncodedImage, int, tuple[str, ...]]:
        """Image `index` transformed at `size` with `seed`; an unreadable image is replaced by the
        next readable one, deterministically (`start` skips the first candidates)."""
        bad: list[str] = []
        for offset in range(start, len(self.source)):
            i = (index + offset) % len(self.source)
            try:
                if encoded:
                    image, label = _encoded(self.source, i, self.transforms[size], seed, (i, size, seed))
                    if image is not None:
                        return image, label, tuple(bad)
                image, label = self.source.load(i)
            except _READ_ERRORS:
                bad.append(self.source.describe(i))
                continue
            with seeded(seed):
                return self.transforms[size](image), label, tuple(bad)
        raise DataLayoutError(f"no image of the training set could be read (first failures: {bad[:3]})")

    def replacement(self, image: EncodedImage) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        """What takes the place of an encoded image nothing could decode: the next readable image,
        decoded here on the CPU (the choice a worker makes for an unreadable file)."""
        index, size, seed = image.item
        return self.sample(index, size, seed, encoded=False, start=1)


class EvalDataset(Dataset):
    """Evaluation images as uint8 tensors (or `EncodedImage`s with `encoded`); an unreadable one
    yields None and is left out of the metrics."""

    def __init__(
        self, source: ImageSource, transform: Callable, seed: int | None = None, encoded: bool = False
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed  # set for the BN-reset subset, whose transform is the random training one
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | EncodedImage | None, int, tuple[str, ...]]:
        seed = None if self.seed is None else sample_seed(self.seed, index)
        try:
            if self.encoded:
                encoded, label = _encoded(self.source, index, self.transform, seed, index)
                if encoded is not None:
                    return encoded, label, ()
            image, label = self.source.load(index)
        except _READ_ERRORS:
            return None, -1, (self.source.describe(index),)
        if seed is None:
            return self.transform(image), label, ()
        with seeded(seed):
            return self.transform(image), label, ()


def collate(batch: list) -> tuple[torch.Tensor | list[EncodedImage | torch.Tensor], torch.Tensor, list[str]]:
    """Stack the readable samples; pass on the paths of those that were not. A batch holding encoded
    images stays a list (decoded on the device, `pipeline.decode_on_device`)."""
    bad = [p for _, _, paths in batch for p in paths]
    kept = [(x, y) for x, y, _ in batch if x is not None]
    labels = torch.tensor([y for _, y in kept], dtype=torch.long)
    if not kept:
        return empty_batch(), labels, bad
    images = [x for x, _ in kept]
    if any(isinstance(x, EncodedImage) for x in images):
        return images, labels, bad
    return torch.stack(images), labels, bad


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------


@dataclass
class StepBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Micro-batches of one epoch for one process, in training order.

    Each optimizer step t takes the next `batch_size x world_size x grad_accum` images of the
    epoch's permutation (seeded by seed and epoch) and cuts them into that many micro-batches,
    "virtual shards" v = accum_step x world_size + rank. All processes and accumulation steps of
    step t share one resolution (drawn per step from `resolutions`). The last incomplete effective
    batch of an epoch is dropped (official `drop_last: true`). `start_step` skips the steps a
    resumed run has already done.
    """

    num_samples: int
    batch_size: int
    resolutions: Sequence[int]
    seed: int
    epoch: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    start_step: int = 0

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.effective_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.grad_accum

    def plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation of the epoch, resolution index per step)."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0x5A3))
        perm = torch.randperm(self.num_samples, generator=g)
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0x4E5))
        res = torch.randint(len(self.resolutions), (max(1, self.steps_per_epoch),), generator=g)
        return perm, res

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        perm, res = self.plan()
        E, B = self.effective_batch, self.batch_size
        for t in range(self.start_step, self.steps_per_epoch):
            size = int(self.resolutions[int(res[t])])
            for a in range(self.grad_accum):
                v = a * self.world_size + self.rank
                chunk = perm[t * E + v * B : t * E + (v + 1) * B].tolist()
                yield [(i, size, sample_seed(self.seed, self.epoch, i, 1)) for i in chunk]


def eval_batches(num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's share of an evaluation set (every image exactly once over all processes)."""
    mine = list(range(rank, num_samples, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def subset_indices(num_samples: int, count: int, seed: int) -> list[int]:
    """A fixed random subset (the BN-reset images): the same every epoch, as the official caches it."""
    g = torch.Generator().manual_seed(sample_seed(seed, 0xB9))
    return torch.randperm(num_samples, generator=g)[: min(count, num_samples)].tolist()
