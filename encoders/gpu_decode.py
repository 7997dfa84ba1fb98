"""JPEG decoding and preprocessing on the GPU (nvJPEG), with a per-item PIL fallback.

``--image_decode gpu`` moves the CPU's heaviest per-image work (Huffman
decode, IDCT, resize) onto the GPU: the fetch stage only reads bytes and
checks the header, and the image handler decodes a whole batch with
``torchvision.io.decode_jpeg(device=...)``, then resizes, crops and
normalizes it with tensor ops on the same device.

One bad image never fails its batch: anything nvJPEG does not take (PNG,
WebP, CMYK or progressive JPEGs it rejects, corrupt data) is decoded by PIL
on the CPU and preprocessed exactly as ``--image_decode cpu`` does; what PIL
cannot decode either comes back as a :class:`MediaError` for that item alone.

The same functions run on CPU tensors (``device=cpu``), which is how the tests
exercise them on machines without a GPU. Vectors from the two decode paths
agree to resize-kernel rounding, not bit for bit, so a run records its
``image_decode`` in the manifest's config.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from encoders.media import MediaError, decode_for_tower
from encoders.preprocess import ImagePreprocess
from schemas.dead_letter import Reason

# JPEG colour layouts nvJPEG decodes to RGB; CMYK/YCCK JPEGs go to PIL
_NVJPEG_MODES = ("RGB", "L")


def _jpeg_header_ok(data: bytes, max_pixels: int) -> bool:
    """True for a baseline-looking JPEG in a colour mode nvJPEG takes; checks the pixel cap first."""
    from PIL import Image

    if not data.startswith(b"\xff\xd8\xff"):
        return False
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - PIL will say what is wrong on the fallback path
        return False
    width, height = image.size
    if width * height > max_pixels:
        return False  # the fallback raises TOO_LARGE with the sizes
    return image.format == "JPEG" and image.mode in _NVJPEG_MODES


def resize_crop_tensor(image: torch.Tensor, preprocess: ImagePreprocess) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> float32 [3, S, S] with integer values 0..255, resized and cropped."""
    s = preprocess.size
    _, h, w = image.shape
    nw, nh = preprocess.resized_size(w, h)
    x = torch.nn.functional.interpolate(image.unsqueeze(0).float(), size=(nh, nw), mode="bicubic",
                                        antialias=True, align_corners=False)
    left, top = (nw - s) // 2, (nh - s) // 2
    # PIL rounds and clamps the resized image to uint8 before normalizing: do the same
    return x[0, :, top:top + s, left:left + s].round().clamp(0, 255)


def normalize_tensor(x: torch.Tensor, preprocess: ImagePreprocess) -> torch.Tensor:
    """float32 [B, 3, S, S] with values 0..255 -> normalized, in whole-batch tensor ops."""
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def preprocess_tensor(image: torch.Tensor, preprocess: ImagePreprocess) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> float32 [3, S, S] normalized, the tensor twin of ``preprocess``."""
    return normalize_tensor(resize_crop_tensor(image, preprocess)[None], preprocess)[0]


def _pil_path(data: bytes, preprocess: ImagePreprocess, max_pixels: int, device: torch.device) -> torch.Tensor:
    pixels = decode_for_tower(data, preprocess, max_pixels)  # uint8 [S, S, 3]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(device).float()


def _nvjpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Batch decode; on a batch error, item by item so only the culprits fall back."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - nvJPEG reports one bad stream as a batch failure
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def decode_batch(datas: list[bytes], preprocess: ImagePreprocess, device: torch.device,
                 max_pixels: int) -> list[torch.Tensor | MediaError]:
    """Encoded images -> per item a float32 [3, S, S] tensor on ``device``, or the MediaError it hit.

    Resize and crop run per image (sizes differ); normalization runs once over the stacked batch.
    """
    out: list[torch.Tensor | MediaError | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if _jpeg_header_ok(d, max_pixels)]
    decoded = _nvjpeg([datas[i] for i in jpegs], device) if jpegs else []
    for i, image in zip(jpegs, decoded):
        if image is not None:
            try:
                out[i] = resize_crop_tensor(image, preprocess)
            except Exception:  # noqa: BLE001 - leave it to the PIL path below
                out[i] = None
    for i, result in enumerate(out):
        if result is None:
            try:
                out[i] = _pil_path(datas[i], preprocess, max_pixels, device)
            except MediaError as e:
                out[i] = e
            except Exception as e:  # noqa: BLE001
                out[i] = MediaError(Reason.DECODE_FAILED, f"{type(e).__name__}: {e}")
    ok = [i for i, r in enumerate(out) if isinstance(r, torch.Tensor)]
    if ok:
        normalized = normalize_tensor(torch.stack([out[i] for i in ok]), preprocess)
        for row, i in enumerate(ok):
            out[i] = normalized[row]
    return out  # type: ignore[return-value]
