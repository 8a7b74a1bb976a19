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
