"""`lowformer detect train | eval`: RetinaNet, Faster R-CNN and Mask R-CNN (torchvision's) on any of
our backbones or timm:NAME, trained and scored on COCO-format data.

Data: DIR/annotations/instances_<split>.json + DIR/<split>/<images> (COCO's layout; splits
train2017 and val2017 by default). Without --data, a built-in demo dataset of rendered shapes is
written in that format into the run folder and trained on (a few minutes on a CPU). Metrics: COCO
box AP (and mask AP for Mask R-CNN) through pycocotools; predictions as COCO results JSON.
Multi-GPU: the same command under `torchrun --nproc-per-node N -m lowformer detect train ...`.
Details: docs/downstream.md.
"""

from __future__ import annotations

import argparse

from ._dense import DenseCommand, add_parsers

EXAMPLES = """examples:
  lowformer detect train --output runs/shapes                         # built-in demo, CPU, minutes
  lowformer detect eval --checkpoint runs/shapes/best.pt
  lowformer detect train --model lowformer_b1 --checkpoint evalmodel.pt --data /data/coco   # RetinaNet 1x
  torchrun --nproc-per-node 8 -m lowformer detect train --model edgevit_xs --recipe maskrcnn_1x \\
      --checkpoint edgevit_xs.pth --data /data/coco
  lowformer detect eval --checkpoint runs/detect-lowformer_b1-retinanet_1x/best.pt --predictions dets.json
  lowformer detect train --list-recipes
"""

COMMAND = DenseCommand(
    command="detect",
    task="detection",
    what="RetinaNet / Faster R-CNN / Mask R-CNN",
    data_help="COCO-format root: DIR/annotations/instances_<split>.json and DIR/<split>/",
    splits=("train2017", "val2017"),
    default_recipe="retinanet_1x",
    length_flag="epochs",
    examples=EXAMPLES,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_parsers(sub, COMMAND, __doc__)
