"""Benchmark of issue 4: fusion cost per mode, exact search latency, retrieval quality on the sample.

Prints its figures and writes them to docs/BENCHMARKS.md, replacing only its
own section. Medians of repeated measurements taken in this one run.
Usage (from the repository root): python bench/bench_fusion_search.py [--items 2000] [--catalog_n 100000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import median_seconds, replace_section  # noqa: E402
from encoders.fusion import FusionConfig, Layout, fuse  # noqa: E402
from pipeline.query.search import ExactSearcher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Fusion, exact search and retrieval evaluation (issue 4)"
ROUTES = [("text", "clip"), ("image", "clip"), ("text", "text")]
DIMS = {"clip": 512, "text": 384}


def bench_fusion(n: int, repeats: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        v = {"clip": {"text": [rng.normal(size=512)], "image": [rng.normal(size=512) for _ in range(1 + i % 2)]},
             "text": {"text": [rng.normal(size=384)]}}
        if i % 5 == 0:
            del v["clip"]["image"]  # some items without a photo
        items.append(v)
    rows = []
    for mode in ("mean", "concat", "attention"):
        cfg = FusionConfig(mode=mode)
        layout = Layout.build(ROUTES, DIMS, cfg)
        t = median_seconds(lambda: [fuse(v, layout, cfg) for v in items], repeats)
        rows.append((f"{mode}" + (" (agreement rule)" if mode == "attention" else ""), n / t))
    from encoders.attention import FusionAttention

    cfg = FusionConfig(mode="attention")
    layout = Layout.build(ROUTES, DIMS, cfg)
    learned = FusionAttention.for_run(ROUTES, layout).weights_fn()
    t = median_seconds(lambda: [fuse(v, layout, cfg, attention=learned) for v in items], repeats)
    rows.append(("attention (learned module)", n / t))
    return rows


def bench_search(n: int, dim: int, queries: int, repeats: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = v[:queries] + 0.05 * rng.normal(size=(queries, dim)).astype(np.float32)
    rows = []
    for metric in ("cosine", "l2"):
        s = ExactSearcher([str(i) for i in range(n)], v, metric)
        batch = median_seconds(lambda: s.search(q, 10), repeats)
        single = median_seconds(lambda: s.search(q[:1], 10), repeats)
        rows.append((metric, single * 1000, batch / queries * 1000))
    return rows


def bench_eval() -> tuple[dict | None, float]:
    from encoders.presets import packaged_minilm
    from pipeline import cli

    minilm = packaged_minilm()
    if minilm is None:
        return None, 0.0
    import json

    with tempfile.TemporaryDirectory() as out:
        assert cli.main(["run", "--catalog", os.path.join(ROOT, "sample_catalog", "catalog.parquet"),
                         "--output", out, "--run_id", "bench", "--clip_model", "none", "--text_model", minilm,
                         "--device", "cpu", "--progress_interval_s", "0"]) == 0
        t = time.perf_counter()
        assert cli.main(["eval", "--run", out, "--queries", os.path.join(ROOT, "sample_catalog", "queries.jsonl"),
                         "--out", os.path.join(out, "eval.json")]) == 0
        seconds = time.perf_counter() - t
        with open(os.path.join(out, "eval.json")) as f:
            return json.load(f), seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--catalog_n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lines = [f"Machine: {os.cpu_count()} CPU cores, no GPU; medians of {args.repeats} repeats in one run "
             f"(`python bench/bench_fusion_search.py`).", ""]

    fusion = bench_fusion(args.items, args.repeats)
    base = fusion[0][1]
    lines += [f"Fusion per item (`encoders.fusion.fuse`, clip 512 + text 384, {args.items} items, 1-2 images, "
              "20% without a photo):", "", "| mode | items/s | vs mean |", "|---|---|---|"]
    lines += [f"| {m} | {r:,.0f} | {r / base:.2f} |" for m, r in fusion]

    search = bench_search(args.catalog_n, 896, 100, args.repeats)
    lines += ["", f"Exact search (`pipeline.query.search.ExactSearcher`, {args.catalog_n:,} items x 896 float32, k=10):", "",
              "| metric | 1 query (ms) | per query in a batch of 100 (ms) |", "|---|---|---|"]
    lines += [f"| {m} | {a:.1f} | {b:.2f} |" for m, a, b in search]

    report, seconds = bench_eval()
    if report is not None:
        t = report["by_modality"]["text"]
        lines += ["", "Retrieval on the sample catalog, `sample_catalog/queries.jsonl`, real all-MiniLM-L6-v2 "
                  "(`--clip_model none`, exact cosine):", "",
                  "| queries | recall@1 | recall@5 | recall@10 | MRR | nDCG@10 |", "|---|---|---|---|---|---|",
                  f"| text ({t['queries']}) | {t['recall@1']:.3f} | {t['recall@5']:.3f} | {t['recall@10']:.3f} "
                  f"| {t['mrr']:.3f} | {t['ndcg@10']:.3f} |", "",
                  f"Image queries skipped ({report['skipped']['image']['queries']}): a text-only run has no image "
                  f"tower. `eval` took {seconds:.1f} s (model load included)."]
    text = "\n".join(lines)
    print(text)
    replace_section(HEADING[3:], text)


if __name__ == "__main__":
    main()
