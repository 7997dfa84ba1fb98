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


def _value(metric):
    return metric.committed if metric.committed is not None else metric.attempted


def run_timings(result, run_wall_s: float) -> dict:
    """The manifest's ``timings``: per stage wall/CPU/items (stage_metrics), encoders, and their busy share.

    ``encode`` is built from the encoders' own ``encode_wall_us`` batches (wall only: torch's
    intra-op threads make a per-thread CPU figure meaningless) and their ``encoded``/``failed`` counters.
    """
    from pipeline.stages.stage_metrics import stage_timings

    stages = stage_timings(result)
    found = result.metrics().query(MetricsFilter())
    encoders: dict[str, dict] = {}
    for dist in found["distributions"]:
        namespace = dist.key.metric.namespace
        if dist.key.metric.name == ENCODE_US and namespace.startswith(ENCODE_NAMESPACE_PREFIX) and _value(dist):
            entry = encoders.setdefault(namespace[len(ENCODE_NAMESPACE_PREFIX):], {"wall_s": 0.0, "batches": 0})
            entry["wall_s"] += _value(dist).sum / 1e6
            entry["batches"] += _value(dist).count
    encoded = sum(int(_value(c) or 0) for c in found["counters"]
                  if c.key.metric.namespace.startswith(ENCODE_NAMESPACE_PREFIX)
                  and c.key.metric.name in ("encoded", "failed"))
    encoder_wall = sum(e["wall_s"] for e in encoders.values())
    if encoders and "encode" not in stages:
        stages["encode"] = {"wall_s": encoder_wall, "cpu_s": None, "items": encoded,
                            "batches": sum(e["batches"] for e in encoders.values())}
    for entry in stages.values():
        entry["items_per_s"] = round(entry["items"] / entry["wall_s"], 1) if entry["wall_s"] else None
        entry["wall_s"] = round(entry["wall_s"], 4)
        entry["cpu_s"] = None if entry["cpu_s"] is None else round(entry["cpu_s"], 4)
    return {"source": "Beam metrics of the finished pipeline", "run_wall_s": round(run_wall_s, 3),
            "stages": stages, "encoders": {m: {"wall_s": round(e["wall_s"], 4), "batches": e["batches"]}
                                           for m, e in sorted(encoders.items())},
            "encoder_wall_s": round(encoder_wall, 4),
            "encoder_busy_share": round(encoder_wall / run_wall_s, 4) if run_wall_s > 0 and encoders else None}
