"""Build spoken shopper queries for the sample catalog with espeak-ng, in several voices.

48 English queries, each a shopper's way of asking for one sample item (or a
few), are synthesized in turn by four espeak-ng voices (US, British,
Scottish, and a female US variant) at 150-170 words a minute, written as
16 kHz mono WAV with a ``queries.jsonl`` of ``{"audio", "text", "voice",
"relevant"}``. The texts are the word-error-rate references.

    .venv/bin/python bench/spoken_queries.py OUT_DIR

Needs Debian ``espeak-ng`` (``apt-get install espeak-ng``). Generated files are
outputs, not committed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VOICES = (("en-us", 160), ("en-gb", 150), ("en-gb-scotland", 150), ("en-us+f3", 170))

QUERIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a small cup and saucer for espresso", ("sku-0001",)),
    ("ceramic coffee cup that keeps the coffee hot", ("sku-0001",)),
    ("stuffed cat toy for a child", ("sku-0002",)),
    ("soft kitten plush with stripes", ("sku-0002",)),
    ("model rocket kit with a parachute", ("sku-0003", "sku-0016")),
    ("rocket that flies three hundred metres", ("sku-0003",)),
    ("wall clock that does not tick", ("sku-0004",)),
    ("silent clock for the bedroom wall", ("sku-0004",)),
    ("album to store my coin collection", ("sku-0005",)),
    ("binder with pockets for coins", ("sku-0005",)),
    ("poster of an astronaut", ("sku-0006", "sku-0016")),
    ("space shuttle wall poster", ("sku-0006",)),
    ("horse sticker for the wall", ("sku-0007",)),
    ("vinyl wall decal of a horse", ("sku-0007",)),
    ("lightweight tripod for my camera", ("sku-0008",)),
    ("aluminium camera stand", ("sku-0008",)),
    ("peel and stick brick wallpaper", ("sku-0009",)),
    ("wallpaper that looks like bricks", ("sku-0009",)),
    ("fake grass mat for the balcony", ("sku-0010",)),
    ("artificial turf for outdoors", ("sku-0010",)),
    ("portable scanner for documents and receipts", ("sku-0011",)),
    ("handheld page scanner", ("sku-0011",)),
    ("colour wheel for mixing paint", ("sku-0012",)),
    ("artist colour chart", ("sku-0012",)),
    ("checkers board game", ("sku-0013",)),
    ("draughts set for two players", ("sku-0013",)),
    ("calculus workbook with answers", ("sku-0014",)),
    ("maths exercise book for derivatives", ("sku-0014",)),
    ("used red motorcycle", ("sku-0015",)),
    ("classic cruiser motorbike", ("sku-0015",)),
    ("space gift set for kids", ("sku-0016", "sku-0003", "sku-0006")),
    ("astronaut and rocket gift bundle", ("sku-0016",)),
    ("bamboo cutting board", ("sku-0025",)),
    ("wooden chopping board for the kitchen", ("sku-0025",)),
    ("wireless earbuds with noise cancelling", ("sku-0026",)),
    ("bluetooth headphones for flights", ("sku-0026",)),
    ("non slip yoga mat", ("sku-0027",)),
    ("thick mat for yoga and pilates", ("sku-0027",)),
    ("insulated water bottle", ("sku-0028",)),
    ("steel flask that keeps drinks cold", ("sku-0028",)),
    ("wooden toy train set", ("sku-0036",)),
    ("train set with track and a bridge", ("sku-0036",)),
    ("gravel for a fish tank", ("sku-0017",)),
    ("moon lamp", ("sku-0018", "sku-0024")),
    ("galaxy canvas wall art", ("sku-0019", "sku-0024")),
    ("thousand piece jigsaw puzzle", ("sku-0020",)),
    ("green tea", ("sku-0029",)),
    ("bamboo steamer basket", ("sku-0031",)),
)


def build(out_dir: str) -> list[dict]:
    """Synthesizes every query in its voice into ``out_dir``; returns the rows of ``queries.jsonl``."""
    import numpy as np
    import soundfile as sf
    import soxr

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (text, relevant) in enumerate(QUERIES):
            voice, wpm = VOICES[i % len(VOICES)]
            raw = Path(tmp) / "q.wav"
            subprocess.run([espeak, "-v", voice, "-s", str(wpm), "-w", str(raw), text], check=True)
            samples, rate = sf.read(raw, dtype="float32")
            samples = soxr.resample(samples, rate, 16_000).astype(np.float32)
            name = f"q{i:03d}.wav"
            sf.write(out / name, samples, 16_000, subtype="PCM_16")
            rows.append({"audio": name, "text": text, "voice": voice, "relevant": list(relevant)})
    with open(out / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = build(sys.argv[1])
    print(f"{len(rows)} spoken queries in {len(VOICES)} voices -> {sys.argv[1]}/queries.jsonl")
