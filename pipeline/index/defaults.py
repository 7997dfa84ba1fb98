"""Index settings that the configuration and the index logic share, defined once (no imports, so
``pipeline.config`` reads them without loading faiss)."""
from __future__ import annotations

# nprobe ladder the recall self-check measures on an IVF index
DEFAULT_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# --reuse_quantizer: auto reuses the previous run's quantizer when its drift allows; never always trains
REUSE_SETTINGS = ("auto", "never")
