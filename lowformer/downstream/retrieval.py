"""Image retrieval: embeddings from our backbones, and mAP / recall@k over image folders.

    model = embedding_lowformer("lowformer_b1", embed_dim=256, checkpoint_path="evalmodel.pt")
    result = evaluate_retrieval(model.eval(), "my_retrieval_set/")
    print(result.summary())          # mAP 0.xxxx | R@1 ... | R@5 ... | R@10 ...

Folder layouts (an image is relevant to a query when their classes match):

    root/query/<class>/*.jpg and root/gallery/<class>/*.jpg   every query ranks the whole gallery
    root/<class>/*.jpg                                       every image ranks all the others
    root/<class>_<anything>.jpg                              GPR1200's own layout: one flat folder, the
                                                             class is the file name before the first "_"

Metrics (cosine similarity, ranking by decreasing similarity, ties kept in gallery order):

- AP of a query: (1 / R) * sum over the ranks k of the relevant gallery images of precision@k, where R
  is the number of relevant gallery images; the mean over queries is mAP. This is GPR1200's
  definition (eval/utils.py of Visual-Computing/GPR1200): the whole ranked gallery, no cut-off, and
  a query without any relevant gallery image scores 0.
- recall@k: the fraction of queries with at least one relevant image among the top k (the
  metric-learning "Recall@K" of CUB / SOP papers, not the fraction of relevant images retrieved).
- GPR1200 (12,000 images, 1,200 classes in the flat layout): also the mAP of each of its six parts
  (2,000 images each, in class order: Landmarks, iNat, Sketch, INSTRE, SOP, Faces), as its
  official `evaluate(compute_partial=True)` reports them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._loop import fit
from .backbone import FeatureBackbone, create_backbone

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al., arXiv:1711.02512): (mean x^p)^(1/p) per channel.

    p = 1 is average pooling, p -> inf max pooling; p is learnt, starting at 3. NOTE: GeM needs
    non-negative inputs, so values are clamped to `eps`; our stage maps end in a residual sum
    and can be negative, which the clamp discards (use `AvgPool` to keep them).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean((-2, -1)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    """Global average pooling: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1))


class EmbeddingModel(nn.Module):
    """Backbone -> last stage map -> pooling -> linear projection -> L2 normalisation.

    Output: (B, embed_dim) unit vectors, so a dot product is the cosine similarity.

    Attributes:
        embed_dim: size of the embedding (the backbone's width when there is no projection).
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        embed_dim: int | None = 512,
        pool_layer: type[nn.Module] = GeM,
    ) -> None:
        super().__init__()
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1 or None (no projection), got {embed_dim}")
        self.backbone = backbone
        self.pool = pool_layer()
        width = backbone.channels[-1]
        self.proj = nn.Linear(width, embed_dim) if embed_dim is not None else nn.Identity()
        self.embed_dim = embed_dim or width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.backbone(x)[-1])  # (B, C)
        return F.normalize(self.proj(x), dim=-1)  # (B, embed_dim)


def embedding_lowformer(
    model: str | nn.Module,
    embed_dim: int | None = 512,
    *,
    pool_layer: type[nn.Module] = GeM,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    frozen_bn: bool | None = None,
    trainable_stages: int | None = None,
) -> EmbeddingModel:
    """An `EmbeddingModel` over one of our backbones (or any timm model, "timm:NAME").

    Args:
        model: "lowformer_b1", "edgevit_xs", "timm:resnet50", ... or a module (see `create_backbone`).
        embed_dim: projection size; None keeps the pooled backbone features (no projection to
            train: the off-the-shelf setting of GPR1200 evaluations).
        pool_layer: `GeM` (default, the retrieval standard) or `AvgPool`.
        pretrained, checkpoint_path, frozen_bn, trainable_stages: see `create_backbone`.
    """
    backbone = create_backbone(
        model,
        out_indices=(-1,),
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        frozen_bn=frozen_bn,
        trainable_stages=trainable_stages,
    )
    return EmbeddingModel(backbone, embed_dim, pool_layer)


class NormSoftmaxLoss(nn.Module):
    """Cross-entropy over cosine similarities to learnt class proxies, scaled by 1 / temperature.

    "Classification is a strong baseline for deep metric learning" (Zhai & Wu, arXiv:1811.12649):
    as good as pair or triplet losses, without mining, and stable with small batches.
    """

    def __init__(self, embed_dim: int, num_classes: int, temperature: float = 0.05) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.proxies = nn.Parameter(torch.randn(num_classes, embed_dim) / embed_dim**0.5)
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(embeddings, dim=-1) @ F.normalize(self.proxies, dim=-1).T  # (B, num_classes)
        return F.cross_entropy(logits / self.temperature, labels)


def train_retrieval(
    model: EmbeddingModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    steps: int,
    loss: nn.Module | None = None,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    grad_clip: float | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimal metric-learning loop: (images, int64 class labels) batches, `NormSoftmaxLoss` by
    default (its proxies are trained too); returns each step's loss."""
    loss = loss if loss is not None else NormSoftmaxLoss(model.embed_dim, num_classes)
    loss.to(device)

    def step_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return loss(m(images), labels)

    return fit(
        model,
        batches,
        step_loss,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        device=device,
        extra_params=loss.parameters(),
        on_step=on_step,
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    """mAP and recall@k of a retrieval evaluation, with what they were computed over."""

    mean_average_precision: float
    recall_at_k: dict[int, float]
    num_queries: int
    num_gallery: int
    num_classes: int
    queries_without_relevant: int = 0  # scored AP 0 and no hit, as GPR1200 does
    protocol: str = "query/gallery"  # or "leave-one-out", "all-vs-all (self included)"
    average_precision: list[float] = field(default_factory=list, repr=False)  # per query
    parts: dict[str, float] = field(default_factory=dict)  # GPR1200's six parts, when evaluated on it

    def summary(self) -> str:
        recalls = " | ".join(f"R@{k} {v:.4f}" for k, v in self.recall_at_k.items())
        text = (
            f"mAP {self.mean_average_precision:.4f} | {recalls}  ({self.num_queries} queries, "
            f"{self.num_gallery} gallery images, {self.num_classes} classes, {self.protocol})"
        )
        if self.queries_without_relevant:
            text += f"; {self.queries_without_relevant} queries had no relevant gallery image"
        if self.parts:
            text += "\n  GPR1200 parts: " + " | ".join(f"{k} {v:.4f}" for k, v in self.parts.items())
        return text

    def to_dict(self) -> dict:
        return {
            "map": self.mean_average_precision,
            "recall_at_k": {str(k): v for k, v in self.recall_at_k.items()},
            "num_queries": self.num_queries,
            "num_gallery": self.num_gallery,
            "num_classes": self.num_classes,
            "queries_without_relevant": self.queries_without_relevant,
            "protocol": self.protocol,
            **({"parts": self.parts} if self.parts else {}),
        }


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: Sequence[int] | torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: Sequence[int] | torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    include_self: bool = False,
    chunk_size: int = 1024,
) -> RetrievalResult:
    """mAP and recall@k of embeddings (see the module docstring for the definitions).

    Args:
        query: (Q, D) query embeddings (normalised here, so any scale works).
        query_labels: (Q,) class ids.
        gallery, gallery_labels: (G, D) and (G,); None: the queries rank each other.
        ks: the k of recall@k.
        include_self: with `gallery=None` only: keep each query in its own ranking (at rank 1,
            relevant), as GPR1200's official evaluation code does; its published mAPs need this.
            Default: leave-one-out.
        chunk_size: queries scored at a time (bounds memory at chunk_size x G similarities).
    """
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or not ks:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    q_labels = torch.as_tensor(query_labels).flatten()
    self_ranking = gallery is None
    if self_ranking:
        if gallery_labels is not None:
            raise ValueError("gallery_labels without a gallery")
        gallery, g_labels = query, q_labels
    else:
        if gallery_labels is None:
            raise ValueError("a gallery needs gallery_labels")
        if include_self:
            raise ValueError("include_self applies when the queries rank each other (gallery=None)")
        g_labels = torch.as_tensor(gallery_labels).flatten()
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"embeddings must be (N, D) with one D, got {tuple(query.shape)} and {tuple(gallery.shape)}")
    if len(q_labels) != len(query) or len(g_labels) != len(gallery):
        raise ValueError("one label per embedding is needed")
    if len(query) == 0 or len(gallery) - (self_ranking and not include_self) < 1:
        raise ValueError("need at least one query and one gallery image")
    q = F.normalize(query.detach().float(), dim=-1)
    g = F.normalize(gallery.detach().float(), dim=-1)
    aps, hits, empty = [], {k: 0 for k in ks}, 0
    for start in range(0, len(q), chunk_size):
        sims = q[start : start + chunk_size] @ g.T  # (b, G)
        relevant = q_labels[start : start + chunk_size, None] == g_labels[None, :]  # (b, G)
        if self_ranking and not include_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -torch.inf
            relevant[rows, rows + start] = False  # ranked last and irrelevant: no effect on AP or recall
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        ranked = torch.gather(relevant, 1, order).float()  # (b, G): 1 where the k-th result is relevant
        num_relevant = ranked.sum(1)
        precision = ranked.cumsum(1) / torch.arange(1, ranked.shape[1] + 1)  # precision@k
        ap = (precision * ranked).sum(1) / num_relevant.clamp(min=1)
        aps.append(ap)
        empty += int((num_relevant == 0).sum())
        for k in ks:
            hits[k] += int((ranked[:, :k].sum(1) > 0).sum())
    ap = torch.cat(aps)
    if empty:
        _logger.warning("%d of %d queries have no relevant gallery image (AP 0)", empty, len(ap))
    protocol = "query/gallery"
    if self_ranking:
        protocol = "all-vs-all (self included)" if include_self else "leave-one-out"
    return RetrievalResult(
        mean_average_precision=ap.mean().item(),
        recall_at_k={k: hits[k] / len(ap) for k in ks},
        num_queries=len(ap),
        num_gallery=len(gallery) - (self_ranking and not include_self),
        num_classes=len(set(q_labels.tolist()) | set(g_labels.tolist())),
        queries_without_relevant=empty,
        protocol=protocol,
        average_precision=ap.tolist(),
    )


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


GPR1200_PARTS = ("Landmarks", "iNat", "Sketch", "INSTRE", "SOP", "Faces")
GPR1200_IMAGES, GPR1200_CLASSES = 12000, 1200


def is_flat_layout(folder: str | os.PathLike) -> bool:
    """True when `folder` holds images directly and no class sub-folders (GPR1200's layout)."""
    folder = Path(folder)
    entries = list(folder.iterdir()) if folder.is_dir() else []
    return not any(p.is_dir() for p in entries) and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)


def list_flat_images(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(path, class) of every image `folder/<class>_<anything>.<ext>`, in class order (numerically when the
    classes are numbers, as GPR1200's loader sorts them), then by name."""
    folder = Path(folder)
    items = []
    unnamed = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        cls, sep, _ = path.name.partition("_")
        if not sep or not cls:
            unnamed.append(path.name)
        items.append((path, cls))
    if unnamed:
        raise ValueError(
            f"{folder} is a flat folder of images, read as GPR1200's layout <class>_<n>.jpg, but "
            f"{len(unnamed)} file names have no class prefix (e.g. {', '.join(unnamed[:3])}); "
            "name them <class>_<anything>, or use class sub-folders"
        )
    numeric = all(cls.isdigit() for _, cls in items)
    return sorted(items, key=lambda item: ((int(item[1]) if numeric else item[1]), item[0].name))


def list_images(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(path, class name) of every image in `folder/<class>/`, sorted; ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory")
    items = [
        (path, class_dir.name)
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir())
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise ValueError(
            f"no images in {folder}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)}); "
            "the layout is root/query/<class>/*.jpg + root/gallery/<class>/*.jpg, or root/<class>/*.jpg"
        )
    return items


def default_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Shorter side resized to `image_size` (bicubic), centre crop, tensor, normalisation."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class ImageFiles(torch.utils.data.Dataset):
    """Image files, each read as RGB and transformed; an unreadable one raises naming the file."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as im:
                return self.transform(im.convert("RGB"))
        except (OSError, SyntaxError) as e:
            # a plain ValueError survives the trip from a loader worker with its message
            raise ValueError(f"cannot read image {self.paths[index]}: {e}") from None


@torch.no_grad()
def embed_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    transform: Callable,
    *,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """(N, D) embeddings of image files, in order; `workers` loader processes read and transform them."""
    from tqdm import tqdm

    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    out = []
    for images in tqdm(loader, desc="embedding", unit="batch", leave=False, disable=not progress):
        out.append(model(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


def evaluate_retrieval(
    model: nn.Module,
    root: str | os.PathLike,
    *,
    image_size: int = 224,
    transform: Callable | None = None,
    ks: Sequence[int] = (1, 5, 10),
    include_self: bool | None = None,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> RetrievalResult:
    """Embed the images under `root` and score retrieval (layouts and metrics: module docstring).

    Args:
        model: maps (B, 3, S, S) normalised images to (B, D) embeddings; run in eval mode (its mode
            is restored after).
        root: `root/query/<class>/` + `root/gallery/<class>/`, `root/<class>/`, or GPR1200's flat
            `root/<class>_<n>.jpg`.
        image_size: S of the default transform (shorter side to S, centre crop, the model's
            `pretrained_cfg` mean/std, else ImageNet's).
        transform: PIL image -> tensor, replacing the default.
        include_self: single-folder layouts only, see `retrieval_metrics`. Default: True for the flat
            GPR1200 layout (its official protocol), False (leave-one-out) for class sub-folders.
        workers: data loader processes reading and transforming the images.
    """
    root = Path(root)
    if transform is None:
        cfg = _pretrained_cfg(model)
        transform = default_transform(
            image_size, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        )
    query_dir, gallery_dir = root / "query", root / "gallery"
    if query_dir.is_dir() != gallery_dir.is_dir():
        raise ValueError(f"{root} has {'query' if query_dir.is_dir() else 'gallery'}/ but not the other")
    flat = not query_dir.is_dir() and is_flat_layout(root)
    if query_dir.is_dir():
        if include_self:
            raise ValueError("include_self applies when the images rank each other (no query/ and gallery/)")
        query, gallery = list_images(query_dir), list_images(gallery_dir)
    else:
        query, gallery = (list_flat_images(root) if flat else list_images(root)), None
    if include_self is None:
        include_self = flat
    classes = sorted({c for _, c in query} | {c for _, c in (gallery or [])})
    index = {c: i for i, c in enumerate(classes)}
    was_training = model.training
    model.to(device).eval()
    embed = dict(batch_size=batch_size, workers=workers, device=device, progress=progress)
    try:
        q_emb = embed_images(model, [p for p, _ in query], transform, **embed)
        g_emb = embed_images(model, [p for p, _ in gallery], transform, **embed) if gallery is not None else None
    finally:
        model.train(was_training)
    q_labels = [index[c] for _, c in query]
    if gallery is not None:
        return retrieval_metrics(q_emb, q_labels, g_emb, [index[c] for _, c in gallery], ks=ks)
    result = retrieval_metrics(q_emb, q_labels, ks=ks, include_self=include_self)
    if flat and len(query) == GPR1200_IMAGES and len(classes) == GPR1200_CLASSES:
        part = GPR1200_IMAGES // len(GPR1200_PARTS)
        aps = result.average_precision
        result.parts = {n: sum(aps[i * part : (i + 1) * part]) / part for i, n in enumerate(GPR1200_PARTS)}
    return result


def _pretrained_cfg(model: nn.Module) -> dict:
    for m in model.modules():
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and "mean" in cfg:
            return cfg
    return {}
