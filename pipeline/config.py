"""Run configuration as frozen dataclasses, grouped by concern and validated on construction."""
from __future__ import annotations

import dataclasses
import re
import secrets
import time

from encoders.asr import AsrSpec, asr_fingerprint
from encoders.audio import AudioPolicy
from encoders.device import validate_placement
from encoders.fusion import FusionConfig, Layout
from encoders.media import FetchPolicy
from encoders import families
from encoders.specs import TEXT_FAMILIES, ModelSpec, fingerprint
from pipeline.index.defaults import DEFAULT_NPROBES, REUSE_SETTINGS
from schemas.catalog import CatalogColumns, MissingColumn

IMAGE_TEXT_FAMILIES = families.names(role="clip")  # models with an image and a text tower in one space
SOUND_FAMILIES = families.names(role="sound")
IMAGE_SPACE_FAMILIES = families.names(role="image")

MEDIA_ERROR_POLICIES = ("fail_item", "drop_media")
# A healthy nightly catalog loses well under 1% of rows to broken media and rows;
# 5% means something systemic (a bucket's permissions, a broken export, a model
# bug), and publishing would replace a good index with a visibly worse one.
DEFAULT_MAX_FAILURE_FRACTION = 0.05
_GLOB_CHARS = "*?["

# incremental runs: which previous run to reuse vectors from, and how changed media are detected
CHANGE_DETECTION = ("bytes", "metadata")
NONE = "none"
LATEST = "latest"


@dataclasses.dataclass(frozen=True)
class IncrementalConfig:
    """Which previous run to reuse vectors from, how to detect media changes, how many runs to keep."""

    previous_run: str = LATEST  # 'latest' (the run OUTPUT/LATEST points to), 'none', or a run directory
    change_detection: str = "bytes"
    keep_runs: int = 5  # published runs kept after a new one is published; 0 keeps all

    def __post_init__(self) -> None:
        if not self.previous_run:
            raise ValueError(f"previous_run must be {LATEST!r}, {NONE!r} or a run directory, got an empty string")
        if self.change_detection not in CHANGE_DETECTION:
            raise ValueError(f"change_detection {self.change_detection!r} is not one of {CHANGE_DETECTION}")
        if self.keep_runs < 0:
            raise ValueError(f"keep_runs must be >= 0 (0 keeps every run), got {self.keep_runs}")


def catalog_root(catalog: str) -> str:
    """The folder tree a catalog path or glob lives in: the default root media must lie under."""
    head = catalog
    for i, c in enumerate(catalog):
        if c in _GLOB_CHARS:
            head = catalog[:i]
            break
    else:
        head = catalog.rsplit("/", 1)[0] if "/" in catalog else ""
        return head or ("." if catalog else "")
    if head.endswith("/"):
        return head.rstrip("/") or "/"
    return head.rsplit("/", 1)[0] if "/" in head else "."
VECTOR_DTYPES = ("float32", "float16")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class Route:
    """One way a modality reaches a space: text -> clip, image -> clip, text -> text.

    ``via`` says what the encoder sees when it is not the modality itself:
    ``transcript`` (audio -> speech recognition -> a text tower) or
    ``waveform`` (audio -> CLAP's audio tower).
    """

    modality: str
    space: str
    spec: ModelSpec
    via: str = ""


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    catalog: str  # path or glob, any Beam filesystem; many files
    columns: CatalogColumns = CatalogColumns()
    max_text_chars: int = 10_000
    # default-named content columns the catalog lacks (schemas.catalog.resolve_columns, run at launch)
    missing_columns: tuple[MissingColumn, ...] = ()

    def manifest_entry(self) -> dict:
        """The manifest's ``catalog`` block: what was read, and which modalities were not (and why)."""
        return {"path": self.catalog, "columns": dataclasses.asdict(self.columns),
                "missing_columns": [m.to_json() for m in self.missing_columns]}

    def __post_init__(self) -> None:
        if not self.catalog:
            raise ValueError("--catalog is required (a Parquet path or glob)")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Which models, on which device, in which batches."""

    clip: ModelSpec | None
    text: ModelSpec | None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32  # 0: from free GPU memory on each worker (a fixed default on CPU)
    model_copies_per_gpu: int = 0  # 0: one copy per worker process; N: Beam's shared copies per GPU
    image_decode: str = "cpu"  # cpu: PIL in fetch threads; gpu: nvJPEG in the image handler
    asr: AsrSpec | None = None  # spoken audio -> transcript -> the clip and text spaces' text towers
    clap: ModelSpec | None = None  # audio -> CLAP audio tower (space clap) or aisfx (space sound)
    image: ModelSpec | None = None  # image -> an ImageNet classifier's pooled features (space image)

    def __post_init__(self) -> None:
        if self.clip is None and self.text is None and self.clap is None and self.image is None:
            raise ValueError("at least one of the clip, text, image and clap models must be set")
        if self.clap is not None and self.clap.family not in SOUND_FAMILIES:
            raise ValueError(f"the sound model needs a family in {SOUND_FAMILIES}, got {self.clap.family!r}")
        if self.clip is not None and self.clip.family not in IMAGE_TEXT_FAMILIES:
            raise ValueError(f"the clip space needs a family in {IMAGE_TEXT_FAMILIES}, got {self.clip.family!r}")
        if self.text is not None and self.text.family not in TEXT_FAMILIES:
            raise ValueError(f"the text space needs a family in {TEXT_FAMILIES}, got {self.text.family!r}")
        if self.image is not None and self.image.family not in IMAGE_SPACE_FAMILIES:
            raise ValueError(f"the image space needs family {' or '.join(map(repr, IMAGE_SPACE_FAMILIES))}, "
                             f"got {self.image.family!r}")
        if self.image is not None and self.clip is not None:
            from encoders.towers import image_preprocess

            if image_preprocess(self.image) != image_preprocess(self.clip):
                raise ValueError(f"the image model {self.image.name} and the clip model {self.clip.name} need "
                                 "different image preprocessing; one run decodes each image once, for one of them")
        validate_placement(self.device, self.precision, self.batch_size, self.model_copies_per_gpu, self.image_decode)
        if self.image_decode == "gpu" and self.device == "cpu":
            raise ValueError("image_decode 'gpu' needs a CUDA device, but device is 'cpu'")

    @property
    def routes(self) -> tuple[Route, ...]:
        routes = []
        if self.clip is not None:
            space = families.get(self.clip.family).space  # a bridge (conse) is labelled as one
            routes += [Route("text", space, self.clip), Route("image", space, self.clip)]
        if self.image is not None:
            routes.append(Route("image", families.get(self.image.family).space, self.image))
        if self.text is not None:
            routes.append(Route("text", "text", self.text))
        if self.asr is not None:
            routes += [Route("audio", r.space, r.spec, "transcript") for r in routes if r.modality == "text"]
        if self.clap is not None:
            space = families.get(self.clap.family).space  # clap, or sound (aisfx)
            routes.append(Route("audio", space, self.clap, "waveform"))
        return tuple(routes)

    @property
    def space_specs(self) -> dict[str, ModelSpec]:
        return {r.space: r.spec for r in self.routes}


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    output: str
    run_id: str = ""
    num_shards: int = 0  # 0: from the row count and rows_per_shard
    rows_per_shard: int = 200_000
    vector_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("--output is required")
        if not self.run_id:
            object.__setattr__(self, "run_id", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3))
        if not _RUN_ID_RE.match(self.run_id):
            raise ValueError(f"run id {self.run_id!r} must match {_RUN_ID_RE.pattern}")
        if self.num_shards < 0 or self.rows_per_shard < 1:
            raise ValueError(f"num_shards must be >= 0 and rows_per_shard >= 1, got {self.num_shards}, {self.rows_per_shard}")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector dtype {self.vector_dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")

    @property
    def run_dir(self) -> str:
        return f"{self.output.rstrip('/')}/runs/{self.run_id}"


INDEX_METRICS = ("ip", "l2")
REUSE_QUANTIZER = REUSE_SETTINGS


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """The FAISS index stage: parameters are automatic unless given (see pipeline/indexing.choose_params)."""

    enabled: bool = True
    factory: str = ""  # a faiss factory string; exclusive with nlist/m/nbits/opq
    nlist: int = 0  # 0: automatic, from N and the training sample
    m: int = 0  # PQ sub-quantizers; 0: automatic, from the memory budget
    nbits: int = 0  # bits per PQ code; 0: automatic (8 when the sample allows)
    opq: bool = False
    metric: str = "ip"
    memory_gb: float = 4.0
    train_size: int = 100_000  # vectors sampled to train the quantizer and PQ codebooks
    num_queries: int = 1000  # held-out sample for the recall self-check
    k: int = 10
    target_recall: float = 0.95  # k-recall@k the chosen index and its recommended setting must reach
    # batched ms per query the recommended setting may cost (autofaiss's default latency cap is 10 ms)
    max_query_ms: float = 10.0
    recall_queries: str = ""  # JSON-lines queries in eval's format, encoded with the run's models (launcher)
    nprobes: tuple[int, ...] = DEFAULT_NPROBES
    merge: bool = False  # also write one merged index
    # vectors per index shard: a smaller catalog is one shard, which holds the trained fixed part once
    shard_vectors: int = 1_000_000
    # auto: an incremental run reuses the previous run's trained quantizer when its measured drift allows
    reuse_quantizer: str = "auto"
    quantizer_drift_tolerance: float = 0.10  # accepted rise of held-out quantization error over training time

    def __post_init__(self) -> None:
        if self.metric not in INDEX_METRICS:
            raise ValueError(f"index metric {self.metric!r} is not one of {INDEX_METRICS}")
        if self.factory and (self.nlist or self.m or self.nbits or self.opq):
            raise ValueError(f"index factory {self.factory!r} excludes nlist/m/nbits/opq "
                             f"(got nlist={self.nlist}, m={self.m}, nbits={self.nbits}, opq={self.opq})")
        if self.nlist < 0 or self.m < 0 or not 0 <= self.nbits <= 16:
            raise ValueError(f"index nlist and m must be >= 0 and nbits in 0..16 (0: automatic), "
                             f"got nlist={self.nlist}, m={self.m}, nbits={self.nbits}")
        if self.memory_gb <= 0:
            raise ValueError(f"index memory budget must be > 0 GB, got {self.memory_gb}")
        if self.train_size < 1 or self.num_queries < 1 or self.k < 1:
            raise ValueError(f"index train_size, num_queries and k must be >= 1, "
                             f"got {self.train_size}, {self.num_queries}, {self.k}")
        if self.shard_vectors < 1:
            raise ValueError(f"index shard vectors must be >= 1, got {self.shard_vectors}")
        if not self.max_query_ms > 0:
            raise ValueError(f"max query ms must be > 0, got {self.max_query_ms}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")
        if not self.nprobes or any(p < 1 for p in self.nprobes):
            raise ValueError(f"nprobe ladder must be positive integers, got {self.nprobes}")
        if self.reuse_quantizer not in REUSE_QUANTIZER:
            raise ValueError(f"reuse_quantizer {self.reuse_quantizer!r} is not one of {REUSE_QUANTIZER}")
        if not 0 <= self.quantizer_drift_tolerance < 10:
            raise ValueError(f"quantizer drift tolerance must be in [0, 10) (0.10 = 10% more error), "
                             f"got {self.quantizer_drift_tolerance}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    read: ReadConfig
    encode: EncodeConfig
    write: WriteConfig
    fetch: FetchPolicy = FetchPolicy()
    fusion: FusionConfig = FusionConfig()
    audio: AudioPolicy = AudioPolicy()
    index: IndexConfig = IndexConfig()
    media_errors: str = "fail_item"
    progress_interval_s: float = 10.0
    preset: str = ""
    max_failure_fraction: float = DEFAULT_MAX_FAILURE_FRACTION
    decode_threads: int = 8  # fetch/decode threads per worker process, overlapping the model
    # processes that decode local images per worker process (0: the threads do; None: auto, decided where the
    # graph is built: pipeline.options.auto_decode_processes)
    decode_processes: int | None = None
    torch_threads: int = 0  # torch intra-op threads per worker process on CPU (0: torch's default)
    items_per_batch: int = 256  # items per element from the join to the write (pipeline/stages/embed.py)
    incremental: IncrementalConfig = IncrementalConfig()

    def __post_init__(self) -> None:
        if self.media_errors not in MEDIA_ERROR_POLICIES:
            raise ValueError(f"media_errors {self.media_errors!r} is not one of {MEDIA_ERROR_POLICIES}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")
        if not 1 <= self.decode_threads <= 256:
            raise ValueError(f"decode_threads must be in 1..256, got {self.decode_threads}")
        if self.decode_processes is not None and not 0 <= self.decode_processes <= 256:
            raise ValueError(f"decode_processes must be auto or in 0..256 (0: decode on the threads), "
                             f"got {self.decode_processes}")
        if not 0 <= self.torch_threads <= 256:
            raise ValueError(f"torch_threads must be in 0..256 (0: torch's default), got {self.torch_threads}")
        if not 1 <= self.items_per_batch <= 65_536:
            raise ValueError(f"items_per_batch must be in 1..65536, got {self.items_per_batch}")

    def layout(self) -> Layout:
        from encoders.towers import output_dim

        dims = {space: output_dim(spec) for space, spec in self.encode.space_specs.items()}
        return Layout.build([(r.modality, r.space) for r in self.encode.routes], dims, self.fusion)

    def model_fingerprint(self) -> str:
        """One id for the whole model set and fusion: equal ids mean comparable vectors."""
        import hashlib
        import json

        parts = {space: fingerprint(spec) for space, spec in self.encode.space_specs.items()}
        if self.encode.asr is not None:  # transcripts decide the audio vectors of the text spaces
            parts["asr"] = asr_fingerprint(self.encode.asr)
        payload = json.dumps({"models": parts, "fusion": self.fusion.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def metadata(self) -> dict:
        """What the embeddings files and the manifest record about how vectors were made."""
        return {
            "run_id": self.write.run_id,
            "preset": self.preset,
            "models": {space: spec.describe() for space, spec in self.encode.space_specs.items()},
            "routes": [{"modality": r.modality, "space": r.space, **({"via": r.via} if r.via else {})}
                       for r in self.encode.routes],
            **({"asr": self.encode.asr.describe()} if self.encode.asr is not None else {}),
            "layout": self.layout().to_json(),
            "fusion": self.fusion.to_json(),
            "model_fingerprint": self.model_fingerprint(),
            # the two decoders agree to resize rounding, not bit for bit
            "image_decode": self.encode.image_decode,
            # cpu: JPEGs much larger than the tower's input are decoded at 1/2..1/8 scale (PIL draft) first
            "image_decode_scaling": "jpeg_draft" if self.encode.image_decode == "cpu" else "full",
            # open_clip's causal text towers run each text over its own length bucket, not the full 77-token
            # context: within encoders.text_context.TOLERANCE of the full forward (measured bit-identical on CPU)
            "text_context": "length_buckets",
        }
