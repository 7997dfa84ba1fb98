"""The terminal progress bar of ``catalog-index run``: items done of the catalog's rows, items/s and an ETA.

``render`` is a plain function (tested on its own); ``TerminalBar`` redraws
it in place on a TTY from :func:`pipeline.stages.progress.done`, which the stages of
an in-process runner (DirectRunner, in memory) feed. The total comes from the
catalog files' Parquet footers, read before the run starts.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def render(done: int, total: int | None, elapsed_s: float, width: int = 24) -> str:
    """One line: ``[#####.....] 120/3600 items  12.3 items/s  ETA 4m43s`` (no ETA before the first item)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        shown = min(done, total)
        filled = int(width * shown / total)
        bar = "[" + "#" * filled + "." * (width - filled) + "]"
        eta = f"ETA {_duration((total - shown) / rate)}" if rate > 0 and shown < total else (
            "done" if shown >= total else "ETA --")
        return f"{bar} {shown}/{total} items  {rate:.1f} items/s  {eta}  ({_duration(elapsed_s)})"
    return f"{done} items  {rate:.1f} items/s  ({_duration(elapsed_s)})"


class TerminalBar:
    """Redraws :func:`render` on ``stream`` every ``interval_s`` while the run goes; a context manager."""

    def __init__(self, total: int | None, count: Callable[[], int], stream: TextIO | None = None,
                 interval_s: float = 0.5):
        self._total, self._count, self._interval = total, count, interval_s
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def _draw(self) -> None:
        line = render(self._count(), self._total, time.monotonic() - self._start)
        with self._lock:
            self._stream.write("\r" + line + "\x1b[K")
            self._stream.flush()

    def write_above(self, text: str) -> None:
        """Prints ``text`` (a log line) where the bar is, and redraws the bar below it."""
        with self._lock:
            self._stream.write("\r\x1b[K" + text)
            self._stream.flush()
        if text.endswith("\n") and self._thread is not None and not self._stop.is_set():
            self._draw()

    def log_stream(self) -> "_AboveBar":
        """A stream for logging handlers: their lines go above the bar instead of through it."""
        return _AboveBar(self)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw()

    def __enter__(self) -> "TerminalBar":
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="progress-bar", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._draw()
        self._stream.write("\n")
        self._stream.flush()


class _AboveBar:
    def __init__(self, bar: TerminalBar):
        self._bar = bar

    def write(self, text: str) -> int:
        self._bar.write_above(text)
        return len(text)

    def flush(self) -> None:
        pass
