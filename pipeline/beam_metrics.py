"""Reading the pipeline's own metrics back from a finished ``PipelineResult``."""
from __future__ import annotations

from apache_beam.metrics.metric import MetricsFilter

from encoders.handlers import ENCODE_US

ENCODE_NAMESPACE_PREFIX = "catalog_index.encode."


def encoder_seconds(result) -> float:
    """Total encoder wall time (seconds) over every modality's batches in a finished run."""
    total_us = 0
    for dist in result.metrics().query(MetricsFilter().with_name(ENCODE_US))["distributions"]:
        if dist.key.metric.namespace.startswith(ENCODE_NAMESPACE_PREFIX):
            total_us += dist.committed.sum if dist.committed is not None else dist.attempted.sum
    return total_us / 1e6


def counter(result, namespace: str, name: str) -> int:
    """One counter's committed value (summed over steps); 0 when it never moved."""
    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
    return sum(c.committed if c.committed is not None else c.attempted for c in found)
