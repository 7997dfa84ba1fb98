"""The cached CLIP tokenizer gives exactly open_clip's token ids."""
import random
import string

import open_clip
import pytest
import torch

from encoders import clip_tokenizer

TRICKY = [
    "", " ", "   \t\n ", "x", "Red Ceramic MUG", "dog's ball, the cat'll sit; we're done", "1234567890 mm",
    "a  b\tc\nd\r\ne", "&amp; &lt;b&gt; &amp;amp;quot; &#39;", "<b>bold</b> & more", "fish &chips",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", "\u7ea2\u8272\u9676\u74f7\u676f", "mojibake: caf\u00c3\u00a9 \u00e2\u0080\u0099",
    "\u201ccurly\u201d \u2018quotes\u2019", "\ufb01ne \uff37\uff49\uff44\uff45", "emoji \U0001f600\U0001f44d",
    "ctrl\x00\x07\x1b[31mred\x1b[0m\x7f", "zero\u200bwidth", "line\u2028sep", "<|startoftext|> <end_of_text>",
    "water bottle " * 60, "\u00e9" * 200,
]


@pytest.fixture(scope="module")
def pair():
    stock = open_clip.get_tokenizer("ViT-B-32")
    return stock, clip_tokenizer.fast(stock)


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.printable + "\u00e9\u00fc\u4e2d\u6587\u2019\u201c\u00a0\x00\x1b&<>;#"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


def test_fast_is_the_cached_tokenizer_for_open_clips_default(pair):
    stock, fast = pair
    assert isinstance(fast, clip_tokenizer.CachedClipTokenizer)
    assert (fast.sot_token_id, fast.eot_token_id, fast.context_length) == (stock.sot_token_id, stock.eot_token_id, 77)


@pytest.mark.parametrize("source", ["tricky", "random", "catalog"])
def test_ids_are_open_clips(pair, source):
    stock, fast = pair
    if source == "tricky":
        texts = TRICKY
    elif source == "random":
        texts = _random_texts(2000, seed=0)
    else:
        from bench.bench_text_context import catalog_texts

        texts = catalog_texts(500)
    a, b = stock(texts), fast(texts)
    assert a.dtype == b.dtype == torch.long and a.shape == b.shape == (len(texts), 77)
    mismatched = [t for t, x, y in zip(texts, a, b) if not torch.equal(x, y)]
    assert not mismatched, mismatched[:3]
    assert torch.equal(fast(texts), a)  # again, from the word cache
    assert torch.equal(fast(texts[0]), stock(texts[0])) and torch.equal(fast(texts, 16), stock(texts, 16))


def test_a_full_word_cache_starts_over(pair, monkeypatch):
    stock, _ = pair
    fast = clip_tokenizer.CachedClipTokenizer(stock)
    monkeypatch.setattr(clip_tokenizer, "MAX_CACHED_WORDS", 4)
    texts = ["one two three four five six seven", "eight nine ten"]
    assert torch.equal(fast(texts), stock(texts)) and len(fast._words) <= 4


def test_other_tokenizers_are_used_as_they_are():
    canon = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    assert clip_tokenizer.fast(canon) is canon
    masked = open_clip.tokenizer.SimpleTokenizer(reduction_mask="simple")
    assert clip_tokenizer.fast(masked) is masked
    other = object()
    assert clip_tokenizer.fast(other) is other
