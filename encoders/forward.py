"""Fixed-shape forward passes, shared by every torch model family (``towers`` and the family modules).

Forward passes have fixed shapes: on CUDA exactly ``batch_size`` rows (short
batches are padded), on CPU a multiple of ``CPU_ROW_QUANTUM`` rows (CPU GEMM
kernels give a row the same bits for any such row count), so an item's vector
does not depend on which items shared its batch. Kept apart from ``towers``
so that a family module (timm, aisfx, Whisper) needs these helpers without
importing the module that dispatches to it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from encoders import placement

CPU_ROW_QUANTUM = 8


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _pad_rows(x: torch.Tensor, rows: int, value: float | int = 0) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


def padded_rows(count: int, batch_size: int, device: torch.device) -> int:
    """Rows of the forward pass that encodes ``count`` (<= batch_size) items."""
    if device.type == "cpu":
        return min(-(-count // CPU_ROW_QUANTUM) * CPU_ROW_QUANTUM, max(batch_size, CPU_ROW_QUANTUM))
    return batch_size


def _in_fixed_batches(n: int, batch_size: int, device: torch.device, run, normalize: bool = True) -> np.ndarray:
    """Calls ``run(start, stop, padded_rows)`` per chunk and stacks the unpadded outputs (L2-normalized)."""
    outputs = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        out = run(start, stop, padded_rows(stop - start, batch_size, device))[: stop - start].float()
        out = torch.nn.functional.normalize(out, dim=-1) if normalize else out
        outputs.append(out.cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def _seeded(spec):
    """Random init that is the same in every process and every run."""
    if not spec.is_random:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(spec.seed)
    return stack


def _as_tensor(pixels) -> torch.Tensor:
    """Pixels as a tensor: numpy from the CPU fetch stage, or a tensor already on the GPU (nvJPEG)."""
    return pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # pinned host memory lets the copy run asynchronously to the host thread
    return placement.pinned(x, device).to(device, non_blocking=True) if x.device != device else x



def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_transformers(spec, device: torch.device, model_class=None):
    """A transformers model from ``spec.name``: its weights, or seeded random weights from its config.

    ``model_class`` (e.g. ClapModel) when the auto class would pick another head.
    trust_remote_code=False: a model folder's Python files are never run; weights load from
    safetensors when present, else through torch.load(weights_only=True) (transformers' default).
    """
    from transformers import AutoConfig, AutoModel

    if spec.is_random:
        config = AutoConfig.from_pretrained(spec.name, trust_remote_code=False)
        with _seeded(spec):
            model = model_class(config) if model_class is not None else AutoModel.from_config(config)
    else:
        model = (model_class or AutoModel).from_pretrained(spec.name, trust_remote_code=False)
    return model.to(device).eval()


