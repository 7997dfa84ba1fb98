"""Builds tests/data/tiny-wordpiece/: a BERT WordPiece tokenizer of a few KB for the tiny test models.

The vocabulary is the five special tokens, every character of printable ASCII
and of the sample catalog's texts (with its ``##`` continuation, CJK
ideographs aside: BERT splits those), and the
sample catalog's words (titles, descriptions, queries, paraphrases). Any text
therefore tokenizes without [UNK] for those characters: distinct texts stay
distinct token sequences, as with a full vocabulary, and the default test suite
needs no packaged tokenizer. Run it again after the sample catalog's texts change:

    .venv/bin/python tests/data/make_tiny_tokenizer.py

:func:`write_whisper_tokenizer` builds the tiny Whisper's byte-level BPE
tokenizer at test time instead (a vocabulary of Whisper's 50,256 byte-level
tokens is 1 MB, too big to commit): synthetic merges, but Whisper tiny.en's
exact special-token ids, so prompts, suppression and decoding run as with the
real one.
"""
from __future__ import annotations

import json
import re
import string
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "tiny-wordpiece"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONFIG = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
          "strip_accents": None, "do_basic_tokenize": True, "model_max_length": 512,
          "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
          "mask_token": "[MASK]"}
SPECIAL_MAP = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}


def _normalize(text: str) -> str:
    """What BERT's basic tokenizer does before WordPiece: lower case, accents stripped."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if unicodedata.category(c) != "Mn")


def sample_texts() -> list[str]:
    import pyarrow.parquet as pq

    sample = ROOT / "sample_catalog"
    texts = [r[k] or "" for r in pq.read_table(sample / "catalog.parquet", columns=["title", "description"]).to_pylist()
             for k in ("title", "description")]
    texts += [json.loads(line)["query"] for line in (sample / "queries.jsonl").read_text().splitlines()
              if line.strip() and json.loads(line)["modality"] == "text"]
    texts += [p["query"] for p in json.loads((sample / "paraphrases.json").read_text())]
    return texts


def vocab(texts: list[str]) -> list[str]:
    normalized = [_normalize(t) for t in texts]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation)
                   | {c for t in normalized for c in t if not c.isspace()})
    words = sorted({w for t in normalized for w in re.findall(r"[a-z0-9]{2,}", t)})
    # BERT splits CJK ideographs into single tokens; any other character may continue a word ("90×90")
    joining = [c for c in chars if not unicodedata.name(c, "").startswith("CJK UNIFIED")]
    return SPECIAL + chars + [f"##{c}" for c in joining] + [w for w in words if w not in chars]


def build() -> dict[str, str]:
    """File name -> content of the tokenizer directory."""
    return {"vocab.txt": "\n".join(vocab(sample_texts())) + "\n",
            "tokenizer_config.json": json.dumps(CONFIG, indent=1, sort_keys=True) + "\n",
            "special_tokens_map.json": json.dumps(SPECIAL_MAP, indent=1, sort_keys=True) + "\n"}


# Whisper's language tokens in vocabulary order (tiny.en's tokenizer lists the same 99; large-v3 adds yue)
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi iw uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su").split()
WHISPER_TEXT_TOKENS = 50_256  # English-only Whisper: ids below <|endoftext|> are text


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in its vocabulary order (byte-level BPE's 256 base tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}


def whisper_tokenizer_json() -> dict:
    """A byte-level BPE ``tokenizer.json`` with English-only Whisper's id layout.

    Text ids 0..50255: the 256 byte symbols, then merges of a space ("Ġ") with
    one byte and with two, so most ids decode to a short word and a random
    decoder's output reads as words; <|endoftext|> is 50256, then
    <|startoftranscript|>, the 99 language tokens, the task tokens and
    <|notimestamps|> (50362), as in tiny.en.
    """
    byte_map = _byte_symbols()
    symbols, space = list(byte_map.values()), byte_map[ord(" ")]  # "Ġ"
    merges = [(space, c) for c in symbols if c != space]
    merges += [(space + a, b) for a in symbols if a != space for b in symbols][: WHISPER_TEXT_TOKENS - 256 - len(merges)]
    vocab = {tok: i for i, tok in enumerate(symbols + [a + b for a, b in merges])}
    assert len(vocab) == WHISPER_TEXT_TOKENS
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{lang}|>" for lang in WHISPER_LANGUAGES),
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                "<|notimestamps|>"]
    vocab["<|endoftext|>"] = WHISPER_TEXT_TOKENS
    added = [{"id": WHISPER_TEXT_TOKENS + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(specials)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": dict(byte_level, add_prefix_space=True),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "vocab": vocab,
                      "merges": [f"{a} {b}" for a, b in merges]}}


def write_whisper_tokenizer(dest: Path) -> Path:
    """Writes ``dest/tokenizer.json`` (:func:`whisper_tokenizer_json`) and returns its path."""
    path = Path(dest) / "tokenizer.json"
    path.write_text(json.dumps(whisper_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    return path


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, content in build().items():
        (OUT / name).write_text(content, encoding="utf-8")
    print(f"{OUT}: {sum(len(c.encode()) for c in build().values())} bytes, "
          f"{build()['vocab.txt'].count(chr(10))} vocab entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
