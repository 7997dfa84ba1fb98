"""Moonshine base-en speech recognition through the project's onnxruntime (backend ``moonshine``).

``moonshine-cpp`` (MIT) carries the ONNX Runtime models (``encoder_model.ort``,
``decoder_model_merged.ort``) and the tokenizer (``tokenizer.bin``). Its own
Python module loads a second, bundled onnxruntime through ctypes, so it is
never imported: the files are found with ``importlib.util.find_spec`` and run
here with the ``onnxruntime`` the project pins, by a small greedy decoder
(BOS, then one token at a time with the merged decoder's KV cache, until EOS
or about 6.5 tokens per second of audio, Moonshine's own bound). EOS is
suppressed at the first step, as Whisper decoders do: greedy Moonshine
otherwise ends some clear 7 s sentences before their first word.

Moonshine reads raw 16 kHz samples of any length, without an attention
mask, so each clip (each 30 s window of one) is its own forward pass: no
padding, and a transcript never depends on its batch-mates. It has no
no-speech token: the probability that it ends at once (EOS as the first
token) stands in for one, and a window above ``no_speech_threshold`` holds
no speech (a chime: 0.95; a spoken sentence that it would have cut: 0.48). English only. On CUDA
workers it still runs on the CPU (the pinned onnxruntime is the CPU build).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from encoders.asr import SAMPLE_RATE, _join, _Window, _windows

FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")
BOS, EOS = 1, 2
TOKENS_PER_SECOND = 6.5
_SPACE = "\u2581".encode()


def packaged_moonshine() -> str | None:
    """The base-en model folder inside the installed moonshine-cpp package (not imported), else None."""
    found = importlib.util.find_spec("moonshine_cpp")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "models" / "base-en"
    return str(path) if all((path / f).is_file() for f in FILES) else None


def read_tokenizer(path: str) -> list[bytes]:
    """``tokenizer.bin``: per token id, a length (one byte; a varint when >= 128) then the token's bytes."""
    data, tokens, i = Path(path).read_bytes(), [], 0
    while i < len(data):
        length, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        tokens.append(data[i:i + length])
        i += length
    return tokens


def detokenize(ids: list[int], vocab: list[bytes]) -> str:
    raw = b"".join(vocab[t] for t in ids if 2 < t < len(vocab))
    return raw.replace(_SPACE, b" ").decode("utf-8", errors="replace").strip()


class MoonshineAsr:
    """Greedy Moonshine decoding; ``transcribe`` has the interface of the Whisper backends."""

    def __init__(self, spec, device=None, precision: str = "fp32"):
        import onnxruntime as ort

        folder = Path(spec.model)
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"Moonshine model folder {folder} lacks {missing}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(folder / FILES[0]), options, providers=providers)
        self.decoder = ort.InferenceSession(str(folder / FILES[1]), options, providers=providers)
        self.vocab = read_tokenizer(str(folder / FILES[2]))
        self.spec = spec
        self._past = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self._present = [o.name for o in self.decoder.get_outputs() if o.name.startswith("present.")]
        shapes = {i.name: i.shape for i in self.decoder.get_inputs()}
        self._heads, self._head_dim = int(shapes[self._past[0]][1]), int(shapes[self._past[0]][3])

    def _decode(self, samples: np.ndarray):
        seconds = len(samples) / SAMPLE_RATE
        if seconds < 0.1:  # shorter than one encoder frame: nothing to hear
            return _Window("", "en", 1.0, -math.inf)
        states = self.encoder.run(None, {"input_values": samples[None].astype(np.float32)})[0]
        empty = np.zeros((1, self._heads, 0, self._head_dim), np.float32)
        past = {name: empty for name in self._past}
        token, tokens, logprob, no_speech = BOS, [], 0.0, 0.0
        limit = min(self.spec.max_new_tokens, max(1, math.ceil(seconds * TOKENS_PER_SECOND)))
        for step in range(limit):
            outputs = self.decoder.run(None, {"input_ids": np.array([[token]], np.int64),
                                              "encoder_hidden_states": states, **past,
                                              "use_cache_branch": np.array([step > 0])})
            logits = outputs[0][0, -1].astype(np.float64)
            if step == 0:  # P(EOS first) is the no-speech probability; then EOS is suppressed (begin-suppression)
                shifted = np.exp(logits - logits.max())
                no_speech = float(shifted[EOS] / shifted.sum())
                logits[EOS] = -np.inf
            logits -= logits.max()
            logp = logits - math.log(float(np.exp(logits).sum()))
            token = int(np.argmax(logp))
            logprob += float(logp[token])
            presents = dict(zip(self._present, outputs[1:]))
            for name in self._past:  # encoder keys/values come from the first step; decoder ones grow
                present = presents[name.replace("past_key_values.", "present.")]
                if step == 0 or ".decoder." in name:
                    past[name] = present
            if token == EOS:
                break
            tokens.append(token)
        mean = logprob / (len(tokens) + 1)
        silent = no_speech > self.spec.no_speech_threshold
        return _Window("" if silent else detokenize(tokens, self.vocab), "en", no_speech, mean)

    def transcribe(self, clips: list[np.ndarray], batch_size: int):
        windows = _windows(clips)
        return _join(len(clips), windows, [self._decode(w) for _, w in windows], self.spec)
