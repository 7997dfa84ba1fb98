"""Query side: open a published run and encode queries exactly as its items were fused.

Everything comes from the run's embeddings metadata (models with family,
name, weights and fingerprint; routes; layout; fusion config), never from
flags, so a query cannot be encoded with a layout its items were not fused
with. No Beam pipeline is involved.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch

from encoders import towers
from encoders.device import resolve_device
from encoders.fusion import FusionConfig, Layout, fuse
from encoders.media import FetchPolicy, MediaError
from encoders.specs import ModelSpec, fingerprint
from pipeline.publish import MANIFEST, latest_run_dir, read_manifest
from schemas.embeddings import read_metadata

QUERY_MODALITIES = ("text", "image", "audio")


class QueryError(ValueError):
    """A query this run cannot encode (no encoder for its modality, unreadable media, changed models)."""


def resolve_run_dir(path: str) -> str:
    """``OUT/runs/<id>`` as given, or ``OUT`` followed through its LATEST pointer."""
    from apache_beam.io.filesystems import FileSystems

    path = path.rstrip("/")
    if FileSystems.exists(f"{path}/{MANIFEST}"):
        return path
    latest = latest_run_dir(path)
    if latest is None:
        raise QueryError(f"{path} is neither a published run (no {MANIFEST}) nor an output root with a LATEST pointer")
    return latest


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A published run: where its files are and how its vectors were made."""

    run_dir: str
    manifest: dict
    metadata: dict  # the embeddings files' catalog_index metadata
    embedding_files: tuple[str, ...]

    @property
    def layout(self) -> Layout:
        return Layout.from_json(self.metadata["layout"])

    @property
    def fusion(self) -> FusionConfig:
        return FusionConfig.from_json(self.metadata["fusion"])

    @property
    def routes(self) -> tuple[tuple[str, str], ...]:
        return tuple((r["modality"], r["space"]) for r in self.metadata["routes"])

    def spec(self, space: str) -> ModelSpec:
        """The space's model spec, rebuilt from the metadata and checked against its fingerprint."""
        d = self.metadata["models"][space]
        spec = ModelSpec(d["family"], d["name"], d["weights"], int(d.get("seed", 0)))
        if fingerprint(spec) != d["fingerprint"]:
            raise QueryError(f"the {space} model {d['name']} is not the one this run used (fingerprint "
                             f"{fingerprint(spec)} != {d['fingerprint']}): its files changed since the run")
        return spec


def load_run(path: str) -> RunInfo:
    run_dir = resolve_run_dir(path)
    manifest = read_manifest(run_dir)
    files = tuple(f"{run_dir}/{f['path']}" for f in manifest["files"] if f["path"].startswith("embeddings/"))
    if not files:
        raise QueryError(f"run {run_dir} has no embeddings files (nothing was embedded)")
    return RunInfo(run_dir, manifest, read_metadata(files[0]), files)


class QueryEncoder:
    """Encodes text or image queries through the run's own towers, spaces, weights and layout."""

    def __init__(self, run: RunInfo, device: str = "cpu", batch_size: int = 32, policy: FetchPolicy = FetchPolicy()):
        from pipeline.fuse import load_attention

        self.run, self.layout, self.fusion = run, run.layout, run.fusion
        self.device, self.batch_size, self.policy = resolve_device(device), batch_size, policy
        try:
            self._attention = load_attention(self.fusion, [_Route(m, s) for m, s in run.routes], self.layout)
        except (ValueError, OSError) as e:  # a changed or missing module must not encode queries differently
            raise QueryError(str(e)) from None

    def modalities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for m, _ in self.run.routes))

    def space_vectors(self, modality: str, contents: Sequence[str]) -> list[dict[str, dict[str, list[np.ndarray]]]]:
        """Per query, ``{space: {modality: [vector]}}`` from every route of ``modality``."""
        if modality not in QUERY_MODALITIES:
            raise QueryError(f"query modality {modality!r} is not one of {QUERY_MODALITIES}")
        routes = [(m, s) for m, s in self.run.routes if m == modality]
        if not routes and modality == "audio":
            raise QueryError("audio queries need the audio encoders (speech recognition -> text towers, CLAP); "
                             "this run has none")
        if not routes:
            raise QueryError(f"this run has no encoder for {modality} queries (its routes: "
                             f"{', '.join(f'{m}->{s}' for m, s in self.run.routes)})")
        out: list[dict] = [{} for _ in contents]
        for _, space in routes:
            spec = self.run.spec(space)
            model = towers.load(spec, self.device)
            if modality == "text":
                vectors = model.encode_text([str(c) for c in contents], self.batch_size)
            elif modality == "image":
                vectors = model.encode_image(np.stack([self._pixels(spec, c) for c in contents]), self.batch_size)
            else:
                raise QueryError("audio queries need the audio encoders, which this build does not have yet")
            for i, v in enumerate(vectors):
                out[i].setdefault(space, {})[modality] = [v]
        return out

    def encode(self, modality: str, contents: Sequence[str]) -> np.ndarray:
        """Queries -> float32 [n, dim] unit vectors in the run's layout."""
        if not contents:
            return np.zeros((0, self.layout.dim), np.float32)
        per_query = self.space_vectors(modality, contents)
        return np.stack([fuse(v, self.layout, self.fusion, query=True, attention=self._attention) for v in per_query])

    def _pixels(self, spec: ModelSpec, path: str) -> np.ndarray:
        from pipeline.fetch import load_image

        try:
            pixels, _ = load_image(os.fspath(path), self.policy, towers.image_preprocess(spec))
        except MediaError as e:
            raise QueryError(f"image query {path}: {e}") from None
        return pixels


@dataclasses.dataclass(frozen=True)
class _Route:
    modality: str
    space: str


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
