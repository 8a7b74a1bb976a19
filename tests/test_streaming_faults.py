"""A worker SIGKILLed while a turn streams: the reader is told to discard what it was shown, then
gets the reply written again on the same stream, and the turn is stored exactly once."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from services import producer
from tasks.generate import dispatch
from tests import worker_processes as wp
from tests.conftest import INGEST_KEY, new_conversation
from tests.test_faults import _counts


def test_a_worker_killed_mid_stream_restarts_the_reply_on_the_same_stream(base_url, tmp_path) -> None:
    env = {"MLCHAT_VISIBILITY_TIMEOUT": "20", "MLCHAT_LEASE_SECONDS": "10"}
    logs = {name: tmp_path / f"{name}.log" for name in ("victim", "rescuer")}
    request = new_conversation() | {
        "message": "Tell me the whole long story of the road north, every village on the way.",
        "stream": True,
        "params": {"max_new_tokens": 200, "seed": 11},
    }
    events: list[tuple[str, str, dict]] = []

    def read(turn_id: str) -> None:
        url = f"{base_url}/v1/turns/{turn_id}/stream"
        with httpx.stream("GET", url, headers={"X-API-Key": INGEST_KEY}, timeout=900) as response:
            for event in _events_live(response):
                events.append(event)

    with wp.started("victim", logs, **env) as victim:
        (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
        reader = threading.Thread(target=read, args=(stored.id,), daemon=True)
        reader.start()
        dispatch([stored.id], model=wp.QUEUE_MODEL, lane="live")
        deadline = time.monotonic() + 600
        while sum(e[0] == "delta" for e in events) < 3:
            assert time.monotonic() < deadline, "no deltas from the victim"
            time.sleep(0.05)
        wp.kill(victim, signal.SIGKILL)
    shown_before = [e for e in events if e[0] == "delta"]
    assert not any(e[0] == "done" for e in events), "the reply finished before the kill: make it longer"
    with wp.started("rescuer", logs, **env):
        reader.join(timeout=900)
    assert not reader.is_alive()
    kinds = [e[0] for e in events]
    assert kinds[-1] == "done", (kinds, events[-2:])
    restart = next(i for i, e in enumerate(events) if e[0] == "error")
    assert events[restart][2]["code"] == "restarted" and restart >= len(shown_before)
    after = "".join(e[2]["text"] for e in events[restart:] if e[0] == "delta")
    final = producer.get_turn(stored.id)
    assert final is not None and after == final.reply == events[-1][2]["reply"]
    counts = _counts([stored.id])
    print(f"stream SIGKILL case: {len(shown_before)} deltas before the kill; {counts}")
    assert counts["done"] == 1 and counts["reply_rows"] == 1 and counts["duplicates"] == 0


def _events_live(response: httpx.Response):  # type: ignore[no-untyped-def]
    """(event, id, data) of an SSE response, yielded as each arrives."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                yield fields.get("event", "message"), fields.get("id", ""), json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
