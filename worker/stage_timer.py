"""Wall-clock timing of a batch's stages, in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Accumulates per-stage milliseconds: `with timer("embed"): ...`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.ms[f"{stage}_ms"] = self.ms.get(f"{stage}_ms", 0.0) + (time.perf_counter() - begin) * 1000

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class GenerationSpan:
    """The generation stage of a batch whose replies are judged and written group by group as they
    finish: from submission to the last reply, less the time this thread spent on the earlier groups
    meanwhile (those are their own stages: no time is counted in two; the bookkeeping between them,
    announcing and calling back, is in none)."""

    def __init__(self) -> None:
        self._submitted = time.perf_counter()
        self._elsewhere = 0.0

    @contextmanager
    def other_stages(self) -> Iterator[None]:
        """Time spent on a finished group's stages, taken out of the span."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._elsewhere += time.perf_counter() - begin

    def ms(self) -> float:
        """The span so far, in milliseconds."""
        return (time.perf_counter() - self._submitted - self._elsewhere) * 1000
