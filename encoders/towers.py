"""Loaded models behind two small contracts: ``encode_text`` and ``encode_image``.

Each returns float32, L2-normalized rows. Forward passes have fixed shapes:
on CUDA exactly ``batch_size`` rows (short batches are padded), on CPU a
multiple of ``CPU_ROW_QUANTUM`` rows (CPU GEMM kernels give a row the same
bits for any such row count; measured, and checked by the integration test),
and text is padded to a length bucket that depends only on the text itself.
So an item's vector does not depend on which items shared its batch, and
reruns are bit-identical however the runner batches.

Models are built in the worker (``load``), cached per process and device so
the image and text handlers of one CLIP model share a single copy.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Protocol

import numpy as np
import torch

from encoders import placement
from encoders.preprocess import ImagePreprocess
from encoders.specs import ModelSpec, open_clip_name

MIN_TEXT_BUCKET = 16
CPU_ROW_QUANTUM = 8


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


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _pad_rows(x: torch.Tensor, rows: int, value: float | int = 0) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


def padded_rows(count: int, batch_size: int, device: torch.device) -> int:
    """Rows of the forward pass that encodes ``count`` (<= batch_size) items."""
    if device.type == "cpu":
        return min(-(-count // CPU_ROW_QUANTUM) * CPU_ROW_QUANTUM, max(batch_size, CPU_ROW_QUANTUM))
    return batch_size


def _in_fixed_batches(n: int, batch_size: int, device: torch.device, run, normalize: bool = True) -> np.ndarray:
    """Calls ``run(start, stop, padded_rows)`` per chunk and stacks the unpadded outputs (L2-normalized)."""
    outputs = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        out = run(start, stop, padded_rows(stop - start, batch_size, device))[: stop - start].float()
        out = torch.nn.functional.normalize(out, dim=-1) if normalize else out
        outputs.append(out.cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def _seeded(spec: ModelSpec):
    """Random init that is the same in every process and every run."""
    if not spec.is_random:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(spec.seed)
    return stack


def _as_tensor(pixels) -> torch.Tensor:
    """Pixels as a tensor: numpy from the CPU fetch stage, or a tensor already on the GPU (nvJPEG)."""
    return pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # pinned host memory lets the copy run asynchronously to the host thread
    return placement.pinned(x, device).to(device, non_blocking=True) if x.device != device else x


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
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.precision = device, precision
        self.dim = int(open_clip.get_model_config(name)["embed_dim"])
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)

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
        tokens = self.tokenizer(texts)  # fixed context length already
        batch_size = self._batch("text", batch_size)

        def run(start, stop, rows):
            batch = _to_device(_pad_rows(tokens[start:stop], rows), self.device)
            with _autocast(self.device, self.precision):
                return self.model.encode_text(batch, normalize=True)

        return _in_fixed_batches(len(texts), batch_size, self.device, run)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_transformers(spec, device: torch.device, model_class=None):
    """A transformers model from ``spec.name``: its weights, or seeded random weights from its config.

    ``model_class`` (e.g. ClapModel) when the auto class would pick another head.
    trust_remote_code=False: a model folder's Python files are never run; weights load from
    safetensors when present, else through torch.load(weights_only=True) (transformers' default).
    """
    from transformers import AutoConfig, AutoModel

    if spec.is_random:
        config = AutoConfig.from_pretrained(spec.name, trust_remote_code=False)
        with _seeded(spec):
            model = model_class(config) if model_class is not None else AutoModel.from_config(config)
    else:
        model = (model_class or AutoModel).from_pretrained(spec.name, trust_remote_code=False)
    return model.to(device).eval()


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
        self._wants_mask = "siglip" not in type(self.model).__name__.lower()
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
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pad_id = self.tokenizer.pad_token_id or 0
        batch_size = self._batch("text", batch_size)

        def run(start, stop, rows):
            ids = _pad_rows(enc["input_ids"][start:stop], rows, pad_id).to(self.device)
            kwargs = {"input_ids": ids}
            if self._wants_mask and "attention_mask" in enc:
                kwargs["attention_mask"] = _pad_rows(enc["attention_mask"][start:stop], rows, 0).to(self.device)
            with _autocast(self.device, self.precision):
                return _features(self.model.get_text_features(**kwargs))

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
        max_length = min(int(self.model.config.text_config.max_position_embeddings) - 2, 77)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        pad_id = self.tokenizer.pad_token_id or 0

        def run(start, stop, rows):
            kwargs = {"input_ids": _pad_rows(enc["input_ids"][start:stop], rows, pad_id).to(self.device),
                      "attention_mask": _pad_rows(enc["attention_mask"][start:stop], rows, 0).to(self.device)}
            with _autocast(self.device, self.precision):
                return _features(self.model.get_text_features(**kwargs))

        return _in_fixed_batches(len(texts), batch_size, self.device, run)


_CACHE: dict[tuple, object] = {}
_FAMILY_CLASSES = {"open_clip": OpenClipModel, "hf_clip": HfClipModel, "hf_text": SentenceModel,
                   "hf_clap": HfClapModel}
_LOCK = threading.RLock()  # re-entrant: a bridge (conse) loads its parts through load()


def load(spec: ModelSpec, device: torch.device, precision: str = "fp32"):
    """The process's one copy of ``spec`` on ``device`` (built on first use)."""
    key = (spec, str(device), precision)
    with _LOCK:
        if key not in _CACHE:
            cls = _FAMILY_CLASSES.get(spec.family) or _packaged_family(spec.family)
            _CACHE[key] = cls(spec, device, precision)
        return _CACHE[key]


def _packaged_family(family: str):
    """The model class of a family that lives in its own module (imported only when used)."""
    if family == "timm_image":
        from encoders.efficientnet import TimmImageModel as cls
    elif family == "conse":
        from encoders.conse import ConseModel as cls
    elif family == "usem3":
        from encoders.use_multilingual import UseModel as cls
    elif family == "aisfx":
        from encoders.aisfx import AisfxModel as cls
    else:
        raise ValueError(f"no model class for family {family!r}")
    return cls


def image_preprocess(spec: ModelSpec) -> ImagePreprocess:
    """The CPU preprocessing a spec's image tower expects, without loading its weights."""
    if spec.family in ("timm_image", "conse"):
        from encoders.efficientnet import image_preprocess as timm_preprocess

        return timm_preprocess(spec.name)
    if spec.family == "open_clip":
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
    if spec.family == "hf_clip":
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
    raise ValueError(f"{spec.family} models have no image tower")


def output_dim(spec: ModelSpec) -> int:
    """The embedding dimension of ``spec`` from its config alone (for schemas at launch)."""
    if spec.family == "open_clip":
        import open_clip

        config = open_clip.get_model_config(open_clip_name(spec.name))
        if config is None:
            raise ValueError(f"unknown open_clip model {spec.name!r}; known: {', '.join(open_clip.list_models())}")
        return int(config["embed_dim"])
    if spec.family == "timm_image":
        from encoders.efficientnet import output_dim as timm_dim

        return timm_dim(spec.name)
    if spec.family == "conse":
        return output_dim(spec.text)
    if spec.family == "usem3":
        from encoders.use_multilingual import DIM

        return DIM
    if spec.family == "aisfx":
        from encoders.aisfx import DIM

        return DIM
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.name)
    if spec.family == "hf_clip":
        return int(getattr(config, "projection_dim", 0) or config.text_config.hidden_size)
    if spec.family == "hf_clap":
        return int(config.projection_dim)
    return int(config.hidden_size)


def sound_hears_speech(spec: ModelSpec) -> bool:
    """Whether a sound model's vector of a spoken clip carries what was said.

    CLAP was trained on captioned audio, speech included. aisfx is a
    sound-effects embedder: every spoken clip lands in one corner of its space
    (cosine 0.985 between two different sample descriptions), so a voice query
    would match every item with a spoken clip, whatever it says. Clips with
    recognized speech therefore reach it neither from items nor from queries;
    their words go through speech recognition.
    """
    return spec.family != "aisfx"


def audio_sample_rate(spec: ModelSpec) -> int:
    """The rate a sound model (CLAP, aisfx) expects, without loading its weights."""
    if spec.family == "aisfx":
        from encoders.aisfx import SAMPLE_RATE

        return SAMPLE_RATE
    if spec.family != "hf_clap":
        raise ValueError(f"{spec.family} models have no audio tower")
    try:
        from transformers import ClapFeatureExtractor

        return int(ClapFeatureExtractor.from_pretrained(spec.name).sampling_rate)
    except OSError:
        return 48_000  # CLAP's standard front end
