"""A causal text tower run over only the positions a text uses (open_clip's CLIP text towers).

open_clip pads every text to its fixed context (77 tokens) and runs all of
it, while catalog titles and descriptions take about 30. Its text
transformer is causal: position ``i`` attends to positions ``<= i`` only, so
what the tower pools at the EOT token cannot depend on anything after it.
Running the first ``L`` positions (the token and positional embeddings and
the causal mask sliced to ``L``), with ``L`` past the pooled position, gives
the same vector up to float rounding (measured: ``TOLERANCE``).

``L`` is the text's own length bucket (:func:`length_buckets`: on CUDA 16,
32, 48, 64, 77 for a 77-token context, 5 forward shapes per row count; on
CPU multiples of 8, 10 shapes), never its batch-mates': a text's forward
shape depends on the text alone, so its vector does not depend on which
items shared its batch and reruns stay bit-identical however the runner
batches (``encoders.forward``).

Where equality cannot be shown from the model's structure (no causal mask,
an appended CLS token, a pad mask, "last"/"none" pooling, a text tower that
is not open_clip's own transformer, an unknown block type) :func:`for_model`
returns ``None`` with the reason and the caller keeps the full forward;
and a model that passes the structural check is also checked numerically
against its full forward once at load (:meth:`ShortTextForward.check`).

Text towers that mask their padding (transformers CLIP, Chinese-CLIP, CLAP)
need no slicing: each text is padded only to its bucket (:func:`bucket_groups`,
:func:`padded`), and the masked columns dropped change no real token's
attention. SigLIP's (no mask, last-token pooling) keeps its full length.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

BUCKET_STEP = 16  # on CUDA: every bucket present in a sub-batch is a forward of --batch_size rows
CPU_BUCKET_STEP = 8  # on CPU rows are padded to a multiple of 8 only, so finer lengths cost little
# max |short - full| over the components of the unit vectors, fp32; measured below it on CPU
# (bench/bench_text_context.py): 3.1e-7 for the tiny config, 1.4e-7 for ViT-B-32; CUDA not measured
TOLERANCE = 1e-6
_POOLED_AT_TOKEN = ("argmax", "eos", "first")  # pool types that read one position from the ids


def bucket_step(device: torch.device) -> int:
    """The bucket step for ``device``: finer on CPU (measured: bench/bench_text_context.py), coarser on CUDA."""
    return CPU_BUCKET_STEP if device.type == "cpu" else BUCKET_STEP


def length_buckets(context_length: int, step: int = BUCKET_STEP) -> tuple[int, ...]:
    """The forward lengths a text can get: multiples of ``step`` below the context, then the context."""
    if context_length < 1 or step < 1:
        raise ValueError(f"context_length and step must be >= 1, got {context_length}, {step}")
    return tuple(range(step, context_length, step)) + (context_length,)


@dataclasses.dataclass(frozen=True)
class ShortTextForward:
    """open_clip's ``encode_text`` (without normalization) over the first ``L`` positions of the tokens."""

    tower: Any  # the CLIP model itself (built-in text tower) or its ``.text`` TextTransformer
    pool_type: str
    eos_id: int | None
    buckets: tuple[int, ...]

    @property
    def context_length(self) -> int:
        return self.buckets[-1]

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per row, the position the tower pools (what the forward must reach), as open_clip picks it."""
        if self.pool_type == "argmax":  # EOT: the highest id of the default tokenizer's vocabulary
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":  # for_model only builds it with an eos id
            return tokens.eq(int(self.eos_id or 0)).int().argmax(dim=-1)
        return torch.zeros(tokens.shape[0], dtype=torch.long)  # "first"

    def row_lengths(self, tokens: torch.Tensor) -> np.ndarray:
        """Per row, its forward length: the smallest bucket past its pooled position."""
        needed = self.pooled_positions(tokens).cpu().numpy() + 1
        buckets = np.asarray(self.buckets)
        return buckets[np.searchsorted(buckets, needed, side="left")]

    def __call__(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Pooled, projected features of ``tokens[:, :length]`` (every row's pooled position < ``length``)."""
        tower, text = self.tower, tokens[:, :length]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(text).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, text, self.pool_type, eos_token_id=self.eos_id)
        projection = tower.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    @torch.inference_mode()
    def check(self, model: Any, tokens: torch.Tensor) -> float:
        """Max |short - full| of the unit vectors of ``tokens`` (fp32, on the model's device)."""
        full = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        short = torch.empty_like(full)
        lengths = self.row_lengths(tokens)
        for length in np.unique(lengths):
            rows = torch.from_numpy(np.flatnonzero(lengths == length)).to(tokens.device)
            short[rows] = torch.nn.functional.normalize(self(tokens[rows], int(length)).float(), dim=-1)
        return float((short - full).abs().max())


def for_model(model: Any, step: int = BUCKET_STEP) -> tuple[ShortTextForward | None, str]:
    """The short forward of an open_clip model, or ``(None, why not)`` when equality is not provable."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, TextTransformer

    if isinstance(getattr(model, "text", None), TextTransformer):  # CustomTextCLIP
        tower = model.text
        pool_type, eos_id = tower.pool_type, getattr(tower, "eos_id", None)
        if tower.cls_emb is not None:
            return None, "the text tower appends a CLS token that attends to every position"
        if getattr(tower, "use_pad_mask", False):
            return None, "the text tower masks padding bidirectionally"
        if getattr(tower, "output_tokens", False):
            return None, "the text tower returns its token features too"
    elif hasattr(model, "text"):
        return None, f"the text tower is {type(model.text).__name__}, not open_clip's TextTransformer"
    elif all(hasattr(model, a) for a in ("transformer", "token_embedding", "positional_embedding", "attn_mask")):
        tower = model  # CLIP: the text tower's parts live on the model
        pool_type, eos_id = getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None)
    else:
        return None, f"{type(model).__name__} has no open_clip text tower"
    if getattr(tower, "attn_mask", None) is None:
        return None, "the text tower has no causal mask (bidirectional attention)"
    if pool_type not in _POOLED_AT_TOKEN:
        return None, f"the text tower pools {pool_type!r}, not at a token it can reach early"
    if pool_type == "eos" and eos_id is None:
        return None, "the text tower pools at EOS but names no eos id"
    blocks = getattr(tower.transformer, "resblocks", None)
    if blocks is None or any(type(b) not in (ResidualAttentionBlock, CustomResidualAttentionBlock) for b in blocks):
        return None, "the text transformer has blocks this check does not know"
    context = int(tower.positional_embedding.shape[0])
    causal = torch.ones(context, context, dtype=torch.bool).triu(1)
    mask = tower.attn_mask
    if tuple(mask.shape) != (context, context) or not torch.equal(torch.isneginf(mask).cpu(), causal):
        return None, "the attention mask is not the causal mask of the positional table"
    return ShortTextForward(tower, pool_type, eos_id, length_buckets(context, step)), ""


# ---- padding trimmed to each text's bucket, for towers that mask their padding (transformers CLIP, CLAP) ----

def bucket_groups(lengths: list[int], buckets: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Row indices per forward length: each row at the smallest bucket that holds all its tokens."""
    sizes = np.asarray(buckets)
    at = sizes[np.searchsorted(sizes, np.asarray(lengths, dtype=np.int64), side="left")]
    return {int(b): np.flatnonzero(at == b) for b in np.unique(at)}


def padded(rows: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded with ``pad_id`` to ``length`` columns, and their attention mask (1 on real tokens)."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask
