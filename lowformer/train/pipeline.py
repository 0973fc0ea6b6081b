"""The device half of the input pipeline.

Loader workers decode, crop and augment images on the CPU and hand over uint8 tensors (a quarter of
the bytes of float32, through shared and pinned memory); the training device does the rest:

- `DeviceBatches` wraps a loader of (uint8 images, labels, unreadable paths): timm's `PrefetchLoader`
  copies the next batch with a non-blocking copy from pinned memory and normalises it on a side
  stream while the current batch trains. (Random erasing, which works on normalised images, is
  applied by the trainer on the device, per micro-batch, after its seeding: see trainer.py.)
- Device decoding (`lowformer train|eval --gpu-decode`): workers only read a JPEG file's bytes and
  its header, and draw the image's crop, flip and interpolation with the image's seed, exactly as
  the CPU transform would (`draw_plan`); the main process decodes the batch with
  `torchvision.io.decode_jpeg(device=...)` (nvJPEG on CUDA) and crops and resizes each image on the
  device (`apply_plan`). This covers the transforms made only of random-resized crop, flip, resize
  and centre crop with nearest/bilinear/bicubic resampling (`plan_blocker` names what stops the
  others: RandAugment and the PIL-only box, hamming and lanczos filters). Files that are not JPEGs
  are decoded by the worker as usual; a JPEG the device decoder rejects is decoded on the CPU; one
  nothing can decode counts as unreadable.
"""

from __future__ import annotations

import io
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from timm.data.loader import PrefetchLoader
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = [
    "DeviceBatches",
    "EncodedImage",
    "apply_plan",
    "check_gpu_decode",
    "decode_on_device",
    "draw_plan",
    "empty_batch",
    "gpu_decode_parts",
    "is_jpeg",
    "plan_blocker",
]

_logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # (images, labels, unreadable paths)

# resampling filters that torch can run on tensors; PIL's box, hamming and lanczos have no tensor version
TENSOR_INTERPOLATIONS = (InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
_JPEG_MAGIC = b"\xff\xd8\xff"


def empty_batch(device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch with no image: (0, 3, 1, 1), so that normalising it over the channel axis still works."""
    return torch.empty((0, 3, 1, 1), dtype=torch.uint8, device=device)


# ------------------------------------------------------------------------------------------------
# Device batches: timm's PrefetchLoader, with the unreadable paths passed alongside
# ------------------------------------------------------------------------------------------------


class _Pairs:
    """One pass over a loader of (images, labels, paths) as the (images, labels) pairs that timm's
    PrefetchLoader reads; the paths wait in `paths`, in order, so the consumer pairs them up again.
    `decode` turns a batch of encoded images (a list) into a uint8 tensor on the device."""

    def __init__(self, loader: Iterable, paths: deque, decode: Callable[..., Batch] | None) -> None:
        self.loader, self.paths, self.decode = loader, paths, decode

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in self.loader:
            bad = list(bad)
            if isinstance(images, list):  # encoded JPEGs: decoded, cropped and resized on the device
                if self.decode is None:
                    raise TypeError("the loader gave encoded images but DeviceBatches got no decode function")
                images, labels, more_bad = self.decode(images, labels)
                bad += more_bad
            self.paths.append(bad)
            yield images, labels


class DeviceBatches:
    """Iterate loaders of (uint8 images, labels, unreadable paths) as (normalised float images on
    `device`, labels on `device`, paths): `for images, labels, bad in to_device(loader): ...`.

    timm's PrefetchLoader does the copy and the normalisation, `(x - 255 mean) / (255 std)`, one batch
    ahead on a side stream (on the CPU: in place, without a stream). One object serves a whole run:
    its side stream is reused (the caching allocator keeps blocks per stream).
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool = False
    ) -> None:
        self.mean, self.std, self.device = tuple(mean), tuple(std), torch.device(device)
        self.channels_last = channels_last
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def __call__(self, loader: Iterable, decode: Callable[..., Batch] | None = None) -> _OnDevice:
        """`loader`'s batches on the device; `decode` turns a batch of encoded images into pixels there."""
        return _OnDevice(self, loader, decode)


class _OnDevice:
    """One pass of `DeviceBatches` over a loader (with the loader's length, for progress bars)."""

    def __init__(self, owner: DeviceBatches, loader: Iterable, decode: Callable[..., Batch] | None) -> None:
        self.owner, self.loader, self.decode = owner, loader, decode

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        owner, paths = self.owner, deque()
        prefetch = PrefetchLoader(_Pairs(self.loader, paths, self.decode), owner.mean, owner.std, device=owner.device)
        prefetch.stream = owner._stream
        for images, labels in prefetch:
            if owner.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels, paths.popleft()


def check_gpu_decode(device: torch.device, data_dir: object) -> None:
    """Refuse `--gpu-decode` where it cannot work at all: no CUDA device, or no image files."""
    if torch.device(device).type != "cuda":
        raise ValueError(
            f"--gpu-decode decodes JPEGs with nvJPEG on a CUDA device, and this process runs on {device}; "
            "leave the flag out (the loader workers decode on the CPU)"
        )
    if data_dir is None:
        raise ValueError(
            "--gpu-decode decodes JPEG files, and the built-in digits are arrays in memory: "
            "pass --data DIR, or leave the flag out"
        )


def gpu_decode_parts(transforms: dict[str, T.Compose]) -> set[str]:
    """The parts of a run ("training", "evaluation", ...: name -> its transform) whose images can be
    decoded on the device. A warning names each other part and why it cannot; ValueError when none can."""
    blockers = {part: plan_blocker(transform) for part, transform in transforms.items()}
    usable = {part for part, reason in blockers.items() if reason is None}
    if not usable:
        reasons = "; ".join(f"the {part} transform: {reason}" for part, reason in blockers.items())
        raise ValueError(
            f"--gpu-decode cannot be used with this recipe ({reasons}). Decoding on the device needs "
            "transforms made of crops, flips and resizes with nearest, bilinear or bicubic resampling "
            "(no randaugment); leave the flag out, or change those recipe keys"
        )
    for part, reason in blockers.items():
        if reason is not None:
            _logger.warning("--gpu-decode: the %s images are decoded on the CPU as usual: %s", part, reason)
    return usable


# ------------------------------------------------------------------------------------------------
# Plans: a transform's random choices drawn in the worker, carried out on the device
# ------------------------------------------------------------------------------------------------


def plan_blocker(transform: T.Compose) -> str | None:
    """Why `transform` cannot run on decoded tensors on the device (every reason), or None when it can."""
    reasons = []
    for op in transform.transforms:
        if isinstance(op, RandomResizedCropAndInterpolation):
            modes = op.interpolation if isinstance(op.interpolation, (tuple, list)) else [op.interpolation]
            pil_only = [m.value for m in modes if m not in TENSOR_INTERPOLATIONS]
            if pil_only:
                reasons.append(f"its crop resamples with {', '.join(pil_only)}, which exist for PIL images only")
        elif isinstance(op, T.Resize):
            if op.interpolation not in TENSOR_INTERPOLATIONS:
                reasons.append(f"its resize uses {op.interpolation.value}, which exists for PIL images only")
        elif not isinstance(op, (T.RandomHorizontalFlip, T.CenterCrop, T.PILToTensor)):
            reasons.append(f"{type(op).__name__} works on PIL images only")
    return "; ".join(reasons) or None


def draw_plan(transform: T.Compose, image: Image.Image) -> tuple[tuple[Any, ...], ...]:
    """The operations `transform(image)` would do, with its random choices drawn now, in the same
    order from the same generators (so a seeded worker picks the crop the CPU transform would).
    `image` may be opened lazily: only its size is read."""
    plan: list[tuple[Any, ...]] = []
    for op in transform.transforms:
        if isinstance(op, RandomResizedCropAndInterpolation):
            top, left, height, width = op.get_params(image, op.scale, op.ratio)
            mode = random.choice(op.interpolation) if isinstance(op.interpolation, (tuple, list)) else op.interpolation
            plan.append(("resized_crop", top, left, height, width, list(op.size), mode))
        elif isinstance(op, T.RandomHorizontalFlip):
            if torch.rand(1) < op.p:  # the draw T.RandomHorizontalFlip makes
                plan.append(("hflip",))
        elif isinstance(op, T.Resize):
            plan.append(("resize", op.size, op.interpolation))
        elif isinstance(op, T.CenterCrop):
            plan.append(("center_crop", list(op.size)))
        elif not isinstance(op, T.PILToTensor):
            raise ValueError(f"{type(op).__name__} cannot run on the device: {plan_blocker(transform)}")
    return tuple(plan)


def apply_plan(image: torch.Tensor, plan: Sequence[tuple[Any, ...]]) -> torch.Tensor:
    """Carry out a plan on a (3, H, W) uint8 tensor, on its device (antialiased, as PIL resamples)."""
    for name, *args in plan:
        if name == "resized_crop":
            top, left, height, width, size, mode = args
            image = F.resized_crop(image, top, left, height, width, size, mode, antialias=True)
        elif name == "hflip":
            image = F.hflip(image)
        elif name == "resize":
            size, mode = args
            image = F.resize(image, size, mode, antialias=True)
        elif name == "center_crop":
            image = F.center_crop(image, args[0])
        else:
            raise ValueError(f"unknown plan step {name!r}")
    return image


# ------------------------------------------------------------------------------------------------
# Encoded images: read in the worker, decoded on the device
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """A JPEG file's bytes, what to do to it once decoded, and where it came from (for reports and
    for a replacement when it cannot be decoded)."""

    data: torch.Tensor  # uint8, the file as read
    plan: tuple[tuple[Any, ...], ...]
    name: str
    item: Any  # the dataset item it answered


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_MAGIC


def _decode_all(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a batch of JPEGs on `device` (one batched call); None where the decoder refused a file."""
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the batched call: find it
        out: list[torch.Tensor | None] = []
        for item in data:
            try:
                out.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def _decode_with_pil(data: torch.Tensor) -> torch.Tensor | None:
    """The CPU decoder every other path uses (PIL), for a JPEG the device decoder refused."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return F.pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def decode_on_device(
    images: list[EncodedImage | torch.Tensor],
    labels: torch.Tensor,
    device: torch.device,
    recover: Callable[[EncodedImage], tuple[torch.Tensor, int, Sequence[str]] | None],
) -> Batch:
    """A collated batch of encoded JPEGs (and images a worker decoded: not JPEGs) as a (B, 3, S, S)
    uint8 tensor on `device`, with its labels and the files nothing could decode.

    `recover(item)` is asked for each file that neither the device decoder nor PIL could decode: it
    returns (image, label, further unreadable paths) to take its place (training: the next readable
    image), or None to leave it out (evaluation).
    """
    encoded = [(k, x) for k, x in enumerate(images) if isinstance(x, EncodedImage)]
    decoded = _decode_all([x.data for _, x in encoded], device)
    out: list[torch.Tensor | None] = [x.to(device) if isinstance(x, torch.Tensor) else None for x in images]
    labels = labels.clone()
    bad: list[str] = []
    for (k, item), pixels in zip(encoded, decoded):
        if pixels is None:
            pixels = _decode_with_pil(item.data)
            if pixels is not None:
                _logger.debug("%s: decoded on the CPU (the device decoder refused it)", item.name)
                pixels = pixels.to(device)
        if pixels is not None:
            out[k] = apply_plan(pixels, item.plan)
            continue
        bad.append(item.name)
        replacement = recover(item)
        if replacement is not None:
            image, label, more_bad = replacement
            out[k], labels[k] = image.to(device), label
            bad += list(more_bad)
    keep = [k for k, x in enumerate(out) if x is not None]
    if not keep:
        return empty_batch(device), labels[:0], bad
    return torch.stack([out[k] for k in keep]), labels[keep], bad
