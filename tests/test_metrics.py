"""What a worker reports per batch: one JSON log line, and Prometheus metrics scraped over HTTP."""

import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import httpx
from prometheus_client import start_http_server

from core.metrics import register_queue_depth
from services.producer import enqueue_turns
from tests.conftest import new_conversation
from worker.pipeline import process_batch


def _value(body: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_start))


def test_a_batch_logs_one_json_line_and_updates_the_scraped_metrics(engine, caplog) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    register_queue_depth()
    server, _ = start_http_server(port, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        before = httpx.get(url).text
        ok = new_conversation() | {"message": "Good evening."}
        too_long = new_conversation() | {"message": "고기" * 1900}  # cannot fit max_model_len
        with caplog.at_level(logging.INFO, logger="mlchat.batch"):
            ids = enqueue_turns([ok, too_long], send=False)
            report = process_batch(ids)
        after = httpx.get(url).text
    finally:
        server.shutdown()

    ours = {str(i) for i in ids}
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mlchat.batch"]
    lines = [line for line in lines if ours & (set(line["done"]) | set(line["failed"]))]
    assert len(lines) == 1  # one line for the batch, whatever else the session's worker logged
    line = lines[0]
    assert line["size"] == 2 and line["done"] == [str(ids[0])] and list(line["failed"]) == [str(ids[1])]
    assert {"claim_ms", "embed_ms", "retrieve_ms", "prompt_ms", "generate_ms", "write_ms"} <= set(
        line["timings_ms"]
    )

    # The session's in-process worker may finish other batches meanwhile: counters grow by at least this one.
    model = 'model="smollm2-135m"'
    for series, at_least in (
        (f'mlchat_turns_total{{{model},outcome="done"}}', len(report.done)),
        (f'mlchat_turns_total{{{model},outcome="failed"}}', 1),
        (f"mlchat_batch_size_count{{{model}}}", 1),
        (f'mlchat_stage_seconds_count{{{model},stage="generate"}}', 1),
        ('mlchat_tokens_total{kind="completion",model="smollm2-135m"}', 1),  # labels sort by name
    ):
        assert _value(after, series) - _value(before, series) >= at_least, series
    assert 'mlchat_queue_depth{queue="gen.smollm2-135m.bulk"}' in after


def test_the_worker_health_check_reads_the_engine_gauge(world, monkeypatch) -> None:
    import socket

    from prometheus_client import start_http_server

    from core import metrics
    from worker.health import engine_up

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1")
    before = metrics.ENGINE_UP._value.get()
    metrics.register_queue_depth()

    def broker_hangs(*args: object) -> dict:
        time.sleep(8)  # longer than the check's 5 s timeout
        return {}

    # Found in review: the check read the whole scrape, whose queue depths come from the broker: a
    # broker that hung timed the check out, and every worker was reported dead.
    monkeypatch.setattr("tasks.queues.queue_depths", broker_hangs)
    try:
        metrics.ENGINE_UP.set(1)
        started = time.monotonic()
        assert engine_up(port) == (True, "engine up") and time.monotonic() - started < 5
        metrics.ENGINE_UP.set(0)  # what a worker whose engine died reports until it exits
        assert engine_up(port) == (False, "engine dead or not loaded")
    finally:
        metrics.ENGINE_UP.set(before)
        server.shutdown()
    assert engine_up(port)[0] is False  # nothing listening: unhealthy, with the reason


@contextmanager
def _broker_that_hangs() -> Iterator[str]:
    """A Redis URL whose server takes the connection and never answers (a paused host, a long script)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def test_a_scrape_and_the_collectors_registration_wait_for_no_broker_that_hangs(monkeypatch) -> None:
    """Review (stop 75): the queue depths were read over a connection with the broker's own 30 s
    socket timeout, so while Redis hung every scrape timed out (the whole target, engine gauge and
    all, went missing) and registering the collector, which read it once, held each process's start."""
    from prometheus_client import CollectorRegistry, generate_latest

    from core import metrics
    from tasks import queues

    with _broker_that_hangs() as url:
        monkeypatch.setattr(queues, "probe_connection", partial(queues.probe_connection, url))
        read: list[float] = []
        real_depths = queues.queue_depths
        monkeypatch.setattr(queues, "queue_depths", lambda lanes: read.append(1) or real_depths(lanes))
        registry = CollectorRegistry(auto_describe=True)  # as the default registry is
        registry.register(metrics.QueueDepthCollector())
        assert read == []  # described, not collected
        started = time.monotonic()
        scraped = generate_latest(registry).decode()
        assert read == [1] and time.monotonic() - started < 3 * queues.PROBE_TIMEOUT_S + 1
        assert "mlchat_queue_depth" in scraped and "mlchat_queue_depth{" not in scraped  # no depth, no wait


def test_the_stage_histogram_holds_stages_only_and_reaches_an_hour() -> None:
    """Found in review: `to_engine` (the claim until the prompts reach the engine: the stages before
    it again) was observed as a stage of its own, so the stages' sum counted those twice; and the top
    bucket was 120 s, where a bulk batch's generate runs for minutes."""
    from prometheus_client import REGISTRY

    from core.metrics import record_batch

    model = "stage-histogram-check"
    record_batch(
        model,
        timings_ms={"claim_ms": 2.0, "to_engine_ms": 9.0, "generate_ms": 1_500_000.0},
        claimed=1,
        outcomes={},
        tokens={},
    )

    def count(stage: str, le: str = "+Inf") -> float | None:
        labels = {"model": model, "stage": stage, "le": le}
        return REGISTRY.get_sample_value("mlchat_stage_seconds_bucket", labels)

    assert count("claim") == 1 and count("to_engine") is None
    assert count("generate", "900.0") == 0 and count("generate", "3600.0") == 1


def test_a_batchs_tokens_count_every_request_the_engine_finished_not_only_the_kept_replies() -> None:
    """Found in review: the token counter summed the candidates kept, so a structured reply that did
    not parse, an empty one and a regeneration were the engine's work that no rate showed."""
    import uuid
    from concurrent.futures import Future

    from prometheus_client import REGISTRY

    from core.settings import settings
    from worker.engine_loop import Generation
    from worker.pipeline import BatchReport, _account

    def done(prompt: int, completion: int, text: str = "ok") -> Future:
        future: Future = Future()
        future.set_result(Generation(text, prompt, completion, "stop"))
        return future

    failed: Future = Future()
    failed.set_exception(RuntimeError("engine error"))
    report = BatchReport()
    kept, dropped = uuid.uuid4(), uuid.uuid4()
    report.futures = {kept: [done(100, 20), done(100, 7, "")], dropped: [done(50, 48, "{not json"), failed]}
    report.done, report.failed = [kept], {}

    def tokens(kind: str) -> float:
        return (
            REGISTRY.get_sample_value("mlchat_tokens_total", {"model": settings.model, "kind": kind}) or 0.0
        )

    before = tokens("prompt"), tokens("completion")
    _account(report, claimed=2)
    assert (tokens("prompt") - before[0], tokens("completion") - before[1]) == (250, 75)


def test_a_batchs_failures_count_only_once_committed() -> None:
    """Review (stop 78, numbers): a batch that raised after noting a failure it never wrote (its
    hand-back could not reach the turn) counted it failed: the turn was answered later, counted twice."""
    import uuid

    from prometheus_client import REGISTRY

    from core.settings import settings
    from db.models import TurnErrorCode
    from db.turns import Failure
    from worker.pipeline import BatchReport, _account

    def failed() -> float:
        labels = {"model": settings.model, "outcome": "failed"}
        return REGISTRY.get_sample_value("mlchat_turns_total", labels) or 0.0

    written, noted = uuid.uuid4(), uuid.uuid4()
    report = BatchReport(
        failed={t: Failure("empty", TurnErrorCode.EMPTY_REPLY) for t in (written, noted)},
        failed_written={written},
    )
    before = failed()
    _account(report, claimed=2)
    assert failed() == before + 1


def test_turns_run_and_never_stored_are_counted_by_their_outcome() -> None:
    """Found in review: a turn answered after its lease lapsed (not stored), or left under a dead
    engine's lease, was claimed and run and counted in no outcome of mlchat_turns_total."""
    import uuid

    from prometheus_client import REGISTRY

    from core.settings import settings
    from worker.pipeline import BatchReport, _account

    def count(outcome: str) -> float:
        return (
            REGISTRY.get_sample_value("mlchat_turns_total", {"model": settings.model, "outcome": outcome})
            or 0.0
        )

    before = count("lost"), count("unsettled")
    _account(BatchReport(lost=[uuid.uuid4(), uuid.uuid4()], unsettled=[uuid.uuid4()]), claimed=3)
    assert (count("lost") - before[0], count("unsettled") - before[1]) == (2, 1)
