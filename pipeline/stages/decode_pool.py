"""Local images decoded in worker processes, as torch's DataLoader workers do (plain code, no Beam, no torch).

With ``--decode_processes N`` the embed stage sends a batch's local images to
a pool of N processes shared by every embed DoFn of the SDK process, instead
of its fetch threads. Why: a decoding thread gives up the GIL for each read,
decode and resize, and takes it back from the DoFn's thread, which runs Beam,
fusion and the model's Python. Each wait costs the waking thread ~30 us of CPU
on this project's 2-core VM, 2.2-2.6 waits per image, and no decoding thread
can run Python while the DoFn's thread does (docs/BENCHMARKS.md, issue 11). A
process has its own interpreter: it never waits on the DoFn's thread.

This module is what the fork server imports (media, preprocessing, the
dead-letter reasons: about 40 MB and 0.2 CPU-s, no torch, no Beam), and all a
decoding process needs: it does not import the parent's main module again, as
multiprocessing does for other children (``decode_server``). The per-image
functions are also the fetch threads' (``pipeline/stages/fetch.py``), so both
paths decode the same pixels.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from typing import Sequence

import numpy as np

from encoders import media
from encoders.digest import sha256_hex
from encoders.media import FetchPolicy, MediaError, fetch_bytes
from encoders.preprocess import ImagePreprocess
from pipeline.stages import faults
from schemas.dead_letter import Reason, Stage


def decode_for_tower(data: bytes, preprocess: ImagePreprocess, max_pixels: int) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3] for the tower; JPEGs decode at reduced scale when much larger.

    Raises MediaError with ``stage`` DECODE (the bytes arrived; decoding or its pixel cap failed).
    """
    try:
        return media.decode_for_tower(data, preprocess, max_pixels)
    except MediaError as e:
        e.stage = Stage.DECODE
        raise


def load_image_u8(uri: str, policy: FetchPolicy, preprocess: ImagePreprocess,
                  digest: bool = True) -> tuple[np.ndarray, str]:
    """One image URI -> (uint8 [S, S, 3] pixels, sha256 of its bytes or '' without ``digest``); raises MediaError."""
    data = fetch_bytes(uri, policy)
    return decode_for_tower(data, preprocess, policy.max_image_pixels), sha256_hex(data) if digest else ""


def timed_load(load, *args):
    """``(load(*args) or the MediaError it became, this thread's CPU seconds)``, for a fetch thread or process.

    Any other exception is a ``decode_failed`` MediaError too: a bug in one
    decode must not fail the batch it belongs to.
    """
    started = time.thread_time()
    try:
        out = load(*args)
    except MediaError as e:
        out = e
    except Exception as e:  # noqa: BLE001 - see the docstring
        out = MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")
    return out, time.thread_time() - started


def decode_chunk(uris: Sequence[str], undigested: frozenset[int], policy: FetchPolicy,
                 preprocess: ImagePreprocess, fault: str | None = None) -> list[tuple[object, float]]:
    """Each URI -> ``((pixels, sha256) or MediaError, CPU seconds)``, one after another; ``undigested``: the
    positions whose sha256 is not needed (their item arrived with its content hash). ``fault``: the test
    hook's setting where the caller read it (a decoding process keeps the environment it started with)."""
    if fault:
        faults.inject("decode", fault)
    return [timed_load(load_image_u8, uri, policy, preprocess, k not in undigested) for k, uri in enumerate(uris)]


def _exit_with_parent() -> None:
    """A decoding process's initializer: it exits when the process that asked for it is gone (killed, say),
    instead of waiting on its work queue forever (its parent is the fork server, not that process)."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    try:
        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    except RuntimeError:  # no thread can start (a pids limit): decode anyway, unwatched
        pass


DECODE_PROCESS = "catalog-index-decode"  # the name prefix by which decode_server knows a decoding process


class _DecodeProcess(multiprocessing.context.ForkServerProcess):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = f"{DECODE_PROCESS}-{self.name}"


class _DecodeContext(multiprocessing.context.ForkServerContext):
    Process = _DecodeProcess


def processes_supported() -> bool:
    """Whether a pool's processes can get their locks here: POSIX semaphores, which a sandbox or a container
    without /dev/shm may not give."""
    try:  # the fork context's lock unlinks its semaphore at once: no resource tracker process starts for it
        multiprocessing.get_context("fork").Lock()
    except (OSError, ImportError, NotImplementedError, ValueError):
        return False
    return True


def new_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """``processes`` decoding processes of this module's fork server."""
    context = _DecodeContext()
    context.set_forkserver_preload(["pipeline.stages.decode_server"])  # it imports this module
    return concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_exit_with_parent)


class DecodePool:
    """A pool of decoding processes, made at first use and kept for the life of this process.

    One pool per size serves every embed DoFn of the process (Beam runs several
    in one SDK process, and a local run may run pipelines one after another):
    its processes start once, not per bundle or per run. They are started by a
    fork server that imported only this module, so they hold no torch, no CUDA
    context and no copy of the models.
    """

    _pools: dict[int, concurrent.futures.ProcessPoolExecutor] = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, processes: int) -> concurrent.futures.ProcessPoolExecutor:
        with cls._lock:
            pool = cls._pools.get(processes)
            if pool is None:
                pool = cls._pools[processes] = new_pool(processes)
            return pool

    @classmethod
    def discard(cls, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        """Drops a broken pool (a decoding process died); the next :meth:`get` starts a new one."""
        with cls._lock:
            for size, known in list(cls._pools.items()):
                if known is pool:
                    del cls._pools[size]
        pool.shutdown(wait=False, cancel_futures=True)
