"""`lowformer segment train | eval`: Semantic FPN on any of our backbones or timm:NAME, trained and
scored on data in the ADE20K layout.

Data: DIR/images/<split>/<name>.jpg + DIR/annotations/<split>/<name>.png (single-channel label
maps; splits training and validation by default; ADE20K's reduce_zero_label convention unless the
recipe says otherwise; optional DIR/classes.txt). Without --data, a built-in demo dataset of
rendered shapes is written in that layout into the run folder and trained on (a minute on a CPU).
Metrics: mIoU, pixel accuracy and per-class IoU / accuracy; whole-image inference by default,
sliding windows with --set eval_mode=slide. Multi-GPU: the same command under torchrun.
Details: docs/downstream.md.
"""

from __future__ import annotations

import argparse

from ._dense import DenseCommand, add_parsers

EXAMPLES = """examples:
  lowformer segment train --output runs/shapes-seg                    # built-in demo, CPU, a minute
  lowformer segment eval --checkpoint runs/shapes-seg/best.pt
  lowformer segment train --model lowformer_b1 --checkpoint evalmodel.pt --data /data/ADEChallengeData2016
  torchrun --nproc-per-node 8 -m lowformer segment train --model edgevit_xs --checkpoint edgevit_xs.pth \\
      --data /data/ADEChallengeData2016
  lowformer segment eval --checkpoint runs/segment-lowformer_b1-semantic_fpn_40k/best.pt --set eval_mode=slide
"""

COMMAND = DenseCommand(
    command="segment",
    task="segmentation",
    what="Semantic FPN",
    data_help="ADE20K-layout root: DIR/images/<split>/ and DIR/annotations/<split>/",
    splits=("training", "validation"),
    default_recipe="semantic_fpn_40k",
    length_flag="iterations",
    examples=EXAMPLES,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_parsers(sub, COMMAND, __doc__)
