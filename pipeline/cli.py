"""The ``catalog-index`` command: ``run`` builds and runs the pipeline (more verbs follow)."""
from __future__ import annotations

import argparse
import logging
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from pipeline.config import RunConfig
from pipeline.graph import build
from pipeline.options import CatalogIndexOptions, to_run_config
from pipeline.publish import read_manifest

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


def summary(config: RunConfig, manifest: dict) -> str:
    """The short report printed after a run."""
    counts = manifest["counts"]
    dead = counts["dead_letters"]
    lines = [
        f"run {manifest['run_id']}: {counts['input_rows']} items read, {counts['embedded']} embedded, "
        f"{sum(dead.values())} failed" + (f" ({', '.join(f'{k}: {v}' for k, v in dead.items())})" if dead else ""),
        f"output: {config.write.run_dir}/ (embeddings/, dead_letter/, manifest.json); LATEST -> {manifest['run_id']}",
    ]
    inc = counts.get("incremental")
    if inc:
        prev = inc["previous_run"]
        lines.append(f"incremental: {inc['reused']} reused, {inc['encoded']} encoded ({inc['new']} new, "
                     f"{inc['changed']} changed), {inc['deleted']} deleted; previous run: "
                     + (f"{prev['run_id']}" + ("" if prev["reusable"] else f" (not reused: {prev['not_reusable_because']})")
                        if prev else "none"))
    for space, model in manifest["models"].items():
        label = "REAL weights" if model["weights_label"] == "real" else "RANDOM weights (not meaningful for search)"
        lines.append(f"  {space:5s} space: {model['family']} {model['name']} [{model['weights']}] -> {label}")
    return "\n".join(lines)


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
    with beam.Pipeline(options=options) as p:
        build(p, config)
    manifest = read_manifest(config.write.run_dir)
    print(summary(config, manifest), flush=True)
    return 0


VERBS = {"run": run}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(f"usage: catalog-index {{{','.join(VERBS)}}} [options]   (catalog-index VERB --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _configure_logging()
    return VERBS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
