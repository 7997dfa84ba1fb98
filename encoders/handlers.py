"""Beam ``ModelHandler``s, one per modality; ``RunInference`` does batching and sharing.

A handler never fails a batch for one bad item: when a batch raises, it is
retried item by item and only the items that fail on their own come back as
:class:`EncodeFailure`, which the pipeline turns into dead-letter rows.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from encoders import families, towers
from encoders.device import resolve_device, validate_placement
from encoders.placement import AUTO_MAX_BATCH
from encoders.preprocess import ImagePreprocess
from encoders.specs import ModelSpec
from schemas.dead_letter import Reason, Stage

IMAGE_FAMILIES = families.names(modality="image")
AUDIO_FAMILIES = families.names(modality="audio", asr=False)
ENCODE_US = "encode_wall_us"  # Distribution metric name (microseconds), namespace catalog_index.encode.<modality>
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodeFailure:
    """Stands in a handler's output for an item that could not be encoded."""

    reason: Reason
    detail: str
    stage: Stage | None = None  # None: the encode stage; DECODE when the handler decoded the media
    source: str = ""  # the media URI at fault, when there is one


@dataclasses.dataclass(frozen=True)
class ImageBytes:
    """An image still encoded (``--image_decode gpu``): the handler decodes it on the device."""

    uri: str
    data: bytes


class _EmbeddingHandler(ModelHandler[Any, Any, Any]):
    modality = ""

    image_decode = "cpu"  # where this handler's images are decoded (validate_placement's image_decode)

    def __init__(self, spec: ModelSpec, *, device: str = "auto", precision: str = "fp32", batch_size: int = 32,
                 copies_per_gpu: int = 0):
        """``batch_size`` 0 sizes batches from free device memory on the worker. ``copies_per_gpu`` >= 1
        loads that many copies per GPU in Beam's shared model servers, used by every process of the
        machine, instead of one copy per process (0). The settings are checked by the rules
        ``EncodeConfig`` uses (``encoders.device.validate_placement``)."""
        validate_placement(device, precision, batch_size, copies_per_gpu, self.image_decode)
        self.spec, self.device, self.precision, self.batch_size = spec, device, precision, batch_size
        self.copies_per_gpu = copies_per_gpu
        super().__init__()

    def share_model_across_processes(self) -> bool:
        return self.copies_per_gpu > 0

    def model_copies(self) -> int:
        """Called by RunInference on the worker, so it counts the worker's GPUs, not the launcher's."""
        gpus = torch.cuda.device_count() if self.device != "cpu" and torch.cuda.is_available() else 1
        return max(self.copies_per_gpu, 1) * max(gpus, 1)

    def load_model(self):
        return towers.load(self.spec, resolve_device(self.device), self.precision)

    def worker_model(self):
        """The model this worker process applies (call it in ``DoFn.setup``, never at launch).

        Its own copy (``load_model``; one per process, shared by the handlers of
        one CLIP model), or with ``copies_per_gpu`` a proxy to one of the
        machine's shared copies (Beam's ``MultiProcessShared``), picked by pid.
        """
        if not self.share_model_across_processes():
            return self.load_model()
        import hashlib
        import os

        from apache_beam.utils import multi_process_shared

        copy = os.getpid() % self.model_copies()
        tag = f"catalog_index_{hashlib.sha256(repr(self.spec).encode()).hexdigest()[:16]}_{copy}"
        return multi_process_shared.MultiProcessShared(self.load_model, tag=tag, always_proxy=True).acquire()

    def _encode(self, model, batch) -> np.ndarray:
        raise NotImplementedError

    def apply(self, model, batch: Sequence[Any]) -> list:
        """One output per input (a vector, or an :class:`EncodeFailure`), in order.

        ``batch`` is a list, or an array whose rows are the inputs. A batch that
        raises is retried item by item so only the culprits fail.
        """
        # Encoder wall time per batch (µs), retries included: what incremental runs save,
        # readable from the PipelineResult (pipeline.beam_metrics.encoder_seconds).
        started = time.perf_counter()
        finite = None
        try:
            raw = self._encode(model, batch)
            if isinstance(raw, np.ndarray) and raw.ndim == 2:
                finite = np.isfinite(raw).all(axis=1)  # one check over the batch, not one call per row
            outputs: list = list(raw)
        except Exception as batch_error:  # noqa: BLE001 - isolate the culprit below
            finite = None
            _LOG.warning("%s batch of %d failed (%s); retrying item by item", self.modality, len(batch), batch_error)
            outputs = []
            for i in range(len(batch)):
                try:
                    outputs.append(self._encode(model, batch[i:i + 1])[0])
                except Exception as e:  # noqa: BLE001
                    outputs.append(EncodeFailure(Reason.ENCODE_FAILED, f"{type(e).__name__}: {e}"))
        Metrics.distribution(self.get_metrics_namespace(), ENCODE_US).update(
            int(round((time.perf_counter() - started) * 1e6)))
        bad = (np.flatnonzero(~finite).tolist() if finite is not None else
               [i for i, out in enumerate(outputs) if isinstance(out, np.ndarray) and not np.all(np.isfinite(out))])
        for i in bad:
            outputs[i] = EncodeFailure(Reason.NONFINITE_VECTOR, f"{self.spec.name} produced NaN/inf")
        return outputs

    def run_inference(self, batch: Sequence[Any], model, inference_args=None) -> Iterable[PredictionResult]:
        batch = list(batch)
        return [PredictionResult(example, out, self.spec.name) for example, out in zip(batch, self.apply(model, batch))]

    def batch_elements_kwargs(self) -> dict:
        # min == max: full batches whenever the bundle has enough elements. Letting BatchElements grow
        # from 1 cost short batches at the start of every bundle, each padded to a fixed shape.
        size = self.batch_size or AUTO_MAX_BATCH
        return {"min_batch_size": size, "max_batch_size": size}

    def get_metrics_namespace(self) -> str:
        return f"catalog_index.encode.{self.modality}"

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(x.nbytes if isinstance(x, np.ndarray) else len(str(x).encode()) for x in batch)


class TextEmbeddingHandler(_EmbeddingHandler):
    """Text -> unit vector through a CLIP text tower or a sentence encoder."""

    modality = "text"

    def _encode(self, model, batch: list) -> np.ndarray:
        return model.encode_text([str(t) for t in batch], self.batch_size)


class ImageEmbeddingHandler(_EmbeddingHandler):
    """Preprocessed pixels [3, S, S] -> unit vector through a CLIP image tower."""

    modality = "image"

    def __init__(self, spec: ModelSpec, **kwargs):
        if not families.get(spec.family).encodes("image"):
            raise ValueError(f"{spec.family} has no image tower; use a model of a family in {IMAGE_FAMILIES}")
        super().__init__(spec, **kwargs)

    def _encode(self, model, batch) -> np.ndarray:
        if isinstance(batch, (np.ndarray, torch.Tensor)):  # a batch already stacked (the embed stage, nvJPEG)
            return model.encode_image(batch, self.batch_size)
        if len(batch) and isinstance(batch[0], torch.Tensor):
            return model.encode_image(torch.stack(list(batch)), self.batch_size)
        return model.encode_image(np.stack(batch), self.batch_size)


class TranscriptEmbeddingHandler(TextEmbeddingHandler):
    """An audio clip's transcript -> unit vector through a text tower (spoken = typed text)."""

    modality = "audio"


class ClapAudioHandler(_EmbeddingHandler):
    """Mono waveform at the CLAP model's rate -> unit vector through CLAP's audio tower."""

    modality = "audio"

    def __init__(self, spec: ModelSpec, **kwargs):
        if spec.family not in AUDIO_FAMILIES:  # the registry's sound families (a recognizer takes audio too)
            raise ValueError(f"{spec.family} has no audio tower; use an {' or '.join(AUDIO_FAMILIES)} model")
        super().__init__(spec, **kwargs)

    def _encode(self, model, batch: list) -> np.ndarray:
        return model.encode_audio(list(batch), self.batch_size)


class AsrHandler(_EmbeddingHandler):
    """16 kHz mono waveform -> :class:`encoders.asr.Transcript` (speech recognition, batched)."""

    modality = "asr"

    def __init__(self, spec, **kwargs):  # an encoders.asr.AsrSpec
        super().__init__(spec, **kwargs)

    def load_model(self):
        from encoders import asr

        return asr.load(self.spec, resolve_device(self.device), self.precision)

    def _encode(self, model, batch: list) -> list:
        return model.transcribe(list(batch), self.batch_size)


class ImageBytesHandler(ImageEmbeddingHandler):
    """Encoded images (:class:`ImageBytes`) -> unit vectors, decoded as a batch on the model's device.

    nvJPEG on CUDA with a per-item PIL fallback (``gpu_decode.decode_batch``);
    an image neither can decode becomes an :class:`EncodeFailure` at the
    decode stage, and its batch-mates are encoded as usual.
    """

    image_decode = "gpu"

    def __init__(self, spec: ModelSpec, preprocess: ImagePreprocess, max_image_pixels: int, **kwargs):
        super().__init__(spec, **kwargs)
        self.preprocess, self.max_image_pixels = preprocess, max_image_pixels

    def apply(self, model, batch: Sequence[Any]) -> list:
        from encoders import gpu_decode

        batch = list(batch)
        decoded = gpu_decode.decode_batch([b.data for b in batch], self.preprocess, model.device,
                                          self.max_image_pixels)
        ok = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        encoded = iter(super().apply(model, torch.stack([decoded[i] for i in ok])) if ok else [])
        outputs: list = []
        for example, d in zip(batch, decoded):
            if isinstance(d, torch.Tensor):
                outputs.append(next(encoded))
            else:
                outputs.append(EncodeFailure(d.reason, d.detail, Stage.DECODE, example.uri))
        return outputs

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(len(b.data) for b in batch)
