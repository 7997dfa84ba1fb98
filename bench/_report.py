"""Writes one benchmark's section of docs/BENCHMARKS.md, leaving the other sections alone.

Several scripts share that file; each owns the section under its own ``## `` heading
and replaces only that section (or appends it when it is not there yet).
"""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
TITLE = "# Benchmarks\n\nFigures written by the scripts under `bench/`; each script owns one section.\n"


def replace_section(heading: str, body: str, doc: Path = DOC) -> None:
    """Puts ``## heading`` + ``body`` in ``doc``, replacing that section if present."""
    text = doc.read_text() if doc.exists() else TITLE
    section = f"## {heading}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def report(heading: str, body: str, write: bool = True) -> None:
    """Prints a benchmark's section and, unless ``write`` is off, puts it into docs/BENCHMARKS.md."""
    print(body)
    if write:
        replace_section(heading, body)


def write_heading_section(markdown: str, doc: Path = DOC) -> None:
    """Like :func:`replace_section` for text that starts with its own ``## heading`` line."""
    heading, _, body = markdown.strip().partition("\n")
    if not heading.startswith("## "):
        raise ValueError(f"a section must start with '## ', got {heading[:40]!r}")
    replace_section(heading[3:], body.strip(), doc)


def median_seconds(fn, repeats: int, inner: int = 1) -> float:
    """Median wall seconds of one ``fn()`` call over ``repeats`` timings of ``inner`` calls each."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)
