"""What the reliability and safety measures cost: prints figures and writes its section of docs/BENCHMARKS.md.

1. Local media fetch: fetch_bytes with root confinement (realpath, stat, O_NOFOLLOW) vs a bare open().read().
2. http fetch from a server on 127.0.0.1: the checked, pinned fetch vs plain urllib.
3. Per-item isolation: a handler batch of 32 texts with one failing item (retried item by item)
   vs a clean batch, with a tiny random BERT sentence encoder.

Medians of repeated runs in one process; ratios from those medians. Run from the repository root:
    python bench/bench_reliability.py
"""
from __future__ import annotations

import http.server
import io
import os
import platform
import sys
import tempfile
import threading
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from bench._report import median_seconds, write_heading_section  # noqa: E402
from encoders.media import FetchPolicy, fetch_bytes  # noqa: E402

HEADING = "## Reliability and safe fetching (issue 6)"
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")


def bench_local(tmp: str) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 90, 200)).save(buf, "JPEG")
    root = os.path.join(tmp, "media")
    os.makedirs(root)
    paths = []
    for i in range(50):
        p = os.path.join(root, f"{i}.jpg")
        with open(p, "wb") as f:
            f.write(buf.getvalue())
        paths.append(p)
    policy = FetchPolicy(allowed_roots=(root,))

    def plain():
        for p in paths:
            with open(p, "rb") as f:
                f.read()

    def checked():
        for p in paths:
            fetch_bytes(p, policy)

    plain(), checked()
    t_plain = median_seconds(plain, 31) / len(paths)
    t_checked = median_seconds(checked, 31) / len(paths)
    return {"bytes": len(buf.getvalue()), "plain_us": t_plain * 1e6, "checked_us": t_checked * 1e6,
            "ratio": t_checked / t_plain}


def bench_http() -> dict:
    body = b"x" * 60_000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/a.jpg"
    policy = FetchPolicy(allow_http=True, allow_private_hosts=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        plain = lambda: opener.open(url, timeout=10).read()  # noqa: E731
        checked = lambda: fetch_bytes(url, policy)  # noqa: E731
        plain(), checked()
        t_plain = median_seconds(plain, 101)
        t_checked = median_seconds(checked, 101)
    finally:
        httpd.shutdown()
    return {"plain_ms": t_plain * 1e3, "checked_ms": t_checked * 1e3, "ratio": t_checked / t_plain}


def bench_isolation(tmp: str) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from encoders.handlers import TextEmbeddingHandler
    from encoders.presets import packaged_minilm
    from encoders.specs import ModelSpec
    import shutil

    model_dir = os.path.join(tmp, "tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(model_dir)
    src = packaged_minilm()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), os.path.join(model_dir, name))

    class OneBad(TextEmbeddingHandler):
        def _encode(self, model, batch):
            if any("BAD" in t for t in batch):
                raise ValueError("bad item")
            return super()._encode(model, batch)

    handler = OneBad(ModelSpec("hf_text", model_dir, "pretrained"), device="cpu", batch_size=32)
    model = handler.load_model()
    clean = [f"item number {i} with a short description" for i in range(32)]
    dirty = clean[:31] + ["BAD item"]
    handler.run_inference(clean, model), handler.run_inference(dirty, model)
    t_clean = median_seconds(lambda: handler.run_inference(clean, model), 21)
    t_dirty = median_seconds(lambda: handler.run_inference(dirty, model), 21)
    return {"clean_ms": t_clean * 1e3, "dirty_ms": t_dirty * 1e3, "ratio": t_dirty / t_clean}


def main() -> None:
    import logging

    logging.getLogger("encoders.handlers").setLevel(logging.ERROR)  # the retry warning, once per repeat
    with tempfile.TemporaryDirectory() as tmp:
        local = bench_local(tmp)
        remote = bench_http()
        iso = bench_isolation(tmp)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    text = f"""{HEADING}

`python bench/bench_reliability.py` ({machine}; shared machine, medians of repeated runs in one process).

| what | baseline | with the safety measure | ratio |
|---|---|---|---|
| local media fetch, {local['bytes'] // 1000} kB JPEG (root confinement: realpath, stat, O_NOFOLLOW, capped read) | {local['plain_us']:.1f} us (`open().read()`) | {local['checked_us']:.1f} us (`fetch_bytes`) | {local['ratio']:.2f}x |
| http fetch of 60 kB from 127.0.0.1 (host and address checks, pinned connection, whole-fetch deadline) | {remote['plain_ms']:.2f} ms (urllib) | {remote['checked_ms']:.2f} ms (`fetch_bytes`) | {remote['ratio']:.2f}x |
| text batch of 32, tiny BERT, one item raising (batch retried item by item) | {iso['clean_ms']:.1f} ms (clean batch) | {iso['dirty_ms']:.1f} ms (31 embedded + 1 dead letter) | {iso['ratio']:.2f}x |

The fetch checks cost tens of microseconds against milliseconds of decoding
and encoding per image. Isolation turns a batch that contains a failing item
into one single-item pass per item (on CPU each pass is padded to 8 rows, for
batch-independent bits); only such batches pay it, so with a failure
fraction f about min(1, f x batch_size) of the batches do.
"""
    print(text)
    write_heading_section(text)
    print(f"wrote section {HEADING!r} of {DOC}")


if __name__ == "__main__":
    main()
