"""CPU image preprocessing: resize, center-crop, normalize, before the batch meets a model.

Kept as plain data (size, mean, std) so the fetch stage can prepare pixels on
CPU workers without loading any model.

Two halves, so the per-image work stays in C and the arithmetic runs once per
batch: :meth:`ImagePreprocess.resize_crop` (PIL, per image, in a decode
thread) gives uint8 ``[S, S, 3]``; :meth:`ImagePreprocess.normalize` turns a
stack of those into float32 ``[B, 3, S, S]`` with whole-array numpy ops. The
float arithmetic is the same per element as it was per image, so batching
does not change a bit.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

RESIZE_MODES = ("shortest", "squash")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest"  # "shortest": resize the short side then center-crop; "squash": to size x size

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r} is not one of {RESIZE_MODES}")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (w, h) an image of ``width`` x ``height`` is resized to before the center crop."""
        s = self.size
        if self.resize == "squash":
            return s, s
        scale = s / min(width, height)
        return max(s, round(width * scale)), max(s, round(height * scale))

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest decode size that still covers :meth:`resized_size` (for JPEG DCT scaling)."""
        return self.resized_size(width, height)

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 [size, size, 3], resized (bicubic) and center-cropped.

        The crop is a view of the resized pixels (the same bytes PIL's ``crop``
        copies; the batch's ``np.stack`` makes the one copy): one C call fewer
        per image in the decode thread, each of which releases the GIL.
        """
        s = self.size
        nw, nh = self.resized_size(*image.size)
        pixels = np.asarray(image.resize((nw, nh), Image.Resampling.BICUBIC), dtype=np.uint8)
        if (nw, nh) != (s, s):
            left, top = (nw - s) // 2, (nh - s) // 2
            pixels = pixels[top:top + s, left:left + s]
        return pixels

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], normalized, in whole-batch array ops.

        The channels move first inside the one uint8 -> float32 copy, and the
        arithmetic then runs in place: one float copy of the batch, not two
        (at 224 px a batch of 256 is 154 MB of float32). Per element the same
        float32 operations in the same order, so the same bits.
        """
        x = pixels.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        x /= np.float32(255.0)
        x -= np.asarray(self.mean, np.float32)[:, None, None]
        x /= np.asarray(self.std, np.float32)[:, None, None]
        return x

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 [3, size, size], normalized (one image: the query side, tools)."""
        return self.normalize(self.resize_crop(image)[None])[0]
