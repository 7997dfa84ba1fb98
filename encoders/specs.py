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

from encoders import families
from encoders.digest import file_sha256

FAMILIES = {f: families.get(f).description for f in families.names(asr=False)}  # a ModelSpec's families
CLIP_FAMILIES = tuple(f for f in families.names(role="clip") if not families.get(f).bridge)  # joint image-text
PRECISIONS = ("fp32", "bf16", "fp16")  # forward-pass precision of a model (EncodeConfig, the handlers)
TEXT_FAMILIES = families.names(role="text", asr=False)
# families whose weights are a file path (or a tag / random), not "pretrained from name"
_WEIGHT_FILE_FAMILIES = tuple(f for f in FAMILIES if families.get(f).weights in (families.TAG, families.FILE))
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
    text: "ModelSpec | None" = None  # conse only: the text space the classes are bridged into
    top_k: int = 0  # conse only: classes per image (0: the default, 10)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not one of {sorted(FAMILIES)}")
        family = families.get(self.family)
        if not self.name:
            raise ValueError(f"{self.family} model name must be non-empty")
        if family.bridge:
            if self.text is None or self.text.family not in TEXT_FAMILIES:
                raise ValueError(f"a conse bridge needs a text model of a family in {TEXT_FAMILIES}, got {self.text}")
            if not 0 <= self.top_k <= 1000:
                raise ValueError(f"conse top_k must be in 1..1000 (0: default 10), got {self.top_k}")
            if self.top_k == 0:
                object.__setattr__(self, "top_k", 10)
        elif self.text is not None or self.top_k:
            raise ValueError(f"text and top_k belong to conse bridges, not to {self.family}")
        if family.weights == families.FILE:
            if self.weights != RANDOM and not os.path.isfile(self.weights):
                raise ValueError(f"{self.family} weights must be a local weights file or {RANDOM!r}, "
                                 f"got {self.weights!r}")
        elif family.weights == families.FIXED and self.weights != PRETRAINED:
            raise ValueError(f"{self.family} has packaged weights only: weights must be {PRETRAINED!r}, "
                             f"got {self.weights!r}")
        elif family.weights != families.TAG and self.weights not in (PRETRAINED, RANDOM):
            raise ValueError(
                f"{self.family} weights must be {PRETRAINED!r} (from {self.name!r}) or {RANDOM!r}, "
                f"got {self.weights!r}"
            )
        if family.weights == families.TAG and self.weights == PRETRAINED:
            raise ValueError(f"{self.family} weights must be a pretrained tag, a checkpoint path or 'random'")

    def describe(self) -> dict:
        return {
            "family": self.family,
            "name": self.name,
            "weights": self.weights,
            "weights_label": self.weights_label,
            **({"seed": self.seed} if self.is_random else {}),
            **({"text": self.text.describe(), "top_k": self.top_k} if self.text is not None else {}),
            "fingerprint": fingerprint(self),
        }


def spec_from_description(d: dict) -> ModelSpec:
    """The :class:`ModelSpec` that :meth:`ModelSpec.describe` recorded."""
    text = spec_from_description(d["text"]) if d.get("text") else None
    return ModelSpec(d["family"], d["name"], d["weights"], int(d.get("seed", 0)), text, int(d.get("top_k", 0)))


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """file_sha256, cached while the file's size and mtime stay (weights are hashed once per process)."""
    return file_sha256(path)


def _path_digest(path: Path) -> str:
    """Content digest of a weights file or of a model directory's weight/config files."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file()
        and p.suffix in {".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".model", ".npz", ".ort"}
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


def open_clip_architecture(spec: ModelSpec) -> object:
    """open_clip's model config (``families`` hook), so a re-registered config changes the fingerprint."""
    import open_clip

    return open_clip.get_model_config(open_clip_name(spec.name))


def name_architecture(spec: ModelSpec) -> object:
    """Built-in architectures (timm, aisfx; ``families`` hook): the name is the architecture."""
    return spec.name


def _architecture(spec: ModelSpec) -> object:
    """The architecture as data: the family's hook, else a transformers dir's config.json, else the name."""
    if families.get(spec.family).architecture is not None:
        return families.architecture(spec)
    config = Path(spec.name) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else spec.name


@functools.lru_cache(maxsize=64)
def fingerprint(spec: ModelSpec) -> str:
    """sha256 over family, name, architecture and weights identity (file contents when local)."""
    weights: object = spec.weights
    if spec.is_random:
        weights = {"random_seed": spec.seed}
    elif spec.family in _WEIGHT_FILE_FAMILIES and os.path.exists(spec.weights):
        weights = {"checkpoint_sha256": _path_digest(Path(spec.weights))}
    elif families.get(spec.family).weights != families.TAG and os.path.isdir(spec.name):
        weights = {"dir_sha256": _path_digest(Path(spec.name))}
    payload = {
        "family": spec.family,
        "name": spec.name if not os.path.exists(spec.name) else os.path.basename(os.path.normpath(spec.name)),
        "architecture": _architecture(spec),
        "weights": weights,
        **({"text": fingerprint(spec.text), "top_k": spec.top_k} if spec.text is not None else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
