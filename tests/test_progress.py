"""The progress reporter: lines at its interval while a run goes, none once the command stopped it."""
from __future__ import annotations

import logging
import time

from pipeline.stages import progress


def test_reporter_logs_while_running_and_stops_with_the_run(caplog):
    caplog.set_level(logging.INFO, logger="catalog_index.progress")
    progress.reset()
    progress.start(0.02)
    thread = progress._state["thread"]
    progress.note(progress.FUSED, 5)
    deadline = time.monotonic() + 5
    while not caplog.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert caplog.records and "fused 5" in caplog.records[-1].getMessage()
    progress.stop()
    assert not thread.is_alive() and progress._state["thread"] is None
    caplog.clear()
    time.sleep(0.1)
    assert not caplog.records  # nothing after the run
    progress.start(0.02)  # a later run in the same process gets a reporter again
    assert progress._state["thread"] is not None and progress._state["thread"].is_alive()
    progress.stop()
    progress.reset()
