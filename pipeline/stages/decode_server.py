"""Imported only by the decoding processes' fork server (``decode_pool.new_pool`` preloads it).

multiprocessing imports the parent's main module again in every child it
starts, for functions defined there. A decoding process runs only
``decode_pool``'s functions, and that import would cost it: in a Beam SDK
worker the main module is ``sdk_worker_main`` (Beam: about 0.6 CPU-s and 127 MB
per process), and a script without an ``if __name__ == "__main__"`` guard
would run again, pipeline and all, in every decoding process. So a child
named as a decoding process starts without it; any other child of the same
fork server starts as multiprocessing starts it. Should a Python version
start children another way, a decoding process imports the main module as
before: slower, not wrong.
"""
from __future__ import annotations

import multiprocessing.spawn

from pipeline.stages.decode_pool import DECODE_PROCESS

_MAIN_MODULE = ("init_main_from_name", "init_main_from_path")
_prepare = multiprocessing.spawn.prepare


def _prepare_child(data: dict) -> None:
    if str(data.get("name", "")).startswith(DECODE_PROCESS):
        data = {key: value for key, value in data.items() if key not in _MAIN_MODULE}
    _prepare(data)


multiprocessing.spawn.prepare = _prepare_child
