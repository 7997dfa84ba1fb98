"""Last stage: check the accounting, write the report (report/ and report.html) and manifest.json,
then point LATEST at the run.

Runs only after every shard is written (its side inputs are the written
paths, and the index stage's result). The manifest is written last inside the
run, and LATEST is replaced atomically after it, so a reader that follows
LATEST never sees a half run.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import typing

import apache_beam as beam

from encoders.digest import stream_digest
from pipeline import storage
from pipeline.report import data as report_data, sample as report_sample, stats as report
from pipeline.stages import faults
from pipeline.stages.stage_metrics import StageTimer
from pipeline.stages.write import write_table_atomically
from pipeline.storage import LATEST, MANIFEST, read_manifest, write_text_atomically
from schemas.manifest import Accounting, Counts, FileEntry, IndexInfo, Manifest

log = logging.getLogger("pipeline.stages.publish")


class PublishRefused(RuntimeError):
    """The run is complete but must not become LATEST; the previous run stays published."""


class AccountingError(PublishRefused):
    """Input rows do not add up to embedded + dead-lettered + skipped: something was lost."""


class FailureThresholdError(PublishRefused):
    """More input rows failed than ``--max_failure_fraction`` allows."""


def failed_fraction(counts: dict) -> float:
    """Dead-lettered rows over input rows (0 for an empty catalog)."""
    failed = sum(counts["dead_letters"].values())
    return failed / counts["input_rows"] if counts["input_rows"] else 0.0


def check_failure_fraction(counts: dict, max_fraction: float) -> None:
    fraction = failed_fraction(counts)
    if fraction > max_fraction:
        worst = sorted(counts["dead_letters"].items(), key=lambda kv: -kv[1])[:3]
        raise FailureThresholdError(
            f"{sum(counts['dead_letters'].values())} of {counts['input_rows']} input rows failed "
            f"({fraction:.1%} > --max_failure_fraction {max_fraction:.1%}; most: "
            f"{', '.join(f'{k}={v}' for k, v in worst)}); nothing published, LATEST unchanged"
        )


def check_counts(counts: dict) -> None:
    accounted = counts["embedded"] + sum(counts["dead_letters"].values()) + counts["skipped"]
    if accounted != counts["input_rows"]:
        raise AccountingError(
            f"{counts['input_rows']} input rows but {counts['embedded']} embedded + "
            f"{sum(counts['dead_letters'].values())} dead letters + {counts['skipped']} skipped = {accounted}"
        )


def file_entry(path: str, run_dir: str) -> FileEntry:
    """Path relative to the run, size and sha256 of one output file."""
    with storage.open_read(path) as f:
        sha256, size = stream_digest(f)
    return FileEntry(path=path[len(run_dir.rstrip("/")) + 1:], bytes=size, sha256=sha256)


def write_report_files(run_dir: str, manifest: Manifest, data: dict, thumbnails=None) -> list[str]:
    """report/data.json (+ report/thumbnails.parquet) and report.html, each atomically; returns their paths."""
    paths = []
    if thumbnails is not None:
        paths.append(f"{run_dir}/{report_data.THUMBNAILS}")
        write_table_atomically(paths[-1], thumbnails)
    paths.append(f"{run_dir}/{report_data.DATA}")
    write_text_atomically(paths[-1], json.dumps(data, indent=1, ensure_ascii=False))
    paths.append(f"{run_dir}/{report.REPORT}")
    write_text_atomically(paths[-1], report.render_html(manifest, data))
    return paths


def add_timings(run_dir: str, timings: dict) -> Manifest:
    """After the pipeline: the manifest gets ``timings``, report.html is re-rendered with them.

    Beam metrics are complete only once the pipeline has finished, after the
    publish stage wrote the manifest and LATEST. So the command re-renders
    report.html (atomically), then rewrites manifest.json (atomically) with
    ``timings`` and report.html's new size and sha256. Both files are whole at
    every moment; between the two renames the manifest's sha256 for
    report.html is the earlier render's.
    """
    manifest = read_manifest(run_dir)
    data_path = f"{run_dir}/{report_data.DATA}"
    with storage.open_read(data_path) as f:
        data = json.loads(f.read().decode())
    manifest = dataclasses.replace(manifest, timings=timings)
    path = f"{run_dir}/{report.REPORT}"
    write_text_atomically(path, report.render_html(manifest, data))
    entry = file_entry(path, run_dir)
    manifest = dataclasses.replace(manifest, files=tuple(entry if f.path == entry.path else f
                                                         for f in manifest.files or ()))
    write_text_atomically(f"{run_dir}/{MANIFEST}", manifest.to_json())
    return manifest


class _Publish(beam.DoFn):
    def __init__(self, output: str, run_dir: str, run_id: str, manifest_base: Manifest, max_failure_fraction: float,
                 incremental_counts=None, previous=None):
        self._output, self._run_dir, self._run_id, self._base = output.rstrip("/"), run_dir, run_id, manifest_base
        self._max_failure_fraction = max_failure_fraction
        self._incremental_counts = incremental_counts
        self._previous = previous
        self._timer = StageTimer("publish")

    def _report_data(self, index: IndexInfo | None, embedding_files: list, dead_files: list, sample, thumbnails):
        """The report's gallery, dead-letter examples and drift; a failure here is shown in the report, not fatal."""
        previous, previous_manifest = self._previous, None
        try:
            if previous is not None and storage.exists(f"{previous.run_dir}/{MANIFEST}"):
                previous_manifest = read_manifest(previous.run_dir)
            return report_data.gather(self._run_dir, index, sorted(embedding_files), sorted(dead_files), sample or [],
                                      thumbnails or [], previous.run_dir if previous else None,
                                      bool(previous and previous.reusable), previous_manifest)
        except Exception as e:  # noqa: BLE001 - the run is good; only its report is incomplete, and says why
            log.warning("report data could not be gathered: %s: %s", type(e).__name__, e)
            return {"error": f"{type(e).__name__}: {e}"}, None

    def process(self, _, summary: dict, index: dict | None = None):
        with self._timer.batch(1):  # the report's gathering is most of this stage's time
            manifest = self._publish(summary, index)
        yield manifest

    def _publish(self, summary: dict, index: dict | None) -> dict:
        input_rows, embedded = summary["rows"], summary["embedded"]
        dead, skipped = summary["dead"], summary["skipped"]
        counts = {"input_rows": input_rows, "embedded": embedded, "dead_letters": dict(sorted(dead.items())),
                  "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items()))}
        check_counts(counts)
        check_failure_fraction(counts, self._max_failure_fraction)
        if self._incremental_counts is not None:
            # reused / encoded / new / changed / deleted; raises if reused + encoded != embedded
            counts["incremental"] = self._incremental_counts(summary["statuses"], summary["encoded"], embedded)
        embedding_files, dead_files = summary["embedding_files"], summary["dead_files"]
        paths = sorted(embedding_files) + sorted(dead_files)
        if index is not None:
            index = dict(index)
            paths += index.pop("files")
            if index["ntotal"] != embedded:
                raise AccountingError(f"{embedded} items embedded but {index['ntotal']} vectors in the index")
        manifest = dataclasses.replace(
            self._base, counts=Counts.from_dict(counts), stats=summary["stats"],
            accounting=Accounting(failed_fraction=round(failed_fraction(counts), 6),
                                  max_failure_fraction=self._max_failure_fraction),
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            index=IndexInfo.from_dict(index) if index is not None else None)
        data, thumbnail_table = self._report_data(manifest.index, embedding_files, dead_files, summary["sample"],
                                                  summary["thumbnails"])
        paths += write_report_files(self._run_dir, manifest, data, thumbnail_table)
        manifest = dataclasses.replace(manifest, report=report.REPORT,
                                       files=tuple(file_entry(path, self._run_dir) for path in paths))
        faults.inject("publish_manifest")
        write_text_atomically(f"{self._run_dir}/{MANIFEST}", manifest.to_json())
        faults.inject("publish_latest")
        write_text_atomically(f"{self._output}/{LATEST}", self._run_id + "\n")
        return manifest.to_dict()  # the stage's output stays the JSON dict (typed stage outputs come later)


def batch_stats(table) -> dict:
    """One batch of embedded rows (``pa.Table``) summarized for the report, where the batch is made."""
    return report.add_table(report.empty_stats(), table)


class RecordStats(beam.CombineFn):
    """Modality coverage and the vector-norm check, from per-batch summaries (:func:`batch_stats`)."""

    def create_accumulator(self):
        return report.empty_stats()

    def add_input(self, acc, stats):
        return report.merge_stats([acc, stats])

    def merge_accumulators(self, accs):
        return report.merge_stats(list(accs))

    def extract_output(self, acc):
        return report.finish_stats(acc)


class SmallestSample(beam.CombineFn):
    """The ``size`` elements with the smallest ``key`` (report_sample.SampleItem or Thumbnail): the report sample.

    An input is one element or a list of them (the join emits each bucket's
    candidates as one list), so a catalog item costs no Beam element here.
    """

    def __init__(self, size: int = report_sample.SAMPLE_SIZE):
        self._size = size

    # accumulator: [bound, elements]; once pruned to ``size``, an element whose key is above the
    # bound cannot be in the sample

    def create_accumulator(self):
        return [None, []]

    def _prune(self, elements: list) -> list:
        kept = self._smallest(elements)
        return [kept[-1].key if len(kept) == self._size else None, kept]

    def add_input(self, acc, element):
        bound, elements = acc
        elements.extend(e for e in (element if isinstance(element, list) else [element])
                        if bound is None or e.key <= bound)
        return self._prune(elements) if len(elements) >= 2 * self._size else acc

    def merge_accumulators(self, accs):
        return self._prune([e for _, elements in accs for e in elements])

    def _smallest(self, elements: list) -> list:
        # one place per item id, whatever reached the combiner twice (a retried bundle's output)
        unique = {}
        for e in elements:
            unique.setdefault(e.item_id, e)
        return report_sample.smallest(list(unique.values()), self._size)

    def extract_output(self, acc):
        return self._smallest(acc[1])


class _Sum(beam.CombineFn):
    def create_accumulator(self):
        return 0

    def add_input(self, acc, n):
        return acc + n

    def merge_accumulators(self, accs):
        return sum(accs)

    def extract_output(self, acc):
        return acc


class _CountKeys(beam.CombineFn):
    """``{key: count}`` of keys (a reason code), or of ``{key: count}`` dicts (the join's statuses)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, key):
        for k, n in (key.items() if isinstance(key, dict) else ((key, 1),)):
            acc[k] = acc.get(k, 0) + n
        return acc

    def merge_accumulators(self, accs):
        total: dict = {}
        for acc in accs:
            self.add_input(total, acc)
        return total

    def extract_output(self, acc):
        return acc


class RunSummary(beam.CombineFn):
    """What publish needs from the whole run, from ``(part, value)`` pairs, each part by its own combiner.

    One combine instead of one per count keeps the graph small: Beam's cost
    per run grows with its number of transforms, and a catalog item costs no
    element here (the inputs are per batch, per shard or per failure)."""

    def __init__(self):
        self._parts = {"rows": _Sum(), "embedded": _Sum(), "encoded": _Sum(), "dead": _CountKeys(),
                       "skipped": _CountKeys(), "statuses": _CountKeys(),
                       "embedding_files": beam.combiners.ToListCombineFn(),
                       "dead_files": beam.combiners.ToListCombineFn(), "stats": RecordStats(),
                       "sample": SmallestSample(), "thumbnails": SmallestSample()}

    def create_accumulator(self):
        return {name: part.create_accumulator() for name, part in self._parts.items()}

    def add_input(self, acc, tagged):
        name, value = tagged
        acc[name] = self._parts[name].add_input(acc[name], value)
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        return {name: part.merge_accumulators([acc[name] for acc in accs]) for name, part in self._parts.items()}

    def extract_output(self, acc):
        return {name: part.extract_output(acc[name]) for name, part in self._parts.items()}


class PublishInputs(typing.NamedTuple):
    """What the publish stage gathers (each a PCollection; it runs once all of them are complete)."""

    rows: beam.PCollection  # int: input rows read, per row group
    records: beam.PCollection  # dict: :func:`batch_stats` of each batch of embedded rows (reused and encoded)
    dead: beam.PCollection  # DeadLetter, from every stage
    skipped: beam.PCollection  # Skip
    embedding_files: beam.PCollection  # str: the written embeddings shards
    dead_files: beam.PCollection  # str: the written dead-letter shards
    status: beam.PCollection  # {status: count} dicts of the join (used with ``incremental_counts``)
    encoded: beam.PCollection  # int: rows of each batch that went through the encoders
    sample: beam.PCollection  # list[SampleItem]: each bucket's report sample candidates
    thumbnails: beam.PCollection  # Thumbnail: from the embed stage
    index: beam.PCollection | None = None  # one index dict (BuildIndex); None with ``--index off``


class Publish(beam.PTransform):
    """:class:`PublishInputs` -> the manifest (one dict), after LATEST points at the run.

    With ``incremental_counts(statuses, encoded, embedded) -> dict`` the
    manifest gets ``counts.incremental``. ``previous`` (incremental.PreviousRun)
    gives the report last run's counts, vectors (drift of changed items) and
    thumbnails (reused items)."""

    def __init__(self, output: str, run_dir: str, run_id: str, manifest_base: Manifest,
                 max_failure_fraction: float = 1.0, incremental_counts=None, previous=None):
        super().__init__()
        self._fn = _Publish(output, run_dir, run_id, manifest_base, max_failure_fraction, incremental_counts,
                            previous)

    def _extract_input_pvalues(self, pvalueish):
        # Beam's default refuses a None leaf; the optional index input is None with --index off
        return pvalueish, {k: v for k, v in pvalueish._asdict().items() if v is not None}

    def expand(self, inputs: PublishInputs):
        p = inputs.rows.pipeline
        # every input tagged for the one summary combiner: one Beam combine per run, not one per count
        tagged = [
            inputs.rows | "TagRows" >> beam.Map(lambda n: ("rows", n)),
            inputs.records | "TagRecords" >> beam.FlatMap(lambda s: (("embedded", s["items"]), ("stats", s))),
            inputs.dead | "TagDead" >> beam.Map(lambda d: ("dead", d.reason.value)),
            inputs.skipped | "TagSkipped" >> beam.Map(lambda s: ("skipped", s.reason.value)),
            inputs.embedding_files | "TagEmbeddingFiles" >> beam.Map(lambda f: ("embedding_files", f)),
            inputs.dead_files | "TagDeadFiles" >> beam.Map(lambda f: ("dead_files", f)),
            inputs.status | "TagStatuses" >> beam.Map(lambda d: ("statuses", d)),
            inputs.encoded | "TagEncoded" >> beam.Map(lambda n: ("encoded", n)),
            inputs.sample | "TagSample" >> beam.Map(lambda s: ("sample", s)),
            inputs.thumbnails | "TagThumbnails" >> beam.Map(lambda t: ("thumbnails", t)),
        ]
        summary = tagged | "Inputs" >> beam.Flatten() | "Summarize" >> beam.CombineGlobally(RunSummary())
        side = {"index": beam.pvalue.AsSingleton(inputs.index)} if inputs.index is not None else {}
        return (
            p
            | "Once" >> beam.Create([None])
            | "Publish" >> beam.ParDo(self._fn, beam.pvalue.AsSingleton(summary), **side)
        )
