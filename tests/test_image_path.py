"""One image-encode path: a query photo and a catalog photo become the same tensor, bit for bit.

The embed stage (fetch threads + one batch normalize), the query encoder,
fit-fusion (``encoders.media.load_image``) and the GPU path's PIL fallback all
go through ``encoders.media.decode_for_tower`` and ``ImagePreprocess.normalize``;
this test holds them to it on a JPEG large enough for draft scaling.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import types

import numpy as np
import pytest
from PIL import Image

from encoders import media, towers
from encoders.media import FetchPolicy
from encoders.specs import ModelSpec
from pipeline.query.encoder import QueryEncoder
from pipeline.stages.fetch import ImageFetcher
from schemas.catalog import CatalogItem
from tests.conftest import TINY_CLIP_JSON


def _photo(path, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.int16)
    rgb += rng.integers(-20, 20, size=rgb.shape, dtype=np.int16)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return path.read_bytes()


def _stage_tensors(paths, policy, preprocess) -> np.ndarray:
    """What the embed stage hands the image tower: the fetcher's uint8 pixels, normalized as one batch."""
    fetcher = ImageFetcher(policy, preprocess)
    items = [CatalogItem(f"i{n}", title="t", image_uris=(p.name,), base_uri=str(p.parent)) for n, p in enumerate(paths)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results, _ = ImageFetcher.collect(fetcher.submit(pool, items))
    pixels = [out[0] for _, out in results]
    return preprocess.normalize(np.stack(pixels))  # as pipeline/stages/embed.py does


@pytest.mark.parametrize("spec", [ModelSpec("open_clip", TINY_CLIP_JSON, "random"),
                                  ModelSpec("open_clip", "ViT-B-32", "random")], ids=["tiny-clip", "vit-b-32"])
def test_query_photo_and_catalog_photo_become_the_same_tensor(tmp_path, spec):
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    data = _photo(big, 1900, 1300, 0)
    _photo(small, 300, 260, 1)
    preprocess = towers.image_preprocess(spec)
    # the big JPEG is decoded at reduced scale (PIL draft), so that step is on the compared path
    drafted = media.decode_image(data, draft_size=preprocess.draft_size)
    assert drafted.size[0] < 1900 and min(drafted.size) >= preprocess.size
    policy = FetchPolicy().with_default_root(str(tmp_path))

    stage = _stage_tensors([big, small], policy, preprocess)
    query = QueryEncoder._pixels(types.SimpleNamespace(policy=policy), spec, str(big))  # type: ignore[arg-type]
    fit_fusion, digest = media.load_image(str(big), policy, preprocess)  # fit_fusion.encode_items' path

    assert stage.dtype == query.dtype == np.float32 and query.shape == (3, preprocess.size, preprocess.size)
    assert stage[0].tobytes() == query.tobytes() == fit_fusion.tobytes()
    assert stage[1].tobytes() == media.load_image(str(small), policy, preprocess)[0].tobytes()
    assert stage[0].tobytes() != stage[1].tobytes()
    # the comparison can fail: a decode that skips the draft step gives other bits
    full = preprocess.normalize(preprocess.resize_crop(media.decode_image(data))[None])[0]
    assert full.tobytes() != query.tobytes()
    assert digest == hashlib.sha256(data).hexdigest()


def test_gpu_paths_pil_fallback_is_the_same_tensor_on_cpu(tmp_path):
    """--image_decode gpu falls back to the CPU decode per item and normalizes in torch: on a CPU
    device, the same bits (on CUDA the normalize's rounding is not measured here: no GPU)."""
    import torch

    from encoders.gpu_decode import _pil_path, normalize_tensor

    spec = ModelSpec("open_clip", TINY_CLIP_JSON, "random")
    preprocess = towers.image_preprocess(spec)
    data = _photo(tmp_path / "a.jpg", 1200, 900, 2)
    policy = FetchPolicy().with_default_root(str(tmp_path))
    fallback = normalize_tensor(_pil_path(data, preprocess, policy.max_image_pixels, torch.device("cpu"))[None],
                                preprocess)[0]
    assert fallback.dtype == torch.float32 and fallback.numpy().tobytes() == media.load_image(str(tmp_path / "a.jpg"), policy,
                                                                          preprocess)[0].tobytes()
