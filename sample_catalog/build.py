"""Regenerate the bundled sample catalog from photos that installed packages carry.

Run from the repository root::

    .venv/bin/python sample_catalog/build.py

Inputs (hand-written, in this directory):
    items.json        the item definitions: ids, titles, descriptions, photo names
    paraphrases.json  English paraphrase queries, checked against items.json
    queries.jsonl     labelled retrieval queries, checked against items.json

Outputs (generated, deterministic for fixed package versions):
    images/<name>.jpg  RGB JPEG, quality 85, longer side at most 320 px
    catalog.parquet    one row per item; ``image_uris`` are relative to this directory

Every photo comes from files shipped inside the scikit-image and scikit-learn
wheels (``skimage.data`` and ``sklearn.datasets.load_sample_image``); nothing
is downloaded.
"""
from __future__ import annotations

import json
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


def build_table(items: list[dict[str, Any]]) -> pa.Table:
    """Turns the item definitions into the catalog table."""
    rows = [
        {
            "item_id": item["item_id"],
            "title": item["title"],
            "description": item["description"],
            "image_uris": [f"images/{n}.jpg" for n in item["images"]] if item["images"] else None,
            "audio_uri": None,  # spoken audio is added later
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

    table = build_table(items)
    pq.write_table(table, HERE / "catalog.parquet")
    check_queries(items)

    size = sum(p.stat().st_size for p in IMAGES_DIR.glob("*.jpg"))
    print(f"wrote {table.num_rows} items, {len(used)} photos ({size / 1e6:.2f} MB) to {HERE}")


if __name__ == "__main__":
    main()
