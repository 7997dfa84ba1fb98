import math

import numpy as np
import pytest

from encoders.fusion import FusionConfig, FusionError, Layout, batch_of, fuse, fuse_batch

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


# --- the three modes -------------------------------------------------------------------------------

ROUTES = [("text", "clip"), ("image", "clip"), ("text", "text")]
DIMS = {"clip": 8, "text": 4}
MODES = ("mean", "concat", "attention")


def _layout(mode, **kw):
    cfg = FusionConfig(mode=mode, **kw)
    return Layout.build(ROUTES, DIMS, cfg), cfg


def test_concat_layout_has_one_block_per_space_and_modality():
    layout, _ = _layout("concat")
    assert [(b.space, b.modality, b.offset) for b in layout.blocks] == [
        ("clip", "text", 0), ("clip", "image", 8), ("text", "text", 16)]
    assert layout.dim == 20 and Layout.from_json(layout.to_json()) == layout
    assert _layout("mean")[0] == _layout("attention")[0] == Layout.from_dims(DIMS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("present", [("clip/text",), ("clip/image",), ("text/text",), ("clip/image", "text/text"),
                                     ("clip/text", "clip/image", "text/text")])
def test_every_mode_gives_unit_vectors_for_items_missing_modalities(mode, present):
    layout, cfg = _layout(mode)
    vectors = {}
    for key in present:
        space, modality = key.split("/")
        vectors.setdefault(space, {})[modality] = [RNG.normal(size=DIMS[space]) * 5]
    out = fuse(vectors, layout, cfg)
    assert out.dtype == np.float32 and out.shape == (layout.dim,)
    assert abs(np.linalg.norm(out) - 1) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_one_modality_fuses_to_that_modality_normalized_in_every_mode(mode):
    layout, cfg = _layout(mode)
    v = RNG.normal(size=8) * 3
    out = fuse({"clip": {"image": [v]}}, layout, cfg)
    block = layout.block("clip", "image" if mode == "concat" else None)
    np.testing.assert_allclose(out[block.offset: block.offset + 8], v / np.linalg.norm(v), atol=1e-6)
    assert np.count_nonzero(out) == 8


def test_concat_inner_product_is_weighted_sum_of_block_cosines():
    cfg = FusionConfig(mode="concat", modality_weights=(("text", 2.0), ("image", 1.0)),
                       space_weights=(("clip", 1.0), ("text", 3.0)))
    layout = Layout.build(ROUTES, DIMS, cfg)
    ct, ci, tt = _unit(8), _unit(8), _unit(4)
    item = fuse({"clip": {"text": [ct], "image": [ci]}, "text": {"text": [tt]}}, layout, cfg)
    qc, qt = _unit(8), _unit(4)
    query = fuse({"clip": {"text": [qc]}, "text": {"text": [qt]}}, layout, cfg, query=True)
    w = {"ct": 1 * 2, "ci": 1 * 1, "tt": 3 * 2}
    total = sum(w.values())
    expected = (w["ct"] * (qc @ ct) + w["ci"] * (qc @ ci) + w["tt"] * (qt @ tt)) / total
    assert float(item @ query) == pytest.approx(expected, abs=1e-6)

    # an item without an image: weighted mean of the cosines it has, times sqrt(its weight share)
    text_only = fuse({"clip": {"text": [ct]}, "text": {"text": [tt]}}, layout, cfg)
    covered = w["ct"] + w["tt"]
    expected = np.sqrt(covered / total) * (w["ct"] * (qc @ ct) + w["tt"] * (qt @ tt)) / covered
    assert float(text_only @ query) == pytest.approx(expected, abs=1e-6)


def test_concat_query_fills_every_modality_block_of_its_space():
    layout, cfg = _layout("concat")
    q = _unit(8)
    query = fuse({"clip": {"image": [q]}}, layout, cfg, query=True)  # an image query, no text space
    for modality in ("text", "image"):
        b = layout.block("clip", modality)
        np.testing.assert_allclose(query[b.offset: b.offset + 8], q / np.sqrt(2), atol=1e-6)
    assert np.all(query[16:] == 0)


@pytest.mark.parametrize("mode", ("mean", "attention"))
def test_query_and_item_layouts_agree(mode):
    layout, cfg = _layout(mode)
    ct, tt = _unit(8), _unit(4)
    item = fuse({"clip": {"text": [ct]}, "text": {"text": [tt]}}, layout, cfg)
    query = fuse({"clip": {"text": [ct]}, "text": {"text": [tt]}}, layout, cfg, query=True)
    np.testing.assert_array_equal(item, query)
    assert float(item @ query) == pytest.approx(1.0, abs=1e-6)


def test_attention_agreement_rule_discounts_an_unrelated_photo():
    layout, cfg = _layout("attention")
    text = _unit(8)
    related = text + 0.3 * _unit(8)
    unrelated = -text + 0.1 * _unit(8)  # cosine < 0 with the description: weight 0
    mean_cfg = FusionConfig()
    fused_bad = fuse({"clip": {"text": [text], "image": [unrelated]}}, layout, cfg)
    np.testing.assert_allclose(fused_bad[:8], text, atol=1e-6)
    fused_ok = fuse({"clip": {"text": [text], "image": [related]}}, layout, cfg)
    r = related / np.linalg.norm(related)
    c = float(r @ text)
    expected = (text + c * r) / np.linalg.norm(text + c * r)
    np.testing.assert_allclose(fused_ok[:8], expected, atol=1e-6)
    # the same item under weighted average keeps the unrelated photo at full weight
    assert float(fuse({"clip": {"text": [text], "image": [unrelated]}}, layout, mean_cfg)[:8] @ text) < 0.5
    # without text there is no anchor: priors (= weighted average)
    a, b = _unit(8), _unit(8)
    np.testing.assert_allclose(fuse({"clip": {"image": [a, b]}}, layout, cfg),
                               fuse({"clip": {"image": [a, b]}}, layout, mean_cfg), atol=1e-6)


def test_learned_module_starts_as_weighted_average_and_matches_the_batched_fusion(tmp_path):
    import torch

    from encoders import attention

    layout, cfg = _layout("attention", modality_weights=(("text", 2.0), ("image", 1.0)))
    module = attention.FusionAttention.for_run(ROUTES, layout)
    items = [{"clip": {"text": [_unit(8)], "image": [_unit(8)]}, "text": {"text": [_unit(4)]}},
             {"clip": {"image": [_unit(8)]}},
             {"clip": {"text": [_unit(8)]}, "text": {"text": [_unit(4)]}}]
    mean_cfg = FusionConfig(modality_weights=cfg.modality_weights)
    for item in items:  # zero-initialized: exactly the weighted average
        np.testing.assert_allclose(fuse(item, layout, cfg, attention=module.weights_fn()),
                                   fuse(item, layout, mean_cfg), atol=1e-6)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape))
    x = {s: torch.zeros((3, len(ms), d), dtype=torch.float64) for s, ms, d in module.spec}
    mask = {s: torch.zeros((3, len(ms)), dtype=torch.bool) for s, ms, d in module.spec}
    for n, item in enumerate(items):
        for s, per in item.items():
            for m, vs in per.items():
                j = module.spaces[s].modalities.index(m)
                x[s][n, j], mask[s][n, j] = torch.from_numpy(vs[0]), True
    batched = attention.fuse_batch(module.double(), x, mask, cfg).detach().numpy()
    for n, item in enumerate(items):
        np.testing.assert_allclose(fuse(item, layout, cfg, attention=module.weights_fn()), batched[n], atol=1e-6)
    # saved and loaded with safetensors, with a sha256 check
    path = str(tmp_path / "m.safetensors")
    attention.save(module, path)
    loaded = attention.load(path, FusionConfig(mode="attention", attention_module=path).attention_sha256)
    np.testing.assert_allclose(fuse(items[0], layout, cfg, attention=loaded.weights_fn()),
                               fuse(items[0], layout, cfg, attention=module.weights_fn()), atol=1e-6)
    with pytest.raises(ValueError, match="changed"):
        attention.load(path, "0" * 64)
    with pytest.raises(ValueError, match="trained for"):
        loaded.check_layout([("text", "clip")], Layout.from_dims({"clip": 8}))


def test_fusion_config_modes_and_module_validation(tmp_path):
    with pytest.raises(ValueError, match="needs fusion mode 'attention'"):
        FusionConfig(mode="mean", attention_module=str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="cannot be read"):
        FusionConfig(mode="attention", attention_module=str(tmp_path / "nothing.safetensors"))
    for mode in MODES:
        cfg = FusionConfig(mode=mode, modality_weights=(("image", 0.5),))
        assert FusionConfig.from_json(cfg.to_json()) == cfg
    assert FusionConfig(mode="attention").to_json()["attention"]["rule"] == "agreement"


def _random_items(rng, n):
    """Items with random subsets of modalities (0-3 images), a few broken ones among them."""
    items = []
    for _ in range(n):
        v: dict = {}
        if rng.random() < 0.85:
            v.setdefault("clip", {})["text"] = [rng.normal(size=8).astype(np.float32)]
        images = int(rng.integers(0, 4))
        if images:
            v.setdefault("clip", {})["image"] = [rng.normal(size=8).astype(np.float32) for _ in range(images)]
        if rng.random() < 0.6:
            v.setdefault("text", {})["text"] = [rng.normal(size=4).astype(np.float32)]
        if rng.random() < 0.4:
            v.setdefault("clap", {})["audio"] = [rng.normal(size=6).astype(np.float32)]
        items.append(v)
    items[3] = {"clip": {"image": [np.full(8, np.nan, np.float32)]}, "text": {"text": [np.ones(4, np.float32)]}}
    items[5] = {"clip": {"text": [np.zeros(8, np.float32)]}}
    items[8] = {}
    return items


@pytest.mark.parametrize("query", [False, True])
@pytest.mark.parametrize("mode", ["mean", "concat", "attention"])
def test_batch_fusion_equals_per_item_fusion_and_isolates_bad_items(mode, query):
    rng = np.random.default_rng(11)
    items = _random_items(rng, 300)
    config = FusionConfig(mode=mode, modality_weights=(("audio", 2.0), ("image", 0.5), ("text", 1.0)),
                          space_weights=(("clip", 2.0),))
    layout = Layout.build([("text", "clip"), ("image", "clip"), ("text", "text"), ("audio", "clap")],
                          {"clip": 8, "text": 4, "clap": 6}, config)
    fused, errors = fuse_batch(len(items), batch_of(items), layout, config, query=query)
    again, errors_again = fuse_batch(len(items), batch_of(items), layout, config, query=query)
    assert fused.dtype == np.float32 and fused.shape == (len(items), layout.dim)
    assert np.array_equal(fused, again) and errors == errors_again  # bit-identical reruns
    assert "non-finite" in errors[3] and "zero norm" in errors[5] and "no usable" in errors[8]
    for i, v in enumerate(items):
        if errors[i] is not None:
            with pytest.raises(FusionError):
                fuse(v, layout, config, query=query)
            assert not fused[i].any()
            continue
        alone = fuse(v, layout, config, query=query)
        # an item's vector does not depend on its batch-mates, broken ones included
        assert np.abs(fused[i] - alone).max() <= 1e-6
        assert abs(float(np.linalg.norm(fused[i])) - 1.0) < 1e-5
    assert sum(e is None for e in errors) >= 250
