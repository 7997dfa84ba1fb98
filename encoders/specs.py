"""Model specifications: which model, which weights, and a fingerprint of both.

A spec is data (frozen, hashable, picklable); models are built from it inside
the worker, never pickled. The fingerprint identifies the exact weights, so a
run's metadata says whether two runs' vectors are comparable.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

FAMILIES = {
    "open_clip": "open_clip model: image and text towers (name = open_clip model config)",
    "hf_clip": "transformers CLIPModel / ChineseCLIPModel / SiglipModel (name = hub id or local dir)",
    "hf_text": "transformers sentence encoder with mean pooling (name = hub id or local dir)",
    "hf_clap": "transformers ClapModel: audio and text towers (name = hub id or local dir)",
}
CLIP_FAMILIES = ("open_clip", "hf_clip")
RANDOM = "random"
PRETRAINED = "pretrained"


class WeightsLabel:
    """``is_random`` / ``weights_label`` for any spec dataclass with a ``weights`` field."""

    @property
    def is_random(self) -> bool:
        return self.weights == RANDOM

    @property
    def weights_label(self) -> str:
        """``random`` or ``real``: what the run's output metadata and summary say."""
        return "random" if self.is_random else "real"


@dataclasses.dataclass(frozen=True)
class ModelSpec(WeightsLabel):
    """One model family + name + weights.

    ``weights`` is, for ``open_clip``, a pretrained tag (``laion2b_s34b_b79k``),
    a local checkpoint file, or ``random``; for the transformers families,
    ``pretrained`` (load the weights from ``name``) or ``random`` (build from
    ``name``'s config with seeded random weights, for tests and offline demos).
    """

    family: str
    name: str
    weights: str = PRETRAINED
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not one of {sorted(FAMILIES)}")
        if not self.name:
            raise ValueError(f"{self.family} model name must be non-empty")
        if self.family != "open_clip" and self.weights not in (PRETRAINED, RANDOM):
            raise ValueError(
                f"{self.family} weights must be {PRETRAINED!r} (from {self.name!r}) or {RANDOM!r}, "
                f"got {self.weights!r}"
            )
        if self.family == "open_clip" and self.weights == PRETRAINED:
            raise ValueError("open_clip weights must be a pretrained tag, a checkpoint path or 'random'")

    def describe(self) -> dict:
        return {
            "family": self.family,
            "name": self.name,
            "weights": self.weights,
            "weights_label": self.weights_label,
            **({"seed": self.seed} if self.is_random else {}),
            "fingerprint": fingerprint(self),
        }


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _path_digest(path: Path) -> str:
    """Content digest of a weights file or of a model directory's weight/config files."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".pt", ".txt", ".model"}
    )
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(str(p.relative_to(path) if p != path else p.name).encode())
        digest.update(_file_digest(str(p), st.st_size, st.st_mtime_ns).encode())
    return digest.hexdigest()


def open_clip_name(name: str) -> str:
    """An open_clip model name; a path to a JSON model config is registered under its file stem.

    This is how custom architectures (and the tests' tiny towers) reach every
    worker process: the config travels as a file path, not as process state.
    """
    if name.endswith(".json") and os.path.isfile(name):
        import open_clip

        stem = Path(name).stem
        if open_clip.get_model_config(stem) is None:
            open_clip.add_model_config(name)
        return stem
    return name


def _architecture(spec: ModelSpec) -> object:
    """The architecture as data, so a re-registered config changes the fingerprint."""
    if spec.family == "open_clip":
        import open_clip

        return open_clip.get_model_config(open_clip_name(spec.name))
    config = Path(spec.name) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else spec.name


@functools.lru_cache(maxsize=64)
def fingerprint(spec: ModelSpec) -> str:
    """sha256 over family, name, architecture and weights identity (file contents when local)."""
    weights: object = spec.weights
    if spec.is_random:
        weights = {"random_seed": spec.seed}
    elif spec.family == "open_clip" and os.path.exists(spec.weights):
        weights = {"checkpoint_sha256": _path_digest(Path(spec.weights))}
    elif spec.family != "open_clip" and os.path.isdir(spec.name):
        weights = {"dir_sha256": _path_digest(Path(spec.name))}
    payload = {
        "family": spec.family,
        "name": spec.name if not os.path.exists(spec.name) else os.path.basename(os.path.normpath(spec.name)),
        "architecture": _architecture(spec),
        "weights": weights,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
