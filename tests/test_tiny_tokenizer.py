"""The committed tiny WordPiece tokenizer is what its script builds, and it keeps texts apart."""
from __future__ import annotations

from tests.conftest import TINY_WORDPIECE, _tokenizers_script as _script


def test_committed_files_are_the_scripts_output():
    built = _script().build()
    assert sorted(p.name for p in TINY_WORDPIECE.iterdir()) == sorted(built)
    for name, content in built.items():
        assert (TINY_WORDPIECE / name).read_text(encoding="utf-8") == content, (
            f"{name} is stale: run .venv/bin/python tests/data/make_tiny_tokenizer.py")
    assert sum(len(c.encode()) for c in built.values()) < 16_000  # a few KB, not a real vocabulary


def test_it_loads_as_a_fast_bert_tokenizer_and_sample_texts_need_no_unk():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY_WORDPIECE))
    assert tok.is_fast and (tok.pad_token_id, tok.unk_token) == (0, "[UNK]")
    texts = _script().sample_texts()
    ids = [tok(t)["input_ids"] for t in texts]
    assert all(tok.unk_token_id not in i for i in ids)
    # distinct texts stay distinct token sequences (words outside the vocabulary fall back to characters)
    assert len({tuple(i) for i in ids}) == len(set(t.lower() for t in texts))
    assert tok.tokenize("zebraphone") == ["z", "##e", "##b", "##r", "##a", "##p", "##h", "##o", "##n", "##e"]
