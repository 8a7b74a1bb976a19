"""The ingest's Prometheus metrics: for admin keys, or for anyone when MLCHAT_API_METRICS_PUBLIC is set
(a scraper on a private network). The series say which routes are used and how often, so an open
/metrics is an opt-in.

Under `mlchat api --workers N` each request may reach any of N processes: they write their values
to files in PROMETHEUS_MULTIPROC_DIR (the CLI makes one), and a scrape reads every process's, so it
shows the ingest's counts, not one child's (whose counter would seem to reset at every scrape)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from api.deps import metrics_reader
from core.metrics import QueueDepthCollector
from core.processes import alive

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

router = APIRouter(tags=["health"])

# A worker's own series, which this process defines (core/metrics.py) but never sets: the ingest's
# `mlchat_engine_up 0` fired an engine-down alert on every API target.
WORKER_ONLY = frozenset({"mlchat_engine_up"})


class _IngestSeries(Collector):
    """Series less the worker's own: this process's, or every ingest process's and the broker's
    queue depths (read at scrape time, not from files) under several processes."""

    def collect(self) -> Iterator[Metric]:
        if MULTIPROC_DIR in os.environ:
            _forget_dead_processes(os.environ[MULTIPROC_DIR])
            every = CollectorRegistry()
            MultiProcessCollector(every)
            families = [*every.collect(), *QueueDepthCollector().collect()]
        else:
            families = list(REGISTRY.collect())
        return (family for family in families if family.name not in WORKER_ONLY)


_INGEST = CollectorRegistry(auto_describe=False)
_INGEST.register(_IngestSeries())


def _forget_dead_processes(folder: str) -> None:
    """Drop the live gauges of processes gone without their shutdown (uvicorn kills a child that
    hangs): their readers are gone with them, and their last count would be summed in for ever."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):  # two scrapes at once may both find it: missing_ok
            path.unlink(missing_ok=True)


def process_ended() -> None:
    """Drop this process's live gauges from the shared files (its readers left with it)."""
    if MULTIPROC_DIR in os.environ:
        mark_process_dead(os.getpid())


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_reader)])
def scrape() -> Response:
    """Prometheus text format; an admin key (`X-API-Key` or `Authorization: Bearer`) unless public."""
    return Response(generate_latest(_INGEST), media_type=CONTENT_TYPE_LATEST)
