"""Retention: after a run is published, delete published runs beyond the newest K.

Runs without a manifest are in progress (or failed half-way) and are never
touched; neither is the run LATEST points to. Everything goes through Beam's
FileSystems, so the same code prunes a local folder or a gs:// bucket.
"""
from __future__ import annotations

import logging

from apache_beam.io.filesystems import FileSystems

from pipeline.storage import MANIFEST, latest_run_dir, read_manifest

_LOG = logging.getLogger(__name__)


def published_runs(output: str) -> list[tuple[str, str]]:
    """(created_at, run_dir) of every published run under ``output/runs``, oldest first."""
    pattern = f"{output.rstrip('/')}/runs/*/{MANIFEST}"
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - no runs folder yet
        return []
    runs = []
    for meta in matched:
        run_dir = meta.path[: -len(MANIFEST) - 1]
        try:
            created = read_manifest(run_dir).created_at or ""
        except Exception:  # noqa: BLE001 - a manifest being replaced right now: leave that run alone
            continue
        runs.append((created, run_dir))
    return sorted(runs)


def runs_to_delete(runs: list[tuple[str, str]], keep: int, protected: set[str]) -> list[str]:
    """The run dirs to delete: all but the newest ``keep`` (0 keeps all), never a protected one."""
    if keep == 0:
        return []
    newest = {run_dir for _, run_dir in runs[-keep:]}
    return [run_dir for _, run_dir in runs if run_dir not in newest and run_dir.rstrip("/") not in protected]


def _delete_tree(run_dir: str) -> None:
    if FileSystems.get_filesystem(run_dir).has_dirs():
        FileSystems.delete([run_dir])  # local, HDFS: a directory, deleted recursively
        return
    # object stores (gs://, s3://): no directories, delete every object under the prefix
    objects = [m.path for m in FileSystems.match([f"{run_dir}/**"])[0].metadata_list]
    if objects:
        FileSystems.delete(objects)


def apply_retention(output: str, keep: int, current_run_dir: str) -> list[str]:
    """Deletes old published runs; returns the deleted run dirs. Call only after LATEST is replaced."""
    latest = latest_run_dir(output)
    protected = {d.rstrip("/") for d in (latest, current_run_dir) if d}
    doomed = runs_to_delete(published_runs(output), keep, protected)
    for run_dir in doomed:
        # manifest first: a run interrupted half-way through deletion reads as unpublished, never as whole
        FileSystems.delete([f"{run_dir}/{MANIFEST}"])
        _delete_tree(run_dir)
        _LOG.info("retention: deleted %s (keeping the newest %d runs)", run_dir, keep)
    return doomed
