"""Semantic-segmentation metrics from a confusion matrix, with mmseg's definitions.

Over all evaluated pixels whose label is not `ignore_index`, with C[t, p] the number of pixels of
true class t predicted as p:

- IoU of class k = C[k, k] / (sum_p C[k, p] + sum_t C[t, k] - C[k, k])  (intersection over union);
  undefined (None) when the class is neither in the labels nor in the predictions.
- accuracy of class k = C[k, k] / sum_p C[k, p]; undefined when the class is not in the labels.
- mIoU, mean accuracy: the mean over the classes where they are defined (mmseg's nanmean).
- pixel accuracy ("aAcc"): sum_k C[k, k] / all labelled pixels.

Processes add their confusion matrices (`all_reduce`), so a distributed evaluation scores exactly
what one process would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    t, p = target[keep].long(), prediction[keep].long()
    if len(t) and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target values outside 0..{num_classes - 1} and {ignore_index}: {t.unique().tolist()[:10]}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)


@dataclass
class SegmentationMetrics:
    """mIoU, pixel accuracy and per-class IoU / accuracy, in [0, 1]; None where undefined."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: list[float | None]
    accuracy: list[float | None]
    class_names: list[str]
    pixels: int  # labelled pixels evaluated

    def summary(self) -> str:
        return (
            f"mIoU {self.miou:.4f} | pixel accuracy {self.pixel_accuracy:.4f} | mean accuracy "
            f"{self.mean_accuracy:.4f}  ({len(self.iou)} classes, {self.pixels} labelled pixels)"
        )

    def table(self) -> str:
        width = max([5, *(len(n) for n in self.class_names)])
        rows = [f"{'class':{width}s}     IoU  accuracy"]
        for name, iou, acc in zip(self.class_names, self.iou, self.accuracy):
            rows.append(f"{name:{width}s}  {_fmt(iou):>6s}  {_fmt(acc):>8s}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "mIoU": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "pixels": self.pixels,
            "per_class": [
                {"class": n, "IoU": i, "accuracy": a} for n, i, a in zip(self.class_names, self.iou, self.accuracy)
            ],
        }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> SegmentationMetrics:
    """The metrics of the module docstring from a (K, K) confusion matrix."""
    c = confusion.double()
    tp = c.diag()
    labelled, predicted = c.sum(1), c.sum(0)
    union = labelled + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.nan)
    total = labelled.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(c))]
    if len(names) != len(c):
        raise ValueError(f"{len(names)} class names for {len(c)} classes")
    return SegmentationMetrics(
        miou=_nanmean(iou),
        pixel_accuracy=(tp.sum() / total).item() if total > 0 else 0.0,
        mean_accuracy=_nanmean(acc),
        iou=[None if v != v else v for v in iou.tolist()],
        accuracy=[None if v != v else v for v in acc.tolist()],
        class_names=names,
        pixels=int(total.item()),
    )


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return defined.mean().item() if len(defined) else 0.0
