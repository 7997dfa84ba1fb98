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

import torch

from encoders.media import MediaError, decode_image
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


def preprocess_tensor(image: torch.Tensor, preprocess: ImagePreprocess) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> float32 [3, S, S] normalized, the tensor twin of ``preprocess``."""
    s = preprocess.size
    _, h, w = image.shape
    x = image.unsqueeze(0).float()
    if preprocess.resize == "squash":
        x = torch.nn.functional.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
    else:
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        left, top = (nw - s) // 2, (nh - s) // 2
        x = x[:, :, top:top + s, left:left + s]
    # PIL rounds and clamps the resized image to uint8 before normalizing: do the same
    x = x.round().clamp(0, 255) / 255.0
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def _pil_path(data: bytes, preprocess: ImagePreprocess, max_pixels: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(preprocess(decode_image(data, max_pixels))).to(device)


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
    """Encoded images -> per item a float32 [3, S, S] tensor on ``device``, or the MediaError it hit."""
    out: list[torch.Tensor | MediaError | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if _jpeg_header_ok(d, max_pixels)]
    decoded = _nvjpeg([datas[i] for i in jpegs], device) if jpegs else []
    for i, image in zip(jpegs, decoded):
        if image is not None:
            try:
                out[i] = preprocess_tensor(image, preprocess)
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
    return out  # type: ignore[return-value]
