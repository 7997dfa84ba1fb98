"""Prepare packaged weights that cannot be used straight from their wheel; run once after pip install.

aisfx: its wheel holds the sound embedder's checkpoint as a torch pickle and
pins numpy 1.23 and librosa 0.9, so the wheel is fetched without its
dependencies (``pip download --no-deps``) into a temporary folder, the
checkpoint is read once with torch's restricted unpickler (``weights_only``,
with only numpy's scalar and dtype types allowed), the embedding net's
tensors are written as safetensors, and the wheel is deleted. Run time only
ever reads the safetensors file.

    .venv/bin/python scripts/prepare_weights.py [--wheel aisfx-0.1.2-py2.py3-none-any.whl] [--force]

Writes <venv>/share/catalog_index/weights/aisfx-embedding.safetensors (or under
$CATALOG_INDEX_WEIGHTS). Prints one line per model and exits 0 when it is done,
1 when it could not be done (with the reason).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AISFX = "aisfx==0.1.2"
CHECKPOINT = "aisfx/models/checkpoint.pth"
PREFIX = "embedding_net."


def _read_checkpoint(path: str) -> dict:
    import numpy as np
    import torch

    allowed = [np.dtype, type(np.dtype("float64")), type(np.dtype("int64"))]
    scalar = getattr(np, "_core", np.core).multiarray.scalar
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar")]  # numpy 2 and numpy 1 pickles
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    weights = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
    out = {k[len(PREFIX):]: v.contiguous() for k, v in weights.items() if k.startswith(PREFIX)}
    if not out:
        raise ValueError(f"{path}: no {PREFIX}* tensors")
    return out


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys in sorted order, the tensors' bytes as they are.

    safetensors writes the header's maps in hash order, which differs from one process to the next, so
    two conversions of the same checkpoint gave files that differ in a few header bytes. The model
    fingerprint hashes the weights file, so every fresh install (a CI machine, a rebuilt worker image)
    would have made a nightly run re-encode the whole catalog. Same keys, same values, compact JSON:
    the header keeps its length (and its padding, which safetensors allows)."""
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size]
    canonical = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    if len(canonical) > size:
        raise ValueError("safetensors header grew when sorted")
    return data[:8] + canonical + b" " * (size - len(canonical)) + data[8 + size:]


def prepare_aisfx(wheel: str | None, force: bool) -> str:
    from safetensors.torch import save

    from encoders.aisfx import WEIGHTS_FILE, SfxNet, weights_dir

    dest = weights_dir() / WEIGHTS_FILE
    if dest.is_file() and not force:
        return f"aisfx: {dest} already there"
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", AISFX, "-d", tmp],
                           check=True)
            wheel = str(next(Path(tmp).glob("aisfx-*.whl")))
        with zipfile.ZipFile(wheel) as z:
            z.extract(CHECKPOINT, tmp)
        tensors = _read_checkpoint(os.path.join(tmp, CHECKPOINT))
    SfxNet().load_state_dict(tensors)  # strict: every key and shape of the architecture
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".tmp")
    partial.write_bytes(canonical_safetensors(
        save(tensors, metadata={"source": AISFX, "licence": "CC BY 4.0 (model), MIT (code)"})))
    os.replace(partial, dest)
    return f"aisfx: wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", help="a downloaded aisfx wheel (default: pip download it)")
    parser.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    try:
        print(prepare_aisfx(args.wheel, args.force))
    except (OSError, ValueError, subprocess.CalledProcessError, StopIteration) as e:
        print(f"aisfx: not prepared: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
