"""Regenerate the bundled sample catalog from photos that installed packages carry.

Run from the repository root::

    .venv/bin/python sample_catalog/build.py

Inputs (hand-written, in this directory):
    items.json        the item definitions: ids, titles, descriptions, photo names
    paraphrases.json  English paraphrase queries, checked against items.json
    queries.jsonl     labelled retrieval queries, checked against items.json

Outputs (generated, deterministic for fixed package versions):
    images/<name>.jpg  RGB JPEG, quality 85, longer side at most 320 px
    audio/<item>.<ext> 16 kHz mono clips: spoken descriptions synthesized with
                       espeak-ng (Debian ``espeak-ng``), and one synthesized
                       product sound (a chime, no speech); WAV, FLAC or OGG/Vorbis
    catalog.parquet    one row per item; ``image_uris``/``audio_uri`` are relative to this directory

Audio is only regenerated when ``espeak-ng`` is installed (``--skip-audio``
keeps the committed clips); the committed clips are what the tests use.

Every photo comes from files shipped inside the scikit-image and scikit-learn
wheels (``skimage.data`` and ``sklearn.datasets.load_sample_image``); nothing
is downloaded.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image
from skimage.util import img_as_ubyte
from sklearn.datasets import load_sample_image

HERE = Path(__file__).resolve().parent
IMAGES_DIR = HERE / "images"
AUDIO_DIR = HERE / "audio"
AUDIO_RATE = 16_000
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
ESPEAK_ARGS = ["-v", "en-us", "-s", "150"]  # voice and words per minute
MAX_SIDE = 320
JPEG_QUALITY = 85

# Photo name -> loader. Each loader reads a file bundled in the wheel (no network).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "brick": skimage.data.brick,
    "camera": skimage.data.camera,
    "cell": skimage.data.cell,
    "checkerboard": skimage.data.checkerboard,
    "chelsea": skimage.data.chelsea,
    "clock": skimage.data.clock,
    "coffee": skimage.data.coffee,
    "coins": skimage.data.coins,
    "colorwheel": skimage.data.colorwheel,
    "grass": skimage.data.grass,
    "gravel": skimage.data.gravel,
    "horse": skimage.data.horse,
    "hubble_deep_field": skimage.data.hubble_deep_field,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "logo": skimage.data.logo,
    "microaneurysms": skimage.data.microaneurysms,
    "moon": skimage.data.moon,
    "motorcycle_left": lambda: skimage.data.stereo_motorcycle()[0],
    "motorcycle_right": lambda: skimage.data.stereo_motorcycle()[1],
    "page": skimage.data.page,
    "phantom": skimage.data.shepp_logan_phantom,
    "retina": skimage.data.retina,
    "rocket": skimage.data.rocket,
    "text": skimage.data.text,
    "china": lambda: load_sample_image("china.jpg"),
    "flower": lambda: load_sample_image("flower.jpg"),
}

SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("image_uris", pa.list_(pa.string())),
        pa.field("audio_uri", pa.string()),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("lang", pa.string()),
    ]
)


def to_rgb_image(array: np.ndarray) -> Image.Image:
    """Converts a grayscale, bool, float or RGBA array to an RGB uint8 PIL image."""
    if array.dtype != np.uint8:
        array = img_as_ubyte(array)  # bool -> {0, 255}; float in [0, 1] -> [0, 255]
    image = Image.fromarray(array)
    if image.mode == "RGBA":  # flatten transparency onto white, not black
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def write_photo(name: str) -> str:
    """Saves one photo as ``images/<name>.jpg`` and returns its catalog-relative path."""
    image = to_rgb_image(PHOTOS[name]())
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # keeps aspect, never enlarges
    image.save(IMAGES_DIR / f"{name}.jpg", "JPEG", quality=JPEG_QUALITY)
    return f"images/{name}.jpg"


def _chime(seconds: float = 1.5) -> np.ndarray:
    """A doorbell-like two-tone chime with decaying harmonics: a product sound without speech."""
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    wave = np.zeros_like(t)
    for start, freq in ((0.0, 659.25), (0.6, 523.25)):
        on = t >= start
        local = t[on] - start
        wave[on] += sum(np.sin(2 * np.pi * freq * k * local) / k for k in (1, 2, 3)) * np.exp(-3 * local)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def _speak(text: str) -> np.ndarray:
    """English speech from espeak-ng, as 16 kHz mono float32."""
    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", *ESPEAK_ARGS, "--stdout", text], check=True, capture_output=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return soxr.resample(samples.mean(axis=1), rate, AUDIO_RATE, quality="HQ").astype(np.float32)


def write_audio(item: dict[str, Any]) -> str:
    """Synthesizes one item's clip as ``audio/<item_id>.<ext>`` and returns its catalog-relative path."""
    import soundfile as sf

    spec = item["audio"]
    samples = _speak(spec["speech"]) if "speech" in spec else _chime()
    container, subtype = AUDIO_FORMATS[spec["format"]]
    path = AUDIO_DIR / f"{item['item_id']}.{spec['format']}"
    sf.write(path, samples, AUDIO_RATE, format=container, subtype=subtype)
    return audio_uri(item)


def audio_uri(item: dict[str, Any]) -> str | None:
    return f"audio/{item['item_id']}.{item['audio']['format']}" if item.get("audio") else None


def build_table(items: list[dict[str, Any]]) -> pa.Table:
    """Turns the item definitions into the catalog table."""
    rows = [
        {
            "item_id": item["item_id"],
            "title": item["title"],
            "description": item["description"],
            "image_uris": [f"images/{n}.jpg" for n in item["images"]] if item["images"] else None,
            "audio_uri": audio_uri(item),
            "category": item["category"],
            "price": float(item["price"]),
            "lang": item["lang"],
        }
        for item in items
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def check_queries(items: list[dict[str, Any]]) -> None:
    """Fails if paraphrases.json or queries.jsonl name an unknown item or image."""
    english = {i["item_id"] for i in items if i["lang"] == "en" and i["description"]}
    for p in json.loads((HERE / "paraphrases.json").read_text(encoding="utf-8")):
        assert p["item_id"] in english, f"paraphrase targets no English described item: {p}"
    ids = {i["item_id"] for i in items}
    for line in (HERE / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        assert q["modality"] in ("text", "image") and q["relevant"], q
        assert set(q["relevant"]) <= ids, f"unknown relevant id in {q}"
        if q["modality"] == "image":
            assert (HERE / q["query"]).is_file(), f"missing query image in {q}"


def main() -> None:
    items: list[dict[str, Any]] = json.loads((HERE / "items.json").read_text(encoding="utf-8"))
    ids = [i["item_id"] for i in items]
    assert len(ids) == len(set(ids)), "item_id values must be unique"
    assert all(i["lang"] in ("en", "zh") for i in items)

    IMAGES_DIR.mkdir(exist_ok=True)
    used = sorted({name for i in items for name in i["images"] or []})
    for stale in IMAGES_DIR.glob("*.jpg"):
        if stale.stem not in used:
            stale.unlink()
    for name in used:
        write_photo(name)

    with_audio = [i for i in items if i.get("audio")]
    if "--skip-audio" in sys.argv or shutil.which("espeak-ng") is None:
        missing = [audio_uri(i) for i in with_audio if not (HERE / audio_uri(i)).is_file()]
        if missing:
            raise SystemExit(f"espeak-ng is needed to synthesize {missing} (apt-get install -y espeak-ng)")
        print("audio: keeping the committed clips (espeak-ng not used)")
    else:
        AUDIO_DIR.mkdir(exist_ok=True)
        wanted = {audio_uri(i) for i in with_audio}
        for stale in AUDIO_DIR.iterdir():
            if f"audio/{stale.name}" not in wanted:
                stale.unlink()
        for item in with_audio:
            write_audio(item)

    table = build_table(items)
    pq.write_table(table, HERE / "catalog.parquet")
    check_queries(items)

    size = sum(p.stat().st_size for p in IMAGES_DIR.glob("*.jpg"))
    audio_size = sum(p.stat().st_size for p in AUDIO_DIR.glob("*")) if AUDIO_DIR.is_dir() else 0
    print(f"wrote {table.num_rows} items, {len(used)} photos ({size / 1e6:.2f} MB), "
          f"{len(with_audio)} audio clips ({audio_size / 1e6:.2f} MB) to {HERE}")


if __name__ == "__main__":
    main()
