"""Benchmark: a nightly run where 1% of the items changed, against a full run of the same catalog.

Builds a catalog of N items from the bundled sample photos (each item its own
crop/rotation of a photo, and its own text), then in one script run:

1. day 1: a full run (seeds OUTPUT/LATEST);
2. 1% of the items change: half text edits, half new image bytes behind the same URI;
3. day 2 incremental (``--previous_run latest``) and day 2 full (``--previous_run none``),
   alternating, ``--repeats`` times each, on the same day-2 catalog.

Encoder time is the pipeline's own ``encode_wall_us`` metric (sum over all
encoder batches); wall time is the whole pipeline, model loading included.
Prints the figures and writes them to docs/BENCHMARKS.md, replacing only this
benchmark's section. Models: the offline preset (random ViT-B-32 CLIP towers,
real packaged MiniLM), on CPU.

    python bench/bench_incremental.py [--items 300] [--repeats 3]
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from bench._report import write_heading_section  # noqa: E402
import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.graph import build  # noqa: E402
from pipeline.beam_metrics import encoder_seconds  # noqa: E402
from pipeline.options import CatalogIndexOptions, to_run_config  # noqa: E402
from pipeline.stages.publish import read_manifest  # noqa: E402
from schemas.catalog import CATALOG_SCHEMA  # noqa: E402
from schemas.embeddings import vectors_of  # noqa: E402

SECTION = "## Incremental nightly re-embedding (issue 7)"
SAMPLE = os.path.join(ROOT, "sample_catalog")


def make_catalog(root: str, n: int, seed: int = 0) -> tuple[str, list[dict]]:
    """N items, each with its own JPEG (a crop + rotation of a sample photo) and its own text."""
    rng = random.Random(seed)
    sample = pq.read_table(os.path.join(SAMPLE, "catalog.parquet")).to_pylist()
    photos = sorted(glob.glob(os.path.join(SAMPLE, "images", "*.jpg")))
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for i in range(n):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.6, 0.95)), int(h * rng.uniform(0.6, 0.95))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            im.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-20, 20), expand=True).save(
                os.path.join(root, "img", f"{i:05d}.jpg"), "JPEG", quality=88)
        src = sample[i % len(sample)]
        rows.append({"item_id": f"item-{i:05d}", "title": f"{src['title'] or 'item'} #{i}",
                     "description": src["description"], "image_uris": [f"img/{i:05d}.jpg"], "audio_uri": None})
    path = os.path.join(root, "catalog.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    return path, rows


def change_one_percent(root: str, rows: list[dict], seed: int = 1) -> list[str]:
    """Edits ceil(1%) of the items: even picks get new text, odd picks new image bytes (same URI)."""
    picks = random.Random(seed).sample(range(len(rows)), math.ceil(len(rows) / 100))
    for k, i in enumerate(picks):
        if k % 2 == 0:
            rows[i]["title"] += " (new colour)"
        else:
            path = os.path.join(root, rows[i]["image_uris"][0])
            with Image.open(path) as im:
                im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, "JPEG", quality=88)
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), os.path.join(root, "catalog.parquet"))
    return [rows[i]["item_id"] for i in picks]


def run(catalog: str, output: str, run_id: str, *extra: str) -> dict:
    argv = ["--catalog", catalog, "--output", output, "--run_id", run_id, "--preset", "offline",
            "--device", "cpu", "--progress_interval_s", "0", "--keep_runs", "0", *extra]
    options = PipelineOptions(argv)
    config, _ = to_run_config(options.view_as(CatalogIndexOptions))
    started = time.perf_counter()
    p = beam.Pipeline(options=options)
    build(p, config)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - started
    manifest = read_manifest(config.write.run_dir)
    files = sorted(glob.glob(os.path.join(config.write.run_dir, "embeddings", "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("item_id")
    return {"wall_s": wall, "encoder_s": encoder_seconds(result), "counts": manifest.counts, "table": table}


BATCH_SIZE = 32  # the runs' --batch_size (the option's default)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="day-2 runs of each kind (medians reported)")
    parser.add_argument("--markdown", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        catalog, rows = make_catalog(os.path.join(tmp, "catalog"), args.items)
        out = os.path.join(tmp, "out")
        day1 = run(catalog, out, "day1", "--previous_run", "none")
        changed = change_one_percent(os.path.join(tmp, "catalog"), rows)
        inc, full = [], []
        for r in range(args.repeats):
            # each incremental run compares with day 1 (not the previous repeat), so each sees the same 1%
            inc.append(run(catalog, out, f"inc{r}", "--previous_run", os.path.join(out, "runs", "day1")))
            full.append(run(catalog, os.path.join(tmp, "full"), f"full{r}", "--previous_run", "none"))
        identical = all(np.array_equal(vectors_of(i["table"]), vectors_of(full[0]["table"]))
                        and i["table"].column("item_id").equals(full[0]["table"].column("item_id"))
                        for i in inc + full)

    med = lambda runs, key: statistics.median(x[key] for x in runs)  # noqa: E731
    enc_ratio = med(inc, "encoder_s") / med(full, "encoder_s")
    wall_ratio = med(inc, "wall_s") / med(full, "wall_s")
    block = {k: getattr(inc[0]["counts"].incremental, k) for k in ("reused", "encoded", "new", "changed", "deleted")}
    lines = [
        SECTION,
        "",
        f"`python bench/bench_incremental.py --items {args.items} --repeats {args.repeats}` "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, DirectRunner in-memory, offline preset on CPU: "
        "random ViT-B-32 CLIP towers + real MiniLM-L6; one script run, medians over the repeats).",
        "",
        f"Catalog: {args.items} items, one own JPEG each (a crop/rotation of a sample photo) and own text. "
        f"Day 2 changes {len(changed)} items ({len(changed) / args.items:.0%}): "
        f"{(len(changed) + 1) // 2} text edits, {len(changed) // 2} new image bytes behind the same URI. "
        f"Incremental counters: {json.dumps(block)}.",
        "",
        "| run | encoder time (s) | wall time (s) |",
        "|---|---|---|",
        f"| day 1, full (seeds LATEST) | {day1['encoder_s']:.2f} | {day1['wall_s']:.1f} |",
        f"| day 2, full (`--previous_run none`), median | {med(full, 'encoder_s'):.2f} | {med(full, 'wall_s'):.1f} |",
        f"| day 2, incremental (1% changed), median | {med(inc, 'encoder_s'):.3f} | {med(inc, 'wall_s'):.1f} |",
        "",
        f"- **encoder time ratio, incremental / full: {enc_ratio:.2%}** (target <= 5%)",
        f"- wall time ratio, incremental / full: {wall_ratio:.1%} (Beam start-up, model loading, "
        "reading the reused rows where they lie and hashing every image's bytes remain)",
        f"- what the encoder ratio can be at this size, where a padded batch costs the same whatever it holds: "
        f"forward passes have a fixed shape (`--batch_size` "
        f"{BATCH_SIZE} rows, padded), so the {block['encoded']} re-encoded items cost "
        f"{math.ceil(block['encoded'] / BATCH_SIZE)} padded batch per route against the full run's "
        f"{math.ceil(args.items / BATCH_SIZE)}: a floor of "
        f"{math.ceil(block['encoded'] / BATCH_SIZE) / math.ceil(args.items / BATCH_SIZE):.1%}; a larger catalog "
        "lowers it (the full run grows with it, the 1% stays a few batches)",
        f"- incremental and full day-2 vectors bit-identical: {identical}",
        "",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    write_heading_section(markdown, Path(args.markdown))
    print(f"written to {args.markdown}")
    return 0 if identical and enc_ratio <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
