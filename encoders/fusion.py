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
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from encoders.digest import file_sha256

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


# (space, modality) -> (item position of each vector, the vectors): one batch's encoder outputs
BatchVectors = Mapping[tuple[str, str], tuple[Sequence[int], Sequence[np.ndarray]]]


class _Batch:
    """Per-item error bookkeeping of one batch: the first error an item meets is its error."""

    def __init__(self, n: int):
        self.errors: list[str | None] = [None] * n
        self.ok = np.ones(n, bool)

    def fail(self, where: np.ndarray, message) -> None:
        for i in np.flatnonzero(where & self.ok):
            self.errors[i] = message(i) if callable(message) else message
        self.ok &= ~where


def _unit_rows(rows: np.ndarray, present: np.ndarray, what: str, batch: _Batch) -> np.ndarray:
    """Float64 ``rows`` scaled to unit norm in place (callers pass arrays of their own); a present row that is
    non-finite or zero fails its item (a non-finite row is set to 0)."""
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        batch.fail(present & ~finite, f"{what} has non-finite values")
        rows = np.where(finite[:, None], rows, 0.0)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))  # row by row: a row's norm does not depend on its batch-mates
    zero = norms < 1e-12
    if zero.any():
        batch.fail(present & finite & zero, f"{what} has zero norm")
        norms = np.where(zero, 1.0, norms)
    rows /= norms[:, None]
    return rows


def _batch_means(n: int, vectors: BatchVectors, layout: Layout,
                 batch: _Batch) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(space, modality) -> (present [n], unit float64 [n, d]): each item's vectors averaged, one call per pair."""
    out: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    spaces = list(dict.fromkeys(space for space, _ in vectors))
    for space in spaces:
        for modality in sorted(m for s, m in vectors if s == space):
            given, vs = vectors[(space, modality)]
            positions = np.asarray(given, np.int64).reshape(-1)
            if not len(positions):
                continue
            had = np.zeros(n, bool)
            had[positions] = True
            if space not in layout.spaces:
                batch.fail(had, f"space {space!r} is not in the layout {list(layout.spaces)}")
                continue
            dim = layout.space_dim(space)
            lengths = np.array([len(v) for v in vs])
            wrong = lengths != dim
            if wrong.any():
                bad = np.zeros(n, bool)
                bad[positions[wrong]] = True
                first = {int(p): int(d) for p, d in zip(positions[wrong][::-1], lengths[wrong][::-1])}
                batch.fail(bad, lambda i: f"{space}/{modality} vector has dim {first[i]}, layout says {dim}")  # noqa: B023 - called here
                positions, vs = positions[~wrong], [v for v, w in zip(vs, wrong) if not w]
                if not len(positions):
                    continue
            what = f"{space}/{modality}"
            units = _unit_rows(np.asarray(np.stack(vs), np.float64), np.ones(len(positions), bool), what,
                               _RowBatch(batch, positions))  # type: ignore[arg-type]
            counts = np.bincount(positions, minlength=n)
            sums = np.zeros((n, dim), np.float64)
            if counts.max() == 1:
                sums[positions] = units
            else:
                np.add.at(sums, positions, units)  # several images of an item, added in their order
            present = counts > 0
            out[(space, modality)] = (present, _unit_rows(sums / np.maximum(counts, 1)[:, None], present, what, batch))
    return out


class _RowBatch:
    """A view of :class:`_Batch` over vector rows: a failing row fails the item at its position."""

    def __init__(self, batch: _Batch, positions: np.ndarray):
        self._batch, self._positions = batch, positions

    def fail(self, where: np.ndarray, message) -> None:
        items = np.zeros(len(self._batch.errors), bool)
        items[self._positions[where]] = True
        self._batch.fail(items, message)


def _assemble_batch(layout: Layout, blocks: Sequence[tuple[Block, np.ndarray, np.ndarray, float]],
                    batch: _Batch) -> np.ndarray:
    """``blocks``: (block, present [n], unit rows [n, d], weight) -> fused float32 [n, dim], each block scaled
    by the square root of its weight share among the blocks the item fills."""
    n = len(batch.errors)
    total = np.zeros(n, np.float64)
    for _, present, _, weight in blocks:
        total += np.where(present, weight, 0.0)
    batch.fail(total <= 0, "no usable modality vector to fuse")
    out = np.zeros((n, layout.dim), np.float64)
    safe = np.where(total > 0, total, 1.0)
    for block, present, rows, weight in blocks:
        scale = np.where(present & (total > 0), np.sqrt(weight / safe), 0.0)
        out[:, block.offset: block.offset + block.dim] = scale[:, None] * rows
    fused = _unit_rows(out, batch.ok.copy(), "fused vector", batch)
    if not batch.ok.all():
        fused[~batch.ok] = 0.0
    return fused.astype(np.float32)


def _agreement_batch(names: Sequence[str], stacked: np.ndarray, mask: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """:func:`agreement_weights` for a whole batch: stacked [n, k, d], mask [n, k] -> weights [n, k]."""
    pw = mask * prior
    if ANCHOR_MODALITY not in names or len(names) < 2:
        return pw
    a = list(names).index(ANCHOR_MODALITY)
    cos = np.einsum("nkd,nd->nk", stacked, stacked[:, a])
    weights = np.where(np.arange(len(names)) == a, pw, prior * np.maximum(0.0, cos) * mask)
    # the rule applies where the item has the anchor and another modality of the space
    applies = mask[:, a] & (mask.sum(axis=1) > 1)
    weights = np.where(applies[:, None], weights, pw)
    return np.where((weights.sum(axis=1) > 0)[:, None], weights, pw)


def fuse_batch(
    n: int,
    vectors: BatchVectors,
    layout: Layout,
    config: FusionConfig = FusionConfig(),
    *,
    query: bool = False,
    attention: AttentionFn | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Fuses ``n`` items at once: ``vectors[(space, modality)] = (item positions, vectors)``.

    Returns ``(fused float32 [n, layout.dim], errors)``: ``errors[i]`` is None
    for an item fused into a unit vector, else why it could not be (its row
    is zeros); one item's error never touches its batch-mates. The rules are
    those of :func:`fuse` (the module docstring), computed with one numpy
    call per (space, modality) over the batch, weights renormalized per item
    over the modalities it has (a mask). Every operation is row by row, so an
    item's vector does not depend on its batch-mates. A learned ``attention``
    is applied item by item (it takes one item's vectors).
    """
    batch = _Batch(n)
    means = _batch_means(n, vectors, layout, batch)
    blocks: list[tuple[Block, np.ndarray, np.ndarray, float]] = []
    for block in layout.blocks:
        space = block.space
        if config.mode == "concat":
            if query:
                names = sorted(m for s, m in means if s == space)
                if not names:
                    continue
                prior = np.array([config.modality_weight(m) for m in names])
                mask = np.stack([means[(space, m)][0] for m in names], axis=1)
                psum = (mask * prior).sum(axis=1)
                mixed = sum(np.where(mask[:, j:j + 1], prior[j] * means[(space, m)][1], 0.0)
                            for j, m in enumerate(names))
                present = mask.any(axis=1) & (psum > 0)
                rows = _unit_rows(np.asarray(mixed), present, f"{space} query", batch)
            elif block.modality is not None and (space, block.modality) in means:
                present, rows = means[(space, block.modality)]
            else:
                continue
            w = config.space_weight(space) * config.modality_weight(block.modality or "")
            if w > 0:
                blocks.append((block, present, rows, w))
            continue
        names = sorted(m for s, m in means if s == space and config.modality_weight(m) > 0)
        if not names:
            continue
        stacked = np.stack([means[(space, m)][1] for m in names], axis=1)  # [n, k, d]
        mask = np.stack([means[(space, m)][0] for m in names], axis=1)  # [n, k]
        prior = np.array([config.modality_weight(m) for m in names])
        if config.mode == "attention" and attention is not None:
            weights = np.zeros(mask.shape, np.float64)
            for i in np.flatnonzero(mask.any(axis=1) & batch.ok):
                idx = np.flatnonzero(mask[i])
                got = np.asarray(attention(space, [names[j] for j in idx], stacked[i, idx], prior[idx]), np.float64)
                if got.shape != idx.shape or not np.all(np.isfinite(got)) or np.any(got < 0):
                    bad = np.zeros(n, bool)
                    bad[i] = True
                    batch.fail(bad, f"attention gave invalid weights {got} for {space}/{[names[j] for j in idx]}")
                    continue
                weights[i, idx] = got
        elif config.mode == "attention":
            weights = _agreement_batch(names, stacked, mask, prior)
        else:
            weights = mask * prior
        total = weights.sum(axis=1)
        present = mask.any(axis=1) & (total > 0)
        mixed = np.einsum("nk,nkd->nd", weights, stacked) / np.where(total > 0, total, 1.0)[:, None]
        blocks.append((block, present, _unit_rows(mixed, present, f"{space} block", batch),
                       config.space_weight(space)))
    return _assemble_batch(layout, blocks, batch), batch.errors


def batch_of(items: Sequence[Mapping[str, Mapping[str, Sequence[np.ndarray]]]]) -> BatchVectors:
    """Per-item ``vectors[space][modality]`` -> the :data:`BatchVectors` form (row i = item i)."""
    flat: dict[tuple[str, str], tuple[list[int], list[np.ndarray]]] = {}
    for row, per_space in enumerate(items):
        for space, per_modality in per_space.items():
            for modality, vs in per_modality.items():
                rows, got = flat.setdefault((space, modality), ([], []))
                rows.extend([row] * len(vs))
                got.extend(vs)
    return flat


def fuse(
    vectors: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
    layout: Layout,
    config: FusionConfig = FusionConfig(),
    *,
    query: bool = False,
    attention: AttentionFn | None = None,
) -> np.ndarray:
    """``vectors[space][modality]`` -> one float32 unit vector in ``layout``; raises :class:`FusionError`.

    Each modality may have several vectors (an item's images); they are
    averaged first. Modalities or spaces an item lacks are left out and the
    remaining weights renormalized, so a missing image is not a penalty
    (in ``concat`` mode see the module docstring for the exact score).
    ``query=True`` marks a query: it matters only in ``concat`` mode, where a
    query's vector in a space fills every modality block of that space.
    ``attention`` replaces the agreement rule in ``attention`` mode (a loaded
    :class:`encoders.attention.FusionAttention`). A batch of one through
    :func:`fuse_batch`, so items and queries share one implementation.
    """
    fused, errors = fuse_batch(1, batch_of([vectors]), layout, config, query=query, attention=attention)
    if errors[0] is not None:
        raise FusionError(errors[0])
    return fused[0]
