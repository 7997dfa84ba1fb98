"""report.html itself: one self-contained page from the manifest and the report data.

Sections: run header and models, where the time went, the nearest-neighbour
gallery, dead letters, coverage and norms, the index (recall against search
setting per candidate), incremental counts and vector drift. A section whose
data the run did not record says so instead of disappearing.
"""
from __future__ import annotations

from pipeline.report.charts import PALETTE, bar_chart, esc, fmt, fmt_bytes, histogram_chart, line_chart
from schemas.manifest import Counts, IndexInfo, Manifest, Recall

STAGE_ORDER = ("read", "incremental", "fetch_decode", "fetch_audio", "encode", "transcribe", "fuse", "write", "index",
               "publish")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;background:#f6f7f9;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 10px}h3{font-size:14px;margin:14px 0 6px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 18px;margin:14px 0}
.muted{color:#6a737d}.bad{color:#b3261e;font-weight:600}.good{color:#2e7d32;font-weight:600}
.tiles{display:flex;gap:10px;flex-wrap:wrap;margin:12px 0 0}
.tile{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:8px 14px;min-width:110px}
.tile b{display:block;font-size:20px}.tile span{color:#6a737d;font-size:12px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
td,th{border-bottom:1px solid #eaecef;padding:3px 10px;text-align:right;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.l,th.l{text-align:left}
code{font-size:12px;background:#f3f4f6;padding:1px 4px;border-radius:3px;word-break:break-all}
.badge{display:inline-block;font-size:11px;border-radius:9px;padding:0 7px;margin-right:3px;background:#e8eef7;color:#2c4f7c}
.badge.real{background:#e3f4e6;color:#1e6b2c}.badge.random{background:#fde8e6;color:#a1261b}
.row{display:grid;grid-template-columns:150px repeat(5,1fr);gap:8px;margin:10px 0;align-items:start}
.card{border:1px solid #e1e4e8;border-radius:6px;padding:6px;background:#fff;overflow:hidden}
.card.query{border:2px solid #3b6ea8;background:#f4f8fd}
.card img{display:block;width:100%;height:96px;object-fit:contain;background:#fafafa;border-radius:3px}
.card .text{height:96px;overflow:hidden;font-size:12px;background:#fbfaf4;border-radius:3px;padding:4px;color:#444}
.card .title{font-size:12px;font-weight:600;margin-top:4px;max-height:3em;overflow:hidden;word-break:break-word}
.card .id{font-size:11px;color:#6a737d;word-break:break-all}.card .score{font-size:12px;color:#3b6ea8;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:18px}
"""


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    """A table; the first ``left`` columns are left-aligned (names), the rest numbers."""
    def cls(i):
        return " class='l'" if i < left else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{esc(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _not_recorded(what: str) -> str:
    return f"<p class='muted'>{esc(what)}</p>"


def catalog_html(manifest: Manifest) -> str:
    """The catalog line, and a warning per modality not read because its default column is missing."""
    catalog = manifest.catalog
    missing = "".join(f"<p class='bad'>catalog: {esc(m['message'])}</p>"
                      for m in (catalog.missing_columns if catalog else []))
    return (f"<p class='muted'>catalog <code>{esc(catalog.path if catalog else None)}</code>"
            f" &middot; created {esc(manifest.created_at or '')}</p>" + missing)


def _header(manifest: Manifest) -> str:
    counts = manifest.counts or Counts()
    tiles = [("input rows", counts.input_rows), ("embedded", counts.embedded), ("dead letters", counts.failed),
             ("skipped", counts.skipped)]
    index = manifest.index
    if index:
        tiles.append(("index vectors", index.ntotal))
    models = []
    for space, m in manifest.models.items():
        label = m.weights_label
        badge = f"<span class='badge {'real' if label == 'real' else 'random'}'>{esc(label)}</span>"
        models.append(f"<tr><td class='l'>{esc(space)}</td><td class='l'>{esc(m.family)}</td>"
                      f"<td class='l'>{esc(m.name)}</td><td class='l'><code>{esc(m.weights)}</code></td>"
                      f"<td class='l'>{badge}</td></tr>")
    if manifest.asr is not None:
        asr = manifest.asr
        label = asr.weights_label
        models.append(f"<tr><td class='l'>speech</td><td class='l'>{esc(asr.family)}</td>"
                      f"<td class='l'>{esc(asr.name)}</td><td class='l'>language {esc(asr.get('language'))}</td>"
                      f"<td class='l'><span class='badge {'real' if label == 'real' else 'random'}'>{esc(label)}</span>"
                      "</td></tr>")
    warn = ("<p class='bad'>Some models have RANDOM weights: their vectors are not meaningful for search.</p>"
            if manifest.random_weights else "")
    return (f"<h1>Run {esc(manifest.run_id)}</h1>" + catalog_html(manifest) +
            "<div class='tiles'>" + "".join(f"<div class='tile'><b>{esc(fmt(v))}</b><span>{esc(k)}</span></div>"
                                            for k, v in tiles) + "</div>"
            "<h3>Models</h3><table><tr><th class='l'>space</th><th class='l'>family</th><th class='l'>model</th>"
            "<th class='l'>weights</th><th class='l'>real/random</th></tr>" + "".join(models) + "</table>" + warn)


def _ordered_stages(stages: dict) -> list[str]:
    known = [s for s in STAGE_ORDER if s in stages]
    return known + sorted(s for s in stages if s not in STAGE_ORDER)


def _timings(manifest: Manifest) -> str:
    t = manifest.timings
    out = ["<h2>Where the time went</h2>"]
    if not t:
        return "".join(out) + _not_recorded(
            "Timings not recorded: they come from the run's Beam metrics, which are complete only after the "
            "pipeline finishes; `catalog-index run` adds them to manifest.json and re-renders this page then.")
    stages = t.get("stages", {})
    names = _ordered_stages(stages)
    out.append(f"<p>Pipeline wall time <b>{fmt(t.get('run_wall_s'))} s</b>"
               + (f"; encoders busy <b>{t['encoder_busy_share']:.0%}</b> of it "
                  f"({fmt(t.get('encoder_wall_s'))} s of encoder batches)" if t.get("encoder_busy_share") is not None
                  else "") + ". Stage times are the sum over batches (on all workers and threads), so stages that "
               "overlap can add up to more than the wall time.</p>")
    if names:
        out.append(bar_chart([(n, [stages[n]["wall_s"], stages[n]["cpu_s"]]) for n in names],
                             series=("wall s", "CPU s"), unit=" s", title="time per stage"))
        out.append(_table(["stage", "batches", "items", "wall s", "CPU s", "items/s (wall)"],
                          [[n, stages[n]["batches"], stages[n]["items"], fmt(stages[n]["wall_s"]),
                            fmt(stages[n]["cpu_s"]), fmt(stages[n].get("items_per_s"))] for n in names]))
    else:
        out.append(_not_recorded("No stage recorded timing metrics in this run."))
    encoders = t.get("encoders", {})
    if encoders:
        out.append("<h3>Encoders</h3>" + _table(["modality", "batches", "wall s"],
                                               [[m, e["batches"], fmt(e["wall_s"])] for m, e in sorted(encoders.items())]))
    missing = [s for s in ("read", "fetch_decode", "encode", "fuse", "write", "index") if s not in stages]
    if missing:
        out.append(_not_recorded(f"Not recorded in this run: {', '.join(missing)}."))
    return "".join(out)


def _card(tile: dict, query: bool = False) -> str:
    title = tile.get("title")
    if tile.get("thumbnail"):
        media = f"<img src=\"{esc(tile['thumbnail'])}\" alt=\"{esc(title or tile['item_id'])}\" class='thumb'>"
    elif tile.get("text") or title:
        media = f"<div class='text'>{esc(tile.get('text') or title)}</div>"
    elif tile.get("sampled", True):
        media = f"<div class='text muted'>({esc(', '.join(tile.get('modalities', [])) or 'no content')} only)</div>"
    else:
        media = "<div class='text muted'>(not in the report sample: no title or thumbnail kept)</div>"
    badges = "".join(f"<span class='badge'>{esc(m)}</span>" for m in tile.get("modalities", []))
    score = f"<div class='score'>{tile['score']:.3f}</div>" if "score" in tile else ""
    return (f"<div class='card{' query' if query else ''}'>{media}"
            f"<div class='title'>{esc(title or '')}</div><div class='id'>{esc(tile['item_id'])}</div>"
            f"<div>{badges}</div>{score}</div>")


def _gallery(data: dict) -> str:
    g = data.get("gallery") or {}
    out = ["<h2>Nearest neighbours</h2>"]
    if not g.get("items"):
        return "".join(out) + _not_recorded(g.get("note") or "No gallery recorded for this run.")
    out.append(f"<p class='muted'>{esc(g['sample'])} (left), and their top {g['k']} neighbours in this run's own index"
               f" ({esc(g['score'])}" + (f", nprobe {g['nprobe']}" if g.get("nprobe") else "") +
               "). With real weights, neighbours should look alike; with random ones they will not.</p>")
    for item in g["items"]:
        cells = [_card(item, query=True)] + [_card(n) for n in item["neighbours"]]
        out.append("<div class='row'>" + "".join(cells) + "</div>")
    return "".join(out)


def _dead_letters(manifest: Manifest, data: dict) -> str:
    dead = (manifest.counts or Counts()).dead_letters
    out = ["<h2>Dead letters</h2>"]
    if not dead:
        return "".join(out) + "<p class='good'>None: every input row was embedded or is a counted skip.</p>"
    rows = sorted(dead.items(), key=lambda kv: -kv[1])
    out.append(bar_chart([(k, [v]) for k, v in rows], colors=("#c0392b",), title="dead letters by reason"))
    examples = data.get("dead_letter_examples")
    if examples is None:
        out.append(_not_recorded("Examples not recorded."))
    for reason, _ in rows:
        found = (examples or {}).get(reason) or []
        if found:
            rows_text = f"{dead[reason]} {'row' if dead[reason] == 1 else 'rows'}; first {len(found)} by item id"
            out.append(f"<h3>{esc(reason)} <span class='muted'>({rows_text})</span>"
                       "</h3>" + _table(["item", "stage", "detail", "source"],
                                        [[e["item_id"], e["stage"], e["detail"], e["source"]] for e in found], left=4))
    return "".join(out)


def _coverage(manifest: Manifest) -> str:
    stats = manifest.stats or {}
    out = ["<h2>Modality coverage</h2>"]
    if not stats:
        return "".join(out) + _not_recorded("No statistics recorded.")
    n = max(stats["items"], 1)
    coverage = bar_chart([(m, [c / n * 100]) for m, c in stats["modalities"].items()], unit="%", width=490,
                         label_width=110, title="modality coverage")
    combos = bar_chart(sorted(((m, [c]) for m, c in stats["combinations"].items()), key=lambda r: -r[1][0]),
                       colors=(PALETTE[2],), width=490, label_width=150, title="modality combinations")
    out.append(f"<div class='charts'><div><h3>Items with each modality (of {stats['items']})</h3>{coverage}</div>"
               f"<div><h3>Modality combinations</h3>{combos}</div></div>")
    norm = stats["norm"]
    out.append(f"<h3>Vector norm check</h3><p>min {esc(norm['min'])}, max {esc(norm['max'])}; "
               + (f"<span class='bad'>{norm['off_unit']} vectors are not unit norm</span>" if norm["off_unit"]
                  else "<span class='good'>every vector has unit norm</span>")
               + f" (tolerance {norm['tolerance']:g}).</p>")
    hist = norm.get("deviation_histogram")
    if hist:
        ok = list(hist)[:4]
        out.append(bar_chart([(f"|norm-1| {k}", [v]) for k, v in hist.items()], colors=(PALETTE[0],),
                             title="norm deviation", label_width=170)
                   + f"<p class='muted'>Buckets {', '.join(ok)} are within tolerance.</p>")
    return "".join(out)


def index_candidates(index: IndexInfo) -> tuple[list[dict], dict | None]:
    """The index stage's candidates and choice; a manifest without ``candidates`` becomes one candidate."""
    if index.candidates:
        return index.candidates, index.chosen
    recall = index.recall or Recall()
    k = recall.k
    settings = [{"params": {"nprobe": r.nprobe} if r.nprobe else {},
                 "query_set": "held_out" if recall.held_out else "recall_queries",
                 "recall_at_10": r.recall(k), "recall_at_1": r.recall(1),
                 "ms_per_query_batch": r.ms_per_query, "ms_single_p50": r.single_query_ms_p50}
                for r in recall.table]
    chosen_params = {"nprobe": recall.recommended_nprobe} if recall.recommended_nprobe else {}
    candidate = {"name": index.factory or None, "family": index.kind or None,
                 "bytes_per_vector": index.bytes_per_vector, "settings": settings,
                 "meets_target": recall.target_reached if index.recall else None, "fits_budget": True}
    why = (f"the only candidate; nprobe {chosen_params['nprobe']} is the smallest measured setting reaching the "
           f"target" if chosen_params else "exact search: " + (index.note or "flat index"))
    return [candidate], {"name": candidate["name"], "params": chosen_params, "why": why}


def _setting(params: dict) -> tuple[float, str]:
    if not params:
        return 1.0, "exact"
    name, value = next(iter(params.items()))
    return float(value), f"{name} {value}"


def _best(best) -> str:
    """A candidate's best setting: a setting ({"params": ...}), bare params, or nothing."""
    if not isinstance(best, dict):
        return "" if best is None else str(best)
    params = best.get("params", best)
    return _setting(params if isinstance(params, dict) else {})[1]


def _index(manifest: Manifest) -> str:
    index = manifest.index
    out = ["<h2>Index</h2>"]
    if not index:
        return "".join(out) + _not_recorded("No index in this run (--index off).")
    recall = index.recall
    out.append(_table(["factory", "metric", "vectors", "shards", "bytes/vector"],
                      [[index.factory, index.metric, index.ntotal, len(index.shards), index.bytes_per_vector]],
                      left=2))
    if index.note:
        out.append(f"<p class='muted'>{esc(index.note)}</p>")
    quantizer = index.quantizer
    if quantizer and quantizer.applicable:
        how = f"reused from run {quantizer.reused_from_run_id}" if quantizer.reused else "trained in this run"
        out.append(f"<p>Quantizer: <b>{esc(how)}</b> ({esc(quantizer.reason)})</p>")
    candidates, chosen = index_candidates(index)
    target = recall.target_recall if recall else None
    if recall:
        out.append(f"<p>Recall self-check: {esc(recall.queries)} queries "
                   f"({'held out from training' if recall.held_out else 'also used in training'}) against "
                   f"{esc(recall.ground_truth)}.</p>")
    charts = []
    for c in candidates:
        measured = [s for s in c.get("settings") or [] if s.get("recall_at_10") is not None]
        if not measured:
            continue
        # one curve per candidate: on the held-out queries when measured there, else on the recall queries
        query_sets = {s.get("query_set") for s in measured}
        query_set = "held_out" if "held_out" in query_sets else sorted(query_sets, key=str)[0]
        measured = [s for s in measured if s.get("query_set") == query_set]
        is_chosen = chosen is not None and chosen.get("name") == c.get("name")
        points = sorted(((*_setting(s["params"]), s) for s in measured), key=lambda p: (p[0], p[1]))
        marked = next((i for i, (_, _, s) in enumerate(points) if s["params"] == chosen.get("params")), None) \
            if is_chosen else None
        series = [{"name": "recall@10", "points": [(x, s["recall_at_10"], t) for x, t, s in points], "marked": marked,
                   "color": PALETTE[0]}]
        if all(s.get("recall_at_1") is not None for _, _, s in points):
            series.append({"name": "recall@1", "points": [(x, s["recall_at_1"], t) for x, t, s in points],
                           "color": PALETTE[1], "dashed": True})
        title = (f"{esc(c.get('name'))} ({esc(c.get('family'))})" + (" &mdash; chosen" if is_chosen else "")
                 + (f" <span class='muted'>({esc(query_set)} queries)</span>" if query_set else ""))
        chart = line_chart(series, width=490, height=230, x_label="search setting", y_label="recall", target=target)
        charts.append(f"<div><h3>{title}</h3>{chart}</div>")
    out.append("<div class='charts'>" + "".join(charts) + "</div>" if charts
               else _not_recorded("No recall measured for any candidate."))
    rows = []
    for c in candidates:
        best = c.get("best_setting")
        rows.append([c.get("name"), c.get("family"), c.get("bytes_per_vector"), fmt_bytes(c.get("memory_bytes")),
                     {True: "yes", False: "no"}.get(c.get("fits_budget"), ""), c.get("skipped_reason") or "",
                     fmt(c.get("train_seconds")), _best(best),
                     {True: "yes", False: "no"}.get(c.get("meets_target"), "")])
    out.append("<h3>Candidates</h3>" + _table(["candidate", "family", "bytes/vector", "memory", "fits budget",
                                               "skipped", "train s", "best setting", "meets target"], rows, left=2))
    if chosen:
        out.append(f"<p>Chosen: <b>{esc(chosen.get('name'))}</b>, {esc(_setting(chosen.get('params') or {})[1])}: "
                   f"{esc(chosen.get('why'))}</p>")
    if recall and recall.table and not index.candidates:
        k = recall.k
        out.append(_table(["nprobe", f"{k}-recall@{k}", "1-recall@1", "ms/query (batch)", "ms single query p50"],
                          [[r.nprobe if r.nprobe else "exact", r.recall(k), r.recall(1),
                            r.ms_per_query, r.single_query_ms_p50] for r in recall.table]))
    return "".join(out)


INCREMENTAL_KEYS = ("reused", "encoded", "new", "changed", "deleted")


def _incremental(manifest: Manifest, data: dict) -> str:
    counts = manifest.counts or Counts()
    inc = counts.incremental
    out = ["<h2>Incremental</h2>"]
    if not inc:
        return "".join(out) + _not_recorded("No incremental counts recorded.")
    prev_run = inc.previous_run
    out.append("<p>Previous run: " + (f"<b>{esc(prev_run['run_id'])}</b>" + (
        "" if prev_run.get("reusable") else f" <span class='bad'>(not reused: {esc(prev_run.get('not_reusable_because'))})"
        "</span>") if prev_run else "none (a full run)") + f"; change detection {esc(inc.change_detection)}.</p>")
    before = data.get("previous_counts")
    tonight = {"input_rows": counts.input_rows, "embedded": counts.embedded, "dead_letters": counts.failed,
               "skipped": counts.skipped, **{k: getattr(inc, k) for k in INCREMENTAL_KEYS}}
    keys = ("input_rows", "embedded", "dead_letters", "skipped") + INCREMENTAL_KEYS
    if before:
        out.append(bar_chart([(k, [tonight[k], before.get(k)]) for k in keys],
                             series=("this run", f"previous ({before.get('run_id')})"), title="counts"))
        out.append(_table(["count", "this run", "previous run"],
                          [[k, tonight[k], "" if before.get(k) is None else before[k]] for k in keys]))
    else:
        out.append(bar_chart([(k, [tonight[k]]) for k in keys], title="counts"))
        out.append(_not_recorded("No previous run's counts to compare with."))
    drift = data.get("drift")
    out.append("<h3>How far changed items' vectors moved</h3>")
    if not drift:
        out.append(_not_recorded("Drift not recorded for this run." if prev_run else "No previous run: nothing to compare."))
    elif "note" in drift:
        out.append(_not_recorded(drift["note"]))
    elif not drift.get("sampled"):
        out.append(_not_recorded(f"{drift.get('changed', 0)} changed items: no histogram."))
    else:
        sampled = "" if drift["sampled"] == drift["changed"] else f" (the {drift['sampled']} with the smallest id hashes)"
        out.append(f"<p>Cosine between the previous and this run's vector of {drift['changed']} changed items"
                   f"{sampled}: min {drift['min']}, median {drift['median']}, max {drift['max']}.</p>"
                   + histogram_chart(drift["histogram"]["edges"], drift["histogram"]["counts"],
                                     x_label="cosine(previous vector, this run's vector)"))
    return "".join(out)


def render_html(manifest: Manifest, data: dict | None = None) -> str:
    """The whole page; ``data`` is ``report_data.gather``'s output (None: sections that need it say so)."""
    data = data or {}
    sections = [_header(manifest), _timings(manifest), _gallery(data), _dead_letters(manifest, data),
                _coverage(manifest), _index(manifest), _incremental(manifest, data)]
    error = (f"<section><p class='bad'>Part of this report could not be gathered: {esc(data['error'])}</p></section>"
             if data.get("error") else "")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>run {esc(manifest.run_id)}</title><style>{CSS}</style></head><body><main>" + error
            + "".join(f"<section>{s}</section>" for s in sections) + "</main></body></html>")
