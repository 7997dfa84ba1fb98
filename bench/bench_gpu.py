"""On one GPU: open_clip ViT-B-32 image+text items/s end to end from JPEG bytes vs the encoder alone.

Both sides in the same run, same GPU, same model, bf16 autocast, same batch:
  * encoder only: pre-decoded, preprocessed pixel tensors and pre-tokenized text already on the GPU;
  * end to end:   JPEG bytes -> decode (nvJPEG with PIL fallback, or PIL on CPU threads) -> preprocess
                  -> pinned host memory -> image tower, plus tokenize -> text tower.
Also reports the encoder's achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode) against the
GPU's dense bf16 peak. Targets (issue 8): end to end >= 0.5 x encoder only; encoder ~40% of peak.

    python bench/bench_gpu.py [--items 4096] [--batch_size 256] [--decode gpu|cpu] [--repeats 5]

Refuses to run without CUDA. Writes its section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

HEADING = "Scale-out (issue 8): GPU end to end vs encoder only"
# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
                    "L4": 121.0, "L40S": 362.0, "A10": 125.0, "T4": 65.0}


def peak_tflops(name: str) -> float | None:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return BF16_PEAK_TFLOPS[key]
    return None


def jpeg_items(n: int) -> list[bytes]:
    """``n`` JPEGs cycling through the sample catalog's photos, re-encoded at 512 px like a product shot."""
    from PIL import Image

    photos = sorted((ROOT / "sample_catalog" / "images").glob("*.jpg"))
    out = []
    for i in range(n):
        image = Image.open(photos[i % len(photos)]).convert("RGB").resize((512, 512 - 8 * (i % 16)))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--decode", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--threads", type=int, default=8, help="CPU decode threads (--decode cpu)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device and torch sees none: nothing measured "
              f"(torch {torch.__version__}). Run it on a GPU machine.", file=sys.stderr)
        return 2

    from bench._report import report
    from encoders import gpu_decode, towers
    from encoders.media import decode_for_tower
    from encoders.specs import ModelSpec

    device = torch.device("cuda:0")
    spec = ModelSpec("open_clip", "ViT-B-32", "random")
    model = towers.load(spec, device, "bf16")
    preprocess = towers.image_preprocess(spec)
    datas = jpeg_items(args.items)
    texts = [f"product {i}: a ceramic cup with a saucer, dishwasher safe" for i in range(args.items)]
    b = args.batch_size

    # encoder only: inputs already on the device
    pixels = torch.randn(b, 3, preprocess.size, preprocess.size, device=device)
    tokens = model.tokenizer(texts[:b]).to(device)

    def encoder_only() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(0, args.items, b):
                model.model.encode_image(pixels, normalize=True)
                model.model.encode_text(tokens, normalize=True)
        torch.cuda.synchronize(device)

    pool = concurrent.futures.ThreadPoolExecutor(args.threads)

    def end_to_end() -> None:
        def decode(chunk):
            if args.decode == "gpu":
                out = gpu_decode.decode_batch(chunk, preprocess, device, 10**8)
                return torch.stack([o for o in out if isinstance(o, torch.Tensor)])
            # the pipeline's CPU path: reduced-scale JPEG decode + resize per image, one normalize per batch
            pixels = list(pool.map(lambda d: decode_for_tower(d, preprocess, 10**8), chunk))
            return preprocess.normalize(np.stack(pixels))

        # one chunk ahead on a thread: decode of chunk k+1 overlaps the towers on chunk k
        ahead = concurrent.futures.ThreadPoolExecutor(1)
        future = ahead.submit(decode, datas[0:b])
        for start in range(0, args.items, b):
            x = future.result()
            if start + b < args.items:
                future = ahead.submit(decode, datas[start + b:start + 2 * b])
            model.encode_image(x, b)
            model.encode_text(texts[start:start + b], b)
        torch.cuda.synchronize(device)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.model.encode_image(pixels[:1].float(), normalize=True)
        model.model.encode_text(tokens[:1], normalize=True)
    flops_per_item = counter.get_total_flops()

    encoder_only()  # warm-up: cuDNN/cuBLAS heuristics, nvJPEG handles, allocator
    end_to_end()
    enc, e2e = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        encoder_only()
        enc.append(args.items / (time.perf_counter() - t))
        t = time.perf_counter()
        end_to_end()
        e2e.append(args.items / (time.perf_counter() - t))
    enc_med, e2e_med = statistics.median(enc), statistics.median(e2e)
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    achieved = enc_med * flops_per_item / 1e12
    body = "\n".join([
        f"`python bench/bench_gpu.py --items {args.items} --batch_size {b} --decode {args.decode}`",
        "",
        f"Device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}. Model: open_clip ViT-B-32 "
        f"(random weights), image + text tower per item, bf16 autocast, batch {b}.",
        "",
        "| | items/s (median of %d) |" % args.repeats, "|---|---|",
        f"| encoder only (tensors on the GPU) | {enc_med:.0f} |",
        f"| end to end from JPEG bytes (decode: {args.decode}) | {e2e_med:.0f} |",
        f"| **ratio end to end / encoder only** | **{e2e_med / enc_med:.2f}** (target >= 0.5) |",
        f"| encoder TFLOP/s ({flops_per_item / 1e9:.1f} GFLOP/item) | {achieved:.0f}"
        + (f" = {100 * achieved / peak:.0f}% of the {peak:.0f} TFLOP/s bf16 peak (target ~40%) |" if peak else " |"),
    ])
    report(HEADING, body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
