"""Benchmark: enqueue rate from one producer, one turn at a time and through the bulk-run path.

Runs against the configured services with no worker consuming; afterwards the benchmark's turns are
cancelled and its queue messages purged.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from core.settings import queue_for_model, settings


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_enqueue(single: int = 2000, bulk: int = 100_000) -> dict[str, Any]:
    """Turns/s of `enqueue_turn` in a loop and of `submit_run` on a `bulk`-line file."""
    from db.session import session_scope
    from db.turns import cancel_turns
    from services.producer import enqueue_turn
    from services.runs import cancel, submit_run
    from tasks.app import app

    tag = uuid.uuid4().hex[:8]
    enqueue_turn(conversation=f"bench-{tag}-warm", character="elara", message="warm up")
    started = time.perf_counter()
    single_ids = [
        enqueue_turn(conversation=f"bench-{tag}-{i % 100}", character="elara", message=f"Line {i}")
        for i in range(single)
    ]
    single_s = time.perf_counter() - started
    with session_scope() as session:  # their messages are purged below; leave no queued rows behind
        cancel_turns(session=session, turn_ids=single_ids)

    path = Path(tempfile.mkdtemp()) / f"bench-{tag}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(bulk):
            line = {"custom_id": f"l{i}", "character": "elara", "message": f"Bulk {i}", "params": {"seed": i}}
            handle.write(json.dumps(line) + "\n")
    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    submitted = submit_run(path, name=f"bench-{tag}")
    bulk_s = time.perf_counter() - started
    assert submitted.enqueued == bulk
    path.unlink()

    cancel(f"bench-{tag}")
    with app.connection_for_write() as conn:
        for lane in ("live", "bulk"):
            conn.default_channel.queue_purge(queue_for_model(settings.model, lane))
    return {
        "single_turns": single,
        "single_turns_per_s": round(single / single_s, 1),
        "single_target": 1000,
        "bulk_lines": bulk,
        "bulk_turns_per_s": round(bulk / bulk_s, 1),
        "bulk_seconds": round(bulk_s, 1),
        "bulk_target": 10000,
        "bulk_messages": -(-bulk // settings.batch_size),
        "peak_rss_mb_before_bulk": round(rss_before, 1),
        "peak_rss_mb_after_bulk": round(_peak_rss_mb(), 1),
    }
