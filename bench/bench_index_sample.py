"""Benchmark of the index stage's training sample: one pass carrying vectors vs two phases carrying positions.

Both run in the in-memory DirectRunner over the same embeddings files and
end with the same sample (checked) in the DoFn that trains:
  * one pass (the stage before the two-phase sample): each file read whole, its
    ``size`` smallest-key rows with their vectors sent to a combiner, the combined
    sample to the train step as a side input;
  * two phases (``pipeline/stages/index.py``): each file's ids read, (file, row)
    positions of the smallest keys combined and passed as the side input, the
    chosen rows' vectors read there, each file once.
Medians of the repeats, the two alternated in one run; wall seconds of the whole
small pipeline (start-up included, the same for both).

    flock /tmp/bench.lock python bench/bench_index_sample.py [--n 200000] [--dim 384] [--size 101000]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench._report import report  # noqa: E402
from bench_index import write_shards  # noqa: E402
from pipeline.stages import index as stage  # noqa: E402

HEADING = "Index training sample: one pass carrying vectors vs two phases carrying positions (issue 12)"


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The one-pass baseline's accumulator: the smallest-key rows with their ids and vectors."""

    keys: np.ndarray
    item_ids: tuple[str, ...]
    vectors: np.ndarray

    @staticmethod
    def of(keys: np.ndarray, item_ids, vectors: np.ndarray, size: int) -> "_Rows":
        order = np.argsort(keys, kind="stable")[:size]
        return _Rows(keys[order], tuple(item_ids[i] for i in order), vectors[order])


class _OnePassCombine(beam.CombineFn):
    def __init__(self, size: int):
        self._size = size

    def create_accumulator(self):
        return None

    def add_input(self, acc, rows):
        return self.merge_accumulators([acc, rows])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if len(accs) <= 1:
            return accs[0] if accs else None
        return _Rows.of(np.concatenate([a.keys for a in accs]), [i for a in accs for i in a.item_ids],
                        np.concatenate([a.vectors for a in accs]), self._size)

    def extract_output(self, acc):
        return acc


def _one_pass_file(path: str, size: int):
    ids, vectors = stage.read_shard(path)
    yield _Rows.of(stage.sample_keys(ids), ids, vectors, size)


def run(files: list[str], size: int, dim: int, two_phase: bool, out: str) -> float:
    def train(_, sample):  # where the index would be trained: the sample's vectors in memory
        if two_phase:
            sample = stage.read_sample(sample, dim)
        digest = hashlib.sha256("\n".join(sample.item_ids).encode() + sample.vectors.tobytes()).hexdigest()
        with open(out, "w") as f:  # the DoFn runs on a copy of this closure: the result goes through a file
            f.write(digest)

    start = time.perf_counter()
    with beam.Pipeline() as p:
        files_pc = p | beam.Create(files)
        if two_phase:
            sample = (files_pc | beam.ParDo(stage._SampleFile(size))
                      | beam.CombineGlobally(stage.SmallestKeys(size)))
        else:
            sample = files_pc | beam.FlatMap(_one_pass_file, size) | beam.CombineGlobally(_OnePassCombine(size))
        p | "Once" >> beam.Create([None]) | beam.Map(train, beam.pvalue.AsSingleton(sample))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--size", type=int, default=101_000, help="sample rows (train_size + num_queries)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.n, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-index-sample-") as tmp:
        files = write_shards(x, f"{tmp}/embeddings")
        del x
        times: dict[bool, list[float]] = {False: [], True: []}
        outs = {False: f"{tmp}/one-pass.sha256", True: f"{tmp}/two-phase.sha256"}
        for _ in range(args.repeats):
            for two in (False, True):
                times[two].append(run(files, args.size, args.dim, two, outs[two]))
        same = open(outs[False]).read() == open(outs[True]).read()
    one, two = statistics.median(times[False]), statistics.median(times[True])
    body = "\n".join([
        f"`flock /tmp/bench.lock python bench/bench_index_sample.py {' '.join(sys.argv[1:])}`: {args.n:,} x "
        f"{args.dim} float32 vectors in {len(files)} embeddings files, a {args.size:,}-row sample, DirectRunner "
        f"in-memory, {os.cpu_count()} CPU cores (shared), medians of {args.repeats} alternated runs. Wall seconds "
        "from the files to the sample's vectors in the train step (pipeline start-up included in both).", "",
        "| sample | wall s (median) | runs |", "|---|---|---|",
        f"| one pass: vectors through the combiner and side input | {one:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in times[False])} |",
        f"| two phases: positions through Beam, the rows read once | {two:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in times[True])} |", "",
        f"Ratio one pass / two phases: {one / two:.2f}x. Same sample rows and vectors in both: {same}.",
    ])
    report(HEADING, body, write=not args.no_write)
    if not same:
        raise SystemExit("the two samples differ")


if __name__ == "__main__":
    main()
