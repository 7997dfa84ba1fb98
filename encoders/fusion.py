"""Fusion of an item's modality vectors into one unit vector; shared by items and queries.

Three modes, all producing a unit float32 vector laid out by :class:`Layout`:

``mean`` (weighted average)
    One block per *space* (``clip``, ``text``, ...). Within a space the
    item's modality vectors are averaged with the modality weights,
    renormalized over the modalities the item has (several images are first
    averaged within the image modality). Across spaces each block is scaled
    by the square root of its space weight share, so a query-item inner
    product is the weighted sum of per-space cosines.
``concat`` (concatenation)
    One block per (space, modality) pair, each scaled by
    ``sqrt(w / W)`` with ``w = space_weight * modality_weight`` and ``W`` the
    sum of ``w`` over the blocks the vector fills. Items fill the blocks of
    the modalities they have. A query fills, in each space it reaches, every
    modality block of that space with its one vector (a text query is
    compared with the item's text *and* its image in the CLIP space). The
    query-item inner product is therefore
    ``sqrt(W_item / W_query) * sum_present (w / W_item) * cos(query, block)``:
    the weighted mean of the cosines of the blocks the item has, times the
    square root of the weight share the item covers. An item with every
    modality scores exactly the weighted sum of block cosines; one missing a
    modality is scaled down by ``sqrt(coverage)`` (``mean`` mode has no such
    factor, which is why it is the default).
``attention`` (per-item weights)
    The ``mean`` layout, but the within-space modality weights are computed
    per item from its modality vectors: by a trained module
    (``encoders.attention``, made by ``catalog-index fit-fusion``) when the
    config names one, otherwise by the parameter-free *agreement* rule of
    :func:`agreement_weights`: the description (text) is the anchor, and every
    other modality in the space weighs its prior weight times its cosine with
    the anchor (clipped at 0), so a catalog photo unrelated to its
    description counts less. Space weights stay fixed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Mapping, Sequence

import numpy as np

MODALITIES = ("text", "image", "audio")
FUSION_MODES = ("mean", "concat", "attention")
ANCHOR_MODALITY = "text"  # the agreement rule's reference: the merchant's own description

# (space, modalities present, unit vectors [M, d], prior weights [M]) -> weights [M] >= 0
AttentionFn = Callable[[str, Sequence[str], np.ndarray, np.ndarray], np.ndarray]


class FusionError(ValueError):
    """An item whose vectors cannot be fused (nothing usable, or non-finite values)."""


@dataclasses.dataclass(frozen=True)
class Block:
    space: str
    dim: int
    offset: int
    modality: str | None = None  # concat mode: the block holds one modality of the space


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each block sits in the fused vector."""

    blocks: tuple[Block, ...]

    @classmethod
    def from_dims(cls, dims: Mapping[str, int]) -> "Layout":
        """One block per space (``mean`` and ``attention`` modes)."""
        blocks, offset = [], 0
        for space, dim in dims.items():
            blocks.append(Block(space, int(dim), offset))
            offset += int(dim)
        return cls(tuple(blocks))

    @classmethod
    def build(cls, routes: Sequence[tuple[str, str]], dims: Mapping[str, int], config: "FusionConfig") -> "Layout":
        """The layout of ``config.mode`` for ``routes`` ((modality, space) pairs) and the spaces' dims."""
        spaces = list(dict.fromkeys(space for _, space in routes))
        missing = [s for s in spaces if s not in dims]
        if missing:
            raise ValueError(f"no dimension for spaces {missing}; known: {sorted(dims)}")
        if config.mode != "concat":
            return cls.from_dims({s: dims[s] for s in spaces})
        blocks, offset = [], 0
        for space in spaces:
            for modality in dict.fromkeys(m for m, s in routes if s == space):
                blocks.append(Block(space, int(dims[space]), offset, modality))
                offset += int(dims[space])
        return cls(tuple(blocks))

    @property
    def dim(self) -> int:
        return sum(b.dim for b in self.blocks)

    @property
    def spaces(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.space for b in self.blocks))

    def space_dim(self, space: str) -> int:
        return self.blocks_of(space)[0].dim

    def blocks_of(self, space: str) -> tuple[Block, ...]:
        found = tuple(b for b in self.blocks if b.space == space)
        if not found:
            raise KeyError(f"space {space!r} is not in this layout ({list(self.spaces)})")
        return found

    def to_json(self) -> list[dict]:
        return [{k: v for k, v in dataclasses.asdict(b).items() if v is not None} for b in self.blocks]

    @classmethod
    def from_json(cls, blocks: Sequence[Mapping]) -> "Layout":
        return cls(tuple(Block(b["space"], int(b["dim"]), int(b["offset"]), b.get("modality")) for b in blocks))

    def block(self, space: str, modality: str | None = None) -> Block:
        for b in self.blocks:
            if b.space == space and b.modality == modality:
                return b
        raise KeyError(f"block {space!r}/{modality!r} is not in this layout ({self.to_json()})")


def _weights(pairs: Mapping[str, float], allowed: Sequence[str] | None, what: str) -> tuple[tuple[str, float], ...]:
    out = []
    for name, weight in pairs.items():
        if allowed is not None and name not in allowed:
            raise ValueError(f"{what} weight for {name!r}: not one of {list(allowed)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{what} weight for {name!r} must be a finite number >= 0, got {weight}")
        out.append((name, float(weight)))
    return tuple(sorted(out))


def file_sha256(path: str) -> str:
    """sha256 of a file on any Beam filesystem (local, gs://, ...)."""
    from apache_beam.io.filesystems import FileSystems

    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type="uncompressed") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """All fusion settings; recorded in the output metadata and reused by queries."""

    mode: str = "mean"
    modality_weights: tuple[tuple[str, float], ...] = (("audio", 1.0), ("image", 1.0), ("text", 1.0))
    space_weights: tuple[tuple[str, float], ...] = ()  # unlisted spaces weigh 1.0
    # attention mode: a module saved by `catalog-index fit-fusion`; "" = the parameter-free agreement rule
    attention_module: str = ""
    attention_sha256: str = ""  # of the module file; checked whenever the module is loaded

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {self.mode!r} is not one of {FUSION_MODES}")
        object.__setattr__(self, "modality_weights", _weights(dict(self.modality_weights), MODALITIES, "modality"))
        object.__setattr__(self, "space_weights", _weights(dict(self.space_weights), None, "space"))
        if self.attention_module and self.mode != "attention":
            raise ValueError(f"a fusion module ({self.attention_module}) needs fusion mode 'attention', "
                             f"got {self.mode!r}")
        if self.attention_sha256 and not self.attention_module:
            raise ValueError("attention_sha256 given without attention_module")
        if self.attention_module and not self.attention_sha256:
            try:
                object.__setattr__(self, "attention_sha256", file_sha256(self.attention_module))
            except (OSError, IOError) as e:
                raise ValueError(f"fusion module {self.attention_module!r} cannot be read: {e}") from None

    def modality_weight(self, modality: str) -> float:
        return dict(self.modality_weights).get(modality, 1.0)

    def space_weight(self, space: str) -> float:
        return dict(self.space_weights).get(space, 1.0)

    @property
    def attention_rule(self) -> str | None:
        if self.mode != "attention":
            return None
        return "learned" if self.attention_module else "agreement"

    def to_json(self) -> dict:
        out = {
            "mode": self.mode,
            "modality_weights": dict(self.modality_weights),
            "space_weights": dict(self.space_weights),
        }
        if self.mode == "attention":
            out["attention"] = {"rule": self.attention_rule, "anchor": ANCHOR_MODALITY,
                                "module": self.attention_module or None, "sha256": self.attention_sha256 or None}
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "FusionConfig":
        attention = data.get("attention") or {}
        return cls(
            mode=data["mode"],
            modality_weights=tuple(data["modality_weights"].items()),
            space_weights=tuple(data["space_weights"].items()),
            attention_module=attention.get("module") or "",
            attention_sha256=attention.get("sha256") or "",
        )


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if not np.all(np.isfinite(v)):
        raise FusionError(f"{what} has non-finite values")
    norm = np.linalg.norm(v)
    if norm < 1e-12:
        raise FusionError(f"{what} has zero norm")
    return v / norm


def agreement_weights(space: str, modalities: Sequence[str], vectors: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The parameter-free attention rule: each modality's weight from its agreement with the text.

    The text (title + description) is the anchor and keeps its prior weight;
    every other modality weighs ``prior * max(0, cos(vector, text))``. A space
    without text, or with one modality, keeps the priors. If every weight
    comes out 0 (a zero-weighted text and only disagreeing media) the priors
    are used, so an item is never dropped by the rule.
    """
    weights = np.asarray(prior, np.float64).copy()
    if ANCHOR_MODALITY in modalities and len(modalities) > 1:
        anchor = vectors[list(modalities).index(ANCHOR_MODALITY)]
        for i, modality in enumerate(modalities):
            if modality != ANCHOR_MODALITY:
                weights[i] = prior[i] * max(0.0, float(vectors[i] @ anchor))
    return weights if weights.sum() > 0 else np.asarray(prior, np.float64)


def modality_means(vectors: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
                   layout: Layout) -> dict[str, dict[str, np.ndarray]]:
    """``vectors[space][modality]`` -> one unit vector per (space, modality): several images are averaged."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for space, per_modality in vectors.items():
        if space not in layout.spaces:
            raise FusionError(f"space {space!r} is not in the layout {list(layout.spaces)}")
        dim = layout.space_dim(space)
        for modality, vs in sorted(per_modality.items()):
            if not len(vs):
                continue
            for v in vs:
                if len(v) != dim:
                    raise FusionError(f"{space}/{modality} vector has dim {len(v)}, layout says {dim}")
            what = f"{space}/{modality}"
            out.setdefault(space, {})[modality] = _unit(np.mean([_unit(v, what) for v in vs], axis=0), what)
    return out


def _assemble(layout: Layout, blocks: Mapping[Block, np.ndarray], weights: Mapping[Block, float]) -> np.ndarray:
    total = sum(weights[b] for b in blocks)
    if not blocks or total <= 0:
        raise FusionError("no usable modality vector to fuse")
    out = np.zeros(layout.dim, np.float64)
    for block, v in blocks.items():
        out[block.offset: block.offset + block.dim] = math.sqrt(weights[block] / total) * v
    return _unit(out, "fused vector").astype(np.float32)


def fuse(
    vectors: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
    layout: Layout,
    config: FusionConfig = FusionConfig(),
    *,
    query: bool = False,
    attention: AttentionFn | None = None,
) -> np.ndarray:
    """``vectors[space][modality]`` -> one float32 unit vector in ``layout``.

    Each modality may have several vectors (an item's images); they are
    averaged first. Modalities or spaces an item lacks are left out and the
    remaining weights renormalized, so a missing image is not a penalty
    (in ``concat`` mode see the module docstring for the exact score).
    ``query=True`` marks a query: it matters only in ``concat`` mode, where a
    query's vector in a space fills every modality block of that space.
    ``attention`` replaces the agreement rule in ``attention`` mode (a loaded
    :class:`encoders.attention.FusionAttention`).
    """
    means = modality_means(vectors, layout)
    if config.mode == "concat":
        return _fuse_concat(means, layout, config, query)
    blocks: dict[Block, np.ndarray] = {}
    space_weights: dict[Block, float] = {}
    for block in layout.blocks:
        per_modality = {m: v for m, v in (means.get(block.space) or {}).items() if config.modality_weight(m) > 0}
        if not per_modality:
            continue
        names = sorted(per_modality)
        stacked = np.stack([per_modality[m] for m in names])
        prior = np.array([config.modality_weight(m) for m in names])
        if config.mode == "attention":
            weights = np.asarray((attention or agreement_weights)(block.space, names, stacked, prior), np.float64)
            if weights.shape != prior.shape or not np.all(np.isfinite(weights)) or np.any(weights < 0):
                raise FusionError(f"attention gave invalid weights {weights} for {block.space}/{names}")
        else:
            weights = prior
        if weights.sum() <= 0:
            continue
        blocks[block] = _unit(weights @ stacked / weights.sum(), f"{block.space} block")
        space_weights[block] = config.space_weight(block.space)
    return _assemble(layout, blocks, space_weights)


def _fuse_concat(means: Mapping[str, Mapping[str, np.ndarray]], layout: Layout, config: FusionConfig,
                 query: bool) -> np.ndarray:
    blocks: dict[Block, np.ndarray] = {}
    weights: dict[Block, float] = {}
    for block in layout.blocks:
        per_modality = means.get(block.space) or {}
        if query and per_modality:
            # a query has one vector per space (several modalities in one query: their weighted mean)
            prior = {m: config.modality_weight(m) for m in per_modality}
            if sum(prior.values()) <= 0:
                continue
            v = _unit(sum(prior[m] * per_modality[m] for m in per_modality), f"{block.space} query")
        elif block.modality in per_modality:
            v = per_modality[block.modality]
        else:
            continue
        w = config.space_weight(block.space) * config.modality_weight(block.modality or "")
        if w > 0:
            blocks[block], weights[block] = v, w
    return _assemble(layout, blocks, weights)
