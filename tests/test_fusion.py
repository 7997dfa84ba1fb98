import math

import numpy as np
import pytest

from encoders.fusion import FusionConfig, FusionError, Layout, fuse

RNG = np.random.default_rng(7)


def _unit(dim):
    v = RNG.normal(size=dim)
    return v / np.linalg.norm(v)


LAYOUT = Layout.from_dims({"clip": 8, "text": 4})


def test_one_modality_fuses_to_itself_normalized():
    v = RNG.normal(size=8) * 3
    out = fuse({"clip": {"image": [v]}}, LAYOUT)
    np.testing.assert_allclose(out[:8], v / np.linalg.norm(v), atol=1e-6)
    assert np.all(out[8:] == 0) and out.dtype == np.float32
    assert abs(np.linalg.norm(out) - 1) < 1e-6


def test_weights_renormalize_over_present_modalities():
    t, i = _unit(8), _unit(8)
    cfg = FusionConfig(modality_weights=(("text", 3.0), ("image", 1.0)))
    both = fuse({"clip": {"text": [t], "image": [i]}}, LAYOUT, cfg)
    expected = (3 * t + i) / np.linalg.norm(3 * t + i)
    np.testing.assert_allclose(both[:8], expected, atol=1e-6)
    only_text = fuse({"clip": {"text": [t]}}, LAYOUT, cfg)
    np.testing.assert_allclose(only_text[:8], t, atol=1e-6)  # no penalty for the missing image


def test_several_images_are_averaged_within_the_image_modality():
    a, b, t = _unit(8), _unit(8), _unit(8)
    out = fuse({"clip": {"image": [a, b], "text": [t]}}, LAYOUT)
    img = (a + b) / np.linalg.norm(a + b)
    np.testing.assert_allclose(out[:8], (img + t) / np.linalg.norm(img + t), atol=1e-6)


def test_space_blocks_give_weighted_sum_of_cosines():
    cfg = FusionConfig(space_weights=(("clip", 2.0), ("text", 1.0)))
    item = fuse({"clip": {"image": [_unit(8)]}, "text": {"text": [_unit(4)]}}, LAYOUT, cfg)
    qc, qt = _unit(8), _unit(4)
    query = fuse({"clip": {"text": [qc]}, "text": {"text": [qt]}}, LAYOUT, cfg)
    cos_clip = float(item[:8] @ qc) / math.sqrt(2 / 3)
    cos_text = float(item[8:] @ qt) / math.sqrt(1 / 3)
    assert float(item @ query) == pytest.approx(2 / 3 * cos_clip + 1 / 3 * cos_text, abs=1e-6)


def test_nothing_usable_or_nonfinite_is_an_error():
    with pytest.raises(FusionError, match="no usable"):
        fuse({}, LAYOUT)
    with pytest.raises(FusionError, match="non-finite"):
        fuse({"clip": {"text": [np.full(8, np.nan)]}}, LAYOUT)
    with pytest.raises(FusionError, match="dim"):
        fuse({"clip": {"text": [np.ones(5)]}}, LAYOUT)


def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="not one of"):
        FusionConfig(mode="max")
    with pytest.raises(ValueError, match="video"):
        FusionConfig(modality_weights=(("video", 1.0),))
    with pytest.raises(ValueError, match=">= 0"):
        FusionConfig(space_weights=(("clip", -1.0),))
    cfg = FusionConfig(modality_weights=(("text", 2.0),), space_weights=(("clip", 0.5),))
    assert FusionConfig.from_json(cfg.to_json()) == cfg
    assert Layout.from_json(LAYOUT.to_json()) == LAYOUT
