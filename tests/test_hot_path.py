"""Issue 11's hot path in plain functions: reduced-scale decode, batch normalize, shard pieces, driver check."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from encoders import device
from encoders.media import decode_for_tower, decode_image
from encoders.preprocess import ImagePreprocess
from pipeline.stages import write
from schemas.embeddings import EmbeddingRecord, embeddings_schema, records_to_table
from tests.conftest import SAMPLE

PRE = ImagePreprocess(size=64, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))


def _jpeg(image: Image.Image, long_side: int, quality: int = 90) -> bytes:
    w, h = image.size
    scale = long_side / max(w, h)
    buf = io.BytesIO()
    image.resize((round(w * scale), round(h * scale))).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((SAMPLE / "images").glob("*.jpg"))[:8]]


def test_batch_normalize_is_bit_identical_to_the_per_image_arithmetic(photos):
    crops = np.stack([PRE.resize_crop(p) for p in photos])
    batch = PRE.normalize(crops)
    for crop, row in zip(crops, batch):
        x = np.asarray(crop, dtype=np.float32) / 255.0  # what preprocessing did per image before issue 11
        x = (x - np.asarray(PRE.mean, np.float32)) / np.asarray(PRE.std, np.float32)
        assert np.array_equal(np.ascontiguousarray(x.transpose(2, 0, 1)), row)
    assert batch.shape == (len(photos), 3, 64, 64) and batch.flags["C_CONTIGUOUS"]


def test_reduced_scale_jpeg_decode_stays_within_the_documented_tolerance(photos, tiny_clip_spec):
    """JPEG draft (DCT scaling) vs full decode, both then resized by PIL: the README's tolerance."""
    from encoders import towers

    pre = towers.image_preprocess(tiny_clip_spec)
    model = towers.load(tiny_clip_spec, torch.device("cpu"))
    drafted, full = [], []
    for photo in photos:
        for long_side in (256, 1024):
            data = _jpeg(photo, long_side)
            drafted.append(decode_for_tower(data, pre, 10**9))
            full.append(pre.resize_crop(decode_image(data, 10**9)))  # today's full-size decode
    a, b = pre.normalize(np.stack(drafted)), pre.normalize(np.stack(full))
    diff = np.abs(a - b)
    assert diff.mean() < 0.05 and np.percentile(diff, 99) < 0.6  # std units; values span about [-2, 2]
    cos = np.sum(model.encode_image(a, 16) * model.encode_image(b, 16), axis=1)
    assert np.all(cos > 0.98), cos


def test_draft_never_decodes_below_the_tower_input(photos):
    data = _jpeg(photos[0], 2048)
    image = decode_image(data, 10**9, draft_size=PRE.draft_size)
    assert min(image.size) >= PRE.size and max(image.size) <= 2048 // 4  # decoded at 1/8 or so, not full size
    small = decode_image(_jpeg(photos[0], 80), 10**9, draft_size=PRE.draft_size)
    assert min(small.size) >= 53  # too close to the input size to scale down: decoded as it is
    png = io.BytesIO()
    photos[0].save(png, "PNG")
    assert decode_image(png.getvalue(), 10**9, draft_size=PRE.draft_size).size == photos[0].size


def _table(ids: list[str], dim: int = 4) -> pa.Table:
    schema = embeddings_schema(dim, "float32", {"run_id": "t"})
    records = [EmbeddingRecord(i, np.full(dim, k, np.float32), ("text",), f"h{i}", "fp") for k, i in enumerate(ids)]
    return records_to_table(records, schema)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_shard_pieces_assemble_sorted_and_complete(tmp_path, monkeypatch, chunk):
    """Pieces written per batch, split by shard hash, assembled a chunk at a time: same rows, sorted by id."""
    monkeypatch.setattr(write, "CHUNK_ROWS", chunk)
    rng = np.random.default_rng(0)
    ids = [f"item-{i:03d}" for i in rng.permutation(40)]
    batches = [_table(ids[i:i + 7]) for i in range(0, 40, 7)]
    pieces = [write.write_piece(t, str(tmp_path / ".pieces")) for t in batches]
    num_shards = 3
    parts: dict[int, list] = {}
    for piece in pieces:
        for shard, part in write.split_by_shard(piece, num_shards):
            parts.setdefault(shard, []).append(part)
    total = []
    for shard, shard_parts in parts.items():
        path = str(tmp_path / f"shard-{shard}.parquet")
        n = write.assemble_shard(path, shard_parts[::-1], batches[0].schema)  # shuffle order must not matter
        table = pq.read_table(path)
        got = table.column("item_id").to_pylist()
        assert got == sorted(got) and n == len(got)
        assert all(write.shard_of(i, num_shards) == shard for i in got)
        assert table.schema.metadata == batches[0].schema.metadata
        total += got
        again = str(tmp_path / f"again-{shard}.parquet")
        write.assemble_shard(again, shard_parts, batches[0].schema)
        assert open(path, "rb").read() == open(again, "rb").read()  # a retried write gives the same bytes
    assert sorted(total) == sorted(ids)
    whole = pa.concat_tables([pq.read_table(tmp_path / f"shard-{s}.parquet") for s in parts]).sort_by("item_id")
    assert whole.equals(pa.concat_tables(batches).sort_by("item_id").cast(whole.schema))


def test_old_driver_fails_at_worker_start_naming_both_versions(tmp_path, monkeypatch):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert device.nvidia_driver_version(str(proc)) == "535.104.05"
    assert device.nvidia_driver_version(str(tmp_path / "absent")) is None
    with pytest.raises(device.DriverTooOld, match=r"CUDA 13\.0.*driver 580 or newer.*driver 535\.104\.05"):
        device.check_driver("535.104.05", "13.0")
    device.check_driver("580.65.06", "13.0")
    device.check_driver(None, "13.0")  # a CPU machine: nothing to check
    device.check_driver("535.104.05", "")  # a CPU-only torch build (torch.version.cuda is None)
    device.check_driver("535.104.05", "12.4")

    # the embed stage checks in setup, before any model is loaded
    from pipeline.stages.embed import _Embed

    monkeypatch.setattr(device, "nvidia_driver_version", lambda path=None: "550.54.15")
    fn = _Embed(routes=(), handlers={}, asr_handler=None, preprocess=None, fetch=None, audio=None, audio_rates=(),
                clap_rates={}, decode_images=True, layout=None, fusion=None, model_fingerprint="", media_errors="",
                schema=None, device="auto", threads=1, progress_interval_s=0)
    if torch.version.cuda and torch.version.cuda.startswith("13"):
        with pytest.raises(device.DriverTooOld, match="550.54.15"):
            fn.setup()
    cpu = _Embed(routes=(), handlers={}, asr_handler=None, preprocess=None, fetch=None, audio=None, audio_rates=(),
                 clap_rates={}, decode_images=True, layout=None, fusion=None, model_fingerprint="", media_errors="",
                 schema=None, device="cpu", threads=1, progress_interval_s=0)
    device.check_worker_gpu("cpu")  # --device cpu never looks at the driver
    assert cpu._device == "cpu"


@pytest.mark.slow  # starts Beam's model server process (torch import, model build)
def test_model_copies_per_gpu_share_one_copy_through_beams_model_server(tiny_clip_spec):
    """--model_copies_per_gpu: the handlers' worker_model is a proxy to a shared copy; same vectors as a local one."""
    from encoders.handlers import ImageEmbeddingHandler, TextEmbeddingHandler

    text = TextEmbeddingHandler(tiny_clip_spec, device="cpu", copies_per_gpu=1, batch_size=8)
    shared = text.worker_model()
    assert type(shared).__name__ == "_AutoProxyWrapper"
    local = TextEmbeddingHandler(tiny_clip_spec, device="cpu", batch_size=8).worker_model()
    np.testing.assert_array_equal(np.stack(text.apply(shared, ["red mug", "blue bag"])),
                                  local.encode_text(["red mug", "blue bag"], 8))
    image = ImageEmbeddingHandler(tiny_clip_spec, device="cpu", copies_per_gpu=1, batch_size=8)
    assert image.apply(image.worker_model(), np.zeros((3, 3, 32, 32), np.float32))[0].shape == (16,)


def test_torch_threads_are_capped_on_cpu_workers_only(monkeypatch):
    from pipeline.stages.embed import set_cpu_torch_threads

    before = torch.get_num_threads()
    try:
        assert not set_cpu_torch_threads(0, "cpu")  # 0: torch's default stays
        assert torch.get_num_threads() == before
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not set_cpu_torch_threads(1, "auto")  # a GPU worker is left alone
        assert not set_cpu_torch_threads(1, "cuda:0")
        assert torch.get_num_threads() == before
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert set_cpu_torch_threads(1, "auto") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_torch_threads_option_reaches_the_config_and_is_validated():
    import dataclasses

    from pipeline.options import CatalogIndexOptions, to_run_config

    options = CatalogIndexOptions(["--catalog", "c.parquet", "--output", "out", "--clip_model", "ViT-B-32",
                                   "--clip_weights", "random", "--text_model", "none", "--torch_threads", "1"])
    config, _ = to_run_config(options)
    assert config.torch_threads == 1
    with pytest.raises(ValueError, match="torch_threads"):
        dataclasses.replace(config, torch_threads=-1)


@pytest.mark.parametrize("n,count", [(0, 2), (1, 2), (5, 2), (7, 3), (4, 8), (9, 1)])
def test_local_images_are_cut_into_at_most_one_chunk_per_thread(n, count):
    from pipeline.stages.fetch import chunks

    got = chunks(list(range(n)), count)
    assert [k for c in got for k in c] == list(range(n))  # every job once, in order
    assert len(got) == min(n, count) and all(got)
    assert max(map(len, got), default=0) - min(map(len, got), default=0) <= 1


class _Pool:
    """Records what the fetcher submits; runs each job at once."""

    def __init__(self):
        self.jobs: list[list[str]] = []

    def submit(self, fn, uris, *args):
        import concurrent.futures

        self.jobs.append(list(uris))
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(uris, *args))
        return future


def test_fetcher_decodes_local_chunks_and_remote_images_one_job_each(tmp_path, photos):
    from encoders.media import FetchPolicy, MediaError
    from pipeline.stages.fetch import ImageFetcher
    from schemas.catalog import CatalogItem
    from schemas.dead_letter import Reason

    for k in range(5):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg(photos[k], 300))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    items = [CatalogItem("a", title="t", image_uris=("0.jpg", "1.jpg"), base_uri=str(tmp_path)),
             CatalogItem("b", title="t", image_uris=("gs://bucket/x.jpg", "bad.jpg", "2.jpg"), base_uri=str(tmp_path)),
             CatalogItem("c", title="t", image_uris=("3.jpg", "gs://other/y.jpg", "4.jpg"), base_uri=str(tmp_path))]
    policy = FetchPolicy(allowed_schemes=("file",), allowed_roots=(str(tmp_path),))
    pool = _Pool()
    results, cpu = ImageFetcher.collect(ImageFetcher(policy, PRE, local_threads=2).submit(pool, items))
    # 6 local images in 2 chunks of 3 (the bad one among them), each remote image its own job
    assert [len(j) for j in pool.jobs] == [3, 3, 1, 1] and pool.jobs[2] == ["gs://bucket/x.jpg"]
    assert [(job.item, job.index) for job, _ in results] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    reasons = [out.reason if isinstance(out, MediaError) else None for _, out in results]
    assert reasons == [None, None, Reason.FORBIDDEN_URI, Reason.DECODE_FAILED, None, None, Reason.FORBIDDEN_URI, None]
    decoded = [out for _, out in results if not isinstance(out, MediaError)]
    assert len(decoded) == 5
    for k, (pixels, digest) in enumerate(decoded):  # the same decode and digest as one image at a time
        data = (tmp_path / f"{k}.jpg").read_bytes()
        assert np.array_equal(pixels, decode_for_tower(data, PRE)) and digest == hashlib.sha256(data).hexdigest()
    assert cpu > 0


def _mixed_items(tmp_path, photos):
    from schemas.catalog import CatalogItem

    for k in range(5):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg(photos[k], 300 + 40 * k))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return [CatalogItem("a", title="t", image_uris=("0.jpg", "1.jpg"), base_uri=str(tmp_path)),
            CatalogItem("b", title="t", image_uris=("gs://bucket/x.jpg", "bad.jpg", "2.jpg", "gone.jpg"),
                        base_uri=str(tmp_path)),
            CatalogItem("c", title="t", image_uris=("3.jpg", "4.jpg"), base_uri=str(tmp_path), content_hash="h" * 64)]


def _outcomes(results):
    from encoders.media import MediaError

    return [(job, (type(out), out.reason, out.detail, getattr(out, "stage", None)) if isinstance(out, MediaError)
             else (out[0].tobytes(), out[0].shape, out[1])) for job, out in results]


def test_decoding_processes_give_the_outcomes_of_the_threads(tmp_path, photos):
    """The same pixels, digests and errors (reason, detail and stage cross the process boundary), and the
    local images are cut into one chunk per decoding process; remote ones stay on the threads."""
    import concurrent.futures

    from encoders.media import FetchPolicy
    from pipeline.stages.fetch import ImageFetcher
    from schemas.dead_letter import Reason

    items = _mixed_items(tmp_path, photos)
    policy = FetchPolicy(allowed_schemes=("file",), allowed_roots=(str(tmp_path),))
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        by_threads, _ = ImageFetcher.collect(ImageFetcher(policy, PRE, local_threads=1).submit(threads, items))
        pool = _Pool()
        submitted = ImageFetcher(policy, PRE, local_threads=1, processes=2).submit(pool, items)
        assert pool.jobs == [["gs://bucket/x.jpg"]]  # only the remote image reached the threads
        assert [len(group) for group, _, fallback in submitted[1] if fallback is not None] == [4, 3]
        by_processes, cpu = ImageFetcher.collect(submitted)
    assert _outcomes(by_processes) == _outcomes(by_threads)
    reasons = [out.reason if isinstance(out, Exception) else None for _, out in by_processes]
    assert reasons == [None, None, Reason.FORBIDDEN_URI, Reason.DECODE_FAILED, None, Reason.MISSING_MEDIA, None, None]
    assert [out[1] for _, out in by_processes if not isinstance(out, Exception)][-2:] == ["", ""]  # item c: hashed
    assert cpu > 0  # the decoding processes' own CPU seconds come back with their images


def test_a_chunk_whose_decoding_process_died_is_decoded_again_image_by_image(tmp_path, photos, monkeypatch,
                                                                            caplog):
    """A pool broken before the batch is replaced; a process that dies on a chunk costs only the image that
    kills it again in a private process (a decode_failed error), never its batch-mates; processes that die
    whatever they run blame no image; with no process at all, the threads decode, after one line that says why."""
    import concurrent.futures
    import logging
    import os

    from encoders.media import FetchPolicy, MediaError
    from pipeline.stages import decode_pool, fetch
    from schemas.catalog import CatalogItem
    from schemas.dead_letter import Reason, Stage

    items = _mixed_items(tmp_path, photos)
    (tmp_path / "poison.jpg").write_bytes((tmp_path / "1.jpg").read_bytes())  # decodes, but "kills" its process
    items.append(CatalogItem("d", title="t", image_uris=("poison.jpg", "0.jpg"), base_uri=str(tmp_path)))
    policy = FetchPolicy(allowed_schemes=("file",), allowed_roots=(str(tmp_path),))

    class Pool:  # a fake process pool: its process dies on a chunk holding poison.jpg (or on any job)
        def __init__(self, dies_always: bool = False):
            self.jobs: list[list[str]] = []
            self.dies_always = dies_always

        def submit(self, fn, *args):
            future: concurrent.futures.Future = concurrent.futures.Future()
            uris = args[0] if fn is decode_pool.decode_chunk else []
            if fn is decode_pool.decode_chunk:
                self.jobs.append(list(uris))
            if self.dies_always or any(u.endswith("poison.jpg") for u in uris):
                future.set_exception(concurrent.futures.process.BrokenProcessPool("killed"))
            else:
                future.set_result(fn(*args))
            return future

        def shutdown(self, **kwargs):
            pass

    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        expected, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, local_threads=1).submit(threads, items))
        broken = decode_pool.DecodePool.get(1)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            broken.submit(os._exit, 3).result()  # a decoding process that dies, as if killed
        got, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, processes=1).submit(threads, items))
        assert _outcomes(got) == _outcomes(expected)  # the broken pool was replaced before the batch
        fresh = decode_pool.DecodePool.get(1)
        assert fresh is not broken and fresh.submit(sum, [1, 2]).result() == 3

        shared, private, started = Pool(), Pool(), []
        monkeypatch.setattr(fetch.DecodePool, "get", classmethod(lambda cls, n: shared))
        monkeypatch.setattr(fetch.ImageFetcher, "_private_pool", staticmethod(lambda: started.append(1) or private))
        got, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, processes=2).submit(threads, items))
        dead_chunk = next(c for c in shared.jobs if any(u.endswith("poison.jpg") for u in c))
        assert len(shared.jobs) == 2 and len(dead_chunk) > 1  # the batch's two chunks, one of them dies
        assert private.jobs == [[u] for u in dead_chunk]  # then each image of it alone, in a private process
        assert len(started) == 2  # one process, and a new one after poison.jpg killed it
        poisoned = [k for k, (job, _) in enumerate(got) if job.uri.endswith("poison.jpg")]
        error = got[poisoned[0]][1]
        assert len(poisoned) == 1 and isinstance(error, MediaError)
        assert (error.reason, error.stage) == (Reason.DECODE_FAILED, Stage.DECODE) and fetch.DIED in error.detail
        assert [o for k, o in enumerate(_outcomes(got)) if k not in poisoned] == \
            [o for k, o in enumerate(_outcomes(expected)) if k not in poisoned]

        # processes that die whatever they run: no image is blamed, the thread decodes the chunk
        monkeypatch.setattr(fetch.ImageFetcher, "_private_pool", staticmethod(lambda: Pool(dies_always=True)))
        got, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, processes=2).submit(threads, items))
        poisoned_out = got[[k for k, (job, _) in enumerate(got) if job.uri.endswith("poison.jpg")][0]][1]
        assert not isinstance(poisoned_out, MediaError)  # decoded in the thread: poison.jpg is a good JPEG
        assert _outcomes(got) == _outcomes(expected)

        monkeypatch.setattr(fetch.DecodePool, "get", classmethod(lambda cls, n: broken))
        jobs = _Pool()
        got, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, processes=2).submit(jobs, items))
        assert _outcomes(got) == _outcomes(expected) and len(jobs.jobs) == 3  # 2 local chunks, 1 remote image

        class NoProcess(Pool):  # multiprocessing's error when processes start while the main module imports
            def submit(self, fn, *args):
                raise RuntimeError("\n        An attempt has been made to start a new process before the\n"
                                   "        current process has finished its bootstrapping phase.\n")

        monkeypatch.setattr(fetch.DecodePool, "get", classmethod(lambda cls, n: NoProcess()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=fetch.__name__):
            got, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, processes=2).submit(_Pool(), items))
        assert _outcomes(got) == _outcomes(expected)
        said = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(said) == 1 and "\n" not in said[0] and "the current process has finished its bootstrapping" in said[0]


def test_decoding_processes_exit_when_their_worker_process_is_killed(tmp_path):
    """Their parent is the fork server, so without a watch on the worker they would wait on their queue forever."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(SAMPLE.parent)!r})\n"
        "from pipeline.stages.decode_pool import DecodePool\n"
        "if __name__ == '__main__':\n"
        "    print(DecodePool.get(1).submit(os.getpid).result(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # the worker dies as if the OOM killer took it\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        subprocess.run([sys.executable, str(script)], stdout=f, timeout=120)
    child = int(out.read_text().split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # gone
        if state == "Z":
            return  # exited, not yet reaped by whoever adopted it
        time.sleep(0.1)
    os.kill(child, 9)
    raise AssertionError(f"decoding process {child} outlived its worker")


@pytest.mark.parametrize("run_as", ["script", "module"])
def test_decoding_processes_do_not_import_the_main_module_again(tmp_path, run_as):
    """multiprocessing would import the parent's main module in each child: Beam's sdk_worker_main (127 MB per
    process), or a script without a __main__ guard, run again with its pipeline in every decoding process.
    Another child of the same fork server still imports it (it may run functions defined there)."""
    import os
    import subprocess
    import sys

    (tmp_path / "prog").mkdir()
    (tmp_path / "prog" / "__init__.py").write_text("")
    (tmp_path / "prog" / "main.py").write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(SAMPLE.parent)!r})\n"
        "with open(os.environ['IMPORTS'], 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')  # what an unguarded script's pipeline would do again\n"
        "from pipeline.stages.decode_pool import new_pool\n"
        "if __name__ == '__main__':\n"
        "    pool = new_pool(2)\n"
        "    pids = {f.result() for f in [pool.submit(time.sleep, 0.3) for _ in range(2)] + [pool.submit(os.getpid)]}\n"
        "    import concurrent.futures, multiprocessing\n"
        "    other = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('forkserver'))\n"
        "    print(os.getpid(), len(pool._processes), other.submit(os.getpid).result())\n")
    imports = tmp_path / "imports.txt"
    command = [sys.executable, str(tmp_path / "prog" / "main.py")] if run_as == "script" else \
        [sys.executable, "-m", "prog.main"]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "IMPORTS": str(imports)}, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    parent, started, other = map(int, done.stdout.split())
    assert started == 2 and imports.read_text().split() == [str(parent), str(other)]


@pytest.mark.parametrize("threads,cores,expected", [(8, 2, 1), (8, 1, 1), (8, 8, 7), (2, 8, 2), (1, 16, 1), (8, 64, 8)])
def test_local_decode_threads_leave_a_core_to_the_dofns_thread(threads, cores, expected):
    from pipeline.stages.fetch import local_decode_threads

    assert local_decode_threads(threads, cores) == expected


def _content_hash_by_json_dumps(item, digests, model_fingerprint: str) -> str:
    """The content hash as rounds 1-6 wrote it (json.dumps of a dict): old runs' hashes must keep matching."""
    import json

    payload = {
        "text": item.text,
        "media": sorted((d.modality, d.index, d.sha256) for d in digests),
        "uris": {"image": list(item.image_uris), "audio": item.audio_uri},
        "models": model_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@pytest.mark.parametrize("item,digests", [
    (dict(item_id="a", title="Red mug", description="Ceramic, 300 ml"), []),
    (dict(item_id="b", title=None, description=None, image_uris=("img/x.jpg", "img/y.jpg")),
     [("image", 1, "f" * 64), ("image", 0, "0" * 64)]),
    (dict(item_id="c", title='Tasse "rouge" \\ 咖啡杯 \u2028 é', description="line\nbreak\ttab \x00",
          audio_uri="sounds/ding.wav"), [("audio", 0, "ab" * 32)]),
    (dict(item_id="d", title="x", image_uris=("gs://b/ü ñ.jpg",), audio_uri="a.wav"),
     [("audio", 0, "1" * 64), ("image", 0, "2" * 64)]),
])
def test_content_hash_keeps_the_bytes_of_the_json_dumps_version(item, digests):
    from pipeline.stages.fuse import content_hash
    from pipeline.stages.records import MediaDigest
    from schemas.catalog import CatalogItem

    it = CatalogItem(**item)
    media = [MediaDigest(*d) for d in digests]
    for fingerprint in ("fp-1", "ü\"fp"):
        assert content_hash(it, media, fingerprint) == _content_hash_by_json_dumps(it, media, fingerprint)


def test_catalog_item_caches_text_without_changing_equality_or_replace():
    import dataclasses

    from schemas.catalog import CatalogItem

    item = CatalogItem("a", title="Mug", description="Blue")
    assert item.text == "Mug. Blue" and item.modalities == frozenset({"text"})
    assert item == CatalogItem("a", title="Mug", description="Blue") and "text" not in repr(item)
    changed = dataclasses.replace(item, title="Cup")
    assert changed.text == "Cup. Blue" and item.text == "Mug. Blue"


def test_the_heap_is_frozen_once_per_process_and_later_cycles_are_still_collected():
    """freeze_heap_once (the embed stage's setup): one gc.freeze per process; garbage made afterwards is collected."""
    import subprocess
    import sys

    code = """
import gc
from pipeline.stages.embed import freeze_heap_once
assert gc.get_freeze_count() == 0
assert freeze_heap_once()
frozen = gc.get_freeze_count()
assert frozen > 1000, frozen
assert not freeze_heap_once() and gc.get_freeze_count() == frozen
a = []; a.append(a); del a
assert gc.collect() >= 1
print("ok")
"""
    root = str(SAMPLE.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip().endswith("ok")


def _edge_rows() -> list[dict]:
    long_id = "x" * 600
    many = [f"img/{i}.jpg" for i in range(33)]
    return [
        {"item_id": "a", "title": " Mug ", "description": "Blue\n", "image_uris": ["img/a.jpg"], "audio_uri": None},
        {"item_id": "  b  ", "title": "", "description": "   ", "image_uris": [" ", None, " img/b.jpg "],
         "audio_uri": "  "},
        {"item_id": None, "title": "no id", "description": None, "image_uris": None, "audio_uri": None},
        {"item_id": "   ", "title": "blank id", "description": None, "image_uris": None, "audio_uri": None},
        {"item_id": long_id, "title": "long id", "description": None, "image_uris": None, "audio_uri": None},
        {"item_id": "c", "title": None, "description": None, "image_uris": [], "audio_uri": None},  # empty item
        {"item_id": "d", "title": None, "description": None, "image_uris": None, "audio_uri": " s/d.wav "},
        {"item_id": "e", "title": "t" * 50, "description": "咖啡杯 \u2028", "image_uris": many, "audio_uri": None},
        {"item_id": "f", "title": None, "description": None, "image_uris": many[:30] + ["", " ", None, "  "],
         "audio_uri": None},  # 34 entries, 30 after dropping blanks: valid
        {"item_id": "a", "title": "dup", "description": None, "image_uris": None, "audio_uri": None},
    ]


@pytest.mark.parametrize("modalities", [frozenset({"text", "image", "audio"}), frozenset({"text"}),
                                        frozenset({"image"})])
@pytest.mark.parametrize("layout", ["list", "string_images", "int_ids", "passthrough", "missing_columns"])
def test_columnar_read_gives_exactly_the_row_by_row_outcomes(modalities, layout):
    """read.classify_rows (columns as lists, plain rows inline) == classify_row on each row's dict."""
    from pipeline.config import ReadConfig
    from pipeline.stages.read import classify_row, classify_rows
    from pipeline.stages.records import item_to_tuple
    from schemas.catalog import CatalogColumns, CatalogItem

    rows = _edge_rows()
    columns = CatalogColumns()
    if layout == "string_images":
        rows = [dict(r, image_uris=(r["image_uris"] or [None])[0]) for r in rows]
    if layout == "int_ids":
        rows = [dict(r, item_id=k) for k, r in enumerate(rows)]
    if layout == "passthrough":
        rows = [dict(r, price=float(k) if k != 3 else float("nan")) for k, r in enumerate(rows)]
        columns = CatalogColumns(passthrough=("price",))
    if layout == "missing_columns":
        rows = [{k: v for k, v in r.items() if k not in ("audio_uri", "description")} for r in rows]
    config = ReadConfig(catalog="x.parquet", columns=columns, max_text_chars=20)
    table = pa.Table.from_pylist(rows)
    got = classify_rows(table, config, modalities, "/base", "cat.parquet", 100)
    want = [classify_row(row, config, modalities, "/base", f"cat.parquet#{100 + k}") for k, row in enumerate(rows)]
    want = [item_to_tuple(w) if isinstance(w, CatalogItem) else w for w in want]
    assert got == want
    assert any(isinstance(g, tuple) for g in got) and any(not isinstance(g, tuple) for g in got)


def test_fuse_table_gives_the_rows_of_records_to_table_over_fuse_items(tiny_clip_spec):
    """The embed stage's column-by-column table == the record-by-record one, dead letters in the same order."""
    from encoders.asr import Transcript
    from encoders.fusion import FusionConfig, Layout
    from pipeline.config import Route
    from pipeline.stages.fuse import ItemFuser
    from pipeline.stages.records import ItemFailure, MediaDigest, ModalityVector
    from schemas.catalog import CatalogItem
    from schemas.dead_letter import Reason, Stage

    routes = (Route("text", "clip", tiny_clip_spec), Route("image", "clip", tiny_clip_spec))
    layout = Layout.from_dims({"clip": 8})
    rng = np.random.default_rng(3)

    def vec(m, i=0):
        return ModalityVector("clip", m, i, rng.standard_normal(8).astype(np.float32))

    items = [CatalogItem("a", title="Mug", description="Blue " * 40, image_uris=("x.jpg", "y.jpg")),
             CatalogItem("b", title="Lamp"),
             CatalogItem("c", title="Bad", image_uris=("z.jpg",)),
             CatalogItem("d", image_uris=("w.jpg",), attributes='{"p": 1}', content_hash="given"),
             CatalogItem("e", title="Zero")]
    vectors = [[vec("text"), vec("image", 1), vec("image", 0)], [vec("text")], [vec("text")], [vec("image")],
               [ModalityVector("clip", "text", 0, np.zeros(8, np.float32))]]
    failures = [[], [], [ItemFailure(Stage.FETCH, Reason.FETCH_FAILED, "gone", "z.jpg", "image")], [], []]
    digests = [[MediaDigest("image", 0, "1" * 64), MediaDigest("image", 1, "2" * 64)], [], [],
               [MediaDigest("image", 0, "3" * 64)], []]
    transcripts = {1: Transcript("spoken words", "en", 0.1)}
    schema = embeddings_schema(8, "float16", {"k": "v"})
    for media_errors in ("dead_letter", "drop_media"):
        fuser = ItemFuser(routes, layout, FusionConfig(), "fp", media_errors)
        outs = fuser.fuse_items(items, vectors, failures, digests, transcripts)
        records = [o for o in outs if isinstance(o, EmbeddingRecord)]
        table, dead = fuser.fuse_table(items, vectors, failures, digests, transcripts, schema)
        assert table.equals(records_to_table(records, schema))
        assert dead == [o for o in outs if not isinstance(o, EmbeddingRecord)] and dead
        assert table.column("item_id").to_pylist()[0] == "a"


def _decode_for_tower_round7(data: bytes, pre: ImagePreprocess) -> np.ndarray:
    """decode_for_tower as it was before round 8: convert("RGB") always (a copy for RGB), PIL's crop."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", pre.draft_size(*image.size))
    image.load()
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    nw, nh = pre.resized_size(*image.size)
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if (nw, nh) != (pre.size, pre.size):
        left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
        image = image.crop((left, top, left + pre.size, top + pre.size))
    return np.asarray(image, dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA-PNG", "P-PNG"])
@pytest.mark.parametrize("size", [(640, 480), (301, 999), (64, 64), (65, 200)])
@pytest.mark.parametrize("resize", ["shortest", "squash"])
def test_decode_for_tower_gives_the_pixels_of_the_round7_path(photos, mode, size, resize):
    """No convert copy for RGB and a view for the crop: the same uint8 pixels, for every mode and shape."""
    pre = ImagePreprocess(size=64, mean=PRE.mean, std=PRE.std, resize=resize)
    image = photos[1].resize(size)
    buf = io.BytesIO()
    if mode.endswith("PNG"):
        image.convert(mode.split("-")[0]).save(buf, "PNG")
    else:
        image.convert(mode).save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    got, want = decode_for_tower(data, pre), _decode_for_tower_round7(data, pre)
    assert got.shape == want.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.array_equal(got, want)
    assert np.array_equal(pre.normalize(np.stack([got, got])), pre.normalize(np.stack([want, want])))


@pytest.mark.parametrize("expected_delta", [0, -7, 5, None])
def test_local_read_takes_one_read_call_and_still_reads_a_file_that_changed_size(tmp_path, monkeypatch,
                                                                                  expected_delta):
    """One os.read for a file of the size stat reported; a stale size (grown or shrunk) still reads to the end."""
    import os

    from encoders import media

    data = bytes(range(256)) * 300
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    calls = []
    real_read = os.read
    monkeypatch.setattr(media.os, "read", lambda fd, n: calls.append(n) or real_read(fd, n))
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = len(data) + (expected_delta or 0)
        got = media._read_chunks(lambda n: os.read(fd, n), 10**9, str(path),
                                 expected=expected if expected_delta is not None else 0)
    finally:
        os.close(fd)
    assert got == data
    if expected_delta == 0:
        assert calls == [len(data) + 1]
    with pytest.raises(media.MediaError) as e:
        fd = os.open(path, os.O_RDONLY)
        try:
            media._read_chunks(lambda n: os.read(fd, n), len(data) - 1, str(path), expected=len(data))
        finally:
            os.close(fd)
    assert e.value.reason.value == "too_large"


def test_images_of_an_item_that_carries_its_content_hash_are_not_hashed_again(tmp_path, photos, monkeypatch):
    """The media sha256 only feeds the item's content hash: an item with its hash (metadata change detection)
    skips it, the others keep it; pixels are the same either way."""
    import concurrent.futures

    from encoders.media import FetchPolicy
    from pipeline.stages import decode_pool, fetch
    from schemas.catalog import CatalogItem

    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg(photos[k], 300))
    items = [CatalogItem("a", title="t", image_uris=("0.jpg", "1.jpg"), base_uri=str(tmp_path)),
             CatalogItem("b", title="t", image_uris=("2.jpg",), base_uri=str(tmp_path), content_hash="h" * 64)]
    hashed = []
    monkeypatch.setattr(decode_pool, "sha256_hex", lambda data: hashed.append(len(data)) or hashlib.sha256(data).hexdigest())
    policy = FetchPolicy(allowed_roots=(str(tmp_path),))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results, _ = fetch.ImageFetcher.collect(fetch.ImageFetcher(policy, PRE, local_threads=1).submit(pool, items))
    assert [(job.item, job.index) for job, _ in results] == [(0, 0), (0, 1), (1, 0)]
    assert len(hashed) == 2
    for job, (pixels, digest) in results:
        data = (tmp_path / f"{job.item * 2 + job.index}.jpg").read_bytes()
        assert np.array_equal(pixels, decode_for_tower(data, PRE))
        assert digest == ("" if job.item == 1 else hashlib.sha256(data).hexdigest())


def test_clips_of_an_item_that_carries_its_content_hash_are_not_hashed_again(tmp_path):
    import concurrent.futures

    import soundfile

    from encoders.audio import AudioPolicy
    from encoders.media import FetchPolicy
    from pipeline.stages.fetch_audio import AudioFetcher
    from schemas.catalog import CatalogItem

    t = np.arange(16000) / 16000
    for k in range(2):
        soundfile.write(tmp_path / f"{k}.wav", 0.3 * np.sin(2 * np.pi * (220 + 110 * k) * t), 16000)
    items = [CatalogItem("a", title="t", audio_uri="0.wav", base_uri=str(tmp_path)),
             CatalogItem("b", title="t", audio_uri="1.wav", base_uri=str(tmp_path), content_hash="h" * 64)]
    fetcher = AudioFetcher(FetchPolicy(allowed_roots=(str(tmp_path),)), AudioPolicy(), (16000,))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results, _ = AudioFetcher.collect(fetcher.submit(pool, items))
    digests = [out[1] for _, _, out in results]
    assert digests == [hashlib.sha256((tmp_path / "0.wav").read_bytes()).hexdigest(), ""]
    assert [pos for pos, _, _ in results] == [0, 1] and all(out[0].duration_s > 0.9 for _, _, out in results)
