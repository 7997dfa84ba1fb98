"""Builds tests/data/tiny-wordpiece/: a BERT WordPiece tokenizer of a few KB for the tiny test models.

The vocabulary is the five special tokens, every character of printable ASCII
and of the sample catalog's texts (with its ``##`` continuation, CJK
ideographs aside: BERT splits those), and the
sample catalog's words (titles, descriptions, queries, paraphrases). Any text
therefore tokenizes without [UNK] for those characters: distinct texts stay
distinct token sequences, as with a full vocabulary, and the default test suite
needs no packaged tokenizer. Run it again after the sample catalog's texts change:

    .venv/bin/python tests/data/make_tiny_tokenizer.py
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


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, content in build().items():
        (OUT / name).write_text(content, encoding="utf-8")
    print(f"{OUT}: {sum(len(c.encode()) for c in build().values())} bytes, "
          f"{build()['vocab.txt'].count(chr(10))} vocab entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
