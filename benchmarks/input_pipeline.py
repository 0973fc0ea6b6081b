"""Input-pipeline throughput, and the end-to-end training step rate against a fixed batch.

    .venv/bin/python benchmarks/input_pipeline.py --workers 0 1 2 --out pipeline.json

Two measurements, both printed as markdown tables (with --out, every sample and the environment
are written as JSON):

1. Loader: images per second of a recipe's training augmentation (default `b1`, the official one:
   random-resized crop with the six random interpolations, flip, RandAugment; the recipe's
   resolutions drawn per batch as training draws them) through `lowformer.train`'s dataset and
   collate, per worker count, on an ImageFolder of JPEGs generated at 500x375 (ImageNet's typical
   size; photo-like content: gradients, shapes and sensor noise, quality 90). Workers hand over
   uint8 tensors, as in training (normalisation runs on the training device). Each round times
   `--loader-batches` batches per worker count after `--loader-warmup` untimed ones (worker
   start-up excluded), worker counts in alternating order; reported: the median over rounds.
2. Training: `lowformer.train.train` (what `lowformer train` runs) on the built-in digits with the
   `demo` recipe (B0, batch 32, 64 px, fp32 by default) against the fixed-batch step of
   `benchmarks/train_speed.py` (the same model, batch and size, random data), interleaved in one
   process (A B, then B A, ...). Each round trains a fresh 1-epoch run and takes its `train_img_s`
   (the whole loop: loader start, loading, copying, normalising, forward, backward, update, syncs;
   its first step is not excluded, which favours the fixed batch), and times as many consecutive
   fixed-batch steps as the epoch has, after `--fixed-warmup` untimed ones. Reported: each side's
   median img/s and the per-round ratio train / fixed (min / median / max); the target is a median
   ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from train_speed import make_step  # the fixed-batch step, shared with benchmarks/train_speed.py

import lowformer
from lowformer._io import check_writable, write_text
from lowformer.measure.env import environment
from lowformer.measure.stats import ratio_summary
from lowformer.train import load_recipe, train
from lowformer.train.augment import mean_std, train_transform
from lowformer.train.data import FolderSource, TrainDataset, collate, sample_seed

JPEG_SIZE = (500, 375)  # (width, height)


def make_jpegs(folder: Path, count: int, classes: int = 10) -> FolderSource:
    """`count` photo-like 500x375 JPEGs in `folder/<class>/` (reused when already there)."""
    rng = np.random.default_rng(0)
    w, h = JPEG_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    samples = []
    for i in range(count):
        path = folder / f"class{i % classes}" / f"{i:05d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            freq = rng.uniform(5, 40, 3)
            pixels = np.stack([127 + 100 * np.sin(xx / f + yy / (f * 1.3) + i) for f in freq], axis=-1)
            for _ in range(6):  # boxes of flat colour: edges and smooth areas, as objects give
                x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
                pixels[y0 : y0 + rng.integers(20, h // 2), x0 : x0 + rng.integers(20, w // 2)] = rng.integers(0, 256, 3)
            pixels += rng.normal(0, 20, pixels.shape)  # sensor noise: JPEG sizes near ImageNet's ~110 KB
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append((str(path), i % classes))
    return FolderSource(samples, [f"class{c}" for c in range(classes)])


def loader_round(dataset: TrainDataset, sizes: list[int], workers: int, batch: int, warmup: int, timed: int) -> float:
    """Images per second of `timed` batches from a fresh loader with `workers` workers."""
    batches = []
    for b in range(warmup + timed):
        size = sizes[b % len(sizes)]
        batches.append([(i % len(dataset), size, sample_seed(b, i)) for i in range(b * batch, (b + 1) * batch)])
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(next(it)[0].shape[0] for _ in range(timed))
    elapsed = time.perf_counter() - start
    del it
    return n / elapsed


def bench_loader(args: argparse.Namespace, folder: Path) -> tuple[dict, list[str]]:
    recipe = load_recipe(args.recipe)
    mean, _ = mean_std(recipe)
    source = make_jpegs(folder, args.images)
    kb = statistics.mean(Path(p).stat().st_size for p, _ in source.samples) / 1024
    sizes = list(recipe.image_size)
    dataset = TrainDataset(source, {s: train_transform(recipe, s, mean) for s in sizes})
    samples: dict[int, list[float]] = {w: [] for w in args.workers}
    for r in range(args.rounds):
        order = args.workers if r % 2 == 0 else list(reversed(args.workers))
        for w in order:
            samples[w].append(loader_round(dataset, sizes, w, args.batch_size, args.loader_warmup, args.loader_batches))
        print(f"loader round {r + 1}/{args.rounds}", flush=True)
    img_s = {w: statistics.median(v) for w, v in samples.items()}
    rows = [
        f"| {w} | {img_s[w]:.1f} | {min(samples[w]):.1f} / {max(samples[w]):.1f} | {img_s[w] / max(w, 1):.1f} |"
        for w in args.workers
    ]
    title = (
        f"recipe {recipe.name} training augmentation at {sizes} px, {len(source)} JPEGs 500x375 "
        f"(mean {kb:.0f} KB), batch {args.batch_size}, {args.rounds} rounds x {args.loader_batches} batches"
    )
    table = [title, "| workers | img/s (median) | min / max | img/s per worker |", "|---:|---:|---|---:|", *rows]
    return {"images": len(source), "mean_kb": kb, "sizes": sizes, "img_s": samples, "median_img_s": img_s}, table


def bench_train(args: argparse.Namespace, work: Path) -> tuple[dict, list[str]]:
    recipe = load_recipe("demo").replace(
        epochs=1, batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last, reset_bn=False
    )
    size = recipe.image_size[0]
    device = torch.device(args.device)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = lowformer.create_model(args.model, num_classes=10).to(device, memory_format=fmt)
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    fixed_step = make_step(model, x, y, args.amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fixed(steps: int) -> float:
        for _ in range(args.fixed_warmup):
            fixed_step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fixed_step()
        sync()
        return steps * args.batch_size / (time.perf_counter() - start)

    def trained() -> tuple[float, int]:
        result = train(args.model, recipe, output_dir=work / "run", device=args.device, progress=False, overwrite=True)
        row = result.history[0]
        return row["train_img_s"], row["global_step"]

    samples: dict[str, list[float]] = {"train": [], "fixed": []}
    steps_per_epoch = None
    for r in range(args.rounds):
        order = ("train", "fixed") if r % 2 == 0 else ("fixed", "train")
        for key in order:
            if key == "train":
                img_s, steps_per_epoch = trained()
                samples["train"].append(img_s)
            else:
                samples["fixed"].append(fixed(steps_per_epoch or 44))
        print(
            f"training round {r + 1}/{args.rounds}: train {samples['train'][-1]:.1f} img/s, "
            f"fixed {samples['fixed'][-1]:.1f} img/s, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    img_s = {k: statistics.median(v) for k, v in samples.items()}
    summary = ratio_summary([t / f for t, f in zip(samples["train"], samples["fixed"])])
    title = (
        f"{args.model}, built-in digits {size} px, batch {args.batch_size}, {args.device}, amp {args.amp}, "
        f"channels_last {args.channels_last}, {args.rounds} rounds x {steps_per_epoch} steps"
    )
    table = [
        title,
        "| lowformer train img/s | fixed-batch img/s | ratio train / fixed min / median / max |",
        "|---:|---:|---|",
        f"| {img_s['train']:.1f} | {img_s['fixed']:.1f} | "
        f"{summary['min']:.3f} / **{summary['median']:.3f}** / {summary['max']:.3f} |",
    ]
    return {"img_s": samples, "median_img_s": img_s, "ratio_train_over_fixed": summary}, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("loader", "train", "both"), default="both")
    p.add_argument("--recipe", default="b1", help="the recipe whose training augmentation the loader runs")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=512, help="JPEGs generated")
    p.add_argument("--data-dir", type=Path, help="keep the generated JPEGs here (default: a temporary folder)")
    p.add_argument("--loader-batches", type=int, default=8, help="timed batches per worker count per round")
    p.add_argument("--loader-warmup", type=int, default=2, help="untimed batches (worker start-up)")
    p.add_argument("--model", default="lowformer_b0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fixed-warmup", type=int, default=3, help="untimed fixed-batch steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, help="write all samples and the environment to this JSON file")
    args = p.parse_args()
    if args.out:
        check_writable(args.out)  # now, not after the measurements
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    results: dict = {"environment": environment(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    tables = []
    with tempfile.TemporaryDirectory(prefix="lowformer-pipeline-") as tmp:
        if args.part in ("loader", "both"):
            results["loader"], table = bench_loader(args, args.data_dir or Path(tmp) / "jpegs")
            tables.append(table)
        if args.part in ("train", "both"):
            results["train"], table = bench_train(args, Path(tmp))
            tables.append(table)
    results["load_avg_1m_end"] = os.getloadavg()[0]
    env = results["environment"]
    print(
        f"\n{env['cpu']}, {env['cpu_affinity']} cores, torch {env['torch']}, {env['date']}, load average "
        f"{env['load_avg_1m']:.2f} at the start, {results['load_avg_1m_end']:.2f} at the end"
    )
    for table in tables:
        print()
        print("\n".join(table))
    if args.out:
        write_text(args.out, json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
