"""What an API process does once, done once when many requests need it at the same moment: loading
the embedder and a model's tokenizer (functools.cache lets every concurrent first caller load), and
background jobs left alone once the server is shutting down."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest


def _at_once(call: Any, n: int = 8) -> None:
    start = threading.Barrier(n)

    def each() -> None:
        start.wait()
        call()

    threads = [threading.Thread(target=each) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_concurrent_first_callers_load_the_embedder_once(world, monkeypatch) -> None:
    """Found in review: an API's first forty fact writes after a deploy loaded forty embedders."""
    from worker import embedder

    real = embedder.get_embedder()  # the session's, put back below
    loads: list[int] = []

    def slow_load(cfg: Any) -> Any:
        loads.append(1)
        time.sleep(0.2)
        return real

    monkeypatch.setattr(embedder, "load_embedder", slow_load)
    embedder._loaded.cache_clear()
    try:
        _at_once(embedder.get_embedder)
        assert len(loads) == 1
    finally:
        embedder._loaded.cache_clear()
        monkeypatch.setattr(embedder, "load_embedder", lambda cfg: real)
        assert embedder.get_embedder() is real


def test_concurrent_first_edits_load_a_models_tokenizer_once(monkeypatch) -> None:
    """The desk's edit check, the same way: each concurrent first edit read the tokenizer."""
    import worker.model_cache
    from core.settings import settings
    from services import desk

    tokenizer = worker.model_cache.load_tokenizer(settings, settings.model)
    loads: list[int] = []

    def slow_load(cfg: Any, model: str) -> Any:
        loads.append(1)
        time.sleep(0.2)
        return tokenizer

    monkeypatch.setattr(worker.model_cache, "load_tokenizer", slow_load)
    model = "a-model-loaded-at-once"
    try:
        _at_once(lambda: desk._sanitizer(model))
        assert len(loads) == 1
    finally:
        desk._sanitizers.pop(model, None)


@pytest.mark.parametrize("stopping", [False, True])
def test_a_background_job_is_left_to_housekeeping_once_the_server_is_stopping(stopping) -> None:
    """Found in review: uvicorn waits for every background task, so a batch's submission that waited
    for a thread and started after the SIGTERM held the restart for minutes (housekeeping submits a
    batch left validating, and finalizes a finalizing one)."""
    import asyncio

    from fastapi import BackgroundTasks
    from sse_starlette.sse import AppStatus

    from api.background import run_after_answer

    ran: list[str] = []
    tasks = BackgroundTasks()
    run_after_answer(tasks, ran.append, "batch_1")
    AppStatus.should_exit = stopping
    try:
        asyncio.run(tasks())
    finally:
        AppStatus.should_exit = False
    assert ran == ([] if stopping else ["batch_1"])
