"""CPU image preprocessing: resize, center-crop, normalize, before the batch meets a model.

Kept as plain data (size, mean, std) so the fetch stage can prepare pixels on
CPU workers without loading any model.
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

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 [3, size, size], normalized."""
        s = self.size
        if self.resize == "squash":
            image = image.resize((s, s), Image.Resampling.BICUBIC)
        else:
            w, h = image.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            image = image.crop((left, top, left + s, top + s))
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))
