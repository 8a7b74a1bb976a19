"""One value per key, made for one version of its source: a new version makes it again. Holds at
most `kept` keys, the oldest dropped first (a worker meets new characters for as long as it runs),
and is safe to share between threads (the value is made outside the lock: two threads may both make
it, one wins)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class VersionedCache(Generic[V]):
    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._values: dict[Hashable, tuple[Hashable, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, version: Hashable, make: Callable[[], V]) -> V:
        """The value for `key` made at `version`, made now if it is not held."""
        with self._lock:
            held = self._values.get(key)
        if held is not None and held[0] == version:
            return held[1]
        value = make()
        with self._lock:
            while len(self._values) >= self.kept and key not in self._values:
                del self._values[next(iter(self._values))]
            self._values[key] = (version, value)
        return value

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._values)
