"""Device choice: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

CUDA asked for and absent is an error, never a quiet CPU run: a GPU job that
silently falls back to CPU costs a night and reports nothing.
"""
from __future__ import annotations

import os
import re

import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class DeviceUnavailable(RuntimeError):
    """The requested accelerator does not exist on this worker."""


def validate_device_spec(spec: str) -> str:
    if not _DEVICE_RE.match(spec):
        raise ValueError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """Maps a device option to a torch device on this worker process.

    ``auto`` takes a GPU when there is one. With several GPUs, ``auto`` and
    ``cuda`` spread worker processes over them round-robin (a machine-wide
    counter, ``placement.claim_gpu_slot``), so each process holds its model
    copy on its own device and no GPU idles while another has two.
    """
    validate_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise DeviceUnavailable(
            f"device {spec!r} requested but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    count = torch.cuda.device_count()
    if spec.startswith("cuda:"):
        index = int(spec.split(":")[1])
        if index >= count:
            raise DeviceUnavailable(f"device {spec!r} requested but only {count} CUDA device(s) exist")
        return torch.device(spec)
    from encoders.placement import claim_gpu_slot

    return torch.device(f"cuda:{claim_gpu_slot(count)}")
