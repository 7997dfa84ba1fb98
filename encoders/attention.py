"""The learned attention of ``attention`` fusion: per-item modality weights from a small torch module.

For each space the module scores every modality vector ``v_m`` the item has::

    logit_m = log(prior_m) + bias_m + agree_m * cos(v_m, v_text) + query . v_m

and the weights are the softmax of the logits over the modalities present
(``prior`` = the config's modality weights). All parameters start at zero,
where the weights equal the priors renormalized over present modalities:
an untrained module *is* the weighted average, and training (``catalog-index
fit-fusion``) moves away from it only as far as labelled pairs pull it.

Saved with safetensors; the file's metadata names the spaces, their
modalities and dimensions, so a module cannot be applied to a run with a
different layout. The pipeline loads it in ``DoFn.setup()`` (never pickled)
and records its sha256 in the run's metadata.
"""
from __future__ import annotations

import copy
import json
import struct
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from encoders.digest import sha256_hex
from encoders.fusion import ANCHOR_MODALITY, FusionConfig, Layout

FORMAT = "catalog-index-attention/1"


class SpaceAttention(nn.Module):
    """Weights over one space's modalities (``modalities`` in a fixed order)."""

    def __init__(self, modalities: Sequence[str], dim: int):
        super().__init__()
        self.modalities = tuple(modalities)
        self.dim = int(dim)
        m = len(self.modalities)
        self.bias = nn.Parameter(torch.zeros(m))
        self.agree = nn.Parameter(torch.zeros(m))
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """x [N, M, d] unit vectors, mask [N, M] bool (present), prior [M] -> weights [N, M] (rows sum to 1)."""
        if ANCHOR_MODALITY in self.modalities:
            a = self.modalities.index(ANCHOR_MODALITY)
            cos = (x * x[:, a: a + 1]).sum(-1) * mask[:, a: a + 1]
        else:
            cos = torch.zeros(mask.shape, dtype=x.dtype)
        logits = torch.log(prior.clamp(min=1e-12)) + self.bias + self.agree * cos + x @ self.query
        present = mask & (prior > 0)
        logits = logits.masked_fill(~present, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(weights, nan=0.0)  # a row with nothing present stays all zero


class FusionAttention(nn.Module):
    """One :class:`SpaceAttention` per space of a run's layout."""

    def __init__(self, spec: Sequence[tuple[str, Sequence[str], int]]):
        super().__init__()
        self.spec = tuple((s, tuple(ms), int(d)) for s, ms, d in spec)
        self.spaces = nn.ModuleDict({s: SpaceAttention(ms, d) for s, ms, d in self.spec})

    @classmethod
    def for_run(cls, routes: Sequence[tuple[str, str]], layout: Layout) -> "FusionAttention":
        """A zero-initialized module for a run's routes ((modality, space) pairs) and layout."""
        spec = []
        for space in layout.spaces:
            modalities = sorted(dict.fromkeys(m for m, s in routes if s == space))
            spec.append((space, modalities, layout.space_dim(space)))
        return cls(spec)

    def check_layout(self, routes: Sequence[tuple[str, str]], layout: Layout) -> None:
        expected = FusionAttention.for_run(routes, layout).spec
        if self.spec != expected:
            raise ValueError(f"fusion module was trained for {list(self.spec)}, this run has {list(expected)}")

    def weights_fn(self):
        """The callable ``encoders.fusion.fuse(attention=...)`` expects (numpy in, numpy out)."""
        frozen = copy.deepcopy(self).double().eval()  # float64 like the numpy fusion; self stays trainable

        @torch.no_grad()
        def weights(space: str, modalities: Sequence[str], vectors: np.ndarray, prior: np.ndarray) -> np.ndarray:
            head: SpaceAttention = frozen.spaces[space]
            x = torch.zeros((1, len(head.modalities), head.dim), dtype=torch.float64)
            mask = torch.zeros((1, len(head.modalities)), dtype=torch.bool)
            p = torch.zeros(len(head.modalities), dtype=torch.float64)
            for i, m in enumerate(modalities):
                j = head.modalities.index(m)
                x[0, j], mask[0, j], p[j] = torch.from_numpy(np.asarray(vectors[i], np.float64)), True, float(prior[i])
            w = head(x, mask, p)[0].numpy()
            return np.array([w[head.modalities.index(m)] for m in modalities])

        return weights


def fuse_batch(module: FusionAttention, x: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
               config: FusionConfig) -> torch.Tensor:
    """Differentiable ``attention`` fusion of N items at once (what fit-fusion trains through).

    ``x[space]`` [N, M, d] unit modality vectors in ``module.spec`` order,
    ``mask[space]`` [N, M]. Equals :func:`encoders.fusion.fuse` with
    ``attention=module.weights_fn()`` (a test holds them together).
    """
    blocks, shares = [], []
    for space, modalities, _ in module.spec:
        prior = torch.tensor([config.modality_weight(m) for m in modalities], dtype=x[space].dtype)
        w = module.spaces[space](x[space], mask[space], prior)
        block = torch.nn.functional.normalize((w.unsqueeze(-1) * x[space]).sum(1), dim=-1)
        present = (w.sum(-1) > 0).to(x[space].dtype)
        blocks.append(block)
        shares.append(present * config.space_weight(space))
    share = torch.stack(shares, -1)
    share = share / share.sum(-1, keepdim=True).clamp(min=1e-12)
    fused = torch.cat([b * share[:, i: i + 1].sqrt() for i, b in enumerate(blocks)], dim=-1)
    return torch.nn.functional.normalize(fused, dim=-1)


def save(module: FusionAttention, path: str) -> None:
    """Writes the module as safetensors (tensors + its spec in the header metadata), atomically."""
    import os
    import tempfile

    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    meta = {"format": FORMAT, "spec": json.dumps([[s, list(ms), d] for s, ms, d in module.spec])}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load(path: str, expected_sha256: str = "") -> FusionAttention:
    """Reads a module saved by :func:`save` from any Beam filesystem; checks its sha256 when given."""
    from apache_beam.io.filesystems import FileSystems
    from safetensors.torch import load as load_tensors

    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read()
    actual = sha256_hex(data)
    if expected_sha256 and actual != expected_sha256:
        raise ValueError(f"fusion module {path} has changed since it was recorded "
                         f"(sha256 {actual[:12]}..., expected {expected_sha256[:12]}...)")
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8: 8 + header_len]).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fusion module of this project (format {meta.get('format')!r})")
    module = FusionAttention([(s, ms, d) for s, ms, d in json.loads(meta["spec"])])
    module.load_state_dict(load_tensors(data))
    return module.eval()


def load_attention(fusion: FusionConfig, routes: Sequence, layout: Layout):
    """The trained attention of ``fusion`` as a ``fuse(attention=...)`` callable; None for the other rules.

    Shared by the embed stage and the query encoder, so items and queries are
    weighted by the same module, checked against the same routes and layout.
    """
    if not fusion.attention_module:
        return None
    module = load(fusion.attention_module, fusion.attention_sha256)
    module.check_layout([(r.modality, r.space) for r in routes], layout)
    return module.weights_fn()
