"""ConSE: an image classifier bridged into a text space, so typed queries can find photos.

Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic
Embeddings" (ICLR 2014): an image's vector is the convex combination of the
text vectors of its top-k predicted class names, weighted by the classifier's
probabilities renormalized over those k. With a multilingual text encoder
(USE) a query in English or Chinese lands near the photos whose classes it
names. This is a bridge, not a joint image-text model: a photo is only as
findable as its ImageNet classes describe it, and the run's layout labels the
space ``conse`` so nobody mistakes it for CLIP.

Family ``conse``: ``name`` and ``weights`` are the classifier's (as in
``timm_image``), ``text`` the text model, ``top_k`` the classes per image.
"""
from __future__ import annotations

import numpy as np
import torch

from encoders import families
from encoders.efficientnet import class_names
from encoders.specs import ModelSpec

DEFAULT_TOP_K = 10


def classifier_spec(spec: ModelSpec) -> ModelSpec:
    """The bridge's image classifier as a ``timm_image`` spec."""
    return ModelSpec("timm_image", spec.name, spec.weights, spec.seed)


def output_dim(spec: ModelSpec) -> int:
    """The ``families`` hook: a bridge's vectors live in its text model's space."""
    return families.output_dim(spec.text)


def class_prompt(description: str) -> str:
    """What a class's name says in text: its lemmas as timm lists them ("tabby, tabby cat")."""
    return description


def bridge(probs: np.ndarray, class_vectors: np.ndarray, top_k: int) -> np.ndarray:
    """[n, C] probabilities and [C, d] unit class vectors -> [n, d] unit vectors (ConSE).

    Ties in probability are broken by class index, so the result does not
    depend on the sort's stability.
    """
    probs = np.asarray(probs, np.float64)
    k = min(top_k, probs.shape[1])
    order = np.lexsort((np.arange(probs.shape[1])[None, :].repeat(len(probs), 0), -probs), axis=1)[:, :k]
    top = np.take_along_axis(probs, order, 1)
    weights = top / np.maximum(top.sum(1, keepdims=True), 1e-12)
    out = np.einsum("nk,nkd->nd", weights, np.asarray(class_vectors, np.float64)[order])
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class ConseModel:
    """``encode_image`` through the bridge, ``encode_text`` through the bridge's text model: one space."""

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32"):
        self.classifier = families.load(classifier_spec(spec), device, precision)
        self.text = families.load(spec.text, device, precision)
        self.top_k = spec.top_k
        self.dim = int(self.text.dim)
        self.image_size = self.classifier.image_size
        names = [class_prompt(n) for n in class_names(self.classifier.num_classes)]
        self.class_vectors = self.text.encode_text(names, 64)

    def encode_image(self, pixels, batch_size: int) -> np.ndarray:
        return bridge(self.classifier.class_probs(pixels, batch_size), self.class_vectors, self.top_k)

    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.text.encode_text(texts, batch_size)
