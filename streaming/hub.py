"""Every SSE reader of one API process (one event loop) served by one hub: one Redis connection reads
all followed turn streams with a single XREAD, and one database query a check interval tells every
reader whether its turn has finished; a reader reads its full stored turn only when it has.

A reader follows its turn (`Hub.follow`) from a cursor and gets the stream's entries after it, in
order, each once. A new follower joins at once: a blocked XREAD also waits on the hub's own wake
stream, which a join writes to. A slow follower (one that has not taken `BACKLOG` entries yet) is
handed what fits and then paused: the hub reads nothing more for it, and its cursor stays at the
last entry it was handed, until it takes its backlog; then the hub reads on from that cursor. So it
neither stalls the others nor grows without bound, and loses nothing. When Redis cannot be read,
every stream follower is told (`unreadable`: it follows the stored turn from then on) and the next
follower makes the hub connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from core.metrics import STREAM_HUB_FAILURES, STREAM_HUB_READS, STREAM_READERS
from core.settings import settings
from db.session import get_watch_engine
from db.turns import finished_turns
from streaming.events import Entry

logger = logging.getLogger(__name__)

BACKLOG = 1024  # entries a follower may hold untaken before the hub pauses reading for it
_COUNT = 256  # entries per stream per XREAD
_BLOCK_MS = 1000  # a join wakes the read at once: the block only bounds an idle round
_WAKE_TTL_S = 3600
_UNREADABLE = (RedisError, OSError)
_RETRY_S = 0.1  # after a failed round, before the next (a new follower's)
_REREAD_S = 0.5  # between reads while they fail, before the followers give up on the stream
_READ_OUTAGE_S = 10.0  # reads failing this long: the followers follow their stored turns instead
# Status queries failed in a row, and for how long, before the readers are failed: a blip of the
# database (each new follower asks for a check at once, so three can fail within a second) is ridden
# out; an outage ends each reader with a resumable `unavailable` error (streaming/reader.py).
_STATUS_FAILURES = 3
_STATUS_OUTAGE_S = 15.0


class StatusUnavailable(RuntimeError):
    """The turns' status could not be read for _STATUS_OUTAGE_S: the database is out."""


def _order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class Follower:
    """One reader's subscription: its turn's stream entries after `cursor`, and whether its turn has
    finished by the last status check."""

    def __init__(self, hub: Hub, turn_id: uuid.UUID, key: str | None, cursor: str) -> None:
        self.turn_id, self.key, self.cursor = turn_id, key, cursor
        self.finished_checks = 0  # status checks that found the turn finished
        self.unreadable = False  # the stream could not be read: only the stored turn is left
        self._hub = hub
        self._entries: deque[Entry] = deque()
        self._paused = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until there is something new (entries, a finished check, a failure) or `timeout` s pass."""
        if timeout > 0 and not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        self._ready.clear()

    def take(self) -> list[Entry]:
        """The entries handed since the last take (a paused follower is read for again)."""
        if self._error is not None:
            raise self._error
        out = list(self._entries)
        self._entries.clear()
        if self._paused:
            self._paused = False
            self._hub.wake()
        return out

    def _hand(self, entries: list[Entry], read_to: str | None = None) -> None:
        """These entries (those after the cursor); the cursor moves past them, and on to `read_to`,
        the last id the read returned, when all were taken: past any entry that did not parse,
        which would otherwise be read again at once, every round."""
        after = _order(self.cursor)
        fresh = [e for e in entries if _order(e.id) > after]
        room = BACKLOG - len(self._entries)
        if len(fresh) > room:
            fresh, self._paused = fresh[:room], True
        if fresh:
            self._entries.extend(fresh)
            self.cursor = fresh[-1].id
            self._ready.set()
        if read_to is not None and not self._paused and _order(read_to) > _order(self.cursor):
            self.cursor = read_to

    def _checked(self) -> None:
        self.finished_checks += 1
        self._ready.set()

    @property
    def hub_closed(self) -> bool:
        """The hub stopped (the app is shutting down): no status check will come any more."""
        return self._hub.closed

    def _fail(self, error: BaseException | None) -> None:
        if error is None:
            self.unreadable = True
        else:
            self._error = error
        self._ready.set()


class Hub:
    """The readers' one XREAD loop and one status check loop (started by the first follower)."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._client: Any = None
        self._followers: set[Follower] = set()
        self._by_key: dict[str, set[Follower]] = {}
        self._joined = asyncio.Event()  # a stream follower joined or was unpaused
        self._check_now = asyncio.Event()  # a follower joined: check the statuses without waiting
        self._wake_key = f"mlchat:stream-hub:{uuid.uuid4()}"
        self._wake_cursor = "0-0"
        self._reading = False  # an XREAD is in flight: a join must wake it
        self._waking = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes: set[asyncio.Task[None]] = set()
        self.closed = False

    def follow(self, turn_id: uuid.UUID, key: str | None, cursor: str = "0-0") -> Follower:
        """Follow a turn: its stream `key` after `cursor` (None: its status alone)."""
        follower = Follower(self, turn_id, key, cursor)
        self._followers.add(follower)
        STREAM_READERS.inc()
        if key is not None:
            self._by_key.setdefault(key, set()).add(follower)
        if not self._tasks or any(task.done() for task in self._tasks):
            for task in self._tasks:
                task.cancel()
            self._tasks = [
                asyncio.create_task(self._read_streams(), name="stream-hub-read"),
                asyncio.create_task(self._check_statuses(), name="stream-hub-check"),
            ]
        self._check_now.set()
        self.wake()
        return follower

    def followers(self) -> int:
        """How many readers the hub serves now."""
        return len(self._followers)

    def stop_stream(self, follower: Follower) -> None:
        """Stop reading the follower's stream; it keeps its status checks."""
        if follower.key is not None:
            followers = self._by_key.get(follower.key, set())
            followers.discard(follower)
            if not followers:
                self._by_key.pop(follower.key, None)
            follower.key = None

    def unfollow(self, follower: Follower) -> None:
        """The reader is gone: nothing more for it."""
        self.stop_stream(follower)
        if follower in self._followers:
            self._followers.discard(follower)
            STREAM_READERS.dec()

    def wake(self) -> None:
        """Let the next XREAD include new or unpaused followers now, not after its block."""
        self._joined.set()
        if self._reading and not self._waking and self._client is not None:
            self._waking = True
            task = asyncio.get_running_loop().create_task(self._send_wake(self._client))
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)

    async def close(self) -> None:
        """Stop both loops and close the Redis connection (the app's shutdown)."""
        self.closed = True
        for task in [*self._tasks, *self._wakes]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._wakes, return_exceptions=True)
        for follower in list(self._followers):  # they end from the stored turn, not at their deadline
            self.stop_stream(follower)
            follower._fail(None)
        if self._client is not None:
            with contextlib.suppress(*_UNREADABLE):
                await self._client.delete(self._wake_key)
            await self._drop_client()

    async def _send_wake(self, client: Any) -> None:
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.expire(self._wake_key, _WAKE_TTL_S)
                await pipe.execute()
        except _UNREADABLE:
            pass  # the XREAD meets the same failure and tells the followers

    def _streams(self) -> dict[str, str]:
        """Each followed key from the lowest cursor of its followers that are not paused."""
        out: dict[str, str] = {}
        for key, followers in self._by_key.items():
            cursors = [f.cursor for f in followers if not f._paused]
            if cursors:
                out[key] = min(cursors, key=_order)
        return out

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_UNREADABLE):
                await client.aclose()

    async def _read_streams(self) -> None:
        try:
            failing_since: float | None = None  # the reads have failed since then
            while True:
                self._joined.clear()
                streams = self._streams()
                if not streams:
                    failing_since = None  # an outage is timed for the followers it met, not the next ones
                    await self._joined.wait()
                    continue
                try:
                    if self._client is None:
                        self._client = self._connect()
                    self._reading, self._waking = True, False  # a join from now on wakes this read
                    answer = await self._client.xread(
                        {self._wake_key: self._wake_cursor} | streams, count=_COUNT, block=_BLOCK_MS
                    )
                    _unless_cancelled()
                    self._reading = False
                    STREAM_HUB_READS.inc()
                    self._hand(answer, streams)
                    failing_since = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._reading = False
                    _unless_cancelled()
                    STREAM_HUB_FAILURES.labels("read").inc()
                    now = time.monotonic()
                    failing_since = now if failing_since is None else failing_since
                    # A blip (a restart, a failover's READONLY or UNBLOCKED) is read through: the
                    # followers keep their places and the next connection reads on from them. Only
                    # a lasting failure sends them to the stored turns.
                    if now - failing_since < _READ_OUTAGE_S:
                        logger.warning("a read of the turn streams failed; trying again: %s", exc)
                    else:
                        log = logger.warning if isinstance(exc, _UNREADABLE) else logger.exception
                        log("the turn streams are unreadable; their readers follow the stored turns")
                        self._fail_streams()
                        failing_since = None
                    await self._drop_client()
                    await asyncio.sleep(_RETRY_S if failing_since is None else _REREAD_S)
        finally:
            await self._drop_client()

    def _hand(self, answer: Any, streams: dict[str, str]) -> None:
        """Each stream's entries to its followers that were read for: a follower behind the cursor
        the read started from (it joined, or was unpaused, while the read was in flight) would skip
        the entries in between, so it waits for the next round, which reads from its cursor."""
        for raw_key, raw_entries in answer:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            if key == self._wake_key:
                self._wake_cursor = _id(raw_entries[-1][0]) if raw_entries else self._wake_cursor
                continue
            entries = _parsed(key, raw_entries)
            read_to = _id(raw_entries[-1][0]) if raw_entries else None
            read_from = _order(streams.get(key, "0-0"))
            for follower in list(self._by_key.get(key, ())):
                if not follower._paused and _order(follower.cursor) >= read_from:
                    follower._hand(entries, read_to)

    def _fail_streams(self) -> None:
        for followers in list(self._by_key.values()):
            for follower in list(followers):
                self.stop_stream(follower)
                follower._fail(None)

    async def _check_statuses(self) -> None:
        failures, failing_since = 0, 0.0
        while True:
            self._check_now.clear()
            if not self._followers:
                # a blip nobody was reading through is over: a failed check hours later is one, not
                # the latest of a run that ends every reader at once (review)
                failures, failing_since = 0, 0.0
                await self._check_now.wait()
                continue
            followers = list(self._followers)
            try:
                finished = await asyncio.to_thread(_finished, {f.turn_id for f in followers})
            except Exception as exc:  # a blip is retried; only a lasting failure ends the readers
                _unless_cancelled()
                STREAM_HUB_FAILURES.labels("status").inc()
                failures += 1
                failing_since = failing_since or time.monotonic()
                logger.warning("turn status check failed (%d in a row): %s", failures, exc)
                if failures >= _STATUS_FAILURES and time.monotonic() - failing_since >= _STATUS_OUTAGE_S:
                    for follower in followers:
                        follower._fail(StatusUnavailable("the turn's status cannot be read for now"))
            else:
                failures, failing_since = 0, 0.0
                for follower in followers:
                    if follower.turn_id in finished:
                        follower._checked()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.stream_check_s):
                    await self._check_now.wait()


def _id(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _parsed(key: str, raw_entries: Any) -> list[Entry]:
    """The stream's entries; one that does not parse is skipped (logged): the stored turn, which
    every reader ends with, makes up for what it held."""
    out = []
    for raw_id, fields in raw_entries:
        try:
            out.append(Entry.parse(raw_id, fields))
        except Exception:
            logger.warning("%s: entry %s does not parse; skipped", key, _id(raw_id), exc_info=True)
    return out


def _unless_cancelled() -> None:
    # redis-py can answer a cancel in mid-command with an error or an empty answer: the cancel wins
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _finished(turn_ids: set[uuid.UUID]) -> set[uuid.UUID]:
    # Its own connection: a request pool held by slow work would end every stream of the process.
    with Session(get_watch_engine()) as session, session.begin():
        return finished_turns(session=session, turn_ids=list(turn_ids))


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub(connect: Callable[[], Any]) -> Hub:
    """This event loop's hub, made on first use; `connect` makes its Redis client."""
    loop = asyncio.get_running_loop()
    for gone in [other for other in list(_hubs) if other.is_closed()]:
        _hubs.pop(gone, None)  # a hub refers back to its loop: the weak key alone never lets go
    found = _hubs.get(loop)
    if found is None or found.closed:
        found = _hubs[loop] = Hub(connect)
    return found


async def close_hub() -> None:
    """Stop this event loop's hub, if it has one."""
    found = _hubs.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.close()
