"""The Redis transport under the Celery app: kombu's own, keeping one redis-py client per channel.

kombu's Redis channel builds a new `redis.Redis` for every command it sends outside a consumer's
poll (the LPUSH of each publish, a queue's size, a purge). The client is only a handle on the
channel's connection pool, but building one copies two tables of ~160 response callbacks: ~0.14 ms
of CPU, more than the LPUSH itself, on every single enqueue. Here each channel builds that handle
once per pool and reuses it. A redis-py client on a connection pool keeps no per-command state (each
command takes a pooled connection and gives it back), so it is safe to share between calls and
threads, as redis-py documents; the pool itself, its connections and what a command does on them
are kombu's, unchanged. A channel whose pools were dropped (after a fork, on close) gets a new handle
on its new pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with one command client per connection pool."""

    _command_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self._command_client
        if cached is None or cached.connection_pool is not pool:
            cached = self._command_client = self._create_client()
        yield cached


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel


def transport_for(url: str) -> str | None:
    """The transport for a broker URL: this one for `redis://`; None (kombu's choice from the
    scheme) for the others: `rediss://` must keep kombu's name-based TLS default and
    `redis+socket://` names its transport in the URL."""
    return f"{__name__}:Transport" if urlsplit(url).scheme == "redis" else None
