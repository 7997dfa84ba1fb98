"""The ``catalog-index`` command: ``run`` builds and runs the pipeline; ``search``, ``eval`` and
``fit-fusion`` work on a published run."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from pipeline import console
from pipeline.console import NotPublished, Parser, UsageError
from schemas.manifest import Counts, IncrementalCounts, Manifest, ModelEntry

BEAM_NOTE = (
    "Every other flag is a Beam pipeline option, passed through: --runner (DirectRunner, PortableRunner, "
    "DataflowRunner), --direct_running_mode=multi_processing, --direct_num_workers=N, "
    "--job_endpoint=embed, --environment_type=LOOPBACK, --setup_file=./setup.py, ... "
    "Exit status: 0 done; 2 usage, configuration or input error; 3 not published (failure threshold); "
    "1 unexpected error."
)


def _weights_label(described: ModelEntry, random_note: str) -> str:
    return "REAL weights" if described.real else f"RANDOM weights ({random_note})"


def _incremental_line(inc: IncrementalCounts) -> str:
    """``reused + encoded = embedded``; what went to the encoders (new + changed) and how much of it failed."""
    prev = inc.previous_run
    sent = inc.new + inc.changed
    failed = sent - inc.encoded
    previous = (f"{prev['run_id']}" + ("" if prev["reusable"] else f" (not reused: {prev['not_reusable_because']})")
                if prev else "none")
    return (f"  incremental: {inc.reused} reused + {inc.encoded} encoded; {sent} sent to the encoders "
            f"({inc.new} new, {inc.changed} changed)" + (f", {failed} of them failed" if failed else "")
            + f"; {inc.deleted} deleted; previous run: {previous}")


def summary(config, manifest: Manifest) -> str:
    """The short report printed after a run: counts, where the output is, which weights are real."""
    counts = manifest.counts or Counts()
    dead, skipped = counts.dead_letters, counts.skipped_by_reason
    lines = [
        f"run {manifest.run_id}: {counts.input_rows} items read, {counts.embedded} embedded, "
        f"{counts.failed} failed" + (f" ({', '.join(f'{k}: {v}' for k, v in dead.items())})" if dead else "")
        + (f", {counts.skipped} skipped ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""),
    ]
    for missing in (manifest.catalog.missing_columns if manifest.catalog else []):
        lines.append(f"  catalog: {missing['message']}")
    if counts.incremental:
        lines.append(_incremental_line(counts.incremental))
    index = manifest.index
    written = "embeddings/, dead_letter/, " + ("index/, " if index else "") + "report.html, manifest.json"
    lines.append(f"output: {config.write.run_dir}/ ({written}); LATEST -> {manifest.run_id}")
    if index and index.recall:
        recall = index.recall
        k = recall.k
        params = index.recommended_params()
        reached = recall.recall_at(params)
        search = ", ".join(f"{name} {value}" for name, value in params.items()) or "exact"
        lines.append(f"  index: {index.factory} ({index.metric}), {index.ntotal} vectors in "
                     f"{len(index.shards)} shard(s); {search} -> {k}-recall@{k} "
                     f"{'n/a' if reached is None else reached} (target {recall.target_recall})")
        if (index.chosen or {}).get("why"):
            lines.append(f"  index choice: {index.chosen['why']}")
        quantizer = index.quantizer
        if quantizer and quantizer.applicable:
            how = f"reused from run {quantizer.reused_from_run_id}" if quantizer.reused else "trained"
            lines.append(f"  quantizer: {how} ({quantizer.reason})")
    for space, model in manifest.models.items():
        lines.append(f"  {space:5s} space: {model.family} {model.name} [{model.weights}] -> "
                     + _weights_label(model, "not meaningful for search"))
    if manifest.asr is not None:
        asr = manifest.asr
        lines.append(f"  speech recognition: {asr.family} {asr.name} [language {asr.get('language')}] -> "
                     + _weights_label(asr, "transcripts meaningless"))
    return "\n".join(lines)


EXIT_NOT_PUBLISHED = console.EXIT_NOT_PUBLISHED


def _in_chain(error: BaseException, names: tuple[str, ...]) -> tuple[str, str] | None:
    """(class name, message) of the first exception named in ``names`` behind ``error``.

    Runners re-raise a DoFn's exception in their own wrappers (sometimes only
    its text survives), so both the cause chain and the text are searched.
    """
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        for cls in type(e).__mro__:
            if cls.__name__ in names:
                return cls.__name__, str(e).split(" [while running")[0]
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(error)
    for name in names:
        for marker in (name + ": ", f"{name}('"):
            if marker in text:
                rest = text[text.index(marker) + len(marker):]
                return name, rest.splitlines()[0].split(" [while running")[0].rstrip("')")
    return None


def publish_refusal(error: BaseException) -> str | None:
    """The message of the :class:`PublishRefused` behind ``error``, or None if the run failed otherwise."""
    found = _in_chain(error, ("FailureThresholdError", "AccountingError", "PublishRefused"))
    if found is None:
        return None
    name, message = found
    return message if name == "PublishRefused" else f"{name}: {message}"


# errors raised inside workers that are the user's to fix, with the hint printed beside them
_WORKER_ERRORS = {
    "DeviceUnavailable": "use --device auto or --device cpu, or run where the GPU is visible",
    "CatalogFileError": "--catalog must name Parquet files",
}


def _check_flags(argv: list[str]) -> None:
    """Refuses likely typos of known flags (Beam would drop them and the default would silently apply)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import CatalogIndexOptions  # noqa: F401 - registers our options as a subclass

    parser = Parser(add_help=False, allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    console.add_verbosity_args(parser)
    known = [opt for action in parser._actions for opt in action.option_strings]
    _, unknown = parser.parse_known_args(argv)
    typos, others = console.unknown_flags(unknown, known)
    if typos:
        raise UsageError(f"unknown option {typos[0]}; did you mean {console.closest_flag(typos[0], known)}?",
                         "catalog-index run --help lists the options")
    stray = [a for a in unknown if not a.startswith("-")]
    if stray and not others:
        raise UsageError(f"unexpected argument {stray[0]!r}", "options take the form --name value")
    for name in others:
        print(f"note: {name} is neither a catalog-index nor a Beam option; passed to the runner as is",
              file=sys.stderr, flush=True)


def _show_bar(options, stream) -> bool:
    """A terminal bar only where this process sees the stages' counts: an in-memory DirectRunner on a TTY."""
    from pipeline.options import in_process_runner

    return in_process_runner(options) and hasattr(stream, "isatty") and stream.isatty()


def local_runner(options):
    """Beam's FnApiRunner, in this process, where the runner is unnamed or the DirectRunner; else None.

    That is what the DirectRunner runs this batch pipeline on, after it has
    tried its Prism runner first: Prism needs a binary downloaded at run time,
    which fails on an offline worker (and the README's local runs, the
    progress bar and the in-process fault hooks assume the in-memory runner
    anyway). The attempt cost every run ~0.16 CPU-s (the pipeline's proto, a
    worker pool started and stopped: docs/BENCHMARKS.md, issue 11 round 8).
    Options reach the runner as the DirectRunner would pass them (its
    ``--direct_running_mode`` and ``--direct_num_workers`` included).
    """
    from pipeline.options import direct_runner

    if not direct_runner(options):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def prepare(argv: list[str]):
    """Flags -> (PipelineOptions, RunConfig with its catalog checked, catalog files); UsageError on bad input."""
    from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

    from pipeline.catalog_files import CatalogFileError, check_catalog
    from pipeline.options import CatalogIndexOptions, given_column_fields, to_run_config
    from schemas.catalog import CatalogColumnError

    parser = Parser(prog="catalog-index run", allow_abbrev=False,
                    description="Embed a catalog snapshot into normalized item vectors (Apache Beam).",
                    epilog=BEAM_NOTE)
    CatalogIndexOptions._add_argparse_args(parser)
    console.add_verbosity_args(parser)
    parser.parse_known_args(argv)  # --help exits here, listing the options; bad values raise
    _check_flags(argv)
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    try:
        config, note = to_run_config(options)
    except ValueError as e:  # the config dataclasses validate every value, --catalog's presence included
        raise UsageError(str(e), "catalog-index run --help lists the options and their values") from None
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    try:
        files, missing = check_catalog(config.read.catalog, config.read.columns, given_column_fields(argv))
    except CatalogColumnError as e:
        raise UsageError(str(e), "name the catalog's columns with --item_id_column, --title_column, "
                                 "--description_column, --image_column, --audio_column") from None
    except CatalogFileError as e:
        raise UsageError(str(e), "--catalog takes a Parquet path or glob (local, gs://, s3://)") from None
    for m in missing:
        print(f"note: {m.message()}", file=sys.stderr, flush=True)
    config = dataclasses.replace(config, read=dataclasses.replace(config.read, missing_columns=missing))
    return options, config, files


def run(argv: list[str]) -> int:
    import contextlib

    import apache_beam as beam

    from pipeline.stages import progress
    from pipeline.graph import build
    from pipeline.progress_bar import TerminalBar
    from pipeline.query.recall_queries import RecallQueriesError

    options, config, files = prepare(argv)
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    try:
        build(pipeline, config, num_rows=files.num_rows)  # loads model configs (dimensions), the fusion module, the recall queries
    except RecallQueriesError as e:
        raise UsageError(str(e), "--recall_queries takes a JSON-lines file in eval's format") from None
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot set up the run: {e}",
                         "check the model options (--clip_model, --clip_weights, --text_model, --asr_model, "
                         "--clap_model, --fusion_module)") from None
    bar = contextlib.nullcontext()
    if _show_bar(options, sys.stderr) and config.progress_interval_s > 0:
        import logging

        progress.reset()
        logging.getLogger("catalog_index.progress").setLevel(logging.WARNING)  # the bar replaces the log lines
        bar = TerminalBar(files.num_rows, progress.done)
        console.redirect_own_logs(bar.log_stream())
    try:
        with bar:
            started = time.perf_counter()
            result = pipeline.run()
            result.wait_until_finish()
            wall_s = time.perf_counter() - started
    except Exception as e:  # noqa: BLE001 - expected failures become an exit status, the rest keeps its traceback
        refusal = publish_refusal(e)
        if refusal is not None:
            raise NotPublished(f"run {config.write.run_id} NOT published: {refusal}",
                               f"its dead letters are in {config.write.run_dir}/dead_letter/; "
                               f"--max_failure_fraction sets the threshold") from None
        found = _in_chain(e, tuple(_WORKER_ERRORS))
        if found is None:
            raise
        raise UsageError(found[1], _WORKER_ERRORS[found[0]]) from None
    finally:
        progress.stop()  # in-process workers' progress lines end with the run, not with the process
    manifest = _record_timings(config.write.run_dir, result, wall_s)
    print(summary(config, manifest), flush=True)
    return 0


def _record_timings(run_dir: str, result, wall_s: float) -> Manifest:
    """Beam metrics are complete only now: the manifest gets ``timings`` and report.html is re-rendered."""
    from pipeline.beam_metrics import run_timings
    from pipeline.stages.publish import add_timings
    from pipeline.storage import read_manifest

    try:
        return add_timings(run_dir, run_timings(result, wall_s))
    except Exception as e:  # noqa: BLE001 - the run is published; only its timing record is missing
        print(f"warning: run timings not recorded in the report: {type(e).__name__}: {e}", file=sys.stderr)
        return read_manifest(run_dir)


def _run_arg(parser: argparse.ArgumentParser) -> None:
    from pipeline.query.search import METRICS

    parser.add_argument("--run", required=True, help="a run folder OUT/runs/<id>, or OUT (follows LATEST)")
    parser.add_argument("--device", default="cpu", help="device for the query encoders: cpu | cuda | cuda:N")
    parser.add_argument("--metric", default="cosine", choices=list(METRICS),
                        help="cosine: inner product, highest first; l2: squared distance, lowest first")
    parser.add_argument("--exact", action="store_true",
                        help="exact search over the embeddings Parquet even if the run has an index")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF lists to visit per query (default: the manifest's recommended nprobe)")
    console.add_verbosity_args(parser)


def _check_nprobe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any run is loaded: the searcher's own check, as a usage error naming the flag."""
    from pipeline.query.search import check_nprobe

    try:
        check_nprobe(args.nprobe)
    except ValueError as e:
        parser.error(f"--{e}")


def _check_k(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any run is loaded: the searcher's own check, as a usage error naming the flag."""
    from pipeline.query.search import check_k

    try:
        check_k(args.k)
    except ValueError as e:
        parser.error(f"-{e}")


def _searcher(info, args):
    from pipeline.query.search import open_searcher

    return open_searcher(info.run_dir, info.manifest, info.embedding_files, args.metric, args.exact, args.nprobe)


_QUERY_HINT = {
    "RunNotFound": "--run takes a run folder (OUT/runs/<id>) or an output root with a LATEST file",
    "QueryContentError": "a query image or clip must be a readable local file or an allowed URI",
    "QueryError": "the query must suit the run's models (catalog-index search --help)",
    "QueriesFileError": "--queries takes JSON lines {\"modality\": ..., \"query\": ..., \"relevant\": [...]}",
    "OSError": "check that the path exists and is readable",
}


def _query_error(e: Exception) -> UsageError:
    name = next((c.__name__ for c in type(e).__mro__ if c.__name__ in _QUERY_HINT), "QueryError")
    return UsageError(str(e), _QUERY_HINT[name])


def search(argv: list[str]) -> int:
    import json

    from pipeline.query.hits import describe_hits, format_hit, hit_rows
    from pipeline.query.encoder import QueryEncoder, QueryError, load_run
    from pipeline.index.runs import RunNotFound

    parser = Parser(
        prog="catalog-index search",
        description="Top-k items for one query, encoded with the run's own models, weights and layout "
                    "(read from its metadata). Each hit shows its title and a short description or transcript.")
    _run_arg(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a typed query")
    what.add_argument("--image", help="path or URI of a query photo")
    what.add_argument("--audio", help="path or URI of a query audio clip")
    parser.add_argument("-k", type=int, default=10, help="how many items to print")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)
    _check_nprobe(parser, args)
    _check_k(parser, args)
    modality, content = next((m, getattr(args, m)) for m in ("text", "image", "audio") if getattr(args, m))
    try:
        info = load_run(args.run)
        searcher = _searcher(info, args)
        vector = QueryEncoder(info, device=args.device).encode(modality, [content])
    except (QueryError, RunNotFound, OSError) as e:
        raise _query_error(e) from None
    scores, ids = searcher.search(vector, args.k)
    hits = hit_rows(ids[0], scores[0], describe_hits(info.embedding_files, ids[0]))
    if args.json:
        print(json.dumps({"run_id": info.manifest.run_id, "query": {"modality": modality, "content": content},
                          "metric": args.metric, "searcher": searcher.label(),
                          "fusion": info.metadata["fusion"]["mode"], "hits": hits}, ensure_ascii=False, indent=2))
        return 0
    label = "score" if args.metric == "cosine" else "dist"
    print(f"run {info.manifest.run_id} ({info.metadata['fusion']['mode']} fusion, {searcher.label()}): "
          f"top {len(hits)} for {modality} query {content!r}")
    for hit in hits:
        print(format_hit(hit, label))
    return 0


def evaluate(argv: list[str]) -> int:
    import json
    import os

    from pipeline.query.evaluate import QueriesFileError, evaluate as run_eval, format_report, read_queries
    from pipeline.storage import write_text_atomically
    from pipeline.query.encoder import QueryEncoder, QueryError, load_run
    from pipeline.index.runs import RunNotFound

    parser = Parser(
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
    except (QueryError, QueriesFileError, RunNotFound, OSError) as e:
        raise _query_error(e) from None
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
    from pipeline.query.fit_fusion import main as fit_main

    return fit_main(argv)


VERBS = {"run": run, "search": search, "eval": evaluate, "fit-fusion": fit_fusion}


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 2 usage/configuration/input error; 3 run not published; 1 unexpected (traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(f"usage: catalog-index {{{','.join(VERBS)}}} [options]   (catalog-index VERB --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else console.EXIT_USAGE
    verb = argv[0]
    try:
        rest, verbose, log_level = console.pop_verbosity(argv[1:])
    except UsageError as e:
        return console.report(e)
    console.configure_logging(verbose, log_level)
    if verb == "run":
        rest += console.worker_log_flags(rest, verbose, log_level)
    try:
        return VERBS[verb](rest)
    except (UsageError, NotPublished) as e:
        return console.report(e)


if __name__ == "__main__":
    sys.exit(main())
