"""Per-stage wall and CPU time and item counts, as Beam metrics (for the run report).

One :class:`StageTimer` per stage, used once per batch (never per item):
``with timer.time(len(batch)): ...`` records Distributions ``wall_us`` and
``cpu_us`` and the Counter ``items`` in namespace ``catalog_index.stage.<stage>``.
``cpu_us`` is the process's CPU time over the block (torch's intra-op threads
included, and any decode threads running alongside); stages whose work runs
on a thread pool report it with :meth:`StageTimer.record`.
"""
from __future__ import annotations

import contextlib
import time

from apache_beam.metrics import Metrics

NAMESPACE_PREFIX = "catalog_index.stage."
STAGES = ("read", "incremental", "fetch_decode", "encode", "transcribe", "fuse", "write")


class StageTimer:
    def __init__(self, stage: str):
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.stage = stage
        namespace = NAMESPACE_PREFIX + stage
        self._wall = Metrics.distribution(namespace, "wall_us")
        self._cpu = Metrics.distribution(namespace, "cpu_us")
        self._items = Metrics.counter(namespace, "items")

    def record(self, n_items: int, wall_s: float, cpu_s: float) -> None:
        self._wall.update(int(round(wall_s * 1e6)))
        self._cpu.update(int(round(cpu_s * 1e6)))
        if n_items:
            self._items.inc(n_items)

    @contextlib.contextmanager
    def time(self, n_items: int):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.record(n_items, time.perf_counter() - wall, time.process_time() - cpu)
