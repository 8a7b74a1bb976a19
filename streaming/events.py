"""The per-turn stream's name and its entries, shared by the publisher and the reader.

An entry is `delta` (new text of the reply, with the claim that wrote it: a new claim after a crash
or a retry starts the reply again, `seq`, its number within that claim from 1, `t`, the worker's
wall-clock time when the engine wrote it, and `rank`, the claim's rank (turns.claims), which orders claims: a
lapsed claim may write after the one that took the turn over) or `end` (the worker committed the
turn's outcome: the reader re-reads the stored turn, which is the truth).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from core.services import broker_url

DELTA, END = "delta", "end"


def stream_key(turn_id: uuid.UUID | str) -> str:
    """The Redis key of a turn's stream."""
    return f"mlchat:stream:{turn_id}"


def redis_url() -> str:
    """The broker's URL in the form redis-py reads (Celery's `redis+socket://` is redis-py's `unix://`)."""
    url = broker_url()
    return "unix://" + url.removeprefix("redis+socket://") if url.startswith("redis+socket://") else url


@dataclass(frozen=True)
class Entry:
    """One entry of a turn's stream, as the reader sees it."""

    id: str  # the Redis stream id: the SSE event id a client resumes from
    kind: str  # DELTA or END
    text: str = ""
    claim: str = ""
    t: float | None = None  # when the engine wrote a delta (Unix seconds, the worker's clock)
    seq: int | None = None  # a delta's number within its claim: a re-sent one repeats it
    rank: int | None = None  # the claim's rank (turns.claims): a later claim of the turn has a higher one

    @classmethod
    def parse(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
        """An entry from XREAD's raw answer."""
        get = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            kind=get.get("kind", ""),
            text=get.get("text", ""),
            claim=get.get("claim", ""),
            t=float(get["t"]) if "t" in get else None,
            seq=int(get["seq"]) if get.get("seq", "").isdigit() else None,
            rank=int(get["rank"]) if get.get("rank", "").isdigit() else None,
        )
