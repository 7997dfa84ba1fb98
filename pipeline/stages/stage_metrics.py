"""Per-stage timing as Beam metrics: wall and CPU time per batch, and items.

Each stage owns a :class:`StageTimer`; one ``with timer.batch(n):`` around the
work of one batch records a ``wall_us`` and a ``cpu_us`` sample (Distributions)
and adds ``n`` to the ``items`` Counter, all in namespace
``catalog_index.stage.<stage>``. Work done on other threads (the fetch pool)
is measured there and recorded with :meth:`StageTimer.record` from the DoFn's
own thread, because Beam's metric containers are per thread.
``stage_timings(result)`` reads them back after the pipeline has finished
(Beam metrics are complete only then).
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from apache_beam.metrics import Metrics

STAGE_NAMESPACE_PREFIX = "catalog_index.stage."
WALL_US, CPU_US, ITEMS = "wall_us", "cpu_us", "items"


class StageTimer:
    """Records one sample per batch for one stage (create it in the DoFn's ``__init__``)."""

    def __init__(self, stage: str):
        self.stage = stage
        namespace = STAGE_NAMESPACE_PREFIX + stage
        self._wall = Metrics.distribution(namespace, WALL_US)
        self._cpu = Metrics.distribution(namespace, CPU_US)
        self._items = Metrics.counter(namespace, ITEMS)

    def record(self, wall_s: float, cpu_s: float, items: int) -> None:
        self._wall.update(int(wall_s * 1e6))
        self._cpu.update(int(cpu_s * 1e6))
        self._items.inc(items)

    @contextlib.contextmanager
    def batch(self, items: int) -> Iterator[None]:
        """Times the enclosed block (wall clock and this thread's CPU time) as one batch of ``items``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.record(time.perf_counter() - wall, time.thread_time() - cpu, items)


def _empty() -> dict:
    return {"wall_s": 0.0, "cpu_s": 0.0, "batches": 0, "items": 0}


def _value(metric):
    return metric.committed if metric.committed is not None else metric.attempted


def stage_timings(result) -> dict[str, dict]:
    """``{stage: {wall_s, cpu_s, batches, items}}`` from a finished ``PipelineResult`` (summed over steps)."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter())
    out: dict[str, dict] = {}
    for dist in found["distributions"]:
        namespace, name = dist.key.metric.namespace, dist.key.metric.name
        if not namespace.startswith(STAGE_NAMESPACE_PREFIX) or name not in (WALL_US, CPU_US):
            continue
        value = _value(dist)
        if value is None:
            continue
        entry = out.setdefault(namespace[len(STAGE_NAMESPACE_PREFIX):], _empty())
        entry["wall_s" if name == WALL_US else "cpu_s"] += value.sum / 1e6
        if name == WALL_US:
            entry["batches"] += value.count
    for counter in found["counters"]:
        namespace = counter.key.metric.namespace
        if namespace.startswith(STAGE_NAMESPACE_PREFIX) and counter.key.metric.name == ITEMS:
            entry = out.setdefault(namespace[len(STAGE_NAMESPACE_PREFIX):], _empty())
            entry["items"] += int(_value(counter) or 0)
    return out
