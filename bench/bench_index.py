"""Benchmark of the index stage: measured choice within a memory budget, against a bare faiss script and autofaiss.

Data sets (bench/index_data.py), written as embeddings Parquet shards exactly as the pipeline writes them:
  * synthetic: N x 512 clustered unit vectors (seeded), 1,000 more from the same clusters as queries;
  * minilm: the packaged all-MiniLM-L6-v2 (real weights) over sentences of this machine's man pages,
    1,000 further sentences as queries (text and vectors cached under ~/.cache, never committed).
Each at the default 4 GB budget and at a tight one (--tight_bytes per vector). Per (data, budget), in turn
(separate subprocesses, so peak memory is per variant, all under the caller's flock):
  * pipeline: DirectRunner, ``BuildIndex`` over the shard files (sample, candidates measured, winner
    filled per shard in parallel, recall self-check, timed separately);
  * bare: numpy + faiss only: read the shards, random sample of the same size, train the chosen factory,
    ``add_with_ids`` per shard, write the shards;
  * autofaiss: its own venv (--afvenv), same vectors as .npy, same budget (bench/autofaiss_worker.py).
The pipeline's and autofaiss's indexes are searched with the same queries against the same exact truth.
Prints the figures and replaces its own section of docs/BENCHMARKS.md.

    flock /tmp/bench.lock python bench/bench_index.py [--n 1000000] [--texts 200000]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench._report import write_heading_section  # noqa: E402
from index_data import clustered, minilm_vectors  # noqa: E402

SECTION = "## Index build: chosen by measurement within the memory budget, vs autofaiss (issue 12)"
SHARDS = 4
K = 10


def write_shards(vectors: np.ndarray, directory: str) -> list[str]:
    """Embeddings shards as the pipeline writes them (same schema, naming, compression and dictionary columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stages.write import DICTIONARY_COLUMNS, WRITE_COMPRESSION
    from schemas.embeddings import embeddings_schema

    os.makedirs(directory, exist_ok=True)
    schema = embeddings_schema(vectors.shape[1], "float32", {"bench": True})
    paths = []
    for shard, rows in enumerate(np.array_split(np.arange(len(vectors)), SHARDS)):
        ids = pa.array([f"item-{i:08d}" for i in rows], pa.string())
        n = len(rows)
        table = pa.Table.from_pydict({
            "item_id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)),
                                                                        vectors.shape[1]),
            "modalities": pa.array([["text"]] * n, pa.list_(pa.string())),
            "content_hash": pa.array([""] * n), "model_fingerprint": pa.array([""] * n),
            "num_images": pa.array([0] * n, pa.int32()), "attributes": pa.array([None] * n, pa.string()),
            "transcript": pa.array([None] * n, pa.string()),
            "title": pa.array([None] * n, pa.string()), "snippet": pa.array([None] * n, pa.string()),
        }, schema=schema)
        path = f"{directory}/part-{shard:05d}-of-{SHARDS:05d}.parquet"
        pq.write_table(table, path, compression=WRITE_COMPRESSION, use_dictionary=DICTIONARY_COLUMNS)
        paths.append(path)
    return paths


def _evaluate(index, queries: np.ndarray, truth: np.ndarray, params: dict) -> dict:
    from pipeline.index import indexing

    index.set_params(params)
    start = time.perf_counter()
    _, found = index.search(queries, K)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    singles = []
    for q in queries[:200]:
        start = time.perf_counter()
        index.search(q[None, :], K)
        singles.append((time.perf_counter() - start) * 1000)
    return {"params": params, "recall_at_10": indexing.recall_at(found, truth, K),
            "recall_at_1": indexing.one_recall_at_one(found, truth), "ms_per_query_batch": batch_ms,
            "ms_single_p50": float(np.median(singles))}


def worker_pipeline(run_dir: str, dim: int, train_size: int, queries: int, memory_gb: float, qpath: str,
                    tpath: str) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.cli import local_runner
    from pipeline.index import indexing
    from pipeline.config import IndexConfig
    from pipeline.stages.index import BuildIndex, self_check_settings

    config = IndexConfig(train_size=train_size, num_queries=queries, memory_gb=memory_gb)
    files = sorted(glob.glob(f"{run_dir}/embeddings/*.parquet"))
    info_path = f"{run_dir}/index-info.json"
    options = PipelineOptions()
    start = time.perf_counter()
    with beam.Pipeline(runner=local_runner(options), options=options) as p:  # the runner a local `run` uses
        (p | beam.Create(files) | BuildIndex(config, run_dir, dim)
         | beam.Map(lambda info: open(info_path, "w").write(json.dumps(info))))
    wall = time.perf_counter() - start
    with open(info_path) as f:
        info = json.load(f)
    # the same external queries and truth as autofaiss, through the shards as a server loads them
    shards = [indexing.from_bytes(open(f"{run_dir}/{s['index']}", "rb").read()) for s in info["shards"]]
    offsets = np.cumsum([0] + [s["count"] for s in info["shards"]])
    truth = np.load(tpath)  # global row numbers -> faiss ids (shard << ROW_BITS | row in the shard)
    bounds = np.searchsorted(offsets, truth, side="right") - 1
    truth_ids = (bounds.astype(np.int64) << indexing.ROW_BITS) | (truth - offsets[bounds])
    sharded = indexing.ShardedIndex(shards, info["metric"])
    q = np.load(qpath)
    recommended = _evaluate(sharded, q, truth_ids, info["search_params"])
    params = indexing.params_for_factory(info["factory"], info["metric"], dim, info["ntotal"], family=info["family"])
    ladder = [_evaluate(sharded, q, truth_ids, s) for g in self_check_settings(params, config, True) for s in g]
    return {"wall_s": wall, "train_s": info["training"]["seconds"], "selection_s": info["training"]["selection_seconds"],
            "add_s": info["add_seconds"], "factory": info["factory"],
            # the self-check: its search ladder, and its exact ground truth computed per shard while filling
            "self_check_s": info["self_check_seconds"] + info.get("ground_truth_seconds", 0.0),
            "family": info["family"], "train_vectors": info["training"]["vectors"],
            "bytes_per_vector": info["bytes_per_vector"], "estimated_bytes": info["estimated_bytes"],
            "index_file_bytes": sum(os.path.getsize(f"{run_dir}/{s['index']}") for s in info["shards"]),
            "chosen": info["chosen"], "candidates": [{k: c[k] for k in ("name", "family", "bytes_per_vector",
                                                                        "fits_budget", "skipped_reason",
                                                                        "train_seconds", "best_setting",
                                                                        "meets_target")}
                                                     | {"best": _best_row(c)} for c in info["candidates"]],
            "recall": info["recall"], "external": recommended, "ladder": ladder,
            "phase_seconds": info.get("phase_seconds", {}),
            "candidate_seconds": {c["name"]: _timings(c) for c in info["candidates"]
                                  if c.get("train_seconds") or c.get("probe")}}


def _timings(c: dict) -> dict:
    """Where a measured candidate's selection time went (coarse quantizer, training, fill + ladder, probe)."""
    return {"coarse": c.get("coarse_seconds"), "train": c.get("train_seconds"), "measure": c.get("measure_seconds"),
            "probe": (c.get("probe") or {}).get("seconds")}


def _best_row(c: dict) -> dict | None:
    rows = [r for r in c["settings"] if r["params"] == c["best_setting"]]
    return rows[0] if rows else None


def worker_bare(run_dir: str, factory: str, metric: str, train_size: int) -> dict:
    """The same work with numpy + faiss only, the way a short script would do it."""
    import faiss
    import pyarrow.parquet as pq

    start = time.perf_counter()
    files = sorted(glob.glob(f"{run_dir}/embeddings/*.parquet"))
    tables = [pq.read_table(f, columns=["item_id", "vector"]) for f in files]
    vecs = [t.column("vector").combine_chunks().values.to_numpy().reshape(len(t), -1) for t in tables]
    xb = np.concatenate(vecs)
    read_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    sample = xb[rng.choice(len(xb), min(len(xb), train_size), replace=False)]
    t0 = time.perf_counter()
    index = faiss.index_factory(xb.shape[1], factory,
                                faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    index.train(sample)
    train_s = time.perf_counter() - t0
    data = faiss.serialize_index(index)
    os.makedirs(f"{run_dir}/bare", exist_ok=True)
    t0 = time.perf_counter()
    for shard, v in enumerate(vecs):
        part = faiss.deserialize_index(data)
        part.add_with_ids(v, (np.int64(shard) << 40) | np.arange(len(v), dtype=np.int64))
        faiss.write_index(part, f"{run_dir}/bare/shard-{shard:05d}.faiss")
    add_s = time.perf_counter() - t0
    return {"wall_s": time.perf_counter() - start, "train_s": train_s, "add_s": add_s, "read_s": read_s}


def run_worker(*args: str, python: str = sys.executable, script: str = __file__) -> dict:
    cmd = [python, script] + (["--worker"] if script == __file__ else []) + list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def exact_truth(xb: np.ndarray, queries: np.ndarray) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return flat.search(queries, K)[1]


def _build_s(pipe: dict) -> float:
    """The pipeline's build time: its wall time without the recall self-check."""
    return pipe["wall_s"] - pipe["self_check_s"]


def bench_dataset(name: str, vectors: np.ndarray, queries: np.ndarray, workdir: str, train_size: int,
                  nq: int, budgets: list[tuple[str, float]], afvenv: str, on_row=None, repeat: int = 1) -> list[dict]:
    base = f"{workdir}/{name.split()[0]}"
    write_shards(vectors, f"{base}/embeddings")
    os.makedirs(f"{base}/npy", exist_ok=True)
    np.save(f"{base}/npy/0.npy", vectors)
    start = time.perf_counter()
    truth = exact_truth(vectors, queries)
    print(f"{name}: exact truth for {len(queries)} queries in {time.perf_counter() - start:.1f} s", flush=True)
    np.save(f"{base}/queries.npy", queries)
    np.save(f"{base}/truth.npy", truth)
    dim, out = vectors.shape[1], []
    for label, gb in budgets:
        run_dir = f"{base}/{label.split()[0]}"
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(f"{run_dir}/embeddings"):
            os.symlink(f"{base}/embeddings", f"{run_dir}/embeddings")
        pipes, bares = [], []
        def pipeline_run() -> None:
            shutil.rmtree(f"{run_dir}/index", ignore_errors=True)
            pipes.append(run_worker("pipeline", run_dir, str(dim), str(train_size), str(nq), str(gb),
                                    f"{base}/queries.npy", f"{base}/truth.npy"))
            print(f"  {label}: pipeline {pipes[-1]['factory']} wall {pipes[-1]['wall_s']:.1f} s, build "
                  f"{_build_s(pipes[-1]):.1f} s", flush=True)

        def bare_run() -> None:
            bares.append(run_worker("bare", run_dir, pipes[0]["factory"], "ip", str(pipes[0]["train_vectors"])))
            print(f"  {label}: bare wall {bares[-1]['wall_s']:.1f} s", flush=True)

        # pipeline and bare alternately, a load spike hits both, not one; and each goes first in every other
        # pair, since the first run after a pause pays for the memory and page cache the VM has handed back
        # (freed pages return to the host within seconds here and cost ~1.5 s/GB to touch again)
        pipeline_run()
        bare_run()
        for i in range(1, max(repeat, 1)):
            for run in ((bare_run, pipeline_run) if i % 2 else (pipeline_run, bare_run)):
                run()
        # the median run of each (by build time) stands for it; every run's figures are kept
        pipe = sorted(pipes, key=_build_s)[len(pipes) // 2]
        bare = sorted(bares, key=lambda b: b["wall_s"])[len(bares) // 2]
        pipe["repeats"] = [{"build_s": round(_build_s(p), 2), "bare_s": round(b["wall_s"], 2),
                            "ratio": round(_build_s(p) / b["wall_s"], 3)} for p, b in zip(pipes, bares)]
        print(f"  {label}: bare wall {bare['wall_s']:.1f} s (read {bare['read_s']:.1f}, train {bare['train_s']:.1f}, "
              f"add + write {bare['add_s']:.1f})", flush=True)
        print(f"  {label}: pipeline phases {pipe['phase_seconds']}, selection {pipe['selection_s']:.1f} s: "
              f"{pipe['candidate_seconds']}, train {pipe['train_s']:.1f}, add {pipe['add_s']:.1f}, "
              f"self-check {pipe['self_check_s']:.1f}", flush=True)
        auto = None
        if afvenv:
            afdir = f"{run_dir}/autofaiss"
            os.makedirs(afdir, exist_ok=True)
            try:
                auto = run_worker(f"{base}/npy", f"{base}/queries.npy", f"{base}/truth.npy", str(int(gb * (1 << 30))),
                                  afdir, python=f"{afvenv}/bin/python",
                                  script=os.path.join(ROOT, "bench", "autofaiss_worker.py"))
                print(f"  {label}: autofaiss {auto['factory']} build {auto['build_s']:.1f} s", flush=True)
            except RuntimeError as e:
                auto = {"error": str(e).strip().splitlines()[-1][:300]}
                print(f"  {label}: autofaiss failed: {auto['error']}", flush=True)
        out.append({"data": name, "n": len(vectors), "dim": dim, "budget": label, "memory_gb": gb,
                    "pipeline": pipe, "bare": bare, "autofaiss": auto})
        if on_row is not None:  # kept after every budget: a long run cut short keeps what it measured
            on_row(out)
        print(json.dumps(out[-1], indent=1, default=str)[:4000], flush=True)
    return out


def _fmt_params(p) -> str:
    if isinstance(p, str):
        return p
    return ", ".join(f"{k}={v}" for k, v in (p or {}).items()) or "exact"


def _equal_latency(pipe: dict, auto: dict | None) -> dict | None:
    """The pipeline's most accurate setting no slower (batched) than autofaiss's tuned one."""
    if not auto or "error" in auto:
        return None
    within = [r for r in pipe["ladder"] if r["ms_per_query_batch"] <= auto["ms_per_query_batch"]]
    return max(within, key=lambda r: r["recall_at_10"]) if within else None


def markdown(results: list[dict], notes: list[str], command: str = "") -> str:
    command = command or f"`flock /tmp/bench.lock python bench/bench_index.py {' '.join(sys.argv[1:])}`"
    lines = [SECTION, "", f"{command} on this "
             f"machine ({os.cpu_count()} CPU cores, faiss-cpu, DirectRunner in-memory), one run, every figure of a "
             f"table measured side by side in that run. {SHARDS} embeddings files, which the pipeline groups into "
             "index shards of at most `--index_shard_vectors` (1,000,000) vectors: one index shard here. `pipeline` "
             "is the Beam stage `BuildIndex`: deterministic sample, candidates trained and measured on it in memory "
             "order, the winner's trained index filled per index shard, recall self-check (timed separately). `bare` "
             "is numpy + faiss reading the same files, training the chosen factory on a random sample of the same "
             "size and adding each file's vectors to one copy per file. `autofaiss` "
             "is autofaiss 2.18 (its own venv: faiss-cpu 1.9.0.post1, numpy 1.26) on the same vectors with the same "
             "`max_index_memory_usage`, its search parameters tuned by itself (10 ms cap). Recall and latency of "
             "both are measured by the same code on the same external queries (never indexed) against the same "
             "exact ground truth; ms/query batch = one batched search of all queries / their number; single p50 "
             "= median of 200 one-query searches.", ""]
    lines += [*notes, ""] if notes else []
    lines += ["| data | budget | index | B/vector | 10-recall@10 | 1-recall@1 | ms/query batch | single p50 ms | "
              "build wall s | setting |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, a = r["pipeline"], r["autofaiss"]
        e = p["external"]
        build = p["wall_s"] - p["self_check_s"]
        lines.append(f"| {r['data']} | {r['budget']} | pipeline `{p['factory']}` | "
                     f"{p['index_file_bytes'] / r['n']:.0f} | **{e['recall_at_10']:.3f}** | {e['recall_at_1']:.3f} | "
                     f"{e['ms_per_query_batch']:.3f} | {e['ms_single_p50']:.3f} | {build:.1f} | "
                     f"{_fmt_params(e['params'])} |")
        eq = _equal_latency(p, a)
        if eq and eq["params"] != e["params"]:
            lines.append(f"| {r['data']} | {r['budget']} | pipeline at autofaiss's latency | | {eq['recall_at_10']:.3f} |"
                         f" {eq['recall_at_1']:.3f} | {eq['ms_per_query_batch']:.3f} | {eq['ms_single_p50']:.3f} | |"
                         f" {_fmt_params(eq['params'])} |")
        if a and "error" not in a:
            # a row whose autofaiss figures come from an earlier run of the same data and budget says so
            label = "autofaiss (earlier run)" if a.get("earlier_run") else "autofaiss"
            lines.append(f"| {r['data']} | {r['budget']} | {label} `{a['factory']}` | {a['bytes_per_vector']:.0f} | "
                         f"{a['recall_at_10']:.3f} | {a['recall_at_1']:.3f} | {a['ms_per_query_batch']:.3f} | "
                         f"{a['ms_single_p50']:.3f} | {a['build_s']:.1f} | {a['params']} |")
        elif a:
            lines.append(f"| {r['data']} | {r['budget']} | autofaiss failed: {a['error']} | | | | | | | |")
    lines += ["", "Build time against the bare script (same factory, same training-set size, same shards); the "
              "pipeline's build excludes its recall self-check, shown apart:", "",
              "| data | budget | chosen | pipeline build s | of which selection s | bare wall s | ratio | "
              "train s (pipe / bare) | add s (pipe / bare) | self-check s | runs: build / bare s | "
              "median of the runs' ratios |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, b = r["pipeline"], r["bare"]
        build = p["wall_s"] - p["self_check_s"]
        lines.append(f"| {r['data']} | {r['budget']} | `{p['factory']}` | {build:.1f} | {p['selection_s']:.1f} | "
                     f"{b['wall_s']:.1f} | {build / b['wall_s']:.2f} | {p['train_s']:.1f} / {b['train_s']:.1f} | "
                     f"{p['add_s']:.1f} / {b['add_s']:.1f} | {p['self_check_s']:.1f} | "
                     + ", ".join(f"{x['build_s']:.1f} / {x['bare_s']:.1f}" for x in p.get("repeats", [])) + " | "
                     + (f"{float(np.median([x['ratio'] for x in p['repeats']])):.2f}" if p.get("repeats") else "")
                     + " |")
    for r in results:
        p = r["pipeline"]
        lines += ["", f"Candidates, {r['data']} at {r['budget']} (measured on the {p['train_vectors']:,}-vector "
                  f"training sample with {p['recall']['queries']} held-out queries; chosen: "
                  f"{p['chosen']['why']}):", "",
                  "| candidate | family | B/vector | fits | trained s | best setting | 10-recall@10 | ms/query batch "
                  "(sample) | note |", "|---|---|---|---|---|---|---|---|---|"]
        for c in p["candidates"]:
            best = c["best"] or {}
            lines.append(f"| `{c['name']}` | {c['family']} | {c['bytes_per_vector']:.0f} | "
                         f"{'yes' if c['fits_budget'] else 'no'} | {c['train_seconds']:.1f} | "
                         f"{_fmt_params(c['best_setting']) if c['best_setting'] is not None else ''} | "
                         f"{best.get('recall_at_10', '')} | {best.get('ms_per_query_batch', '')} | "
                         f"{(c['skipped_reason'] or ('meets the target' if c['meets_target'] else 'misses'))} |")
    return "\n".join(lines) + "\n"


NOTE = ("The synthetic set has 1000 clusters, each spread over its own 16-dimensional subspace of the 512 "
        "(real embeddings have a low intrinsic dimension). Latencies on the 2 shared cores vary by up to 2x between "
        "runs; ratios are from one run. This machine's faiss-cpu 1.15 wheel loads its generic build (no AVX2 module), "
        "autofaiss's venv has faiss-cpu 1.9.0.post1: raw faiss speed differs between the two columns.")


def _save(path: str, name: str, rows: list[dict], notes: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    saved = json.load(open(path)) if os.path.exists(path) else {}
    # a run of one budget (--budget) keeps the other budget's rows from an earlier run
    labels = {r["budget"] for r in rows}
    old = saved.get(name, {}).get("rows", [])
    kept = [r for r in old if r["budget"] not in labels]
    for r in rows:  # a run without autofaiss (--afvenv '') keeps an earlier run's autofaiss figures, marked so
        earlier = next((o.get("autofaiss") for o in old if o["budget"] == r["budget"]), None)
        if r.get("autofaiss") is None and earlier and "error" not in earlier:
            r["autofaiss"] = {**earlier, "earlier_run": True}
    saved[name] = {"rows": sorted(kept + rows, key=lambda r: r["budget"] != "4 GB"), "notes": notes}
    with open(path, "w") as f:
        json.dump(saved, f, default=str)


def _budgets(args, n: int) -> list[tuple[str, float]]:
    both = [("4 GB", 4.0), (f"{args.tight_bytes:g} B/vector", args.tight_bytes * n / (1 << 30))]
    return {"both": both, "4gb": both[:1], "tight": both[1:]}[args.budget]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "pipeline":
            out = worker_pipeline(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]), args[5], args[6])
        else:
            out = worker_bare(args[0], args[1], args[2], int(args[3]))
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (512-d)")
    ap.add_argument("--texts", type=int, default=200_000, help="real sentences for MiniLM (0: skip)")
    ap.add_argument("--train_size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000, help="held-out sample rows of the self-check")
    ap.add_argument("--tight_bytes", type=float, default=100.0, help="tight budget, bytes per vector")
    ap.add_argument("--budget", choices=("both", "4gb", "tight"), default="both", help="which budgets to run")
    ap.add_argument("--afvenv", default="/tmp/afvenv", help="autofaiss's venv ('' to skip autofaiss)")
    ap.add_argument("--only", default="", help="synthetic or minilm: run one data set")
    ap.add_argument("--repeat", type=int, default=1,
                    help="pipeline and bare runs per budget, alternately; the medians are reported")
    ap.add_argument("--workdir", default="", help="keep the files here (default: a temporary folder)")
    ap.add_argument("--results", default=os.path.expanduser("~/.cache/catalog-index-bench/index-results.json"),
                    help="results of each data set are kept here; --report writes the section from them")
    ap.add_argument("--report", action="store_true", help="only write the section from --results")
    ap.add_argument("--note", action="append", default=[], help="a line to add to the section (with --report)")
    args = ap.parse_args()
    notes, results = [], []
    if args.report:
        with open(args.results) as f:
            saved = json.load(f)
        text = markdown([r for name in ("synthetic", "minilm") for r in saved.get(name, {}).get("rows", [])],
                        [n for name in ("synthetic", "minilm") for n in saved.get(name, {}).get("notes", [])]
                        + args.note + [NOTE], command="The commands in the notes below ran")
        print(text)
        write_heading_section(text)
        return
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        workdir = args.workdir or tmp
        if args.only in ("", "synthetic"):
            start = time.perf_counter()
            x = clustered(args.n + 1000, 512)
            rng = np.random.default_rng(1)
            pick = rng.permutation(len(x))
            xb, xq = x[pick[1000:]], x[pick[:1000]]
            del x
            print(f"synthetic: {args.n} x 512 generated in {time.perf_counter() - start:.1f} s", flush=True)
            budgets = _budgets(args, len(xb))
            rows = bench_dataset("synthetic clustered", xb, xq, workdir, args.train_size, args.queries, budgets,
                                 args.afvenv, on_row=lambda r: _save(args.results, "synthetic", r, []),
                                 repeat=args.repeat)
            results += rows
            _save(args.results, "synthetic", rows, [])
            del xb
        if args.texts and args.only in ("", "minilm"):
            xb, xq, info = minilm_vectors(args.texts)
            notes.append(f"MiniLM: {len(xb):,} sentences (of {info['texts']:,} unique ones found in /usr/share/man, "
                         f"drawn with a fixed seed) plus 1,000 more as queries, encoded by the packaged "
                         f"all-MiniLM-L6-v2 (real weights, mean pooling, max 48 tokens) in {info['encode_s']:.0f} s, "
                         "cached in ~/.cache/catalog-index-bench (not part of the timings).")
            budgets = _budgets(args, len(xb))
            rows = bench_dataset("MiniLM man pages", xb, xq, workdir, args.train_size, args.queries, budgets,
                                 args.afvenv, on_row=lambda r: _save(args.results, "minilm", r, notes[-1:]),
                                 repeat=args.repeat)
            results += rows
            _save(args.results, "minilm", rows, notes[-1:])
    notes.append(NOTE)
    text = markdown(results, notes)
    print(text)
    if args.only:
        print("(--only: BENCHMARKS.md left alone)")
    else:
        write_heading_section(text)


if __name__ == "__main__":
    main()
