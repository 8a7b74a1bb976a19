"""Benchmark: live streaming (`--only streaming`), through a real API process and one worker.

1. Time to the first delta of a streamed live turn (POST /v1/turns, then its SSE stream), alone and
   during a bulk run: the median of `probes` each, and their ratio.
2. Delivery overhead: the last delta's arrival at the SSE client minus `t`, the wall-clock time the
   worker stamped on it when the engine wrote the text (same machine, same clock).
3. `readers` concurrent SSE readers on the one API process while a streamed bulk run is answered:
   readers that missed an event (their deltas do not add up to the stored reply, or their ids skip
   an entry of the turn's Redis stream), the API process's RSS before and at its peak, and the bulk
   run's turns per second ÷ the same run without readers (medians of `reader_rounds` runs each,
   alternated without-with-with-without).

The API is a uvicorn process on loopback (its memory is its own); the engine and the Celery worker
run in this process, as in the engine benchmark; the readers run in one spawned process, so their
parsing takes no time from the worker's threads.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from core.settings import PROJECT_ROOT, settings
from db.models import TURN_FINISHED, Turn
from db.session import session_scope
from scripts.bench_engine import _idle_engine, in_process_worker
from scripts.bench_generation import _wait_finished, sample_requests
from worker.cpu_affinity import unpinned

BENCH_KEY = "bench-streaming-admin-key-" + uuid.uuid4().hex[:12]  # an admin key: it reads bulk turns too

Event = tuple[float, str, str, dict[str, Any]]  # (arrival, Unix seconds; event; id; data)


@contextmanager
def api_process() -> Iterator[tuple[str, int]]:
    """The HTTP API in a uvicorn process of its own on a free loopback port; yields (base URL, pid)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(tempfile.gettempdir()) / "mlchat-bench-streaming-api.log"
    env = os.environ | {"MLCHAT_API_KEYS": json.dumps([BENCH_KEY])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1"]
        + ["--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=unpinned,  # noqa: PLW1509 (a single call, before exec)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not answer /healthz within 120 s")
            time.sleep(0.2)
        yield base, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _events(client: httpx.AsyncClient, url: str) -> list[Event]:
    """Every event of one turn's stream as it arrives, until `done` or a terminal `error`."""
    out: list[Event] = []
    fields: dict[str, str] = {}
    async with client.stream("GET", url) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                if "data" in fields:
                    data = json.loads(fields["data"])
                    kind = fields.get("event", "message")
                    out.append((time.time(), kind, fields.get("id", ""), data))
                    if kind == "done" or (kind == "error" and data.get("code") != "restarted"):
                        return out
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return out


def _client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base,
        headers={"X-API-Key": key},
        timeout=httpx.Timeout(1800, connect=60),
        limits=httpx.Limits(max_connections=None),
    )


async def _probe(base: str, request: dict[str, Any]) -> dict[str, float]:
    """One streamed live turn: seconds to its first delta; ms from the engine to the client for its last."""
    async with _client(base, BENCH_KEY) as client:
        started = time.time()
        answer = await client.post("/v1/turns", json=request | {"stream": True})
        posted = time.time()
        answer.raise_for_status()
        turn_id = answer.json()["id"]
        events = await _events(client, f"/v1/turns/{turn_id}/stream")
        read = await client.get(f"/v1/turns/{turn_id}")
        read.raise_for_status()
        stored = read.json().get("timings") or {}
    deltas = [e for e in events if e[1] == "delta"]
    stamped = [e for e in deltas if "t" in e[3]]  # the last delta made up from the stored turn has none
    if not deltas or events[-1][1] != "done":
        raise RuntimeError(f"probe {request['conversation']} ended without a reply: {events[-1:]}")
    ttft_ms = (deltas[0][0] - started) * 1000
    return {
        "ttft_s": ttft_ms / 1000,
        "delivery_ms": (stamped[-1][0] - stamped[-1][3]["t"]) * 1000 if stamped else float("nan"),
        "post_ms": (posted - started) * 1000,
        **_breakdown(ttft_ms, stored, deltas[0][3].get("t"), started),
    }


# Where a probe's time to first delta went, from the turn's stored timings (worker/pipeline.py):
# waiting for a worker to claim it, the claim's stages before the engine, inside the engine loop.
STAGES = ("queue", "claim", "embed", "retrieve", "prompt", "to_engine", "engine_wait", "first_token")


def _breakdown(
    ttft_ms: float, timings: dict[str, Any], first_t: float | None, started: float
) -> dict[str, float]:
    """The probe's stage times (ms); `first_delta_written_ms`, from the POST to the worker's stamp on
    the first delta; `unaccounted_ms`, what the stored stages leave out (the API's insert, the
    delta's way to the client)."""
    row = {f"{stage}_ms": float(timings.get(f"{stage}_ms", float("nan"))) for stage in STAGES}
    row["first_delta_written_ms"] = (first_t - started) * 1000 if first_t is not None else float("nan")
    row["unaccounted_ms"] = ttft_ms - row["queue_ms"] - row["to_engine_ms"] - row["first_token_ms"]
    return row


def _probes(
    base: str, requests: list[dict[str, Any]], gap_s: float = 0.0, bulk: list[uuid.UUID] | None = None
) -> list[dict[str, float]]:
    """The probes one after another; with `bulk`, each also records how many of its turns were still
    unfinished when the probe ended (0: the probe did not run under the bulk run)."""
    out = []
    for request in requests:
        row = asyncio.run(_probe(base, request))
        if bulk is not None:
            row["bulk_unfinished"] = _unfinished(bulk)
        out.append(row)
        time.sleep(gap_s)
    return out


def _stage_row(probe: dict[str, float]) -> dict[str, float]:
    names = ["post_ms"] + [f"{stage}_ms" for stage in STAGES] + ["first_delta_written_ms", "unaccounted_ms"]
    return {"ttft_ms": round(probe["ttft_s"] * 1000, 1)} | {n: round(probe[n], 1) for n in names}


def _stage_medians(probes: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the probes (stages do not add up to the ttft median)."""
    rows = [_stage_row(p) for p in probes]
    return {name: round(statistics.median(r[name] for r in rows), 1) for name in rows[0]}


def _unfinished(ids: list[uuid.UUID]) -> int:
    with session_scope() as session:
        count = session.scalar(
            select(func.count()).where(Turn.id.in_(ids), Turn.status.not_in(TURN_FINISHED))
        )
    return int(count or 0)


def read_streams(base: str, key: str, turn_ids: list[str]) -> tuple[list[dict[str, Any]], float]:
    """One SSE reader per id, all at once (in the readers' process): each one's ids and text, and the
    CPU seconds the readers' process spent on them."""
    cpu_started = time.process_time()

    async def crowd() -> list[list[Event]]:
        async with _client(base, key) as client:
            return await asyncio.gather(*(_events(client, f"/v1/turns/{t}/stream") for t in turn_ids))

    seen = []
    for turn_id, events in zip(turn_ids, asyncio.run(crowd()), strict=True):
        ids: list[str] = []
        text = ""
        for _, kind, event_id, data in events:
            if kind == "error" and data.get("code") == "restarted":
                ids, text = [], ""
            elif kind == "delta":
                ids.append(event_id)
                text += data["text"]
        done = events[-1][3] if events and events[-1][1] == "done" else None
        seen.append({"turn": turn_id, "ids": ids, "text": text, "reply": done and done["reply"]})
    return seen, time.process_time() - cpu_started


def _ready() -> bool:
    return True


def _missed(seen: dict[str, Any]) -> bool:
    """Whether a reader missed an event: its text is not the stored reply, or its delta ids are not
    exactly the turn's stream entries of the claim that wrote the reply (each `seq` once)."""
    import redis

    from streaming.events import DELTA, Entry, redis_url, stream_key

    if seen["reply"] is None or seen["text"] != seen["reply"]:
        return True
    client = redis.Redis.from_url(redis_url())
    raw: list[Any] = client.xrange(stream_key(seen["turn"]))  # type: ignore[assignment]
    entries = [Entry.parse(i, f) for i, f in raw]
    deltas = [e for e in entries if e.kind == DELTA]
    claims = list(dict.fromkeys(e.claim for e in deltas))  # a reader follows the newest claim only
    last_claim, seq = [], 0
    for e in deltas:
        if claims and e.claim == claims[-1] and (e.seq is None or e.seq > seq):  # a re-sent delta once
            last_claim.append(e.id)
            seq = e.seq if e.seq is not None else seq
    streamed = [i for i in seen["ids"] if i != "final"]
    return streamed != last_claim


def _rss_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        line = next(x for x in status if x.startswith(field + ":"))
    return round(int(line.split()[1]) / 1024, 1)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_bulk(
    loop: Any, llm: Any, tag: str, turns: int, max_new_tokens: int
) -> tuple[float, list[uuid.UUID]]:
    """Enqueue a streamed bulk run once the engine is idle and cold; (when it started, its turn ids)."""
    from services.producer import enqueue_turns

    _idle_engine(loop, llm)
    requests = [r | {"stream": True} for r in sample_requests(turns, tag, max_new_tokens)]
    started = time.time()
    return started, enqueue_turns(requests, lane="bulk")


def _turns_per_s(started: float, ids: list[uuid.UUID]) -> float:
    rows = _wait_finished(ids, timeout=3600)
    done = [r.finished_at.timestamp() for r in rows if r.finished_at is not None]
    if len(done) != len(ids):
        raise RuntimeError(f"only {len(done)} of {len(ids)} bulk turns finished")
    return round(len(ids) / (max(done) - started), 3)


def measure_streaming(
    probes: int = 8,
    bulk_turns: int = 256,
    readers: int = 200,
    reader_bulk_turns: int = 128,
    max_new_tokens: int = 32,
    reader_rounds: int = 2,
) -> dict[str, Any]:
    """Run the streaming benchmark and return its figures."""
    from services.producer import enqueue_turns

    tag = uuid.uuid4().hex[:6]
    probe = [
        {k: v for k, v in r.items() if v is not None}
        for r in sample_requests(probes, "", max_new_tokens, offset=1000)
    ]

    def fresh(name: str) -> list[dict[str, Any]]:
        return [r | {"conversation": f"bench-{tag}-{name}-{i}"} for i, r in enumerate(probe)]

    spawn = get_context("spawn")
    with (
        in_process_worker() as (loaded, loop),
        api_process() as (base, api_pid),
        ProcessPoolExecutor(max_workers=1, mp_context=spawn) as readers_process,
    ):
        readers_process.submit(_ready).result()  # started and imported before anything is timed
        # Untimed: the first requests at new shapes pay one-time costs on CPU backends.
        _probes(base, fresh("warm")[:1])
        _idle_engine(loop, loaded.llm)
        alone = _probes(base, fresh("alone"))

        _idle_engine(loop, loaded.llm)
        bulk = enqueue_turns(sample_requests(bulk_turns, tag + "-bulk", max_new_tokens), lane="bulk")
        time.sleep(5.0)  # the bulk run is inside the engine
        probed = _probes(base, fresh("load"), gap_s=2.0, bulk=bulk)
        _wait_finished(bulk, timeout=3600)

        # The same bulk run without and with the readers, alternated (without first, then with first,
        # ...): one pair moves by more than the 5 % the target allows on this shared machine.
        rss_before = _rss_mib(api_pid, "VmRSS")
        without_runs: list[float] = []
        with_runs: list[float] = []
        seen: list[dict[str, Any]] = []
        api_cpu_s = readers_cpu_s = readers_run_s = 0.0
        for n in range(reader_rounds * 2):
            readers_now = n % 4 in (1, 2)
            name = f"{tag}-{'read' if readers_now else 'quiet'}{n}"
            started, ids = _start_bulk(loop, loaded.llm, name, reader_bulk_turns, max_new_tokens)
            if not readers_now:
                without_runs.append(_turns_per_s(started, ids))
                continue
            api_cpu_before = _cpu_s(api_pid)
            crowd = readers_process.submit(
                read_streams, base, BENCH_KEY, [str(ids[i % len(ids)]) for i in range(readers)]
            )
            with_runs.append(_turns_per_s(started, ids))
            round_seen, round_cpu_s = crowd.result(timeout=1800)
            seen += round_seen
            readers_cpu_s += round_cpu_s
            api_cpu_s += _cpu_s(api_pid) - api_cpu_before
            readers_run_s += time.time() - started
        rss_peak, rss_after = _rss_mib(api_pid, "VmHWM"), _rss_mib(api_pid, "VmRSS")
        without_readers = round(statistics.median(without_runs), 3)
        with_readers = round(statistics.median(with_runs), 3)

    def median(rows: list[dict[str, float]], name: str) -> float:
        values = [r[name] for r in rows if not math.isnan(r[name])]  # a stage a turn did not record
        return statistics.median(values) if values else float("nan")

    # A probe that ended after the bulk run did measure nothing under bulk: left out of the figures.
    loaded_probes = [p for p in probed if p["bulk_unfinished"] > 0]
    if not loaded_probes:
        raise RuntimeError(f"the {bulk_turns}-turn bulk run finished before any probe under it ended")
    ttft_alone, ttft_loaded = median(alone, "ttft_s") * 1000, median(loaded_probes, "ttft_s") * 1000
    return {
        "model": settings.model,
        "probes": probes,
        "bulk_turns": bulk_turns,
        "max_new_tokens": max_new_tokens,
        "ttft_alone_ms": [round(p["ttft_s"] * 1000, 1) for p in alone],
        "ttft_under_bulk_ms": [round(p["ttft_s"] * 1000, 1) for p in loaded_probes],
        "bulk_unfinished_at_probes": [int(p["bulk_unfinished"]) for p in probed],
        "probes_after_bulk_left_out": len(probed) - len(loaded_probes),
        "ttft_alone_ms_median": round(ttft_alone, 1),
        "ttft_under_bulk_ms_median": round(ttft_loaded, 1),
        "ttft_ratio": round(ttft_loaded / ttft_alone, 2),
        "ttft_ratio_target": 1.5,
        "ttft_breakdown_alone_ms": _stage_medians(alone),
        "ttft_breakdown_under_bulk_ms": _stage_medians(loaded_probes),
        "ttft_breakdown_alone_each_ms": [_stage_row(p) for p in alone],
        "ttft_breakdown_under_bulk_each_ms": [_stage_row(p) for p in loaded_probes],
        "delivery_overhead_ms": [round(p["delivery_ms"], 2) for p in alone],
        "delivery_overhead_ms_median": round(median(alone, "delivery_ms"), 2),
        "delivery_overhead_under_bulk_ms_median": round(median(loaded_probes, "delivery_ms"), 2),
        "delivery_overhead_ms_target": 50.0,
        "readers": readers,
        "readers_bulk_turns": reader_bulk_turns,
        "reader_sessions": len(seen),  # `readers` in each run with readers
        "readers_missing_events": sum(_missed(s) for s in seen),
        "api_rss_before_readers_mib": rss_before,
        "api_peak_rss_mib": rss_peak,
        "api_rss_after_readers_mib": rss_after,
        "reader_rounds": reader_rounds,
        "bulk_turns_per_s_without_readers_runs": without_runs,
        "bulk_turns_per_s_with_readers_runs": with_runs,
        "bulk_turns_per_s_without_readers": without_readers,
        "bulk_turns_per_s_with_readers": with_readers,
        "bulk_throughput_ratio": round(with_readers / without_readers, 3),  # of the medians
        "bulk_throughput_ratio_target": 0.95,
        # On a machine this small the readers' client and the API share the engine's cores: what they
        # took shows how much of the throughput loss is the test's own client (all runs with readers).
        "readers_run_s": round(readers_run_s, 1),
        "api_cpu_s_during_readers": round(api_cpu_s, 1),
        "readers_client_cpu_s": round(readers_cpu_s, 1),
        "scaled_down": (
            f"{max_new_tokens} tokens out per turn, and the with/without-readers runs are "
            f"{reader_rounds} each of {reader_bulk_turns} streamed bulk turns: the engine has one of this "
            f"machine's {os.cpu_count()} cores, and the section is kept under 12 minutes"
        ),
    }
