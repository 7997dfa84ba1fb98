"""manifest.json, typed: what one published run holds, how it was made, and what it measured.

The manifest is the contract with the serving side (and with the next run:
incremental reuse, quantizer reuse, the report's drift), so its JSON keys
stay as they are; this module gives them one definition. The publish stage
builds a :class:`Manifest` and writes :meth:`Manifest.to_json`; every reader
(the report, search, eval, fit-fusion, the next run) goes through
:meth:`Manifest.from_json` / :func:`read` and attribute access, never through
string keys of its own.

Each part is a frozen dataclass whose fields are the JSON keys in the order
they are written. Keys a part does not name (a block's optional extras, or a
key a newer writer added) are kept in its ``extra`` mapping and written back,
so ``from_json``/``to_json`` round-trip a manifest exactly. Blocks whose shape
belongs to another module stay plain JSON values here and say whose they are:
``stats`` (pipeline.report.stats), ``layout`` and ``fusion`` (encoders.fusion),
``timings`` (pipeline.stages.stage_metrics), an index's ``candidates`` and ``chosen``
(pipeline.index.index_select).

``format_version`` 1 is every manifest written so far; bump it only when the
JSON changes, and keep :meth:`Manifest.from_dict` reading version 1.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from schemas.catalog import CatalogColumns

FORMAT_VERSION = 1
FILE_NAME = "manifest.json"

_P = TypeVar("_P", bound="Part")
_RECALL_KEY = re.compile(r"^recall_(\d+)_at_(\d+)$")


def recall_key(k: int) -> str:
    """The recall table's column for k-recall@k (``recall_10_at_10``): the one place that spells it."""
    return f"recall_{k}_at_{k}"


def _part_type(hint: Any) -> tuple[str, "type[Part] | None"]:
    """('part', P) for P, P | None; ('parts', P) for tuple[P, ...]; ('raw', None) for anything else."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, Part):
        return "part", hint
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _part_type(args[0]) if len(args) == 1 else ("raw", None)
    if origin is tuple:
        items = typing.get_args(hint)
        if items and isinstance(items[0], type) and issubclass(items[0], Part):
            return "parts", items[0]
    return "raw", None


class Part:
    """A JSON object as a frozen dataclass; unnamed keys are kept in ``extra`` and written back."""

    # fields left out of the JSON when None (keys that writers add only sometimes)
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _fields(cls) -> "dict[str, tuple[str, type[Part] | None]]":
        cached = cls.__dict__.get("_field_kinds")
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = {f.name: _part_type(hints[f.name]) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                      if f.name != "extra"}
            cls._field_kinds = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def from_dict(cls: type[_P], data: Mapping[str, Any]) -> _P:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        kinds, kwargs, extra = cls._fields(), {}, {}
        for key, value in data.items():
            if key not in kinds:
                extra[key] = copy.deepcopy(value)
                continue
            kind, part = kinds[key]
            if kind in ("part", "parts") and value is not None:
                assert part is not None  # _part_type names a Part class for these kinds
                kwargs[key] = part.from_dict(value) if kind == "part" else tuple(part.from_dict(v) for v in value)
            else:
                kwargs[key] = copy.deepcopy(value)
        return cls(**kwargs, extra=extra)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (kind, _) in self._fields().items():
            value = getattr(self, name)
            if value is None and name in self.OPTIONAL:
                continue
            if kind == "part" and value is not None:
                value = value.to_dict()
            elif kind == "parts" and value is not None:
                value = [v.to_dict() for v in value]
            else:
                value = copy.deepcopy(value)
            out[name] = value
        out.update(copy.deepcopy(dict(self.extra)))  # type: ignore[attr-defined]
        return out


class ManifestError(ValueError):
    """manifest.json is not a manifest this code can read."""


def _extra() -> Any:
    return dataclasses.field(default_factory=dict, compare=True)


@dataclasses.dataclass(frozen=True)
class Catalog(Part):
    """``catalog``: what was read (``pipeline.config.ReadConfig.manifest_entry``), with the column mapping."""

    path: str = ""
    columns: dict[str, Any] | None = None  # CatalogColumns as a dict; None: a run from before column blocks
    missing_columns: list = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: Any) -> "Catalog":
        if isinstance(data, str):  # the oldest manifests recorded the catalog path alone
            return cls(path=data)
        return super().from_dict(data)

    def to_dict(self) -> Any:
        if self.columns is None and not self.missing_columns and not self.extra:
            return self.path
        return super().to_dict()

    def column_mapping(self) -> CatalogColumns:
        """The catalog's physical column names as the run read them (the defaults for older runs)."""
        if not self.columns:
            return CatalogColumns()
        known = {f.name for f in dataclasses.fields(CatalogColumns)}
        cols = {k: v for k, v in self.columns.items() if k in known}
        if "passthrough" in cols:
            cols["passthrough"] = tuple(cols["passthrough"])
        return CatalogColumns(**cols)


@dataclasses.dataclass(frozen=True)
class Embeddings(Part):
    """``embeddings``: where the vectors are, their dtype and dimension."""

    dir: str = "embeddings"
    dtype: str = "float32"
    dim: int = 0
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class ModelEntry(Part):
    """One entry of ``models`` (by space) or ``asr``: ``encoders.specs`` ``describe()`` output."""

    OPTIONAL = frozenset({"weights_label"})

    family: str = ""
    name: str = ""
    weights: str = ""
    weights_label: str | None = None  # "real", "random", ...
    # seed, a ConSE model's text tower and top_k, the ASR settings, then the fingerprint
    extra: dict[str, Any] = _extra()

    @property
    def real(self) -> bool:
        return self.weights_label == "real"

    @property
    def fingerprint(self) -> str | None:
        return self.extra.get("fingerprint")

    def get(self, key: str, default: Any = None) -> Any:
        """An extra setting (``language``, ``top_k``, ...) by its JSON key."""
        return self.extra.get(key, default)


@dataclasses.dataclass(frozen=True)
class IncrementalCounts(Part):
    """``counts.incremental`` (``pipeline.stages.incremental.incremental_counts``)."""

    reused: int = 0
    new: int = 0
    changed: int = 0
    deleted: int = 0
    resumed: int = 0
    encoded: int = 0
    previous_run: dict[str, Any] | None = None  # incremental.PreviousRun.to_json(), None on a first run
    change_detection: str = ""
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Counts(Part):
    """``counts``: every input row is embedded, dead-lettered or a counted skip."""

    OPTIONAL = frozenset({"incremental"})

    input_rows: int = 0
    embedded: int = 0
    dead_letters: dict[str, int] = dataclasses.field(default_factory=dict)  # reason code -> rows
    skipped: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    incremental: IncrementalCounts | None = None
    extra: dict[str, Any] = _extra()

    @property
    def failed(self) -> int:
        return sum(self.dead_letters.values())

    @property
    def failed_fraction(self) -> float:
        """Dead-lettered rows over input rows (0 for an empty catalog)."""
        return self.failed / self.input_rows if self.input_rows else 0.0

    @property
    def accounted(self) -> int:
        return self.embedded + self.failed + self.skipped


@dataclasses.dataclass(frozen=True)
class Accounting(Part):
    """``accounting``: the failed fraction and the limit it was checked against."""

    failed_fraction: float = 0.0
    max_failure_fraction: float = 1.0
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Shard(Part):
    """One index shard: its faiss file, its id file (faiss id -> item id), its vector count."""

    shard: int = 0
    index: str = ""
    ids: str = ""
    count: int = 0
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Quantizer(Part):
    """``index.quantizer`` (``pipeline.index.quantizer_reuse.manifest_block``): trained or reused, why, the errors.

    The decision's figures (``sample_error``, ``error_ratio``, ...) and the
    reuse chain are present only for an index with a quantizer, so they live
    in ``extra`` and are read through the properties below.
    """

    applicable: bool = False
    reused: bool = False
    reason: str = ""
    reuse_setting: str = ""
    model_fingerprint: str = ""
    applies_to: list = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = _extra()

    @property
    def baseline_error(self) -> float | None:
        """The held-out quantization error when this quantizer was trained (what the next run compares with)."""
        return self.extra.get("baseline_error")

    @property
    def trained_run_id(self) -> str | None:
        return self.extra.get("trained_run_id")

    @property
    def reused_from_run_id(self) -> str | None:
        return self.extra.get("reused_from_run_id")

    def get(self, key: str, default: Any = None) -> Any:
        """A decision figure (``error_ratio``, ``tolerance``, ``sample_size``, ...) by its JSON key."""
        return self.extra.get(key, default)


@dataclasses.dataclass(frozen=True)
class RecallRow(Part):
    """One row of the recall table: a search setting on one query set, its recalls and latency."""

    query_set: str = "held_out"
    nprobe: int | None = None
    recalls: dict[int, float] = dataclasses.field(default_factory=dict)  # k -> k-recall@k (1 -> 1-recall@1)
    ms_per_query: float = 0.0
    single_query_ms_p50: float | None = None
    params: dict[str, Any] | None = None  # the faiss search parameters (absent in the oldest tables)
    extra: dict[str, Any] = _extra()

    def recall(self, k: int) -> float | None:
        """k-recall@k of this row (None when not measured)."""
        return self.recalls.get(k)

    def setting(self) -> dict[str, Any]:
        """The search parameters of this row (older tables recorded only an nprobe)."""
        if self.params is not None:
            return dict(self.params)
        return {"nprobe": self.nprobe} if self.nprobe is not None else {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RecallRow":
        recalls, extra = {}, {}
        for key, value in data.items():
            match = _RECALL_KEY.match(key)
            if match and match.group(1) == match.group(2):
                recalls[int(match.group(1))] = value
            elif key not in ("query_set", "nprobe", "ms_per_query", "single_query_ms_p50", "params"):
                extra[key] = copy.deepcopy(value)
        return cls(query_set=data.get("query_set", "held_out"), nprobe=data.get("nprobe"), recalls=recalls,
                   ms_per_query=data.get("ms_per_query", 0.0), single_query_ms_p50=data.get("single_query_ms_p50"),
                   params=copy.deepcopy(data["params"]) if "params" in data else None, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.params is None else {"params": copy.deepcopy(self.params)}
        out.update(query_set=self.query_set, nprobe=self.nprobe)
        # the table's k first, then recall@1 (the order recall_table writes them)
        for k in sorted(self.recalls, key=lambda k: (k == 1, -k)):
            out[recall_key(k)] = self.recalls[k]
        out.update(ms_per_query=self.ms_per_query, single_query_ms_p50=self.single_query_ms_p50)
        out.update(copy.deepcopy(self.extra))
        return out


@dataclasses.dataclass(frozen=True)
class Recall(Part):
    """``index.recall``: the self-check of the finished index against exact search."""

    OPTIONAL = frozenset({"recommended_params"})

    k: int = 10
    queries: int = 0
    held_out: bool = False
    recall_queries: int = 0
    recall_queries_file: dict[str, Any] | None = None
    ground_truth: str = ""
    target_recall: float = 0.0
    recommended_nprobe: int | None = None
    recommended_params: dict[str, Any] | None = None  # absent in runs from before candidate selection
    target_reached: bool = False
    table: tuple[RecallRow, ...] = ()
    recall_queries_table: tuple[RecallRow, ...] = ()
    extra: dict[str, Any] = _extra()

    def recall_at(self, params: Mapping[str, Any], query_set: str = "held_out") -> float | None:
        """k-recall@k measured with search setting ``params`` on ``query_set`` (None when not measured)."""
        rows = self.table if query_set == "held_out" else self.recall_queries_table
        return next((r.recall(self.k) for r in rows if r.setting() == dict(params)), None)


@dataclasses.dataclass(frozen=True)
class IndexParamFields:
    """An index's parameters: what kind of index, and why (``note``).

    The one field list of two classes: ``pipeline.index.indexing.IndexParams``
    (what the index logic chooses and trains) and :class:`IndexInfo` (the
    manifest's ``index``, which adds files, timings and the self-check), so
    what is chosen is what the manifest records, key for key.
    """

    factory: str = ""
    metric: str = "ip"
    dim: int = 0
    kind: str = ""  # "ivfpq" (any IVF factory), "hnsw" or "flat"
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    opq: bool = False
    bytes_per_vector: float = 0.0
    estimated_bytes: int = 0
    note: str = ""
    family: str = ""  # pipeline.index.index_select.FAMILIES; "" for a user factory string or an older run


@dataclasses.dataclass(frozen=True)
class IndexInfo(IndexParamFields, Part):
    """``index``: the parameters (:class:`IndexParamFields`, first), files, timings and self-check."""

    ntotal: int = 0
    id_layout: dict[str, Any] = dataclasses.field(default_factory=dict)
    score: str = ""
    trained: str = ""  # index/trained.faiss, relative to the run
    shards: tuple[Shard, ...] = ()
    merged: str | None = None
    merge_note: str | None = None
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantizer: Quantizer | None = None
    add_seconds: float = 0.0
    self_check_seconds: float = 0.0
    ground_truth_seconds: float = 0.0
    search_params: dict[str, Any] | None = None  # the recommended setting (absent before candidate selection)
    candidates: list = dataclasses.field(default_factory=list)  # pipeline.index.index_select candidates
    chosen: dict[str, Any] | None = None  # name, family, why, params
    max_query_ms: float | None = None
    recall: Recall | None = None
    extra: dict[str, Any] = _extra()

    OPTIONAL = frozenset({"quantizer", "recall", "chosen", "max_query_ms", "search_params"})

    def recommended_params(self) -> dict[str, Any]:
        """The search setting the run recommends (nprobe, k_factor, efSearch: those that apply).

        Runs from before candidate selection recorded ``recall.recommended_params``
        or only ``recall.recommended_nprobe``; those still open with their setting.
        """
        params = self.search_params
        if params is None and self.recall is not None:
            params = self.recall.recommended_params
            if params is None:
                nprobe = self.recall.recommended_nprobe
                params = {"nprobe": nprobe} if nprobe is not None else {}
        return dict(params or {})


@dataclasses.dataclass(frozen=True)
class FileEntry(Part):
    """One file of the run: its path relative to the run, size and sha256."""

    path: str = ""
    bytes: int = 0
    sha256: str = ""
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Manifest(Part):
    """manifest.json of one run (see the module docstring for the rules)."""

    OPTIONAL = frozenset({"asr", "index", "report", "timings", "counts", "stats", "accounting", "created_at",
                          "files", "catalog", "embeddings", "dead_letter", "text_context"})

    format_version: int = FORMAT_VERSION
    run_id: str = ""
    catalog: Catalog | None = None
    embeddings: Embeddings | None = None
    dead_letter: dict[str, Any] | None = None
    preset: str | None = None
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)  # by space
    routes: list = dataclasses.field(default_factory=list)  # {modality, space[, via]}
    asr: ModelEntry | None = None
    layout: list = dataclasses.field(default_factory=list)  # encoders.fusion.Layout.to_json()
    fusion: dict[str, Any] = dataclasses.field(default_factory=dict)  # encoders.fusion FusionConfig.to_json()
    model_fingerprint: str = ""
    image_decode: str = "cpu"
    image_decode_scaling: str = ""
    text_context: str | None = None  # "length_buckets" (encoders.text_context); absent: the full context
    counts: Counts | None = None
    stats: dict[str, Any] | None = None  # pipeline.report.stats.finish_stats()
    accounting: Accounting | None = None
    created_at: str | None = None
    index: IndexInfo | None = None  # None: --index off
    report: str | None = None
    files: tuple[FileEntry, ...] | None = None
    timings: dict[str, Any] | None = None  # pipeline.stages.stage_metrics, added after the pipeline finished
    extra: dict[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, Mapping) else None
        if version is None or not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestError(f"manifest format_version {version!r} is not one this code reads "
                                f"(1..{FORMAT_VERSION})")
        models = data.get("models") or {}
        manifest = super().from_dict({k: v for k, v in data.items() if k != "models"})
        return dataclasses.replace(manifest, models={s: ModelEntry.from_dict(m) for s, m in models.items()})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["models"] = {s: m.to_dict() for s, m in self.models.items()}
        return out

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"manifest.json is not JSON: {e}") from e
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def file(self, path: str) -> FileEntry | None:
        """The files entry of ``path`` (relative to the run), or None."""
        return next((f for f in self.files or () if f.path == path), None)

    def file_paths(self, prefix: str = "") -> list[str]:
        """Paths (relative to the run) of the listed files under ``prefix``."""
        return [f.path for f in self.files or () if f.path.startswith(prefix)]

    @property
    def random_weights(self) -> bool:
        """True when any space's model has no real weights (figures then say nothing about quality)."""
        return any(not m.real for m in self.models.values())
