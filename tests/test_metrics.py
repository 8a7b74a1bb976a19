"""What a worker reports per batch: one JSON log line, and Prometheus metrics scraped over HTTP."""

import json
import logging
import socket

import httpx
from prometheus_client import start_http_server

from core.metrics import register_queue_depth
from tasks.producer import enqueue_turns
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

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mlchat.batch"]
    assert len(lines) == 1
    line = lines[0]
    assert line["size"] == 2 and line["done"] == [str(ids[0])] and list(line["failed"]) == [str(ids[1])]
    assert {"claim_ms", "embed_ms", "retrieve_ms", "prompt_ms", "generate_ms", "write_ms"} <= set(
        line["timings_ms"]
    )

    model = 'model="smollm2-135m"'
    done = f'mlchat_turns_total{{{model},outcome="done"}}'
    failed = f'mlchat_turns_total{{{model},outcome="failed"}}'
    assert _value(after, done) == _value(before, done) + 1 == _value(before, done) + len(report.done)
    assert _value(after, failed) == _value(before, failed) + 1
    batches = f"mlchat_batch_size_count{{{model}}}"
    assert _value(after, batches) == _value(before, batches) + 1
    generate = f'mlchat_stage_seconds_count{{{model},stage="generate"}}'
    assert _value(after, generate) == _value(before, generate) + 1
    completion = 'mlchat_tokens_total{kind="completion",model="smollm2-135m"}'  # labels sort by name
    assert _value(after, completion) > _value(before, completion)
    assert 'mlchat_queue_depth{queue="gen.smollm2-135m.bulk"}' in after
