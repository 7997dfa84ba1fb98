"""The open_clip text tower over each text's own length bucket equals open_clip's full-context encode_text.

Tolerance: max |short - full| <= text_context.TOLERANCE (1e-6) over the
components of the fp32 unit vectors (measured on CPU: up to 3.1e-7, the
16-multiple lengths bit-identical); bit equality is asserted where it is the
pipeline's guarantee: batch invariance.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

from encoders import text_context, towers
from encoders.specs import ModelSpec

CPU = torch.device("cpu")
# mixed lengths in one sub-batch: empty, short, every bucket, and one truncated at the full 77 tokens
TEXTS = ["", "red mug", "Stainless steel water bottle. Keeps drinks cold for 24 hours, leak-proof lid.",
         "红色陶瓷杯 with a handle", "leather shoe " * 12, "wooden desk lamp " * 14, "lorem ipsum " * 200, "x"]


def _full(model: towers.OpenClipModel, texts: list[str], batch_size: int = 8) -> np.ndarray:
    return model.encode_tokens_full(model.tokenizer(texts), batch_size)


def _variant(tmp_path, **text_cfg) -> ModelSpec:
    """The tiny CLIP config with text_cfg overrides (and ``custom_text`` for a CustomTextCLIP).

    Named after its overrides: open_clip registers a config once per name and process.
    """
    from tests.conftest import TINY_CLIP_JSON

    config = json.loads(open(TINY_CLIP_JSON).read())
    custom = text_cfg.pop("custom_text", False)
    config["text_cfg"].update(text_cfg)
    if custom:
        config["custom_text"] = True
    name = "tiny-clip-" + "-".join(f"{k}-{v}" for k, v in sorted(text_cfg.items())) + ("-custom" if custom else "")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return ModelSpec("open_clip", str(path), "random")


def test_length_buckets():
    assert text_context.length_buckets(77) == (16, 32, 48, 64, 77)  # CUDA's: 5 shapes
    assert text_context.length_buckets(77, text_context.bucket_step(CPU)) == (8, 16, 24, 32, 40, 48, 56, 64, 72, 77)
    assert text_context.bucket_step(torch.device("cuda")) == 16
    assert text_context.length_buckets(64) == (16, 32, 48, 64)
    assert text_context.length_buckets(10) == (10,)
    with pytest.raises(ValueError, match="must be >= 1"):
        text_context.length_buckets(0)


def test_row_lengths_reach_the_pooled_token(tiny_clip_spec):
    model = towers.load(tiny_clip_spec, CPU)
    short = model.short_text
    assert short is not None and short.buckets == text_context.length_buckets(77, 8)  # CPU's buckets
    tokens = torch.zeros((6, 77), dtype=torch.long)
    eot = int(model.tokenizer.eot_token_id)
    for row, eot_at in enumerate((1, 7, 8, 63, 71, 76)):  # empty text: SOT, EOT; bucket edges; the full context
        tokens[row, 0], tokens[row, 1:eot_at], tokens[row, eot_at] = model.tokenizer.sot_token_id, 320, eot
    assert short.row_lengths(tokens).tolist() == [8, 8, 16, 64, 72, 77]
    coarse = dataclasses.replace(short, buckets=text_context.length_buckets(77, 16))
    assert coarse.row_lengths(tokens).tolist() == [16, 16, 16, 64, 77, 77]
    real = short.row_lengths(model.tokenizer(TEXTS))
    assert real[0] == 8 and real[6] == 77 and set(real) <= set(short.buckets)


def test_short_forward_equals_open_clip_encode_text(tiny_clip_spec):
    model = towers.load(tiny_clip_spec, CPU)
    assert model.short_text is not None
    for batch_size in (3, 8, 32):  # sub-batches that split and pad the length groups differently
        short, full = model.encode_text(TEXTS, batch_size), _full(model, TEXTS, batch_size)
        assert short.shape == full.shape == (len(TEXTS), model.dim) and short.dtype == np.float32
        assert float(np.abs(short - full).max()) <= text_context.TOLERANCE
    # and against open_clip's own call, tokens straight from its tokenizer
    with torch.inference_mode():
        reference = model.model.encode_text(model.tokenizer(TEXTS), normalize=True).numpy()
    assert float(np.abs(model.encode_text(TEXTS, 8) - reference).max()) <= text_context.TOLERANCE


def test_a_texts_vector_does_not_depend_on_its_batch_mates(tiny_clip_spec):
    model = towers.load(tiny_clip_spec, CPU)
    whole = model.encode_text(TEXTS, 4)
    alone = np.concatenate([model.encode_text([t], 4) for t in TEXTS])
    assert np.array_equal(whole, alone)
    assert np.array_equal(whole, model.encode_text(TEXTS[::-1], 4)[::-1])


def test_no_texts(tiny_clip_spec):
    model = towers.load(tiny_clip_spec, CPU)
    assert model.encode_text([], 8).shape[0] == 0


@pytest.mark.parametrize("overrides", [{"pool_type": "eos", "eos_id": 49407}, {"pool_type": "first"},
                                       {"custom_text": True}],
                         ids=["eos-pool", "first-pool", "custom-text-clip"])
def test_other_provable_towers_run_short(tmp_path, overrides):
    model = towers.OpenClipModel(_variant(tmp_path, **overrides), CPU)
    assert model.short_text is not None
    assert float(np.abs(model.encode_text(TEXTS, 8) - _full(model, TEXTS)).max()) <= text_context.TOLERANCE


@pytest.mark.parametrize("overrides, why", [
    ({"no_causal_mask": True}, "no causal mask"),
    ({"pool_type": "last"}, "pools 'last'"),
    ({"embed_cls": True, "custom_text": True}, "CLS token"),
    ({"no_causal_mask": True, "custom_text": True}, "no causal mask"),
], ids=["bidirectional", "last-pool", "cls-token", "bidirectional-custom-text"])
def test_unprovable_towers_keep_the_full_forward(tmp_path, overrides, why):
    model = towers.OpenClipModel(_variant(tmp_path, **overrides), CPU)
    assert model.short_text is None
    assert why in text_context.for_model(model.model)[1]
    assert np.array_equal(model.encode_text(TEXTS, 8), _full(model, TEXTS))


def test_a_failed_load_check_falls_back_to_the_full_forward(tiny_clip_spec, monkeypatch, caplog):
    monkeypatch.setattr(text_context, "TOLERANCE", -1.0)  # any difference, even 0, is too much
    model = towers.OpenClipModel(tiny_clip_spec, CPU)
    assert model.short_text is None and "using the full one" in caplog.text
    assert np.array_equal(model.encode_text(TEXTS, 8), _full(model, TEXTS))


@pytest.mark.slow
def test_vit_b_32_text_tower_short_equals_full():
    """The real-size ViT-B-32 text tower (12 layers, 512 wide; random weights: no CLIP weights exist offline)."""
    model = towers.OpenClipModel(ModelSpec("open_clip", "ViT-B-32", "random"), CPU)
    assert model.short_text is not None
    short, full = model.encode_text(TEXTS, 8), _full(model, TEXTS)
    assert float(np.abs(short - full).max()) <= text_context.TOLERANCE


# ---- transformers towers that mask their padding: padding trimmed to each text's bucket ----

def _padded_to_max_length(model, texts: list[str], max_length: int, mask: bool = True) -> np.ndarray:
    """The reference: every text padded to ``max_length`` (as before), one forward."""
    enc = model.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    kwargs = {"input_ids": enc["input_ids"], **({"attention_mask": enc["attention_mask"]} if mask else {})}
    with torch.inference_mode():
        out = towers._features(model.model.get_text_features(**kwargs)).float()
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def test_bucket_groups_and_padding():
    groups = text_context.bucket_groups([2, 16, 17, 77, 1], (16, 32, 48, 64, 77))
    assert {k: v.tolist() for k, v in groups.items()} == {16: [0, 1, 4], 32: [2], 77: [3]}
    ids, mask = text_context.padded([[5, 6], [7]], 4, pad_id=1)
    assert ids.tolist() == [[5, 6, 1, 1], [7, 1, 1, 1]] and mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("kind", ["clip", "chinese_clip", "siglip"])
def test_transformers_clip_text_equals_max_length_padding(tiny_hf_clip_dirs, kind):
    model = towers.HfClipModel(ModelSpec("hf_clip", tiny_hf_clip_dirs[kind], "pretrained"), CPU)
    reference = _padded_to_max_length(model, TEXTS, model.max_length, mask=kind != "siglip")
    for batch_size in (3, 8):
        assert float(np.abs(model.encode_text(TEXTS, batch_size) - reference).max()) <= text_context.TOLERANCE


def test_clap_text_equals_max_length_padding(tiny_clap_dir):
    model = towers.HfClapModel(ModelSpec("hf_clap", tiny_clap_dir, "random"), CPU)
    max_length = min(int(model.model.config.text_config.max_position_embeddings) - 2, 77)
    reference = _padded_to_max_length(model, TEXTS, max_length)
    assert float(np.abs(model.encode_text(TEXTS, 4) - reference).max()) <= text_context.TOLERANCE
    alone = np.concatenate([model.encode_text([t], 4) for t in TEXTS])
    assert np.array_equal(model.encode_text(TEXTS, 4), alone)
