"""Progress lines on long local runs: items done per stage and their rate, at a steady interval.

Beam metrics are only readable when a run ends, so each worker process keeps
its own counts and a daemon thread logs them every ``interval_s`` seconds.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

_LOG = logging.getLogger("catalog_index.progress")
# Stages where an input row meets its fate; their sum is the terminal progress bar's "items done".
FUSED, FAILED, REUSED, REJECTED = "fused", "failed", "reused", "rejected"
FINAL_STAGES = (FUSED, FAILED, REUSED, REJECTED)
_lock = threading.Lock()
_counts: Counter = Counter()
_state: dict = {"thread": None, "start": 0.0, "interval": 0.0, "stop": threading.Event()}


def _report_forever(stop: threading.Event) -> None:
    last: Counter = Counter()
    last_time = _state["start"]
    while not stop.wait(_state["interval"]):
        now = time.monotonic()
        with _lock:
            counts = Counter(_counts)
        parts = []
        for stage, n in counts.items():
            rate = (n - last[stage]) / max(now - last_time, 1e-9)
            parts.append(f"{stage} {n} ({rate:.1f}/s)")
        if parts:
            _LOG.info("progress after %.0fs: %s", now - _state["start"], " | ".join(parts))
        last, last_time = counts, now


def start(interval_s: float) -> None:
    """Starts this process's reporter once; ``interval_s <= 0`` leaves progress off."""
    if interval_s <= 0:
        return
    with _lock:
        if _state["thread"] is None:
            _state.update(start=time.monotonic(), interval=interval_s, stop=threading.Event())
            _state["thread"] = threading.Thread(target=_report_forever, args=(_state["stop"],), name="progress",
                                                daemon=True)
            _state["thread"].start()


def stop() -> None:
    """Ends this process's reporter (the command, once its in-process run is over); a worker's ends with it."""
    with _lock:
        thread, _state["thread"] = _state["thread"], None
        _state["stop"].set()
    if thread is not None:
        thread.join(timeout=1.0)


def note(stage: str, n: int = 1) -> None:
    with _lock:
        _counts[stage] += n


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def done() -> int:
    """Input rows of this process that reached their fate: embedded, dead-lettered, reused or skipped."""
    with _lock:
        return sum(_counts[s] for s in FINAL_STAGES)


def reset() -> None:
    """Forgets the counts (a new run in the same process, e.g. the command run twice in a test)."""
    with _lock:
        _counts.clear()
