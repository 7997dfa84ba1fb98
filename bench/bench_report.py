"""Benchmark: what the run report costs (issue 16): the fetch stage's thumbnail hook, and gathering + rendering.

1. Thumbnail hook and sample, per catalog item: ``LocalBound.offer`` for every item
   (one blake2b hash and a heap compare), plus ``make_thumbnail`` for the
   few items that can still be in the sample, set against the bare decode
   of the same photos (``decode_image``), which the fetch stage pays anyway;
   and the publish stage's sample combiner over every catalog item.
2. Report gathering + rendering on a synthetic published run of N vectors
   (sharded, flat index), with a previous run in which 1% changed and
   ``--dead`` dead-letter rows: the gallery search, dead-letter examples,
   drift of the changed items, thumbnails table and the HTML page.

Prints the figures and writes this benchmark's section of docs/BENCHMARKS.md.

    python bench/bench_report.py [--items 200000] [--dim 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench._report import median_seconds, write_heading_section  # noqa: E402
from encoders.media import decode_image  # noqa: E402
from pipeline.index import indexing  # noqa: E402
from pipeline.report import data as report_data, sample as report_sample, stats as report  # noqa: E402
from pipeline.stages.publish import SmallestSample  # noqa: E402
from pipeline.stages.write import dead_letters_to_table  # noqa: E402
from schemas.catalog import CatalogItem  # noqa: E402
from schemas.dead_letter import DeadLetter, Reason, Stage  # noqa: E402


def hook_figures(items: int, repeats: int) -> dict:
    photos = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(ROOT, "sample_catalog", "images", "*.jpg")))]
    decoded = [decode_image(b) for b in photos]
    decode_ms = median_seconds(lambda: [decode_image(b) for b in photos], repeats) / len(photos) * 1e3
    thumb_ms = median_seconds(lambda: [report_sample.make_thumbnail(im) for im in decoded], repeats) / len(decoded) * 1e3
    ids = [f"sku-{i:09d}" for i in range(items)]

    def offer_all():
        bound = offer_all.bound = report_sample.LocalBound()
        offer_all.made = sum(bound.offer(i) for i in ids)

    offer_us = median_seconds(offer_all, repeats) / items * 1e6
    catalog = [CatalogItem(i, title=f"title of {i}", description="a description " * 8) for i in ids]
    combine = SmallestSample()

    def sample_all():
        acc = combine.create_accumulator()
        for item in catalog:
            acc = combine.add_input(acc, item)
        combine.extract_output(acc)

    sample_us = median_seconds(sample_all, repeats) / items * 1e6
    per_item_us = offer_us + offer_all.made / items * thumb_ms * 1e3
    return {"photos": len(photos), "decode_ms": decode_ms, "sample_us": sample_us, "thumb_ms": thumb_ms,
            "offer_us": offer_us,
            "thumbnails_made": offer_all.made, "per_item_us": per_item_us,
            "share_of_decode": per_item_us / (decode_ms * 1e3)}


def _write_shard(path: str, ids: list[str], vectors: np.ndarray, hashes: list[str]) -> None:
    table = pa.table({"item_id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()),
                                                                                     vectors.shape[1]),
                      "modalities": [["image", "text"]] * len(ids), "content_hash": hashes})
    pq.write_table(table, path, row_group_size=8192)


def synthetic_runs(work: str, n: int, dim: int, shards: int, dead: int) -> dict:
    rng = np.random.default_rng(0)
    ids = sorted(f"sku-{i:09d}" for i in range(n))
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    moved = vectors.copy()
    changed = rng.choice(n, n // 100, replace=False)
    moved[changed] += rng.normal(scale=0.3, size=(len(changed), dim)).astype(np.float32)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    hashes = np.array(["h"] * n, dtype=object)
    new_hashes = hashes.copy()
    new_hashes[changed] = "x"
    out = {}
    for run, vecs, hs in (("previous", vectors, hashes), ("tonight", moved, new_hashes)):
        run_dir = os.path.join(work, run)
        os.makedirs(f"{run_dir}/embeddings"), os.makedirs(f"{run_dir}/index"), os.makedirs(f"{run_dir}/dead_letter")
        files, entries = [], []
        params = indexing.choose_params(64, dim, 64)  # flat: exact gallery neighbours
        trained = indexing.to_bytes(indexing.train_index(params, vecs[:64]))
        for s, rows in enumerate(np.array_split(np.arange(n), shards)):
            path = f"{run_dir}/embeddings/part-{s:05d}-of-{shards:05d}.parquet"
            _write_shard(path, [ids[i] for i in rows], vecs[rows], list(hs[rows]))
            files.append(path)
            index, faiss_ids = indexing.fill_shard(trained, vecs[rows], s)
            with open(f"{run_dir}/index/shard-{s:05d}.faiss", "wb") as f:
                f.write(indexing.to_bytes(index))
            pq.write_table(indexing.ids_table(faiss_ids, [ids[i] for i in rows]), f"{run_dir}/index/ids-{s:05d}.parquet")
            entries.append({"shard": s, "index": f"index/shard-{s:05d}.faiss", "ids": f"index/ids-{s:05d}.parquet"})
        dead_rows = [DeadLetter(f"bad-{i:07d}", Stage.DECODE, Reason.DECODE_FAILED if i % 3 else Reason.MISSING_MEDIA,
                                "JPEG decode failed: truncated", f"gs://bucket/img/{i}.jpg") for i in range(dead)]
        pq.write_table(dead_letters_to_table(dead_rows), f"{run_dir}/dead_letter/part-00000-of-00001.parquet")
        out[run] = {"dir": run_dir, "files": files,
                    "index": {"shards": entries, "metric": "ip", "recall": {}, "factory": "Flat", "kind": "flat",
                              "ntotal": n, "bytes_per_vector": 4 * dim}}
    jpeg = report_sample.make_thumbnail(decode_image(open(glob.glob(os.path.join(
        ROOT, "sample_catalog", "images", "*.jpg"))[0], "rb").read()))
    sample = report_sample.smallest([report_sample.sample_item(CatalogItem(i, title=f"title of {i}", image_uris=("a",)))
                                     for i in ids], report_sample.SAMPLE_SIZE)
    out["sample"], out["thumbnails"] = sample, [report_sample.Thumbnail(s.key, s.item_id, jpeg) for s in sample]
    out["changed"] = len(changed)
    return out


def gather_figures(n: int, dim: int, shards: int, dead: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        runs = synthetic_runs(work, n, dim, shards, dead)
        tonight, previous = runs["tonight"], runs["previous"]
        prev_manifest = {"run_id": "previous", "counts": {"input_rows": n, "embedded": n, "dead_letters": {},
                                                          "skipped": 0},
                         "files": [{"path": os.path.relpath(f, previous["dir"])} for f in previous["files"]]}
        dead_files = glob.glob(f"{tonight['dir']}/dead_letter/*.parquet")

        def gather():
            gather.result = report_data.gather(tonight["dir"], tonight["index"], tonight["files"], dead_files,
                                               runs["sample"], runs["thumbnails"], previous["dir"], True, prev_manifest)

        gather_s = median_seconds(gather, repeats)
        data, thumbs = gather.result
        parts = {
            "gallery": lambda: report_data.gallery(tonight["dir"], tonight["index"], tonight["files"], runs["sample"],
                                                   {t.item_id: t.jpeg for t in runs["thumbnails"]}),
            "dead letters": lambda: report_data.dead_letter_examples(dead_files),
            "drift": lambda: report_data.vector_drift(previous["files"], tonight["files"]),
        }
        part_s = {name: median_seconds(fn, repeats) for name, fn in parts.items()}
        manifest = {"run_id": "tonight", "catalog": "synthetic", "created_at": "",
                    "counts": {"input_rows": n + dead, "embedded": n, "skipped": 0,
                               "dead_letters": {"decode_failed": dead - dead // 3, "missing_media": dead // 3},
                               "incremental": {"reused": n - runs["changed"], "encoded": runs["changed"], "new": 0,
                                               "changed": runs["changed"], "deleted": 0, "change_detection": "bytes",
                                               "previous_run": {"run_id": "previous", "reusable": True}}},
                    "stats": report.finish_stats(report.empty_stats()), "index": tonight["index"]}
        page = report.render_html(manifest, data)
        render_s = median_seconds(lambda: report.render_html(manifest, data), repeats)
        buffer = io.BytesIO()
        pq.write_table(thumbs, buffer)
        return {"gather_s": gather_s, "parts": part_s, "render_s": render_s, "html_bytes": len(page.encode()),
                "thumbnails_bytes": buffer.tell(), "changed": runs["changed"], "drift_sampled": data["drift"]["sampled"],
                "gallery_items": len(data["gallery"]["items"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dead", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    hook = hook_figures(args.items, args.repeats)
    gather = gather_figures(args.items, args.dim, args.shards, args.dead, args.repeats)
    body = (
        f"`python bench/bench_report.py --items {args.items} --dim {args.dim} --shards {args.shards} "
        f"--dead {args.dead} --repeats {args.repeats}` on {platform.machine()} ({os.cpu_count()} cores, shared), "
        f"medians of {args.repeats}.\n\n"
        "**Thumbnail hook in the fetch stage** (per catalog item, one worker seeing every item):\n\n"
        "| what | figure |\n|---|---|\n"
        f"| bare decode of a sample photo (`decode_image`, {hook['photos']} photos, up to 320 px) | "
        f"{hook['decode_ms']:.2f} ms |\n"
        f"| `make_thumbnail` of a decoded photo (96 px JPEG) | {hook['thumb_ms']:.2f} ms |\n"
        f"| `LocalBound.offer` per item | {hook['offer_us']:.2f} µs |\n"
        f"| thumbnails made for {args.items:,} items (sample of {report_sample.SAMPLE_SIZE}) | "
        f"{hook['thumbnails_made']:,} |\n"
        f"| hook cost per item (offer + thumbnails made / items) | {hook['per_item_us']:.2f} µs "
        f"({hook['share_of_decode']:.2%} of the bare decode) |\n"
        f"| report sample combiner (`SmallestSample.add_input`, every catalog item, in publish) | "
        f"{hook['sample_us']:.2f} µs per item |\n\n"
        f"**Gathering the report's data** on a synthetic run of {args.items:,} vectors (dim {args.dim}, "
        f"{args.shards} shards, flat index), {gather['changed']:,} changed since the previous run, "
        f"{args.dead:,} dead letters:\n\n"
        "| step | seconds |\n|---|---|\n"
        + "".join(f"| {name} | {s:.3f} |\n" for name, s in gather["parts"].items())
        + f"| all of `report_data.gather` (the above + sample hashes, thumbnails table) | {gather['gather_s']:.3f} |\n"
        f"| `render_html` | {gather['render_s']:.4f} |\n\n"
        f"report.html: {gather['html_bytes'] / 1e3:.0f} kB ({gather['gallery_items']} gallery items with thumbnails); "
        f"report/thumbnails.parquet: {gather['thumbnails_bytes'] / 1e3:.0f} kB; drift over {gather['drift_sampled']:,} "
        "changed items.\n"
    )
    print(body)
    write_heading_section("## Run report cost (issue 16)\n\n" + body)


if __name__ == "__main__":
    main()
