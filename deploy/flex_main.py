"""Flex template entry point: builds the catalog-index job from the template's parameters and submits it.

The template launcher runs this file with the parameters as flags; it must
submit and return (not wait), so unlike ``catalog-index run`` it neither
blocks on the job nor prints the manifest summary.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from pipeline.graph import build
from pipeline.catalog_files import check_catalog
from pipeline.options import given_column_fields, to_run_config


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    config, note = to_run_config(options)
    if note:
        logging.info(note)
    # the catalog's columns, checked before the job is submitted (as `catalog-index run` does)
    _, missing = check_catalog(config.read.catalog, config.read.columns, given_column_fields(argv))
    for m in missing:
        logging.warning(m.message())
    config = dataclasses.replace(config, read=dataclasses.replace(config.read, missing_columns=missing))
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config)
    pipeline.run()


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    main()
