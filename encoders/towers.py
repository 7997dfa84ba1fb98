"""Loaded models behind two small contracts: ``encode_text`` and ``encode_image``.

Each returns float32, L2-normalized rows. Forward passes have fixed shapes
(``encoders.forward``: on CUDA exactly ``batch_size`` rows, on CPU a multiple
of ``CPU_ROW_QUANTUM`` rows; measured, and checked by the integration test),
and text runs at a length bucket that depends only on the text itself (``encoders.text_context``).
So an item's vector does not depend on which items shared its batch, and
reruns are bit-identical however the runner batches.

This module holds the open_clip and transformers families' models and hooks;
which family a spec belongs to, and how it is loaded, preprocessed and sized,
is the registry's (``encoders.families``). ``load``, ``image_preprocess``,
``output_dim`` and ``audio_sample_rate`` here ask it. Models are built in the
worker (``load``), cached per process and device so the image and text
handlers of one CLIP model share a single copy.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from encoders import clip_tokenizer, families, placement, text_context
from encoders.forward import (  # noqa: F401 - padded_rows, CPU_ROW_QUANTUM: part of this module's surface
    CPU_ROW_QUANTUM,
    _as_tensor,
    _autocast,
    _features,
    _in_fixed_batches,
    _pad_rows,
    _seeded,
    _to_device,
    load_transformers,
    padded_rows,
)
from encoders.preprocess import ImagePreprocess
from encoders.specs import ModelSpec, open_clip_name

MIN_TEXT_BUCKET = 16


class TextEncoder(Protocol):
    dim: int

    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class AudioEncoder(Protocol):
    dim: int
    sample_rate: int

    def encode_audio(self, clips: list[np.ndarray], batch_size: int) -> np.ndarray: ...


class ImageEncoder(Protocol):
    dim: int

    def encode_image(self, pixels: np.ndarray, batch_size: int) -> np.ndarray: ...


class _AutoBatch:
    """``batch_size == 0``: the model picks its batch per modality from free device memory, once."""

    device: torch.device

    def _batch(self, modality: str, batch_size: int) -> int:
        if batch_size > 0:
            return batch_size
        auto = self.__dict__.setdefault("_auto_batch", {})
        if modality not in auto:
            auto[modality] = placement.auto_batch_size(lambda rows: self._probe(modality, rows), self.device)
            import logging

            logging.getLogger(__name__).info("%s batch size %d on %s (from free memory)",
                                             modality, auto[modality], self.device)
        return auto[modality]

    def _probe(self, modality: str, rows: int) -> None:
        if modality == "image":
            size = self.image_size
            self.encode_image(np.zeros((rows, 3, size, size), np.float32), rows)
        else:  # the longest text the tokenizer keeps: the worst case
            self.encode_text(["lorem ipsum " * 400] * rows, rows)


class OpenClipModel(_AutoBatch):
    """open_clip image and text towers; ``encode_image(x, normalize=True)`` is the contract."""

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32"):
        import open_clip

        name = open_clip_name(spec.name)
        pretrained = None if spec.is_random else spec.weights
        with _seeded(spec):
            # weights_only: a checkpoint is tensors, never code to unpickle
            self.model = open_clip.create_model(name, pretrained=pretrained, device=device, weights_only=True)
        self.model.eval()
        # open_clip's tokenizer, or for its default one the same ids at a fifth of the CPU (clip_tokenizer)
        self.tokenizer = clip_tokenizer.fast(open_clip.get_tokenizer(name))
        self.device, self.precision = device, precision
        self.dim = int(open_clip.get_model_config(name)["embed_dim"])
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.short_text = self._short_text_forward()

    def _short_text_forward(self) -> text_context.ShortTextForward | None:
        """The forward over each text's own length bucket, where it provably equals the full one."""
        import logging

        log = logging.getLogger(__name__)
        short, why = text_context.for_model(self.model, text_context.bucket_step(self.device))
        if short is None:
            log.info("%s: full %s-token text forward (%s)", type(self.model).__name__,
                     getattr(self.model, "context_length", "?"), why)
            return None
        # once per load: the full forward is the reference; texts of every bucket, pooled at EOT
        probe = ["", "a", "red leather shoe " * 4, "water bottle, steel " * 8, "lorem ipsum " * 60]
        diff = short.check(self.model, self.tokenizer(probe).to(self.device))
        if diff > text_context.TOLERANCE:
            log.warning("%s: short text forward differs from the full one by %.3g (> %g); using the full one",
                        type(self.model).__name__, diff, text_context.TOLERANCE)
            return None
        return short

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray | torch.Tensor, batch_size: int) -> np.ndarray:
        x = _as_tensor(pixels)
        batch_size = self._batch("image", batch_size)

        def run(start, stop, rows):
            batch = _to_device(_pad_rows(x[start:stop], rows), self.device)
            with _autocast(self.device, self.precision):
                return self.model.encode_image(batch, normalize=True)

        return _in_fixed_batches(len(x), batch_size, self.device, run)

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Unit vectors of ``texts``; each text runs at its own length bucket (``encoders.text_context``)."""
        tokens = self.tokenizer(texts)  # one call for the batch, padded to the full context
        return self.encode_tokens(tokens, self._batch("text", batch_size))

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor, batch_size: int) -> np.ndarray:
        """Unit vectors of tokenized texts [N, context], grouped by length bucket (the full forward without one)."""
        if self.short_text is None or not len(tokens):
            return self.encode_tokens_full(tokens, batch_size)
        lengths = self.short_text.row_lengths(tokens)
        out = np.zeros((len(tokens), self.dim), np.float32)
        for length in np.unique(lengths):
            members = np.flatnonzero(lengths == length)
            group = tokens[torch.from_numpy(members)]

            def run(start, stop, rows):  # called in this iteration only (_in_fixed_batches below)
                batch = _to_device(_pad_rows(group[start:stop], rows), self.device)  # noqa: B023
                with _autocast(self.device, self.precision):
                    # normalized as open_clip's encode_text(normalize=True) is, then again like it below
                    return torch.nn.functional.normalize(self.short_text(batch, int(length)), dim=-1)  # noqa: B023

            out[members] = _in_fixed_batches(len(members), batch_size, self.device, run)
        return out

    @torch.inference_mode()
    def encode_tokens_full(self, tokens: torch.Tensor, batch_size: int) -> np.ndarray:
        """open_clip's own ``encode_text`` over the full context: the reference the short forward matches."""

        def run(start, stop, rows):
            batch = _to_device(_pad_rows(tokens[start:stop], rows), self.device)
            with _autocast(self.device, self.precision):
                return self.model.encode_text(batch, normalize=True)

        return _in_fixed_batches(len(tokens), batch_size, self.device, run)


class HfClipModel(_AutoBatch):
    """transformers CLIP-family model: CLIPModel, ChineseCLIPModel, SiglipModel (by its config)."""

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32"):
        from transformers import AutoTokenizer

        self.model = load_transformers(spec, device)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.name)
        text_cfg = self.model.config.text_config
        self.max_length = min(int(text_cfg.max_position_embeddings), 77)
        self.device, self.precision = device, precision
        self.dim = int(getattr(self.model.config, "projection_dim", 0) or text_cfg.hidden_size)
        # SigLIP's text tower takes no mask and pools the last position: it runs the full padded length.
        # CLIP (causal) and Chinese-CLIP (BERT) mask their padding: each text runs at its length bucket.
        self._wants_mask = "siglip" not in type(self.model).__name__.lower()
        self.buckets = text_context.length_buckets(self.max_length, text_context.bucket_step(device))
        self.image_size = int(self.model.config.vision_config.image_size)

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray | torch.Tensor, batch_size: int) -> np.ndarray:
        x = _as_tensor(pixels)
        batch_size = self._batch("image", batch_size)

        def run(start, stop, rows):
            batch = _to_device(_pad_rows(x[start:stop], rows), self.device)
            with _autocast(self.device, self.precision):
                return _features(self.model.get_image_features(pixel_values=batch))

        return _in_fixed_batches(len(x), batch_size, self.device, run)

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray:
        batch_size = self._batch("text", batch_size)
        if self._wants_mask:
            return _encode_masked_text(self, texts, batch_size, self.max_length, self.buckets)
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pad_id = self.tokenizer.pad_token_id or 0

        def run(start, stop, rows):  # SigLIP: no mask, the full padded length
            ids = _pad_rows(enc["input_ids"][start:stop], rows, pad_id).to(self.device)
            with _autocast(self.device, self.precision):
                return _features(self.model.get_text_features(input_ids=ids))

        return _in_fixed_batches(len(texts), batch_size, self.device, run)


class SentenceModel(_AutoBatch):
    """A transformers sentence encoder: mean pooling over non-padding tokens, then L2."""

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32", max_length: int = 256):
        from transformers import AutoTokenizer

        self.model = load_transformers(spec, device)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.name)
        self.max_length = min(max_length, int(getattr(self.model.config, "max_position_embeddings", max_length)))
        self.device, self.precision = device, precision
        self.dim = int(self.model.config.hidden_size)

    def _bucket(self, length: int) -> int:
        bucket = MIN_TEXT_BUCKET
        while bucket < length:
            bucket *= 2
        return min(bucket, self.max_length)

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        batch_size = self._batch("text", batch_size)
        out = np.zeros((len(texts), self.dim), np.float32)
        buckets: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            buckets.setdefault(self._bucket(len(seq)), []).append(i)
        pad_id = self.tokenizer.pad_token_id or 0
        for length, members in sorted(buckets.items()):
            matrix = torch.full((len(members), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(members), length), dtype=torch.long)
            for row, i in enumerate(members):
                matrix[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1

            def run(start, stop, rows):  # called in this iteration only (_in_fixed_batches below)
                m = _pad_rows(mask[start:stop], rows, 0).to(self.device)  # noqa: B023
                x = _pad_rows(matrix[start:stop], rows, pad_id).to(self.device)  # noqa: B023
                with _autocast(self.device, self.precision):
                    hidden = self.model(input_ids=x, attention_mask=m).last_hidden_state
                weights = m.unsqueeze(-1).to(hidden.dtype)
                return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

            out[members] = _in_fixed_batches(len(members), batch_size, self.device, run)
        return out


class HfClapModel:
    """transformers ``ClapModel``: audio tower (``get_audio_features``) and text tower, one space.

    CLAP's feature extractor crops clips longer than its window at random;
    feeding it the first ``max_length_s`` seconds keeps vectors reproducible
    (a product sound's first seconds carry it; README says so).
    """

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str = "fp32"):
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        self.model = load_transformers(spec, device, ClapModel)
        fusion = bool(getattr(self.model.config.audio_config, "enable_fusion", False))
        try:
            self.extractor = ClapFeatureExtractor.from_pretrained(spec.name)
        except OSError:  # a bare config dir (tests, random init): CLAP's standard front end
            self.extractor = ClapFeatureExtractor()
        # the fusion front end stacks 4 mel views; an unfused tower takes one
        self.extractor.truncation = "fusion" if fusion else "rand_trunc"
        self.tokenizer = AutoTokenizer.from_pretrained(spec.name)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.window = int(self.extractor.max_length_s * self.sample_rate)
        self.device, self.precision = device, precision
        self.dim = int(self.model.config.projection_dim)

    @torch.inference_mode()
    def encode_audio(self, clips: list[np.ndarray], batch_size: int) -> np.ndarray:
        feats = self.extractor([np.asarray(c, np.float32)[: self.window] for c in clips],
                               sampling_rate=self.sample_rate, return_tensors="pt")
        x, longer = feats["input_features"], feats["is_longer"]

        def run(start, stop, rows):
            kwargs = {"input_features": _pad_rows(x[start:stop], rows).to(self.device),
                      "is_longer": _pad_rows(longer[start:stop], rows, False).to(self.device)}
            with _autocast(self.device, self.precision):
                return _features(self.model.get_audio_features(**kwargs))

        return _in_fixed_batches(len(clips), batch_size, self.device, run)

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int) -> np.ndarray:
        """RoBERTa masks its padding (and numbers positions from the ids): each text runs at its length bucket."""
        max_length = min(int(self.model.config.text_config.max_position_embeddings) - 2, 77)
        buckets = text_context.length_buckets(max_length, text_context.bucket_step(self.device))
        return _encode_masked_text(self, texts, batch_size, max_length, buckets)


def _encode_masked_text(model, texts: list[str], batch_size: int, max_length: int,
                        buckets: tuple[int, ...]) -> np.ndarray:
    """A transformers text tower that masks its padding, each text padded only to its own length bucket.

    The padding's keys are masked, so trimming padding columns changes no real token's attention (as
    padding to ``max_length`` did, within float rounding: tests/test_text_context.py); a text's bucket
    depends on the text alone, so its vector does not depend on its batch-mates.
    """
    if not texts:
        return np.zeros((0, 0), np.float32)
    ids = model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad_id = model.tokenizer.pad_token_id or 0
    out = np.zeros((len(texts), model.dim), np.float32)
    for length, members in text_context.bucket_groups([len(row) for row in ids], buckets).items():
        x, mask = text_context.padded([ids[i] for i in members], length, pad_id)

        def run(start, stop, rows):  # called in this iteration only (_in_fixed_batches below)
            kwargs = {"input_ids": _pad_rows(x[start:stop], rows, pad_id).to(model.device),  # noqa: B023
                      "attention_mask": _pad_rows(mask[start:stop], rows, 0).to(model.device)}  # noqa: B023
            with _autocast(model.device, model.precision):
                return _features(model.model.get_text_features(**kwargs))

        out[members] = _in_fixed_batches(len(members), batch_size, model.device, run)
    return out


# the registry's one cache of loaded models (shared with encoders.asr; tests and benches clear it)
_CACHE = families._CACHE


def load(spec: ModelSpec, device: torch.device, precision: str = "fp32"):
    """The process's one copy of ``spec`` on ``device`` (built on first use by its family's loader)."""
    return families.load(spec, device, precision)


def image_preprocess(spec: ModelSpec) -> ImagePreprocess:
    """The CPU preprocessing a spec's image tower expects, without loading its weights."""
    return families.image_preprocess(spec)


def output_dim(spec: ModelSpec) -> int:
    """The embedding dimension of ``spec`` from its config alone (for schemas at launch)."""
    return families.output_dim(spec)


def audio_sample_rate(spec: ModelSpec) -> int:
    """The rate a sound model (CLAP, aisfx) expects, without loading its weights."""
    return families.audio_sample_rate(spec)


def sound_hears_speech(spec: ModelSpec) -> bool:
    """Whether a sound model's vector of a spoken clip carries what was said.

    CLAP was trained on captioned audio, speech included. aisfx is a
    sound-effects embedder: every spoken clip lands in one corner of its space
    (cosine 0.985 between two different sample descriptions), so a voice query
    would match every item with a spoken clip, whatever it says. Clips with
    recognized speech therefore reach it neither from items nor from queries;
    their words go through speech recognition. The fact is the family's
    (``Family.hears_speech``).
    """
    return families.get(spec.family).hears_speech


# ---- the registry's hooks for the families defined here (open_clip, hf_clip, hf_text, hf_clap) ----

def open_clip_preprocess(spec: ModelSpec) -> ImagePreprocess:
    import open_clip

    name = open_clip_name(spec.name)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    cfg = {} if spec.is_random else (open_clip.get_pretrained_cfg(name, spec.weights) or {})
    return ImagePreprocess(
        size=int(size),
        mean=tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD),
    )


def hf_clip_preprocess(spec: ModelSpec) -> ImagePreprocess:
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(spec.name).vision_config
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(spec.name)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError):
        pass  # a bare config (tests, random init) has no processor file: CLIP's defaults
    squash = "siglip" in str(getattr(vision, "model_type", "")).lower()  # SigLIP resizes without crop
    return ImagePreprocess(size=int(vision.image_size), mean=mean, std=std, resize="squash" if squash else "shortest")


def open_clip_dim(spec: ModelSpec) -> int:
    import open_clip

    config = open_clip.get_model_config(open_clip_name(spec.name))
    if config is None:
        raise ValueError(f"unknown open_clip model {spec.name!r}; known: {', '.join(open_clip.list_models())}")
    return int(config["embed_dim"])


def _hf_config(spec: ModelSpec):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec.name)


def hf_clip_dim(spec: ModelSpec) -> int:
    config = _hf_config(spec)
    return int(getattr(config, "projection_dim", 0) or config.text_config.hidden_size)


def hf_clap_dim(spec: ModelSpec) -> int:
    return int(_hf_config(spec).projection_dim)


def hf_text_dim(spec: ModelSpec) -> int:
    return int(_hf_config(spec).hidden_size)


def clap_sample_rate(spec: ModelSpec) -> int:
    try:
        from transformers import ClapFeatureExtractor

        return int(ClapFeatureExtractor.from_pretrained(spec.name).sampling_rate)
    except OSError:
        return 48_000  # CLAP's standard front end
