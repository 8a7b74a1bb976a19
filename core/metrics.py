"""Prometheus metrics shared by the worker and the HTTP ingest (prometheus_client's default registry).

Flower's /metrics has no queue depth; `mlchat_queue_depth` is read from the broker at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core.settings import Lane, settings

logger = logging.getLogger(__name__)

# Outcomes of claims, not of turns: a turn deferred, retried or handed back counts again at its next
# claim (a rate of `done` and `failed` is the turns finished).
TURNS = Counter(
    "mlchat_turns",
    "Outcomes of the turns a worker claimed, one per claim (done and failed: committed)",
    ["model", "outcome"],
)
BATCH_SIZE = Histogram(
    "mlchat_batch_size", "Turns claimed per batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
STAGE_SECONDS = Histogram(
    "mlchat_stage_seconds",
    "Wall time of one batch stage",
    ["model", "stage"],
    # A bulk batch's generate stage runs for minutes: buckets up to the visibility timeout's hour.
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
TOKENS = Counter("mlchat_tokens", "Tokens processed by the engine (rate() gives tokens/s)", ["model", "kind"])
ENGINE_UP = Gauge("mlchat_engine_up", "1 while this worker's inference engine is loaded and alive")
STREAM_EVENTS_DROPPED = Counter(
    "mlchat_stream_events_dropped", "Live stream events the worker did not send to Redis", ["why"]
)
STREAM_READERS = Gauge(
    "mlchat_stream_readers",
    "SSE readers the readers' hubs of this process serve now",
    multiprocess_mode="livesum",  # `mlchat api --workers N`: the live processes' sum (api/routes/metrics.py)
)
STREAM_HUB_READS = Counter(
    "mlchat_stream_hub_reads", "XREAD rounds of the readers' hubs (one round serves every reader)"
)
STREAM_HUB_FAILURES = Counter(
    "mlchat_stream_hub_failures", "Failed rounds of the readers' hubs, by part (read, status)", ["part"]
)
INGEST_REQUESTS = Counter("mlchat_ingest_requests", "HTTP ingest requests", ["method", "route", "status"])


def _queue_depth_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("mlchat_queue_depth", "Messages waiting in a model's queue", labels=["queue"])


class QueueDepthCollector(Collector):
    """Messages waiting per model lane queue, read from the broker when Prometheus scrapes."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without it, registering the collector collects once, reading the broker: a process's start
        # waited on a broker that hangs (review, stop 75).
        yield _queue_depth_family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from tasks.queues import queue_depths

        family = _queue_depth_family()
        lanes: list[tuple[str, Lane]] = [(m, lane) for m in settings.models for lane in ("live", "bulk")]
        try:
            for queue, depth in queue_depths(lanes).items():
                family.add_metric([queue], depth)
        except Exception:  # a scrape (and the worker's health check, which reads it) must not fail
            logger.warning("queue depths unavailable (the broker away?)", exc_info=True)
        yield family


_collector_registered = False


def register_queue_depth() -> None:
    """Add the queue-depth collector to the default registry (once per process)."""
    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(QueueDepthCollector())
        _collector_registered = True


def record_batch(
    model: str, *, timings_ms: dict[str, Any], claimed: int, outcomes: dict[str, int], tokens: dict[str, int]
) -> None:
    """Account one batch: its size, each stage's time, turns by outcome, tokens by kind."""
    if claimed:
        BATCH_SIZE.labels(model).observe(claimed)
    for key, value in timings_ms.items():
        # Not stages: the whole, the queue before it, a load, and `to_engine` (the claim until the
        # prompts reach the engine: the stages before it again; summing the stages counted them twice).
        if key.endswith("_ms") and key not in ("total_ms", "queue_ms", "llm_load_ms", "to_engine_ms"):
            STAGE_SECONDS.labels(model, key.removesuffix("_ms")).observe(value / 1000)
    for outcome, n in outcomes.items():
        if n:
            TURNS.labels(model, outcome).inc(n)
    record_tokens(model, tokens)


def record_tokens(model: str, tokens: dict[str, int]) -> None:
    """Tokens the engine processed, by kind (prompt, completion): a batch's, or a memory job's."""
    for kind, n in tokens.items():
        if n:
            TOKENS.labels(model, kind).inc(n)
