"""Where a worker process's model goes, and how big its batches are.

Plain functions over numbers and files, so the policy is unit-tested on a
machine without a GPU; ``towers`` and ``handlers`` call them on the worker.

* GPU slots: the SDK processes of one machine (or Beam's shared model
  servers, ``--model_copies_per_gpu``) each claim the next GPU round-robin
  through a counter file under a lock. Unlike ``pid % count`` this never puts
  two of N processes on one GPU while another idles.
* Batch size from memory: ``--batch_size 0`` probes one forward pass for the
  peak bytes per row and fills the free GPU memory, less a reserve.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import Callable

import torch

CPU_AUTO_BATCH = 32  # CPU throughput is flat past a few dozen rows; more only costs memory
AUTO_MAX_BATCH = 1024  # rows handed to one handler call when the batch size is auto
SLOT_FILE = "catalog-index-gpu-slots"

_claimed: dict[tuple[str, int], int] = {}


def claim_gpu_slot(count: int, directory: str | None = None, job: str = "") -> int:
    """The GPU index (0..count-1) for this process: round-robin over the processes of a machine.

    The counter lives in a file shared by all processes of the machine (per
    ``job`` name), incremented under an exclusive lock; a process claims once
    and keeps its slot.
    """
    if count < 1:
        raise ValueError(f"GPU count must be >= 1, got {count}")
    key = (job, count)
    if key in _claimed:
        return _claimed[key]
    path = os.path.join(directory or tempfile.gettempdir(), f"{SLOT_FILE}{'-' + job if job else ''}")
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read().strip()
            n = int(text) if text.isdigit() else 0
            f.seek(0)
            f.truncate()
            f.write(str(n + 1))
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    _claimed[key] = n % count
    return _claimed[key]


def batch_size_from_memory(free_bytes: int, bytes_per_row: float, *, reserve: float = 0.2,
                           lo: int = 8, hi: int = AUTO_MAX_BATCH, multiple: int = 8) -> int:
    """Rows per forward pass that fit in ``free_bytes`` less a ``reserve`` fraction.

    Rounded down to a ``multiple`` (tensor cores and fixed shapes like round
    numbers) and clamped to ``[lo, hi]``; ``lo`` wins when even it does not fit,
    so the caller fails loudly with an out-of-memory error rather than
    crawling at a batch of one.
    """
    if free_bytes < 0 or bytes_per_row <= 0:
        raise ValueError(f"need free_bytes >= 0 and bytes_per_row > 0, got {free_bytes}, {bytes_per_row}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    if not 1 <= lo <= hi or multiple < 1:
        raise ValueError(f"need 1 <= lo <= hi and multiple >= 1, got lo={lo}, hi={hi}, multiple={multiple}")
    rows = int(free_bytes * (1 - reserve) // bytes_per_row)
    rows = rows // multiple * multiple
    return max(lo, min(hi, rows))


def peak_bytes_per_row(run_rows: Callable[[int], object], device: torch.device, rows: int = 8) -> float:
    """Peak CUDA memory one row of ``run_rows(rows)`` adds over what is already allocated."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run_rows(rows)
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - base, 1) / rows


def auto_batch_size(run_rows: Callable[[int], object], device: torch.device) -> int:
    """``--batch_size 0``: a batch that fills this device's free memory (a fixed default on CPU)."""
    if device.type != "cuda":
        return CPU_AUTO_BATCH
    per_row = peak_bytes_per_row(run_rows, device)
    free, _total = torch.cuda.mem_get_info(device)
    return batch_size_from_memory(free, per_row)


def pinned(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` in page-locked host memory when it is bound for a GPU, so the copy can run async."""
    if device.type == "cuda" and not x.is_pinned():
        with contextlib.suppress(RuntimeError):  # pinning can fail under memory pressure: copy unpinned
            return x.pin_memory()
    return x
