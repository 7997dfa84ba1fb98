"""Fusion of an item's modality vectors into one unit vector; shared by items and queries.

The fused vector is a concatenation of one block per *space* (``clip``,
``text``, ...). Within a space, the item's modality vectors are averaged with
the modality weights, renormalized over the modalities the item has; several
images are first averaged within the image modality. Across spaces, each
block is scaled by the square root of its space weight (renormalized over the
spaces present), so the inner product of a query and an item is a weighted
sum of per-space cosines.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

MODALITIES = ("text", "image", "audio")
FUSION_MODES = ("mean",)


class FusionError(ValueError):
    """An item whose vectors cannot be fused (nothing usable, or non-finite values)."""


@dataclasses.dataclass(frozen=True)
class Block:
    space: str
    dim: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each space's block sits in the fused vector."""

    blocks: tuple[Block, ...]

    @classmethod
    def from_dims(cls, dims: Mapping[str, int]) -> "Layout":
        blocks, offset = [], 0
        for space, dim in dims.items():
            blocks.append(Block(space, int(dim), offset))
            offset += int(dim)
        return cls(tuple(blocks))

    @property
    def dim(self) -> int:
        return sum(b.dim for b in self.blocks)

    def to_json(self) -> list[dict]:
        return [dataclasses.asdict(b) for b in self.blocks]

    @classmethod
    def from_json(cls, blocks: Sequence[Mapping]) -> "Layout":
        return cls(tuple(Block(b["space"], int(b["dim"]), int(b["offset"])) for b in blocks))

    def block(self, space: str) -> Block:
        for b in self.blocks:
            if b.space == space:
                return b
        raise KeyError(f"space {space!r} is not in this layout ({[b.space for b in self.blocks]})")


def _weights(pairs: Mapping[str, float], allowed: Sequence[str] | None, what: str) -> tuple[tuple[str, float], ...]:
    out = []
    for name, weight in pairs.items():
        if allowed is not None and name not in allowed:
            raise ValueError(f"{what} weight for {name!r}: not one of {list(allowed)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{what} weight for {name!r} must be a finite number >= 0, got {weight}")
        out.append((name, float(weight)))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """All fusion settings; recorded in the output metadata and reused by queries."""

    mode: str = "mean"
    modality_weights: tuple[tuple[str, float], ...] = (("audio", 1.0), ("image", 1.0), ("text", 1.0))
    space_weights: tuple[tuple[str, float], ...] = ()  # unlisted spaces weigh 1.0

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {self.mode!r} is not one of {FUSION_MODES}")
        object.__setattr__(self, "modality_weights", _weights(dict(self.modality_weights), MODALITIES, "modality"))
        object.__setattr__(self, "space_weights", _weights(dict(self.space_weights), None, "space"))

    def modality_weight(self, modality: str) -> float:
        return dict(self.modality_weights).get(modality, 1.0)

    def space_weight(self, space: str) -> float:
        return dict(self.space_weights).get(space, 1.0)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "modality_weights": dict(self.modality_weights),
            "space_weights": dict(self.space_weights),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "FusionConfig":
        return cls(
            mode=data["mode"],
            modality_weights=tuple(data["modality_weights"].items()),
            space_weights=tuple(data["space_weights"].items()),
        )


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if not np.all(np.isfinite(v)):
        raise FusionError(f"{what} has non-finite values")
    norm = np.linalg.norm(v)
    if norm < 1e-12:
        raise FusionError(f"{what} has zero norm")
    return v / norm


def fuse(
    vectors: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
    layout: Layout,
    config: FusionConfig = FusionConfig(),
) -> np.ndarray:
    """``vectors[space][modality]`` -> one float32 unit vector in ``layout``.

    Each modality may have several vectors (an item's images); they are
    averaged first. Modalities or spaces an item lacks are left out and the
    remaining weights renormalized, so a missing image is not a penalty.
    """
    blocks: dict[str, np.ndarray] = {}
    for block in layout.blocks:
        per_modality = vectors.get(block.space) or {}
        total, acc = 0.0, np.zeros(block.dim, np.float64)
        for modality, vs in sorted(per_modality.items()):
            weight = config.modality_weight(modality)
            if not len(vs) or weight == 0:
                continue
            for v in vs:
                if len(v) != block.dim:
                    raise FusionError(f"{block.space}/{modality} vector has dim {len(v)}, layout says {block.dim}")
            mean = _unit(np.mean([_unit(v, f"{block.space}/{modality}") for v in vs], axis=0), f"{block.space}/{modality}")
            acc += weight * mean
            total += weight
        if total > 0:
            blocks[block.space] = _unit(acc / total, f"{block.space} block")
    space_total = sum(config.space_weight(s) for s in blocks)
    if not blocks or space_total <= 0:
        raise FusionError("no usable modality vector to fuse")
    out = np.zeros(layout.dim, np.float64)
    for block in layout.blocks:
        if block.space in blocks:
            scale = math.sqrt(config.space_weight(block.space) / space_total)
            out[block.offset : block.offset + block.dim] = scale * blocks[block.space]
    return _unit(out, "fused vector").astype(np.float32)
