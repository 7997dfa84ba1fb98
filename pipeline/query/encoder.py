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
from encoders.attention import load_attention
from encoders.audio import AudioPolicy
from encoders.device import resolve_device
from encoders.fusion import MODALITIES, FusionConfig, FusionError, Layout, fuse
from encoders.media import FetchPolicy, MediaError, fetch_bytes, load_image
from encoders.specs import ModelSpec, fingerprint, spec_from_description
from pipeline.storage import read_manifest, resolve_run_dir
from schemas.embeddings import read_metadata
from schemas.manifest import Manifest

QUERY_MODALITIES = MODALITIES  # a query is any modality an item can have


class QueryError(ValueError):
    """A query this run cannot encode (no encoder for its modality, unreadable media, changed models)."""


class QueryContentError(QueryError):
    """One query's own content cannot be encoded (unreadable media, a clip with no speech and no CLAP)."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A published run: where its files are and how its vectors were made."""

    run_dir: str
    manifest: Manifest
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

    @property
    def route_info(self) -> tuple[dict, ...]:
        """The recorded routes with what the encoder saw (``via``: transcript or waveform for audio)."""
        return tuple(self.metadata["routes"])

    def asr_spec(self):
        """The run's speech recognizer (an ``encoders.asr.AsrSpec``), checked against its fingerprint."""
        from encoders.asr import asr_fingerprint, spec_from_description

        d = self.metadata.get("asr")
        if not d:
            raise QueryError("this run routes audio through speech recognition but records no recognizer")
        return _rebuilt(d, spec_from_description, asr_fingerprint, "the run's speech recognizer",
                        f"the speech recognizer {d['name']}", "its files or settings changed")

    def spec(self, space: str) -> ModelSpec:
        """The space's model spec, rebuilt from the metadata and checked against its fingerprint."""
        d = self.metadata["models"][space]
        return _rebuilt(d, spec_from_description, fingerprint, f"the {space} model",
                        f"the {space} model {d['name']}", "its files changed since the run",
                        source=" from the run's metadata")


def _rebuilt(d: dict, rebuild, fingerprint_of, what: str, named: str, why: str, source: str = ""):
    """A model spec rebuilt from its recorded description, refused when its fingerprint differs."""
    try:
        spec = rebuild(d)
    except (KeyError, ValueError) as e:
        raise QueryError(f"{what} cannot be rebuilt{source}: {e}") from None
    if fingerprint_of(spec) != d["fingerprint"]:
        raise QueryError(f"{named} is not the one this run used (fingerprint "
                         f"{fingerprint_of(spec)} != {d['fingerprint']}): {why}")
    return spec


def load_run(path: str) -> RunInfo:
    run_dir = resolve_run_dir(path)
    manifest = read_manifest(run_dir)
    files = tuple(f"{run_dir}/{path}" for path in manifest.file_paths("embeddings/"))
    if not files:
        raise QueryError(f"run {run_dir} has no embeddings files (nothing was embedded)")
    return RunInfo(run_dir, manifest, read_metadata(files[0]), files)


class QueryEncoder:
    """Encodes text, image or audio queries through the run's own towers, spaces, weights and layout.

    An audio query goes where an item's audio went: speech recognition (the
    run's recognizer and decoding settings) -> the text towers of the spaces
    that audio reached, and the clip itself -> the CLAP audio tower when the
    run has a clap space.
    """

    def __init__(self, run: RunInfo, device: str = "cpu", batch_size: int = 32, policy: FetchPolicy = FetchPolicy(),
                 audio_policy: AudioPolicy = AudioPolicy()):
        self.run, self.layout, self.fusion = run, run.layout, run.fusion
        self.device, self.batch_size, self.policy = resolve_device(device), batch_size, policy
        self.audio_policy = audio_policy
        try:
            self._attention = load_attention(self.fusion, [_Route(m, s) for m, s in run.routes], self.layout)
        except (ValueError, OSError) as e:  # a changed or missing module must not encode queries differently
            raise QueryError(str(e)) from None

    def modalities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for m, _ in self.run.routes))

    def space_vectors(self, modality: str, contents: Sequence[str]) -> list[dict[str, dict[str, list[np.ndarray]]]]:
        """Per query, ``{space: {modality: [vector]}}`` from every route of ``modality``.

        Raises :class:`QueryError` if any query cannot be encoded.
        """
        per_query, errors = self.space_vectors_each(modality, contents)
        if errors:
            raise QueryContentError(errors[min(errors)])
        return per_query

    def space_vectors_each(self, modality: str, contents: Sequence[str]
                           ) -> tuple[list[dict[str, dict[str, list[np.ndarray]]]], dict[int, str]]:
        """Like :meth:`space_vectors`, but a query that cannot be encoded (unreadable media, no speech
        and no CLAP) gets an empty dict and its reason in ``errors[index]``; a modality this run has no
        encoder for still raises :class:`QueryError`."""
        if modality not in QUERY_MODALITIES:
            raise QueryError(f"query modality {modality!r} is not one of {QUERY_MODALITIES}")
        routes = [r for r in self.run.route_info if r["modality"] == modality]
        if not routes and modality == "audio":
            raise QueryError("audio queries need the audio encoders (speech recognition -> text towers, CLAP); "
                             "this run has none")
        if not routes:
            raise QueryError(f"this run has no encoder for {modality} queries (its routes: "
                             f"{', '.join(f'{m}->{s}' for m, s in self.run.routes)})")
        out: list[dict] = [{} for _ in contents]
        errors: dict[int, str] = {}
        if modality == "audio":
            self._audio(routes, contents, out, errors)
            return out, errors
        for route in routes:
            space = route["space"]
            spec = self.run.spec(space)
            if modality == "text":
                ok, vectors = list(range(len(contents))), self._model(spec).encode_text(
                    [str(c) for c in contents], self.batch_size)
            else:
                pixels = {}
                for i, c in enumerate(contents):
                    if i in errors:
                        continue
                    try:
                        pixels[i] = self._pixels(spec, c)
                    except QueryContentError as e:
                        errors[i] = str(e)
                ok = list(pixels)
                vectors = (self._model(spec).encode_image(np.stack([pixels[i] for i in ok]), self.batch_size)
                           if ok else [])
            for i, v in zip(ok, vectors):
                out[i].setdefault(space, {})[modality] = [v]
        return out, errors

    def _model(self, spec: ModelSpec):
        return towers.load(spec, self.device)

    def _audio(self, routes: list[dict], contents: Sequence[str], out: list[dict], errors: dict[int, str]) -> None:
        """Decode each clip once at every rate the run's audio models want, then transcribe and/or CLAP it."""
        from encoders import asr

        spoken = [r for r in routes if r.get("via") == "transcript"]
        sounds = [r for r in routes if r.get("via") == "waveform"]
        rates = {r["space"]: towers.audio_sample_rate(self.run.spec(r["space"])) for r in sounds}
        wanted = tuple(sorted(set(rates.values()) | ({asr.SAMPLE_RATE} if spoken else set())))
        clips = {}
        for i, path in enumerate(contents):
            try:
                clips[i] = self._clip(path, wanted)
            except QueryContentError as e:
                errors[i] = str(e)
        ok = list(clips)
        if not ok:
            return
        no_speech: dict[int, float] = {}
        if spoken:
            recognizer = asr.load(self.run.asr_spec(), self.device)
            transcripts = recognizer.transcribe([clips[i].at(asr.SAMPLE_RATE) for i in ok], self.batch_size)
            said = [(i, t.text) for i, t in zip(ok, transcripts) if t.is_speech]
            no_speech = {i: t.no_speech_prob for i, t in zip(ok, transcripts) if not t.is_speech}
            for route in spoken:  # spoken words are compared like typed ones, through the same text towers
                space = route["space"]
                vectors = self._model(self.run.spec(space)).encode_text([t for _, t in said], self.batch_size) \
                    if said else []
                for (i, _), v in zip(said, vectors):
                    out[i].setdefault(space, {})["audio"] = [v]
        spoke = {i for i, _ in said} if spoken else set()
        for route in sounds:
            space = route["space"]
            spec = self.run.spec(space)
            # as for items: a sound-effects model does not hear words (towers.sound_hears_speech)
            heard = [i for i in ok if towers.sound_hears_speech(spec) or i not in spoke]
            vectors = self._model(spec).encode_audio([clips[i].at(rates[space]) for i in heard],
                                                     self.batch_size) if heard else []
            for i, v in zip(heard, vectors):
                out[i].setdefault(space, {})["audio"] = [v]
        for i in ok:
            if not out[i]:
                errors[i] = (f"audio query {contents[i]}: no recognizable speech (no-speech probability "
                             f"{no_speech.get(i, 1.0):.2f}), and this run has no CLAP space to embed the sound "
                             "itself")

    def encode(self, modality: str, contents: Sequence[str]) -> np.ndarray:
        """Queries -> float32 [n, dim] unit vectors in the run's layout; any query that fails raises QueryError."""
        vectors, errors = self.encode_each(modality, contents)
        if errors:
            raise QueryContentError(errors[min(errors)])
        return vectors

    def encode_each(self, modality: str, contents: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
        """float32 [n, dim] vectors (zero rows for the queries that failed) and ``{index: reason}`` of those."""
        if not contents:
            return np.zeros((0, self.layout.dim), np.float32), {}
        per_query, errors = self.space_vectors_each(modality, contents)
        vectors = np.zeros((len(contents), self.layout.dim), np.float32)
        for i, v in enumerate(per_query):
            if i in errors:
                continue
            try:
                vectors[i] = fuse(v, self.layout, self.fusion, query=True, attention=self._attention)
            except FusionError as e:
                errors[i] = f"{modality} query {contents[i]!r}: {e}"
        return vectors, errors

    def _clip(self, path: str, rates: tuple[int, ...]):
        from encoders.audio import decode_audio

        try:
            return decode_audio(fetch_bytes(os.fspath(path), self.policy), rates, self.audio_policy)
        except MediaError as e:
            raise QueryContentError(f"audio query {path}: {e}") from None

    def _pixels(self, spec: ModelSpec, path: str) -> np.ndarray:
        try:
            pixels, _ = load_image(os.fspath(path), self.policy, towers.image_preprocess(spec))
        except MediaError as e:
            raise QueryContentError(f"image query {path}: {e}") from None
        return pixels


@dataclasses.dataclass(frozen=True)
class _Route:
    modality: str
    space: str


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
