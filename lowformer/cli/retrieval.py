"""`lowformer retrieval eval`: image-retrieval mAP and recall@k of a backbone's embeddings.

Layouts: GPR1200's own flat folder (DIR/<class>_<n>.jpg; every image queries all 12,000, itself
included, as GPR1200's official evaluation does, and the six parts' mAPs are reported), class
folders (DIR/<class>/*.jpg, leave-one-out), or DIR/query/<class>/ + DIR/gallery/<class>/.
mAP is GPR1200's definition (whole ranked list, no cut-off). The embedding is the backbone's pooled
last stage map (average pooling, as the classifier pools; --pool gem for GeM), L2-normalised: the
off-the-shelf setting GPR1200 evaluates. Details: docs/downstream.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ._args import non_negative_int, positive_int

EXAMPLES = """examples:
  lowformer retrieval eval --model lowformer_b1 --checkpoint evalmodel.pt --data /data/GPR1200/images
  lowformer retrieval eval --model timm:resnet50 --pretrained --data my_set/ --image-size 256 --workers 4
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieval",
        help="image retrieval mAP / recall@k (GPR1200's layout and definition)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser(
        "eval", help="embed a folder of images and score retrieval", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    e.add_argument("--model", required=True, help="backbone: one of ours or timm:NAME")
    init = e.add_mutually_exclusive_group()
    init.add_argument("--checkpoint", metavar="FILE", help="classifier weights (any format the loader reads)")
    init.add_argument("--pretrained", action="store_true", help="official weights (ours: local folder; timm: timm's)")
    e.add_argument("--data", required=True, metavar="DIR", help="GPR1200 folder, class folders or query/ + gallery/")
    e.add_argument("--image-size", type=positive_int, default=224, metavar="S", help="shorter side, then centre crop")
    e.add_argument("--pool", choices=("avg", "gem"), default="avg", help="pooling of the last stage map")
    self_group = e.add_mutually_exclusive_group()
    self_group.add_argument("--include-self", action="store_true", default=None,
                            help="keep each image in its own ranking (default for GPR1200's flat layout)")  # fmt: skip
    self_group.add_argument("--leave-one-out", dest="include_self", action="store_false",
                            help="leave each image out of its own ranking (default for class folders)")  # fmt: skip
    e.add_argument("--ks", type=positive_int, nargs="+", default=[1, 5, 10], metavar="K", help="recall@k")
    e.add_argument("--batch-size", type=positive_int, default=64)
    e.add_argument("--workers", type=non_negative_int, default=4, help="image loading processes")
    e.add_argument("--device", choices=("cpu", "cuda"))
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..downstream.retrieval import AvgPool, GeM, embedding_lowformer, evaluate_retrieval

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = embedding_lowformer(
        args.model,
        embed_dim=None,
        pool_layer=GeM if args.pool == "gem" else AvgPool,
        pretrained=args.pretrained,
        checkpoint_path=args.checkpoint,
    )
    result = evaluate_retrieval(
        model,
        args.data,
        image_size=args.image_size,
        ks=tuple(args.ks),
        include_self=args.include_self,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "image_size": args.image_size, **result.to_dict()},
                         indent=2))  # fmt: skip
    else:
        print(result.summary())
        print(f"{args.model}, {args.pool} pooling, {args.image_size}x{args.image_size}, {args.data}")
    return 0
