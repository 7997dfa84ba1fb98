"""Last stage: check the accounting, write manifest.json, then point LATEST at the run.

Runs only after every shard is written (its side inputs are the written
paths). The manifest is written last inside the run, and LATEST is replaced
atomically after it, so a reader that follows LATEST never sees a half run.
"""
from __future__ import annotations

import datetime
import json
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

MANIFEST = "manifest.json"
LATEST = "LATEST"


class AccountingError(RuntimeError):
    """Input rows do not add up to embedded + dead-lettered + skipped: something was lost."""


def write_text_atomically(path: str, text: str) -> None:
    directory, _, name = path.rpartition("/")
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}-{name}"
    with FileSystems.create(tmp) as f:
        f.write(text.encode())
    FileSystems.rename([tmp], [path])


def check_counts(counts: dict) -> None:
    accounted = counts["embedded"] + sum(counts["dead_letters"].values()) + counts["skipped"]
    if accounted != counts["input_rows"]:
        raise AccountingError(
            f"{counts['input_rows']} input rows but {counts['embedded']} embedded + "
            f"{sum(counts['dead_letters'].values())} dead letters + {counts['skipped']} skipped = {accounted}"
        )


def read_manifest(run_dir: str) -> dict:
    with FileSystems.open(f"{run_dir.rstrip('/')}/{MANIFEST}") as f:
        return json.loads(f.read().decode())


def latest_run_dir(output: str) -> str | None:
    """The run LATEST points to, or None before the first published run."""
    path = f"{output.rstrip('/')}/{LATEST}"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        run_id = f.read().decode().strip()
    return f"{output.rstrip('/')}/runs/{run_id}"


class _Publish(beam.DoFn):
    def __init__(self, output: str, run_dir: str, run_id: str, manifest_base: dict, incremental_counts=None):
        self._output, self._run_dir, self._run_id, self._base = output.rstrip("/"), run_dir, run_id, manifest_base
        self._incremental_counts = incremental_counts

    def process(self, _, input_rows: int, embedded: int, dead: dict, embedding_files: list, dead_files: list,
                statuses: dict | None = None, encoded: int | None = None):
        counts = {"input_rows": input_rows, "embedded": embedded, "dead_letters": dict(sorted(dead.items())),
                  "skipped": 0}
        check_counts(counts)
        if self._incremental_counts is not None:
            # reused / encoded / new / changed / deleted; raises if reused + encoded != embedded
            counts["incremental"] = self._incremental_counts(statuses, encoded, embedded)
        files = []
        for path in sorted(embedding_files) + sorted(dead_files):
            size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
            files.append({"path": path[len(self._run_dir) + 1:], "bytes": size})
        manifest = dict(self._base, counts=counts, files=files,
                        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        write_text_atomically(f"{self._run_dir}/{MANIFEST}", json.dumps(manifest, indent=2, ensure_ascii=False))
        write_text_atomically(f"{self._output}/{LATEST}", self._run_id + "\n")
        yield manifest


class Publish(beam.PTransform):
    """``incremental_counts(statuses, encoded, embedded) -> dict``, when given, needs the inputs
    ``status`` (one string per item id) and ``encoded`` (the records that went through the encoders)."""

    def __init__(self, output: str, run_dir: str, run_id: str, manifest_base: dict, incremental_counts=None):
        super().__init__()
        self._fn = _Publish(output, run_dir, run_id, manifest_base, incremental_counts)

    def expand(self, inputs: dict):
        count = beam.combiners.Count.Globally
        p = inputs["rows"].pipeline
        reasons = (
            inputs["dead"]
            | "Reasons" >> beam.Map(lambda d: d.reason.value)
            | "CountReasons" >> beam.combiners.Count.PerElement()
        )
        return (
            p
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(
                self._fn,
                beam.pvalue.AsSingleton(inputs["rows"] | "CountRows" >> count()),
                beam.pvalue.AsSingleton(inputs["records"] | "CountEmbedded" >> count()),
                beam.pvalue.AsDict(reasons),
                beam.pvalue.AsList(inputs["embedding_files"]),
                beam.pvalue.AsList(inputs["dead_files"]),
                *self._incremental_inputs(inputs),
            )
        )

    def _incremental_inputs(self, inputs: dict) -> list:
        if self._fn._incremental_counts is None:
            return []
        statuses = inputs["status"] | "CountStatuses" >> beam.combiners.Count.PerElement()
        encoded = inputs["encoded"] | "CountEncoded" >> beam.combiners.Count.Globally()
        return [beam.pvalue.AsDict(statuses), beam.pvalue.AsSingleton(encoded)]
