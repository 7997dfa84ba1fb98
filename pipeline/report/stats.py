"""The run report: embeddings statistics and a self-contained ``report.html``.

Plain functions (no Beam): ``add_record``/``merge_stats`` accumulate the
statistics the publish step's combiner needs; ``render_html`` turns a
manifest and the report data (``report_data.gather``: gallery, dead-letter
examples, drift) into one HTML file with inline SVG charts and inline JPEG
thumbnails: no scripts, no network, no external assets. Everything that
comes from the catalog is HTML-escaped.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.report.render import render_html  # noqa: F401 - the page itself lives there

REPORT = "report.html"
NORM_TOLERANCE = 1e-3  # fused vectors are L2-normalized; float16 storage keeps them within this
# |norm - 1| buckets of the norm check's histogram (upper bounds), then "non-finite"
NORM_BUCKETS = (1e-6, 1e-5, 1e-4, NORM_TOLERANCE, 1e-2, math.inf)
NORM_BUCKET_NAMES = ("<=1e-6", "<=1e-5", "<=1e-4", "<=1e-3", "<=1e-2", ">1e-2", "non-finite")


def empty_stats() -> dict:
    return {"items": 0, "modalities": {}, "combinations": {}, "images": 0,
            "norm_min": math.inf, "norm_max": -math.inf, "off_unit_norm": 0,
            "norm_deviation": [0] * len(NORM_BUCKET_NAMES)}


def _norm_bucket(norm: float) -> int:
    if not math.isfinite(norm):
        return len(NORM_BUCKETS)
    deviation = abs(norm - 1)
    return next(i for i, bound in enumerate(NORM_BUCKETS) if deviation <= bound)


def add_record(stats: dict, modalities: tuple[str, ...], vector: np.ndarray, num_images: int = 0) -> dict:
    """Counts one embedded item: its modalities, images and whether its vector has unit norm."""
    norm = float(np.linalg.norm(np.asarray(vector, dtype=np.float64)))
    stats["items"] += 1
    for m in modalities:
        stats["modalities"][m] = stats["modalities"].get(m, 0) + 1
    combo = "+".join(sorted(modalities)) or "(none)"
    stats["combinations"][combo] = stats["combinations"].get(combo, 0) + 1
    stats["images"] += num_images
    stats["norm_min"], stats["norm_max"] = min(stats["norm_min"], norm), max(stats["norm_max"], norm)
    stats["off_unit_norm"] += int(abs(norm - 1) > NORM_TOLERANCE or not math.isfinite(norm))
    stats["norm_deviation"][_norm_bucket(norm)] += 1
    return stats


def add_table(stats: dict, table) -> dict:
    """Counts a batch of embedded rows (a ``pa.Table`` in the embeddings schema) at once."""
    from schemas.embeddings import vectors_of

    if table.num_rows == 0:
        return stats
    norms = np.linalg.norm(vectors_of(table).astype(np.float64), axis=1)
    for modalities in table.column("modalities").to_pylist():
        for m in modalities:
            stats["modalities"][m] = stats["modalities"].get(m, 0) + 1
        combo = "+".join(sorted(modalities)) or "(none)"
        stats["combinations"][combo] = stats["combinations"].get(combo, 0) + 1
    stats["items"] += table.num_rows
    stats["images"] += int(np.sum(table.column("num_images").to_numpy()))
    stats["norm_min"] = min(stats["norm_min"], float(norms.min()))
    stats["norm_max"] = max(stats["norm_max"], float(norms.max()))
    stats["off_unit_norm"] += int(np.sum((np.abs(norms - 1) > NORM_TOLERANCE) | ~np.isfinite(norms)))
    return stats


def merge_stats(parts: list[dict]) -> dict:
    out = empty_stats()
    for s in parts:
        out["items"] += s["items"]
        out["images"] += s["images"]
        out["off_unit_norm"] += s["off_unit_norm"]
        out["norm_min"], out["norm_max"] = min(out["norm_min"], s["norm_min"]), max(out["norm_max"], s["norm_max"])
        out["norm_deviation"] = [a + b for a, b in zip(out["norm_deviation"], s["norm_deviation"])]
        for key in ("modalities", "combinations"):
            for name, n in s[key].items():
                out[key][name] = out[key].get(name, 0) + n
    return out


def finish_stats(stats: dict) -> dict:
    """JSON-ready: sorted keys, no infinities (an empty run has no norms)."""
    empty = stats["items"] == 0
    return {
        "items": stats["items"], "images": stats["images"],
        "modalities": dict(sorted(stats["modalities"].items())),
        "combinations": dict(sorted(stats["combinations"].items())),
        "norm": {"min": None if empty else round(stats["norm_min"], 6),
                 "max": None if empty else round(stats["norm_max"], 6),
                 "tolerance": NORM_TOLERANCE, "off_unit": stats["off_unit_norm"],
                 "deviation_histogram": dict(zip(NORM_BUCKET_NAMES, stats["norm_deviation"]))},
    }

