"""The run report: embeddings statistics and a self-contained ``report.html`` built from the manifest.

Plain functions (no Beam): ``add_record``/``merge_stats`` accumulate the
statistics the publish step's combiner needs, ``render_html`` turns a
manifest into one HTML file with an inline SVG plot (no scripts, no network,
no plotting library).
"""
from __future__ import annotations

import html
import math

import numpy as np

REPORT = "report.html"
NORM_TOLERANCE = 1e-3  # fused vectors are L2-normalized; float16 storage keeps them within this


def empty_stats() -> dict:
    return {"items": 0, "modalities": {}, "combinations": {}, "images": 0,
            "norm_min": math.inf, "norm_max": -math.inf, "off_unit_norm": 0}


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
                 "tolerance": NORM_TOLERANCE, "off_unit": stats["off_unit_norm"]},
    }


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def recall_svg(table: list[dict], k: int, width: int = 480, height: int = 260) -> str:
    """Recall against nprobe (log2 x axis) as an inline SVG line chart."""
    rows = [r for r in table if r["nprobe"]]
    if not rows:
        return "<p>(no nprobe ladder: exact flat index)</p>"
    left, right, top, bottom = 50, 20, 15, 40
    xs = [math.log2(r["nprobe"]) for r in rows]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return top + (1 - y) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>']
    for y in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>'
                     f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
    for r, x in zip(rows, xs):
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 15}" text-anchor="middle">{r["nprobe"]}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 5}" text-anchor="middle">nprobe</text>')
    for key, color in ((f"recall_{k}_at_{k}", "#1f77b4"), ("recall_1_at_1", "#d62728")):
        points = " ".join(f"{px(x):.1f},{py(r[key]):.1f}" for r, x in zip(rows, xs))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(r[key]):.1f}" r="3" fill="{color}"/>' for r, x in zip(rows, xs)]
    parts.append(f'<text x="{left + 8}" y="{py(0.08):.1f}" fill="#1f77b4">{k}-recall@{k}</text>'
                 f'<text x="{left + 100}" y="{py(0.08):.1f}" fill="#d62728">1-recall@1</text></svg>')
    return "".join(parts)


def catalog_html(manifest: dict) -> str:
    """The catalog line, and a warning per modality not read because its default column is missing."""
    catalog = manifest.get("catalog")
    path = catalog.get("path") if isinstance(catalog, dict) else catalog  # a plain string in older manifests
    out = [f"<p>catalog: <code>{html.escape(str(path))}</code>; created "
           f"{html.escape(str(manifest.get('created_at', '')))}</p>"]
    for missing in (catalog.get("missing_columns", []) if isinstance(catalog, dict) else []):
        out.append(f"<p class='bad'>catalog: {html.escape(missing['message'])}</p>")
    return "".join(out)


def render_html(manifest: dict) -> str:
    """One self-contained HTML page: counts, dead letters, coverage, norm check, index and recall."""
    counts, stats, index = manifest["counts"], manifest.get("stats") or {}, manifest.get("index")
    dead = counts["dead_letters"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>run {html.escape(manifest['run_id'])}</title>",
           "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse;"
           "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
           ".bad{color:#b00}</style></head><body>",
           f"<h1>Run {html.escape(manifest['run_id'])}</h1>",
           catalog_html(manifest),
           "<h2>Counts</h2>",
           _table(["input rows", "embedded", "dead letters", "skipped"],
                  [[counts["input_rows"], counts["embedded"], sum(dead.values()), counts["skipped"]]]),
           "<h2>Dead-letter reasons</h2>",
           _table(["reason", "rows"], [[k, v] for k, v in dead.items()]) if dead else "<p>none</p>",
           "<h2>Models</h2>",
           _table(["space", "family", "model", "weights", "real/random"],
                  [[s, m.get("family"), m.get("name"), m.get("weights"), m.get("weights_label")]
                   for s, m in manifest.get("models", {}).items()])]
    if stats:
        n = max(stats["items"], 1)
        out += ["<h2>Modality coverage</h2>",
                _table(["modality", "items", "share"],
                       [[m, c, f"{c / n:.1%}"] for m, c in stats["modalities"].items()]),
                _table(["combination", "items"], [[m, c] for m, c in stats["combinations"].items()]),
                "<h2>Vector norm check</h2>",
                _table(["min norm", "max norm", f"off unit norm (> {stats['norm']['tolerance']})"],
                       [[stats["norm"]["min"], stats["norm"]["max"], stats["norm"]["off_unit"]]])]
        if stats["norm"]["off_unit"]:
            out.append(f"<p class='bad'>{stats['norm']['off_unit']} vectors are not unit norm</p>")
    if index:
        recall = index["recall"]
        k = recall["k"]
        out += ["<h2>Index</h2>",
                _table(["factory", "metric", "vectors", "shards", "nlist", "M", "nbits", "bytes/vector"],
                       [[index["factory"], index["metric"], index["ntotal"], len(index["shards"]), index["nlist"],
                         index["m"], index["nbits"], index["bytes_per_vector"]]])]
        if index.get("note"):
            out.append(f"<p>{html.escape(index['note'])}</p>")
        quantizer = index.get("quantizer")
        if quantizer and quantizer.get("applicable"):
            how = f"reused from run {quantizer['reused_from_run_id']}" if quantizer["reused"] else "trained in this run"
            out.append(f"<p>Quantizer: <b>{html.escape(how)}</b> ({html.escape(quantizer['reason'])})</p>")
        out += [f"<h2>Recall self-check</h2><p>{recall['queries']} queries "
                f"({'held out from training' if recall['held_out'] else 'also used in training'}), "
                f"against {html.escape(recall['ground_truth'])}. Recommended nprobe for {k}-recall@{k} &ge; "
                f"{recall['target_recall']}: <b>{recall['recommended_nprobe']}</b>"
                + ("" if recall["target_reached"] or not recall["table"] else " <span class='bad'>(target not "
                   "reached; best shown)</span>") + "</p>",
                _table(["nprobe", f"{k}-recall@{k}", "1-recall@1", "ms/query (batch)", "ms single query p50"],
                       [[r["nprobe"], r[f"recall_{k}_at_{k}"], r["recall_1_at_1"], r["ms_per_query"],
                         r["single_query_ms_p50"]] for r in recall["table"]]),
                recall_svg(recall["table"], k)]
    out.append("</body></html>")
    return "\n".join(out)
