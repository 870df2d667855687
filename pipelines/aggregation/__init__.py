"""Adaptive Feature Aggregation (AFA, Wang et al., ICLR 2025): N same-architecture U-Nets run in
lock-step, their features blended after every block by a trained spatial aggregator (SABW)."""

from pipelines.aggregation.pipeline import AggregationPipeline, AggregationPipelineOutput
from pipelines.aggregation.sabw import (
    SABW,
    Aggregator,
    blend,
    coordinates,
    unet_fingerprint,
    uniform_combine,
)
from pipelines.aggregation.walker import (
    Context,
    Point,
    check_same_architecture,
    points,
    time_embedding,
    walk,
)

__all__ = [
    "SABW",
    "AggregationPipeline",
    "AggregationPipelineOutput",
    "Aggregator",
    "Context",
    "Point",
    "blend",
    "check_same_architecture",
    "coordinates",
    "points",
    "time_embedding",
    "unet_fingerprint",
    "uniform_combine",
    "walk",
]
