"""The API's side: a turn's events for one reader, from its Redis stream and the stored turn.

What a reader gets, in order: `delta` events (new text of the reply, with `t`: when the engine wrote
it, Unix seconds on the worker's clock), then one `done` (the stored
turn: the truth) or one terminal `error` (the turn failed or was cancelled, or the stream reached
its longest life, code `timeout`). When a new claim starts the reply again (the worker died, or the
engine refused the request and it is retried), an `error` with code `restarted` comes first: the
text shown so far is to be discarded; the claim it replaces is ignored from then on (a worker past
its lease that still writes), and so is a delta sent twice (its `seq` is not new). After the last
`restarted` (or from the start), the deltas add up to the stored reply exactly: whatever the stream
lacks (a turn that was not streamed, a stream that expired, events the worker dropped, Redis that
cannot be read) comes as one last delta before `done`.

Event ids are the Redis stream ids, so a reader resumes with `Last-Event-ID`; the last delta made
up from the stored turn and `done` carry the id `final`; `restarted`, `timeout` and a failed or
cancelled turn's `error` carry none, so a resume continues after the last delta shown (a failed turn
sent again may yet be answered), and one after `final` gets `done` alone (the whole reply was shown).
A resume whose id is no longer in the stream (trimmed, expired, lost), whose claim's first deltas
were trimmed, or whose stream cannot be read, starts with `restarted` and is then served as a new
reader; unless its caller says what text it showed up to that id (`shown_text`: a chat completion,
which cannot take text back), when it goes on from the stored turn after that text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from core.settings import settings
from services.producer import TurnView
from streaming.events import DELTA, END, Entry, redis_url, stream_key
from streaming.hub import Follower, Hub
from streaming.hub import hub as stream_hub

logger = logging.getLogger(__name__)

FINAL = "final"
_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_U64 = 2**64 - 1  # each part of a Redis stream id
_SOCKET_TIMEOUT_S = 5.0  # above the longest XREAD block (1 s): a hung Redis is an error, not a hang
_UNREADABLE = (RedisError, OSError)


def valid_event_id(value: str) -> bool:
    """Whether `value` is an id this reader hands out (a stream id, or `final`)."""
    match = _STREAM_ID.fullmatch(value)
    return value == FINAL or (match is not None and all(int(part) <= _U64 for part in match.groups()))


@dataclass(frozen=True)
class Event:
    """One event for the reader: `delta`, `done` or `error`; `id` None for one a resume cannot start
    after (`restarted`, `timeout`, a failed or cancelled turn's `error`)."""

    kind: str
    id: str | None
    data: dict[str, Any] = field(default_factory=dict)


def restarted() -> Event:
    """The reader is to discard the text shown so far: the reply is written again."""
    return Event(
        "error",
        None,
        {"code": "restarted", "message": "the reply is being written again; discard the text shown so far"},
    )


def unavailable() -> Event:
    """The turn cannot be read for now (the database is out): no id, so a resume continues after
    the last delta shown; the turn itself goes on."""
    return Event(
        "error",
        None,
        {
            "code": "unavailable",
            "message": "the turn cannot be read for now; resume the stream or read the turn",
        },
    )


def terminal(view: TurnView) -> Event:
    """The last event of a finished turn: `done` with the stored turn (id `final`), or an `error`."""
    if view.status.value == "done":
        return Event("done", FINAL, view.model_dump(mode="json"))
    return Event(  # no id: a resume after it reads on from the last delta (a revived turn goes on)
        "error",
        None,
        {
            "code": view.error_code or view.status.value,
            "message": view.error or f"the turn was {view.status.value}",
            "status": view.status.value,
        },
    )


class _Shown:
    """What the reader has been shown: the claim it follows, that claim's text and last `seq`."""

    def __init__(self) -> None:
        self.claim, self.text, self.seq, self.rank = "", "", 0, -1
        self.superseded: set[str] = set()
        self.whole = False  # the reader was shown the whole stored reply (it resumes after `final`)
        self.gap = False  # a delta of this claim never came: the rest comes with the stored reply

    def take(self, entry: Entry) -> list[Event]:
        """The events a delta entry makes: none for a repeat or a superseded claim's late text, and
        none after a delta of its claim went missing (the worker drops deltas when Redis fails it:
        the text after the gap would not follow the text shown, and the stored reply brings it)."""
        if entry.claim in self.superseded:
            return []
        # A rank below the shown claim's: a lapsed claim writing late. An unranked delta, or one after
        # an unranked claim (-1: a worker from before ranks, in a rolling deploy), says nothing: the
        # later claim is taken, as before ranks.
        if entry.claim != self.claim and entry.rank is not None and entry.rank < self.rank:
            self.superseded.add(entry.claim)  # a lapsed claim writing late: the turn is another's now
            return []
        if entry.claim == self.claim and entry.seq is not None and entry.seq <= self.seq:
            return []
        out = []
        if entry.claim != self.claim:
            if self.claim:
                self.superseded.add(self.claim)
                if self.text:  # nothing of it shown (its first delta lost): nothing to take back
                    out.append(restarted())
            self.claim, self.text, self.seq, self.gap = entry.claim, "", 0, False
            self.rank = entry.rank if entry.rank is not None else -1
        if entry.seq is not None:
            self.gap = self.gap or entry.seq != self.seq + 1
            self.seq = entry.seq
        if self.gap:
            return out
        self.text += entry.text
        stamp = {} if entry.t is None else {"t": entry.t}
        out.append(Event("delta", entry.id, {"text": entry.text} | stamp))
        return out

    def finish(self, view: TurnView) -> list[Event]:
        """The last events once the turn is finished: what its stored reply adds, then `done`/`error`."""
        out = []
        if view.status.value == "done" and view.reply is not None and not self.whole:
            if not view.reply.startswith(self.text):
                out.append(restarted())
                self.text = ""
            if view.reply != self.text:
                out.append(Event("delta", FINAL, {"text": view.reply[len(self.text) :]}))
        return [*out, terminal(view)]


def replaced_claims(deltas: list[Entry]) -> set[str]:
    """The claims of a stream's deltas that are not the reply's: all but the latest claim of the
    highest rank (a lapsed claim may write after the one that took the turn over), or, with an
    unranked claim among them (a worker from before ranks, in a rolling deploy), all but the latest."""
    ranks: dict[str, int] = {}  # each claim, in the order of its first delta, and its rank
    for entry in deltas:
        ranks.setdefault(entry.claim, -1 if entry.rank is None else entry.rank)
    order = list(ranks)
    if not order:
        return set()
    chosen = order[-1]
    if all(rank >= 0 for rank in ranks.values()):
        chosen = max(order, key=lambda c: (ranks[c], order.index(c)))
    return {c for c in order if c != chosen}


async def _deltas(client: Any, key: str, last: str) -> list[Entry]:
    """The stream's delta entries up to `last` ("+": all), oldest first; an entry that does not
    parse is skipped, as the hub skips it (the stored reply makes up for it)."""
    out = []
    for raw_id, fields in await client.xrange(key, "-", last):
        try:
            entry = Entry.parse(raw_id, fields)
        except ValueError:
            continue
        if entry.kind == DELTA:
            out.append(entry)
    return out


def _client() -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        redis_url(), socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=_SOCKET_TIMEOUT_S
    )


# A turn finished longer ago than this has its last deltas on the stream already, if they ever get
# there (its end entry expired, or was never written): a reader ends at once, without waiting a
# status check for them (review: every reader of a turn finished minutes ago waited one out).
GRACE_WITHIN_S = 10.0


async def _just_finished(turn_id: uuid.UUID) -> bool:
    """Whether the turn finished within the grace, on the database's clock (review: the API host's,
    ahead of it, took every turn for one finished long ago); the database away: yes (a grace)."""
    try:
        return await asyncio.to_thread(
            _finished_within, turn_id, max(GRACE_WITHIN_S, 2 * settings.stream_check_s)
        )
    except Exception:
        return True


def _finished_within(turn_id: uuid.UUID, seconds: float) -> bool:
    from db.session import session_scope
    from db.turns import finished_within

    with session_scope() as session:
        return finished_within(session=session, turn_id=turn_id, seconds=seconds)


async def _close(client: Any) -> None:
    """Give a connection back; one that cannot close cleanly (a peer that stopped answering: redis-py
    raises its timeout) is dropped, and the resume goes on without it (streaming review: a `/stream`
    with Last-Event-ID answered 500, and a chat stream broke off with no error and no [DONE])."""
    with contextlib.suppress(*_UNREADABLE):
        await client.aclose()


class TurnReader:
    """One reader of one turn: `open()` finds where a resume continues, `events()` yields the rest."""

    def __init__(
        self,
        turn_id: uuid.UUID,
        read_turn: Callable[[], Awaitable[TurnView]],
        *,
        last_event_id: str | None = None,
        max_s: float | None = None,
        shown_text: str | None = None,
        latest_claim_only: bool = False,
    ) -> None:
        self._turn_id, self._key, self._read_turn = turn_id, stream_key(turn_id), read_turn
        self._latest_claim_only = latest_claim_only and last_event_id is None
        self._last_event_id = last_event_id
        self._shown_text = shown_text  # what the caller itself showed up to `last_event_id`, if it knows
        self._max_s = settings.stream_max_s if max_s is None else max_s  # a resumed one: what is left
        self._shown = _Shown()
        self._cursor = "0-0"
        self._restart_first = False  # the reader was shown text this reader cannot find again
        self._unreadable = False

    async def open(self) -> None:
        """Replay the stream up to `Last-Event-ID`, to continue it exactly (before any response)."""
        last = self._last_event_id
        self._shown.whole = last == FINAL  # only `final` events follow the whole reply
        if self._latest_claim_only:
            await self._skip_replaced_claims()
        if last is None or last == FINAL:
            return
        try:
            client = _client()
        except Exception:  # the embedded Redis could not be started (its URL is resolved on demand)
            logger.warning("turn %s: no Redis to resume from; resuming from the stored turn", self._turn_id)
            self._restart_first, self._unreadable = not self._from_text_shown(), True
            return
        try:
            if not await client.xrange(self._key, last, last):  # trimmed, expired or never there
                self._restart_first = not self._from_text_shown()
                return
            first_seq: dict[str, int | None] = {}
            for entry in await _deltas(client, self._key, last):
                first_seq.setdefault(entry.claim, entry.seq)
                self._shown.take(entry)
            self._cursor = last
            if first_seq.get(self._shown.claim) not in (None, 1):
                # The claim's first deltas were trimmed: this reader cannot tell what the client
                # was shown of them, so the client starts again from the stored reply (or, when it
                # says what it showed, goes on from that).
                self._restart_first = not self._from_text_shown()
        except _UNREADABLE:
            logger.warning("turn %s: its stream is unreadable; resuming from the stored turn", self._turn_id)
            self._restart_first, self._unreadable = not self._from_text_shown(), True
        finally:
            await _close(client)

    async def _skip_replaced_claims(self) -> None:
        """A new reader that cannot take text back (a chat completion: `restarted` ends it) follows
        only the claim answering the turn (or, the database away, the stream's latest claim): a claim
        replaced before it came is not the reply. Read
        from the start, its text and then `restarted` failed every retry of a restarted turn's chat
        under its key, for as long as the stream lived. While the turn is still to be answered, every
        claim but the one answering it now is skipped: a retry of a chat whose worker died (the turn
        queued again, or its lease lapsed) was shown the dead claim's text, then `restarted` when the
        next claim wrote. (A worker killed outright holds its lease until it lapses: a retry within
        that time still follows it. A worker alive past its lapsed lease is skipped too: the reply
        then comes whole at its end.) Redis away: the hub's reads say so."""
        try:
            client = _client()
        except Exception:
            return
        try:
            deltas = await _deltas(client, self._key, "+")
        except _UNREADABLE:
            return
        finally:
            await _close(client)
        if not deltas:
            return
        replaced = replaced_claims(deltas)
        try:
            open_, answering = await asyncio.to_thread(_answering_claim, self._turn_id)
        except Exception:  # the database away: the stream's own order tells
            open_, answering = False, None
        if open_:  # the turn's own claim decides: the stream's latest may be a dead worker's
            replaced = {e.claim for e in deltas} - {str(answering)}
        self._shown.superseded.update(replaced)

    def _from_text_shown(self) -> bool:
        """A resume that cannot find its place in the stream goes on from the stored turn after the
        text the caller says it showed (a chat completion cannot take text back: `restarted` would end
        it); whether the caller said. The stored reply must start with that text, or `restarted` comes."""
        if self._shown_text is None:
            return False
        self._shown = _Shown()
        self._shown.text = self._shown_text
        self._unreadable = True  # the stored turn alone is followed from here
        return True

    async def events(self) -> AsyncIterator[Event]:
        """The turn's events after the resume point, until done, failed or timed out."""
        deadline = time.monotonic() + self._max_s
        if self._restart_first:
            yield restarted()
        stored_only = self._last_event_id == FINAL or self._unreadable  # only the stored turn is left
        readers = stream_hub(_client)
        follower = readers.follow(self._turn_id, None if stored_only else self._key, self._cursor)
        try:
            if stored_only:
                async for event in self._from_stored_turn(follower, deadline):
                    yield event
            else:
                async for event in self._from_stream(readers, follower, deadline):
                    yield event
        except Exception:  # the database is out (the hub's status checks, or the stored turn's read)
            logger.warning("turn %s: its stream ends unfinished: the turn cannot be read", self._turn_id)
            yield unavailable()
        finally:
            readers.unfollow(follower)

    async def _from_stream(self, readers: Hub, follower: Follower, deadline: float) -> AsyncIterator[Event]:
        shown, graced, end_seen, checks = self._shown, False, False, 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                readers.stop_stream(follower)
                async for event in self._from_stored_turn(follower, now):
                    yield event
                return
            await follower.wait(deadline - now)
            for entry in follower.take():
                if entry.kind == END:
                    end_seen = True
                elif entry.kind == DELTA:
                    for event in shown.take(entry):
                        yield event
            if follower.unreadable:
                logger.warning("turn %s: its stream is unreadable; following the stored turn", self._turn_id)
                async for event in self._from_stored_turn(follower, deadline):
                    yield event
                return
            checked, checks = follower.finished_checks > checks, follower.finished_checks
            if not (end_seen or checked):
                continue
            ended, end_seen = end_seen, False
            view = await self._read_turn()  # the full stored turn, only once it has finished
            if not view.finished:
                continue
            if view.params.get("stream") and not ended and not graced and await _just_finished(self._turn_id):
                graced = True  # its last deltas may still be on their way: wait for its end
                continue
            for event in shown.finish(view):
                yield event
            return

    async def _from_stored_turn(self, follower: Follower, deadline: float) -> AsyncIterator[Event]:
        """The end of the stream from the stored turn alone, read again once the hub's status check
        finds it finished, until `deadline`."""
        while True:
            view = await self._read_turn()
            if view.finished:
                for event in self._shown.finish(view):
                    yield event
                return
            if time.monotonic() >= deadline:
                yield Event(
                    "error",
                    None,
                    {
                        "code": "timeout",
                        "message": f"the stream was open {settings.stream_max_s:g} s, its longest; "
                        "resume it or read the turn",
                        "status": view.status.value,
                    },
                )
                return
            if follower.hub_closed:  # the server is stopping: no status check comes to end the wait
                yield unavailable()
                return
            checks = follower.finished_checks
            while (
                follower.finished_checks == checks
                and not follower.hub_closed
                and (left := deadline - time.monotonic()) > 0
            ):
                await follower.wait(left)
                follower.take()  # raises what a failed status check raised


async def turn_events(
    turn_id: uuid.UUID,
    read_turn: Callable[[], Awaitable[TurnView]],
    *,
    last_event_id: str | None = None,
    max_s: float | None = None,
    shown_text: str | None = None,
    latest_claim_only: bool = False,
) -> AsyncIterator[Event]:
    """The turn's events after `last_event_id` (from the start when None), until done or failed, or
    `max_s` seconds (MLCHAT_STREAM_MAX_S when None). `shown_text`: the text the caller showed up to
    `last_event_id`, when it knows it; a resume whose place the stream lost then goes on from it.
    `latest_claim_only`: a new reader skips the claims the stream's latest replaced."""
    reader = TurnReader(
        turn_id,
        read_turn,
        last_event_id=last_event_id,
        max_s=max_s,
        shown_text=shown_text,
        latest_claim_only=latest_claim_only,
    )
    await reader.open()
    async for event in reader.events():
        yield event


def _answering_claim(turn_id: uuid.UUID) -> tuple[bool, uuid.UUID | None]:
    from db.session import session_scope
    from db.turns import answering_claim

    with session_scope() as session:
        return answering_claim(session=session, turn_id=turn_id)
