"""Device choice: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

CUDA asked for and absent is an error, never a quiet CPU run: a GPU job that
silently falls back to CPU costs a night and reports nothing.
"""
from __future__ import annotations

import os
import re

import torch

from encoders.specs import PRECISIONS

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
IMAGE_DECODERS = ("cpu", "gpu")  # cpu: PIL in fetch threads; gpu: nvJPEG in the image handler
MAX_BATCH_SIZE = 4096
MAX_COPIES_PER_GPU = 16


class DeviceUnavailable(RuntimeError):
    """The requested accelerator does not exist on this worker."""


def validate_device_spec(spec: str) -> str:
    if not _DEVICE_RE.match(spec):
        raise ValueError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return spec


def validate_placement(device: str, precision: str, batch_size: int, copies_per_gpu: int,
                       image_decode: str = "cpu") -> None:
    """The rules for where and how a model runs, stated once.

    ``EncodeConfig`` checks a run's settings with it, and the model handlers
    check theirs (a handler may be built without a config), so both refuse the
    same values with the same message. (That a run's ``image_decode gpu`` needs
    a CUDA device is the config's rule alone: the nvJPEG handler itself falls
    back to decoding on the CPU, which its tests use.)
    """
    validate_device_spec(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if not 0 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, or 0 for auto, got {batch_size}")
    if not 0 <= copies_per_gpu <= MAX_COPIES_PER_GPU:
        raise ValueError(f"model_copies_per_gpu must be in 0..{MAX_COPIES_PER_GPU} (0: one per process), "
                         f"got {copies_per_gpu}")
    if image_decode not in IMAGE_DECODERS:
        raise ValueError(f"image_decode {image_decode!r} is not one of {IMAGE_DECODERS}")
    if image_decode == "gpu" and copies_per_gpu:
        raise ValueError("image_decode 'gpu' cannot be combined with model_copies_per_gpu: shared model servers "
                         "take inputs by pickling, so decoded images would cross host memory")


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


# CUDA major version of the torch build -> the oldest NVIDIA (Linux) driver branch that runs it
REQUIRED_DRIVER = {13: 580, 12: 525, 11: 450}
_DRIVER_FILE = "/proc/driver/nvidia/version"


class DriverTooOld(RuntimeError):
    """The worker's NVIDIA driver is older than the one torch's CUDA build needs."""


def nvidia_driver_version(path: str = _DRIVER_FILE) -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. '580.65.06'), or None on a machine without one."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def check_driver(driver: str | None, cuda: str | None = None) -> None:
    """Raises :class:`DriverTooOld`, naming both versions, when ``driver`` cannot run torch's CUDA build.

    ``cuda``: the CUDA version torch was built for (``torch.version.cuda``). Without a
    driver (a CPU machine) or a CPU-only torch there is nothing to check.
    """
    cuda = torch.version.cuda if cuda is None else cuda
    if not driver or not cuda:
        return
    need = REQUIRED_DRIVER.get(int(cuda.split(".")[0]))
    if need is not None and int(driver.split(".")[0]) < need:
        raise DriverTooOld(
            f"torch {torch.__version__} is built for CUDA {cuda}, which needs NVIDIA driver {need} or newer; "
            f"this worker has driver {driver}. Run the workers on an image/driver of the {need} series or newer "
            f"(README, 'Dataflow').")


def check_worker_gpu(device_spec: str) -> None:
    """Called at worker start (DoFn.setup): fails there, clearly, instead of at the first CUDA call."""
    if device_spec != "cpu":
        check_driver(nvidia_driver_version())
