"""Benchmark: live streaming against a running API and worker (not run by the tests).

Measures, in one run on one machine: the time to the first delta of a streamed live turn alone and
during a 256-turn bulk run (median of `probes` each, and their ratio); the time from the last delta
at the client to `done` (the store's commit and the reader's re-read); and `readers` concurrent SSE
readers during the bulk run (every reader's deltas must add up to the stored reply), with the API
process's peak RSS when its pid is given. Prints one JSON object.

    python -m scripts.bench_streaming --base-url http://127.0.0.1:8000 --key change-me-0123456789 \
        [--api-pid 1234]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import httpx


async def _sse(client: httpx.AsyncClient, url: str) -> list[tuple[float, str, dict[str, Any]]]:
    """(arrival time, event, data) of every event of one turn's stream, until it ends."""
    out: list[tuple[float, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async with client.stream("GET", url, timeout=900) as response:
        async for line in response.aiter_lines():
            if not line:
                if "data" in fields:
                    out.append((time.perf_counter(), fields.get("event", ""), json.loads(fields["data"])))
                    if fields.get("event") in ("done", "error") and out[-1][2].get("code") != "restarted":
                        return out
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return out


async def _probe(client: httpx.AsyncClient, base: str, tag: str, i: int) -> dict[str, float]:
    """One streamed live turn: seconds to its first delta, and from its last delta to `done`."""
    body = {
        "conversation": f"bench-stream-{tag}-{i}",
        "character": "elara",
        "message": "Any work around here?",
        "stream": True,
        "params": {"seed": i, "max_new_tokens": 48},
    }
    started = time.perf_counter()
    turn = (await client.post(f"{base}/v1/turns", json=body)).json()
    events = await _sse(client, f"{base}/v1/turns/{turn['id']}/stream")
    deltas = [t for t, kind, _ in events if kind == "delta"]
    return {
        "first_delta_s": (deltas[0] - started) if deltas else float("nan"),
        "last_delta_to_done_s": (events[-1][0] - deltas[-1]) if deltas else float("nan"),
    }


async def _reader_checks(client: httpx.AsyncClient, base: str, tag: str, n: int) -> dict[str, int]:
    """n streamed turns read at once; how many readers' deltas added up to the stored reply."""
    ids = []
    for i in range(n):
        body = {
            "conversation": f"bench-readers-{tag}-{i}",
            "character": "elara",
            "message": f"Tell me about the road, part {i}.",
            "stream": True,
            "params": {"seed": i, "max_new_tokens": 24},
        }
        ids.append((await client.post(f"{base}/v1/turns", json=body)).json()["id"])
    streams = await asyncio.gather(*(_sse(client, f"{base}/v1/turns/{t}/stream") for t in ids))
    whole = 0
    for events in streams:
        text = ""
        for _, kind, data in events:
            if kind == "error" and data.get("code") == "restarted":
                text = ""
            elif kind == "delta":
                text += data["text"]
        whole += bool(events) and events[-1][1] == "done" and text == events[-1][2]["reply"]
    return {"readers": n, "complete_and_equal": whole}


def _bulk_run(tag: str, turns: int = 256) -> list[uuid.UUID]:
    from services.producer import enqueue_turns

    lines = [
        {"conversation": f"bench-bulk-{tag}-{i}", "character": "elara", "message": f"Bulk line {i}."}
        for i in range(turns)
    ]
    return enqueue_turns(lines, lane="bulk")


def _peak_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


async def run(base: str, key: str, probes: int, readers: int, api_pid: int | None) -> dict[str, Any]:
    """Every figure of the benchmark, as one dict."""
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(headers={"X-API-Key": key}, timeout=900) as client:
        await _probe(client, base, tag, -1)  # warm-up
        alone = [await _probe(client, base, tag, i) for i in range(probes)]
        _bulk_run(tag)
        loaded = [await _probe(client, base, tag, 1000 + i) for i in range(probes)]
        crowd = await _reader_checks(client, base, tag, readers)

    def median(rows: list[dict[str, float]], name: str) -> float:
        return statistics.median(r[name] for r in rows)

    ttft_alone, ttft_loaded = median(alone, "first_delta_s"), median(loaded, "first_delta_s")
    return {
        "ttft_alone_s": round(ttft_alone, 3),
        "ttft_during_bulk_s": round(ttft_loaded, 3),
        "ttft_ratio": round(ttft_loaded / ttft_alone, 2),
        "last_delta_to_done_ms": round(median(alone, "last_delta_to_done_s") * 1000, 1),
        **crowd,
        "api_peak_rss_mb": _peak_rss_mb(api_pid),
    }


def main() -> None:
    """Parse the arguments, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--api-pid", type=int)
    args = parser.parse_args()
    figures = asyncio.run(run(args.base_url, args.key, args.probes, args.readers, args.api_pid))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
