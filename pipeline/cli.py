"""The ``catalog-index`` command: ``run`` builds and runs the pipeline; ``search``, ``eval`` and
``fit-fusion`` work on a published run."""
from __future__ import annotations

import argparse
import logging
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from pipeline.config import RunConfig
from pipeline.graph import build
from pipeline.options import CatalogIndexOptions, to_run_config
from pipeline.publish import AccountingError, FailureThresholdError, PublishRefused, read_manifest
from pipeline.recall_queries import RecallQueriesError

BEAM_NOTE = (
    "Every other flag is a Beam pipeline option, passed through: --runner (DirectRunner, PortableRunner, "
    "DataflowRunner), --direct_running_mode=multi_processing, --direct_num_workers=N, "
    "--job_endpoint=embed, --environment_type=LOOPBACK, --setup_file=./setup.py, ..."
)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    for name in ("catalog_index", "encoders", "pipeline"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        log.propagate = False


def _weights_label(described: dict, random_note: str) -> str:
    return "REAL weights" if described["weights_label"] == "real" else f"RANDOM weights ({random_note})"


def summary(config: RunConfig, manifest: dict) -> str:
    """The short report printed after a run: counts, where the output is, which weights are real."""
    counts = manifest["counts"]
    dead, skipped = counts["dead_letters"], counts.get("skipped_by_reason", {})
    lines = [
        f"run {manifest['run_id']}: {counts['input_rows']} items read, {counts['embedded']} embedded, "
        f"{sum(dead.values())} failed" + (f" ({', '.join(f'{k}: {v}' for k, v in dead.items())})" if dead else "")
        + (f", {counts['skipped']} skipped ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""),
    ]
    inc = counts.get("incremental")
    if inc:
        prev = inc["previous_run"]
        lines.append(f"  incremental: {inc['reused']} reused, {inc['encoded']} encoded ({inc['new']} new, "
                     f"{inc['changed']} changed), {inc['deleted']} deleted; previous run: "
                     + (f"{prev['run_id']}" + ("" if prev["reusable"] else f" (not reused: {prev['not_reusable_because']})")
                        if prev else "none"))
    lines.append(f"output: {config.write.run_dir}/ (embeddings/, dead_letter/, index/, report.html, manifest.json); "
                 f"LATEST -> {manifest['run_id']}")
    index = manifest.get("index")
    if index:
        recall = index["recall"]
        k = recall["k"]
        params = index.get("search_params", {"nprobe": recall["recommended_nprobe"]}
                           if recall["recommended_nprobe"] is not None else {})
        reached = next((r[f"recall_{k}_at_{k}"] for r in recall["table"]
                        if r.get("params", {"nprobe": r["nprobe"]} if r["nprobe"] is not None else {}) == params), "n/a")
        search = ", ".join(f"{name} {value}" for name, value in params.items()) or "exact"
        lines.append(f"  index: {index['factory']} ({index['metric']}), {index['ntotal']} vectors in "
                     f"{len(index['shards'])} shard(s); {search} -> {k}-recall@{k} {reached} "
                     f"(target {recall['target_recall']})")
        if (index.get("chosen") or {}).get("why"):
            lines.append(f"  index choice: {index['chosen']['why']}")
        quantizer = index.get("quantizer")
        if quantizer and quantizer.get("applicable"):
            how = f"reused from run {quantizer['reused_from_run_id']}" if quantizer["reused"] else "trained"
            lines.append(f"  quantizer: {how} ({quantizer['reason']})")
    for space, model in manifest["models"].items():
        lines.append(f"  {space:5s} space: {model['family']} {model['name']} [{model['weights']}] -> "
                     + _weights_label(model, "not meaningful for search"))
    if "asr" in manifest:
        asr = manifest["asr"]
        lines.append(f"  speech recognition: {asr['family']} {asr['name']} [language {asr['language']}] -> "
                     + _weights_label(asr, "transcripts meaningless"))
    return "\n".join(lines)


EXIT_NOT_PUBLISHED = 3


def publish_refusal(error: BaseException) -> str | None:
    """The message of the :class:`PublishRefused` behind ``error``, or None if the run failed otherwise.

    Runners re-raise a DoFn's exception in their own wrappers (sometimes only
    its text survives), so both the cause chain and the text are searched.
    """
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, PublishRefused):
            return str(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(error)
    for name in (FailureThresholdError.__name__, AccountingError.__name__):
        if name + ":" in text:
            return text[text.index(name + ":"):].splitlines()[0].split(" [while running")[0]
    return None


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="catalog-index run",
        description="Embed a catalog snapshot into normalized item vectors (Apache Beam).",
        epilog=BEAM_NOTE,
    )
    CatalogIndexOptions._add_argparse_args(parser)
    args, _ = parser.parse_known_args(argv)  # --help exits here, listing the options
    if not args.catalog:
        parser.error("--catalog is required")
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    config, note = to_run_config(options)
    if note:
        print(note, flush=True)
    try:
        with beam.Pipeline(options=options) as p:
            build(p, config)
    except RecallQueriesError as e:  # raised while the graph is built, before any work
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - only a refusal to publish is turned into an exit status
        refusal = publish_refusal(e)
        if refusal is None:
            raise
        print(f"run {config.write.run_id} NOT published: {refusal}", file=sys.stderr, flush=True)
        print(f"its dead letters are in {config.write.run_dir}/dead_letter/", file=sys.stderr, flush=True)
        return EXIT_NOT_PUBLISHED
    manifest = read_manifest(config.write.run_dir)
    print(summary(config, manifest), flush=True)
    return 0


def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder OUT/runs/<id>, or OUT (follows LATEST)")
    parser.add_argument("--device", default="cpu", help="device for the query encoders: cpu | cuda | cuda:N")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "l2"],
                        help="cosine: inner product, highest first; l2: squared distance, lowest first")
    parser.add_argument("--exact", action="store_true",
                        help="exact search over the embeddings Parquet even if the run has an index")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF lists to visit per query (default: the manifest's recommended nprobe)")


def _check_nprobe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nprobe is not None and args.nprobe < 1:
        parser.error(f"--nprobe must be >= 1, got {args.nprobe}")


def _searcher(info, args):
    from pipeline.search import open_searcher

    return open_searcher(info.run_dir, info.manifest, info.embedding_files, args.metric, args.exact, args.nprobe)


def search(argv: list[str]) -> int:
    from pipeline.query import QueryEncoder, QueryError, load_run
    from pipeline.runs import RunNotFound

    parser = argparse.ArgumentParser(
        prog="catalog-index search",
        description="Top-k items for one query, encoded with the run's own models, weights and layout "
                    "(read from its metadata).")
    _run_arg(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a typed query")
    what.add_argument("--image", help="path or URI of a query photo")
    what.add_argument("--audio", help="path or URI of a query audio clip")
    parser.add_argument("-k", type=int, default=10, help="how many items to print")
    args = parser.parse_args(argv)
    _check_nprobe(parser, args)
    modality, content = next((m, getattr(args, m)) for m in ("text", "image", "audio") if getattr(args, m))
    try:
        info = load_run(args.run)
        searcher = _searcher(info, args)
        vector = QueryEncoder(info, device=args.device).encode(modality, [content])
    except (QueryError, RunNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scores, ids = searcher.search(vector, args.k)
    label = "score" if args.metric == "cosine" else "dist"
    print(f"run {info.manifest['run_id']} ({info.metadata['fusion']['mode']} fusion, {searcher.label()}): "
          f"top {len(ids[0])} for {modality} query {content!r}")
    for rank, (item, score) in enumerate(zip(ids[0], scores[0]), 1):
        print(f"{rank:3d}  {item}  {label}={score:.4f}")
    return 0


def evaluate(argv: list[str]) -> int:
    import json
    import os

    from pipeline.evaluate import QueriesFileError, evaluate as run_eval, format_report, read_queries
    from pipeline.publish import write_text_atomically
    from pipeline.query import QueryEncoder, QueryError, load_run
    from pipeline.runs import RunNotFound

    parser = argparse.ArgumentParser(
        prog="catalog-index eval",
        description="Recall@1/5/10, MRR and nDCG@10 of a run on labelled queries, overall and per query modality.")
    _run_arg(parser)
    parser.add_argument("--queries", required=True,
                        help='JSON lines {"modality": "text"|"image"|"audio", "query": ..., "relevant": [item ids]} '
                             '(media queries: paths relative to the file)')
    parser.add_argument("--out", default="", help="report JSON path (default RUN/eval/<queries file stem>.json)")
    args = parser.parse_args(argv)
    _check_nprobe(parser, args)
    try:
        info = load_run(args.run)
        queries = read_queries(args.queries)
        searcher = _searcher(info, args)
        report = run_eval(info, queries, searcher, QueryEncoder(info, device=args.device))
    except (QueryError, QueriesFileError, RunNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["queries_file"] = os.path.abspath(args.queries)
    report["metric"] = args.metric
    out = args.out or f"{info.run_dir}/eval/{os.path.splitext(os.path.basename(args.queries))[0]}.json"
    if "://" not in out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_text_atomically(out, json.dumps(report, indent=2, ensure_ascii=False))
    print(format_report(report))
    print(f"report: {out}")
    return 0


def fit_fusion(argv: list[str]) -> int:
    from pipeline.fit_fusion import main as fit_main

    return fit_main(argv)


VERBS = {"run": run, "search": search, "eval": evaluate, "fit-fusion": fit_fusion}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(f"usage: catalog-index {{{','.join(VERBS)}}} [options]   (catalog-index VERB --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _configure_logging()
    return VERBS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
