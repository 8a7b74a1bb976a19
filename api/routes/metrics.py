"""The ingest's Prometheus metrics: for admin keys, or for anyone when MLCHAT_API_METRICS_PUBLIC is set
(a scraper on a private network). The series say which routes are used and how often, so an open
/metrics is an opt-in."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from api.deps import metrics_reader

router = APIRouter(tags=["health"])

# A worker's own series, which this process defines (core/metrics.py) but never sets: the ingest's
# `mlchat_engine_up 0` fired an engine-down alert on every API target.
WORKER_ONLY = frozenset({"mlchat_engine_up"})


class _IngestSeries(Collector):
    """The process's series less the worker's own."""

    def collect(self) -> Iterator[Metric]:
        return (family for family in REGISTRY.collect() if family.name not in WORKER_ONLY)


_INGEST = CollectorRegistry(auto_describe=False)
_INGEST.register(_IngestSeries())


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_reader)])
def scrape() -> Response:
    """Prometheus text format; an admin key (`X-API-Key` or `Authorization: Bearer`) unless public."""
    return Response(generate_latest(_INGEST), media_type=CONTENT_TYPE_LATEST)
