"""Run configuration as frozen dataclasses, grouped by concern and validated on construction."""
from __future__ import annotations

import dataclasses
import re
import secrets
import time

from encoders.fusion import FusionConfig, Layout
from encoders.handlers import PRECISIONS
from encoders.media import FetchPolicy
from encoders.specs import CLIP_FAMILIES, ModelSpec, fingerprint
from encoders.device import validate_device_spec
from pipeline.incremental import IncrementalConfig
from schemas.catalog import CatalogColumns

MEDIA_ERROR_POLICIES = ("fail_item", "drop_media")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class Route:
    """One way a modality reaches a space: text -> clip, image -> clip, text -> text."""

    modality: str
    space: str
    spec: ModelSpec


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    catalog: str  # path or glob, any Beam filesystem; many files
    columns: CatalogColumns = CatalogColumns()
    max_text_chars: int = 10_000

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
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.clip is None and self.text is None:
            raise ValueError("at least one of the clip and text models must be set")
        if self.clip is not None and self.clip.family not in CLIP_FAMILIES:
            raise ValueError(f"the clip space needs a family in {CLIP_FAMILIES}, got {self.clip.family!r}")
        if self.text is not None and self.text.family != "hf_text":
            raise ValueError(f"the text space needs family 'hf_text', got {self.text.family!r}")
        validate_device_spec(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f"batch_size must be in 1..4096, got {self.batch_size}")

    @property
    def routes(self) -> tuple[Route, ...]:
        routes = []
        if self.clip is not None:
            routes += [Route("text", "clip", self.clip), Route("image", "clip", self.clip)]
        if self.text is not None:
            routes.append(Route("text", "text", self.text))
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
        if self.vector_dtype not in ("float32", "float16"):
            raise ValueError(f"vector dtype {self.vector_dtype!r} is not one of float32, float16")

    @property
    def run_dir(self) -> str:
        return f"{self.output.rstrip('/')}/runs/{self.run_id}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    read: ReadConfig
    encode: EncodeConfig
    write: WriteConfig
    fetch: FetchPolicy = FetchPolicy()
    fusion: FusionConfig = FusionConfig()
    media_errors: str = "fail_item"
    progress_interval_s: float = 10.0
    preset: str = ""
    incremental: IncrementalConfig = IncrementalConfig()

    def __post_init__(self) -> None:
        if self.media_errors not in MEDIA_ERROR_POLICIES:
            raise ValueError(f"media_errors {self.media_errors!r} is not one of {MEDIA_ERROR_POLICIES}")

    def layout(self) -> Layout:
        from encoders.towers import output_dim

        return Layout.from_dims({space: output_dim(spec) for space, spec in self.encode.space_specs.items()})

    def model_fingerprint(self) -> str:
        """One id for the whole model set and fusion: equal ids mean comparable vectors."""
        import hashlib
        import json

        parts = {space: fingerprint(spec) for space, spec in self.encode.space_specs.items()}
        payload = json.dumps({"models": parts, "fusion": self.fusion.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def metadata(self) -> dict:
        """What the embeddings files and the manifest record about how vectors were made."""
        return {
            "run_id": self.write.run_id,
            "preset": self.preset,
            "models": {space: spec.describe() for space, spec in self.encode.space_specs.items()},
            "routes": [{"modality": r.modality, "space": r.space} for r in self.encode.routes],
            "layout": self.layout().to_json(),
            "fusion": self.fusion.to_json(),
            "model_fingerprint": self.model_fingerprint(),
        }
