"""Scale-out (issue 8): GPU placement and batch sizing, nvJPEG decoding with PIL fallback, Dataflow graph.

Everything here runs on CPU: the placement and batch-size policies are pure
functions fed fake numbers, the GPU decoder runs on CPU tensors, and the
Dataflow job is built and validated without being submitted.
"""
from __future__ import annotations

import io
import multiprocessing

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from encoders import placement
from encoders.gpu_decode import decode_batch, preprocess_tensor
from encoders.handlers import EncodeFailure, ImageBytes, ImageBytesHandler, ImageEmbeddingHandler
from encoders.media import MediaError
from encoders.preprocess import ImagePreprocess
from schemas.dead_letter import Reason, Stage

GIB = 1 << 30


@pytest.mark.parametrize("free, per_row, expected", [
    (40 * GIB, 10 * (1 << 20), 1024),   # plenty: capped at AUTO_MAX_BATCH
    (4 * GIB, 10 * (1 << 20), 327 // 8 * 8),  # 0.8 * 4096 MiB / 10 MiB = 327 rows -> 320
    (100 * (1 << 20), 10 * (1 << 20), 8),  # 8 rows fit exactly
    (10 * (1 << 20), 10 * (1 << 20), 8),  # not even one batch: the floor, so the OOM is loud
])
def test_batch_size_from_memory(free, per_row, expected):
    assert placement.batch_size_from_memory(free, per_row) == expected


def test_batch_size_from_memory_rejects_nonsense():
    with pytest.raises(ValueError, match="bytes_per_row"):
        placement.batch_size_from_memory(GIB, 0)
    with pytest.raises(ValueError, match="reserve"):
        placement.batch_size_from_memory(GIB, 1.0, reserve=1.0)


def test_auto_batch_on_cpu_is_fixed(tiny_clip_spec):
    from encoders import towers

    model = towers.load(tiny_clip_spec, torch.device("cpu"))
    assert placement.auto_batch_size(lambda rows: None, torch.device("cpu")) == placement.CPU_AUTO_BATCH
    pixels = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    # batch 0 (auto) and an explicit batch give the same vectors: fixed shapes on CPU
    np.testing.assert_array_equal(model.encode_image(pixels, 0), model.encode_image(pixels, 32))


def _claim(directory, count, queue):
    placement._claimed.clear()  # a forked child starts as a fresh worker process
    queue.put(placement.claim_gpu_slot(count, directory))


def test_gpu_slots_round_robin_across_processes(tmp_path):
    """Four worker processes on a two-GPU machine: two per GPU, never three on one."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), 2, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    slots = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(slots) == [0, 0, 1, 1]
    placement._claimed.clear()
    assert placement.claim_gpu_slot(3, str(tmp_path)) == 4 % 3  # the counter file kept counting
    assert placement.claim_gpu_slot(3, str(tmp_path)) == 4 % 3  # and a process keeps its slot
    placement._claimed.clear()


def test_pinned_is_a_no_op_off_gpu():
    x = torch.zeros(2, 3)
    assert placement.pinned(x, torch.device("cpu")) is x


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from tests.conftest import SAMPLE

    return Image.open(SAMPLE / "images" / "chelsea.jpg").convert("RGB")


PRE = ImagePreprocess(size=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def test_tensor_preprocess_matches_pil_preprocess(photo):
    """The GPU path's resize/crop/normalize agrees with the CPU path to resize-kernel rounding."""
    data = _encoded(photo, "JPEG", quality=95)
    tensor_path = decode_batch([data], PRE, torch.device("cpu"), 10**8)[0]
    pil_path = PRE(Image.open(io.BytesIO(data)).convert("RGB"))
    assert tensor_path.shape == (3, 64, 64)
    diff = np.abs(tensor_path.numpy() - pil_path)
    assert diff.mean() < 0.05 and np.percentile(diff, 99) < 0.5  # in units of std; values span ~[-3, 3]
    squash = ImagePreprocess(size=48, mean=PRE.mean, std=PRE.std, resize="squash")
    assert preprocess_tensor(torch.from_numpy(np.array(photo)).permute(2, 0, 1), squash).shape == (3, 48, 48)


def test_one_bad_image_never_fails_the_batch(photo):
    good = _encoded(photo, "JPEG")
    png = _encoded(photo, "PNG")  # not for nvJPEG: PIL fallback
    cmyk = _encoded(photo.convert("CMYK"), "JPEG")  # a JPEG nvJPEG does not take: PIL fallback
    truncated = good[: len(good) // 3]
    text = b"just some text, not an image"
    out = decode_batch([good, png, truncated, cmyk, text, good], PRE, torch.device("cpu"), 10**8)
    assert [type(o).__name__ for o in out] == ["Tensor", "Tensor", "MediaError", "Tensor", "MediaError", "Tensor"]
    assert out[2].reason is Reason.DECODE_FAILED
    assert out[4].reason is Reason.UNSUPPORTED_FORMAT
    assert torch.equal(out[0], out[5])
    big = decode_batch([good], PRE, torch.device("cpu"), max_pixels=100)[0]
    assert isinstance(big, MediaError) and big.reason is Reason.TOO_LARGE


def test_image_bytes_handler_isolates_decode_failures(photo, tiny_clip_spec):
    from encoders.towers import image_preprocess

    handler = ImageBytesHandler(tiny_clip_spec, image_preprocess(tiny_clip_spec), 10**8, device="cpu", batch_size=4)
    model = handler.load_model()
    batch = [ImageBytes("a.jpg", _encoded(photo, "JPEG")), ImageBytes("bad.jpg", b"\xff\xd8\xff\xe0broken"),
             ImageBytes("c.png", _encoded(photo, "PNG"))]
    results = list(handler.run_inference(batch, model))
    assert [r.example.uri for r in results] == ["a.jpg", "bad.jpg", "c.png"]
    failure = results[1].inference
    assert isinstance(failure, EncodeFailure) and failure.stage is Stage.DECODE and failure.source == "bad.jpg"
    for r in (results[0], results[2]):
        assert r.inference.shape == (16,) and abs(np.linalg.norm(r.inference) - 1) < 1e-5


def test_model_copies_are_counted_on_the_worker(tiny_clip_spec):
    h = ImageEmbeddingHandler(tiny_clip_spec, device="cpu", copies_per_gpu=2)
    assert h.share_model_across_processes() and h.model_copies() == 2  # no GPU: one "device"
    plain = ImageEmbeddingHandler(tiny_clip_spec, device="cpu")
    assert not plain.share_model_across_processes() and plain.model_copies() == 1
    auto = ImageEmbeddingHandler(tiny_clip_spec, device="cpu", batch_size=0)
    assert auto.batch_elements_kwargs()["max_batch_size"] == placement.AUTO_MAX_BATCH
    with pytest.raises(ValueError, match="model_copies_per_gpu"):
        ImageBytesHandler(tiny_clip_spec, ImagePreprocess(32, (0, 0, 0), (1, 1, 1)), 100, copies_per_gpu=1)


def _config(*flags):
    from pipeline.options import to_run_config

    return to_run_config(PipelineOptions(["--catalog", "gs://shop-bucket/catalog/*.parquet", "--preset", "offline-v1",
                                          *flags]))[0]


@pytest.mark.parametrize("flags, message", [
    (["--image_decode", "gpu", "--device", "cpu"], "needs a CUDA device"),
    (["--image_decode", "gpu", "--model_copies_per_gpu", "1"], "cannot be combined"),
    (["--model_copies_per_gpu", "99"], "model_copies_per_gpu"),
    (["--decode_threads", "0"], "decode_threads"),
    (["--decode_processes", "-1"], "decode_processes"),
])
def test_scale_options_are_validated(flags, message):
    with pytest.raises(ValueError, match=message):
        _config(*flags)


@pytest.mark.parametrize("flags, cores, rows, expected", [
    ([], 2, 0, 2), ([], 1, 0, 0), ([], 6, 0, 6), ([], 96, 0, 8),
    ([], 4, 2047, 0), ([], 4, 2048, 4), ([], 4, 10**8, 4),  # a small catalog does not pay back the pool's start
    (["--direct_running_mode", "in_memory"], 4, 0, 4),
    (["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"], 4, 0, 0),
    (["--runner", "DataflowRunner"], 16, 10**8, 0),
    (["--runner", "PortableRunner"], 16, 0, 0),
])
def test_decode_processes_auto_starts_them_only_where_the_pipeline_runs_in_this_process(flags, cores, rows,
                                                                                        expected):
    """This process cannot see a remote runner's workers, nor how many SDK processes share their vCPUs."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import auto_decode_processes

    assert auto_decode_processes(PipelineOptions(flags), cores, rows) == expected


def test_decode_processes_auto_keeps_the_threads_where_processes_cannot_start(monkeypatch):
    import multiprocessing.context

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import auto_decode_processes
    from pipeline.stages import decode_pool

    assert decode_pool.processes_supported()

    def no_semaphores(self):
        raise OSError(38, "Function not implemented")  # what sem_open gives without /dev/shm

    monkeypatch.setattr(multiprocessing.context.BaseContext, "Lock", no_semaphores)
    assert not decode_pool.processes_supported()
    assert auto_decode_processes(PipelineOptions([]), 4) == 0


def test_decode_processes_default_to_auto():
    assert _config().decode_processes is None and _config("--decode_processes", "auto").decode_processes is None
    assert _config("--decode_processes", "0").decode_processes == 0
    assert _config("--decode_processes", "3").decode_processes == 3


DATAFLOW_FLAGS = [
    "--runner=DataflowRunner", "--project=shop-project", "--region=us-central1",
    "--temp_location=gs://shop-bucket/tmp", "--staging_location=gs://shop-bucket/tmp/staging",
    "--experiments=use_runner_v2", "--experiments=no_use_multiple_sdk_containers",
    "--sdk_container_image=us-central1-docker.pkg.dev/shop-project/images/catalog-index:1",
    "--sdk_location=container",
    "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
    "--worker_machine_type=g2-standard-8", "--disk_size_gb=100", "--number_of_worker_harness_threads=4",
]


def test_dataflow_graph_constructs_without_submitting(tiny_text_dir):
    """The job a Dataflow launch would submit: options validated, graph built and translated, nothing run."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, WorkerOptions
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    from pipeline.graph import build
    from pipeline.options import to_run_config
    from tests.conftest import TINY_CLIP_JSON

    options = PipelineOptions(DATAFLOW_FLAGS + [
        "--catalog", "gs://shop-bucket/catalog/*.parquet", "--output", "gs://shop-bucket/index", "--run_id", "r1",
        "--previous_run", "none",  # finding the previous run reads gs://, which needs the gcp extra
        "--preset", "offline-v1", "--clip_model", TINY_CLIP_JSON, "--clip_weights", "random", "--text_model", tiny_text_dir,
        "--device", "cuda", "--precision", "bf16", "--batch_size", "0", "--image_decode", "gpu",
    ])
    config, _ = to_run_config(options)
    p = beam.Pipeline(options=options)  # runs Beam's option validator for the Dataflow runner
    assert isinstance(p.runner, DataflowRunner)
    build(p, config)
    proto = p.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"Read", "Incremental", "Embed", "WriteEmbeddings", "Publish"} <= names
    # issue 11: no shuffle between fetch and fusion; the only shuffles of items or rows are the join by id
    # and the shard write (the rest group counts and small side results)
    shuffles = sorted(t.unique_name for t in proto.components.transforms.values()
                      if t.spec.urn == "beam:transform:group_by_key:v1")
    assert not [s for s in shuffles if s.startswith(("Read", "Embed"))], shuffles
    assert "Incremental/JoinByIdBucket" in shuffles and "WriteEmbeddings/GroupByShard" in shuffles
    data_shuffles = [s for s in shuffles if not s.startswith(("Publish/", "Index/")) and "Count" not in s
                     and "CombineGlobally" not in s and "/Combine" not in s]
    assert data_shuffles == ["Incremental/JoinByIdBucket", "WriteDeadLetters/GroupByShard",
                             "WriteEmbeddings/GroupByShard"], \
        data_shuffles
    assert config.write.run_dir == "gs://shop-bucket/index/runs/r1"
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == [
        "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert options.view_as(WorkerOptions).sdk_container_image.endswith("catalog-index:1")


def test_dataflow_options_missing_project_are_refused():
    bad = [f for f in DATAFLOW_FLAGS if not f.startswith("--project")]
    with pytest.raises(ValueError, match="project"):
        beam.Pipeline(options=PipelineOptions(bad))


def _deploy(name: str) -> str:
    from tests.conftest import ROOT

    return str(ROOT / "deploy" / name)


def test_deploy_files_are_well_formed():
    import json
    import subprocess

    from pipeline.options import CatalogIndexOptions

    subprocess.run(["bash", "-n", _deploy("launch_dataflow.sh")], check=True)
    with open(_deploy("flex_template_metadata.json")) as f:
        meta = json.load(f)
    parser = __import__("argparse").ArgumentParser()
    CatalogIndexOptions._add_argparse_args(parser)
    known = {a.dest for a in parser._actions}
    assert {p["name"] for p in meta["parameters"]} <= known  # every template parameter is a real option
    text = open(_deploy("Dockerfile")).read()
    assert "pip check" in text and "constraints.txt" in text and "/opt/apache/beam/boot" in text


def test_launch_script_dry_run_has_gpu_worker_options(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, PROJECT="shop-project", IMAGE="img:1", BUCKET="shop-bucket", DRY_RUN="1",
               GPUS_PER_WORKER="2", MACHINE_TYPE="g2-standard-24")
    out = subprocess.run([_deploy("launch_dataflow.sh"), "--catalog", "gs://shop-bucket/c/*.parquet"],
                         env=env, check=True, capture_output=True, text=True).stdout
    for flag in ("--runner=DataflowRunner", "worker_accelerator=type:nvidia-l4\\;count:2\\;install-nvidia-driver",
                 "--worker_machine_type=g2-standard-24", "--disk_size_gb=100", "--experiments=use_runner_v2",
                 "--sdk_container_image=img:1", "--experiments=no_use_multiple_sdk_containers",
                 "--model_copies_per_gpu=1", "--setup_file"):
        assert flag in out, flag


@pytest.mark.slow
def test_pipeline_with_image_decode_gpu_on_cpu_tensors(sample_catalog, tiny_text_dir, tmp_path):
    """The --image_decode gpu graph end to end (bytes -> handler decode); torchvision decodes on CPU here."""
    from schemas.embeddings import vectors_of
    from tests.test_pipeline import run

    # --device auto: on this GPU-less machine the model, and so the decoder, run on CPU
    cpu_table, _, _, _ = run(sample_catalog, tmp_path / "a", "cpu-decode", tiny_text_dir)
    table, dead, manifest, _ = run(sample_catalog, tmp_path / "b", "gpu-decode", tiny_text_dir,
                                   "--device", "auto", "--image_decode", "gpu")
    assert manifest["image_decode"] == "gpu" and manifest["counts"]["embedded"] == cpu_table.num_rows
    assert manifest["image_decode_scaling"] == "full"
    assert dead.num_rows == 0
    assert table.column("num_images").to_pylist() == cpu_table.column("num_images").to_pylist()
    cos = np.sum(vectors_of(table) * vectors_of(cpu_table), axis=1)
    assert np.all(cos > 0.98)  # same items, same models; only the resize kernels differ
