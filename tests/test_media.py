import io

import numpy as np
import pytest
from PIL import Image

from encoders.media import FetchPolicy, MediaError, decode_image, fetch_bytes, resolve_uri
from encoders.preprocess import ImagePreprocess
from schemas.dead_letter import Reason


def _image_bytes(fmt="JPEG", size=(40, 30), color=(200, 10, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


def test_resolve_uri_relative_to_catalog_dir():
    assert resolve_uri("images/a.jpg", "/data/cat") == "/data/cat/images/a.jpg"
    assert resolve_uri("a.jpg", "gs://bucket/cat") == "gs://bucket/cat/a.jpg"
    assert resolve_uri("/abs/a.jpg", "/data") == "/abs/a.jpg"
    assert resolve_uri("https://x/a.jpg", "/data") == "https://x/a.jpg"


def test_fetch_local_file_and_caps(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    assert fetch_bytes(str(path)) == b"x" * 100
    with pytest.raises(MediaError) as err:
        fetch_bytes(str(path), FetchPolicy(max_bytes=99))
    assert err.value.reason is Reason.TOO_LARGE


def test_fetch_missing_and_directory(tmp_path):
    with pytest.raises(MediaError) as err:
        fetch_bytes(str(tmp_path / "nope.jpg"))
    assert err.value.reason is Reason.MISSING_MEDIA


def test_http_is_off_unless_allowed():
    with pytest.raises(MediaError) as err:
        fetch_bytes("https://example.invalid/a.jpg")
    assert err.value.reason is Reason.FORBIDDEN_URI


def test_unregistered_scheme_is_forbidden():
    with pytest.raises(MediaError) as err:
        fetch_bytes("nosuchscheme://bucket/a.jpg")
    assert err.value.reason in (Reason.FORBIDDEN_URI, Reason.MISSING_MEDIA, Reason.FETCH_FAILED)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_decode_formats_to_rgb(fmt):
    img = decode_image(_image_bytes(fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_decode_composites_alpha_on_white():
    img = decode_image(_image_bytes("PNG", mode="RGBA", color=(0, 0, 0, 0)))
    assert img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data, reason", [
    (b"", Reason.DECODE_FAILED),
    (_image_bytes("JPEG")[:60], Reason.DECODE_FAILED),  # truncated JPEG
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, Reason.DECODE_FAILED),
    (b"%PDF-1.4 not an image", Reason.UNSUPPORTED_FORMAT),
])
def test_bad_images_get_reason_codes(data, reason):
    with pytest.raises(MediaError) as err:
        decode_image(data)
    assert err.value.reason is reason


def test_pixel_cap_refuses_before_decoding():
    with pytest.raises(MediaError) as err:
        decode_image(_image_bytes("PNG", size=(200, 200)), max_pixels=100 * 100)
    assert err.value.reason is Reason.TOO_LARGE


def test_preprocess_shape_crop_and_normalization():
    pre = ImagePreprocess(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre(Image.new("RGB", (64, 32), (255, 0, 127)))
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 8, 8], [1.0, -1.0, 127 / 255 * 2 - 1], atol=1e-2)
    squash = ImagePreprocess(size=16, mean=(0, 0, 0), std=(1, 1, 1), resize="squash")
    assert squash(Image.new("RGB", (64, 32))).shape == (3, 16, 16)
