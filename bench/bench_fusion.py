"""Fusion CPU per item: a batch through ``fuse_batch`` against items one at a time (issue 11).

Synthetic encoder outputs for the sample layout's routes (text and image in
the CLIP space, text in a sentence space, audio in CLAP; each item has a
random subset, 0-3 images), 512-d CLIP and 384-d text vectors. Both sides
run the same code (``fuse`` is ``fuse_batch`` with a batch of one), so the
difference is what one numpy call per (space, modality) over a batch saves.
Process CPU time, medians over ``--repeats``, one after the other in this
process.

    python bench/bench_fusion.py [--items 20000] [--batch 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench._report import report  # noqa: E402
from encoders.fusion import FusionConfig, Layout, batch_of, fuse, fuse_batch  # noqa: E402

HEADING = "Fusion over a batch (issue 11): fuse_batch vs one item at a time, CPU per item"
ROUTES = [("text", "clip"), ("image", "clip"), ("text", "text"), ("audio", "clap")]
DIMS = {"clip": 512, "text": 384, "clap": 512}


def make_items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        v: dict = {}
        if rng.random() < 0.95:
            v.setdefault("clip", {})["text"] = [rng.normal(size=DIMS["clip"]).astype(np.float32)]
        images = int(rng.integers(0, 4))
        if images:
            v.setdefault("clip", {})["image"] = [rng.normal(size=DIMS["clip"]).astype(np.float32)
                                                 for _ in range(images)]
        if rng.random() < 0.8:
            v.setdefault("text", {})["text"] = [rng.normal(size=DIMS["text"]).astype(np.float32)]
        if rng.random() < 0.2:
            v.setdefault("clap", {})["audio"] = [rng.normal(size=DIMS["clap"]).astype(np.float32)]
        if not v:  # every item has something to fuse
            v["clip"] = {"text": [rng.normal(size=DIMS["clip"]).astype(np.float32)]}
        items.append(v)
    return items


def cpu_per_item(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) / n)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    items = make_items(args.items)
    rows = ["| mode | one at a time (CPU-us / item) | batches of "
            f"{args.batch} (CPU-us / item) | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for mode in ("mean", "concat", "attention"):
        config = FusionConfig(mode=mode)
        layout = Layout.build(ROUTES, DIMS, config)
        chunks = [items[i:i + args.batch] for i in range(0, len(items), args.batch)]
        batches = [batch_of(c) for c in chunks]  # the embed stage builds this while it collects vectors

        def one_at_a_time():
            return [fuse(v, layout, config) for v in items]

        def batched():
            return [fuse_batch(len(c), b, layout, config)[0] for c, b in zip(chunks, batches)]

        single = cpu_per_item(one_at_a_time, len(items), args.repeats)
        batch = cpu_per_item(batched, len(items), args.repeats)
        diff = float(np.abs(np.concatenate(batched()) - np.stack(one_at_a_time())).max())
        rows.append(f"| {mode} | {single * 1e6:.1f} | {batch * 1e6:.1f} | {single / batch:.1f}x | {diff:.1e} |")
    body = "\n".join([
        f"`python bench/bench_fusion.py --items {args.items} --batch {args.batch} --repeats {args.repeats}`",
        "",
        "Synthetic encoder outputs: text + image (0-3 per item) in a 512-d CLIP space, text in a 384-d "
        "sentence space, audio in a 512-d CLAP space, random subsets per item. Process CPU time, medians. "
        "Both sides are the same code (`fuse` is `fuse_batch` with a batch of one); the difference is the "
        "per-call Python that one numpy call per (space, modality) over a batch saves. Max abs diff: "
        "batched against one at a time (an item's vector does not depend on its batch-mates).",
        "",
        *rows,
    ])
    report(HEADING, body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
