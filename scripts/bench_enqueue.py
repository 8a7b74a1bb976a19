"""Benchmark: enqueue rate from one producer, one turn at a time and through the bulk-run path.

Runs against the configured services (the embedded ones by default) with no worker consuming;
afterwards the benchmark's turns are cancelled and its queue messages purged. Writes the figures
under "enqueue" in bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
import uuid
from pathlib import Path

from core.logging import configure_logging
from core.settings import PROJECT_ROOT, queue_for_model, settings


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Measure and record."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--single", type=int, default=1000, help="turns sent one enqueue_turn call each")
    parser.add_argument("--bulk", type=int, default=100_000, help="lines in the bulk run file")
    args = parser.parse_args()
    configure_logging("WARNING")

    from db.migrate import upgrade
    from scripts.seed import seed_world
    from tasks.app import app
    from tasks.producer import enqueue_turn
    from tasks.runs import cancel, submit_run

    upgrade()
    seed_world()
    tag = uuid.uuid4().hex[:8]

    enqueue_turn(conversation=f"bench-{tag}-warm", character="elara", message="warm up")
    started = time.perf_counter()
    for i in range(args.single):
        enqueue_turn(conversation=f"bench-{tag}-{i % 100}", character="elara", message=f"Line {i}")
    single_s = time.perf_counter() - started

    path = Path(tempfile.mkdtemp()) / f"bench-{tag}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(args.bulk):
            line = {"custom_id": f"l{i}", "character": "elara", "message": f"Bulk {i}", "params": {"seed": i}}
            handle.write(json.dumps(line) + "\n")
    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    submitted = submit_run(path, name=f"bench-{tag}")
    bulk_s = time.perf_counter() - started
    assert submitted.enqueued == args.bulk

    cancel(f"bench-{tag}")
    with app.connection_for_write() as conn:
        for lane in ("live", "bulk"):
            conn.default_channel.queue_purge(queue_for_model(settings.model, lane))

    figures = {
        "single_turns": args.single,
        "single_turns_per_s": round(args.single / single_s, 1),
        "bulk_lines": args.bulk,
        "bulk_turns_per_s": round(args.bulk / bulk_s, 1),
        "bulk_seconds": round(bulk_s, 1),
        "peak_rss_mb_before_bulk": round(rss_before, 1),
        "peak_rss_mb_after_bulk": round(_peak_rss_mb(), 1),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = PROJECT_ROOT / "bench" / "results.json"
    data = json.loads(results.read_text()) if results.exists() else {}
    data["enqueue"] = figures
    results.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
