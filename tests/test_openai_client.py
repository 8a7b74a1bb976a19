"""The official `openai` client against mlchat's /v1/files and /v1/batches, on the real worker: the
whole round trip, an expiry, and a signed completion callback retried after a failure."""

import json
import re
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from core.settings import PROJECT_ROOT, queue_for_model, settings
from db.models import Run
from db.session import session_scope
from services import batches
from services.callbacks import SIGNATURE_HEADER, verify_signature
from tasks.app import app
from tests.conftest import HASHED_INGEST_KEY, INGEST_KEY, serving_api
from tests.test_openai_batches import openai_line

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _client(base_url: str, key: str = INGEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def _upload(client: openai.OpenAI, path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, until: set[str], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.5)


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    """A result file's lines; none when the batch has no such file (OpenAI's null id: no line)."""
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_the_openai_client_does_the_whole_batch_round_trip(base_url, celery_worker, tmp_path) -> None:
    client = _client(base_url)
    characters = ["elara", "luffy", "haneul"]
    lines = [
        openai_line(
            f"req-{i:03d}",
            [{"role": "user", "content": f"Tell me about the road north, part {i}."}],
            model=characters[i % 3],
            max_completion_tokens=8,
            seed=i,
            **({"n": 2} if i < 2 else {}),  # two choices each: best of n, both returned
        )
        for i in range(52)
    ]
    # Two lines whose prompt cannot fit next to the reply they ask for: answered in the error file.
    crowded = " ".join(f"x{i}y{i}" for i in range(600))[:3990]
    lines += [
        openai_line(f"too-long-{i}", [{"role": "user", "content": crowded}], max_completion_tokens=1024)
        for i in range(2)
    ]
    file_id = _upload(client, tmp_path / "npc.jsonl", lines)
    assert client.files.retrieve(file_id).purpose == "batch"

    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "round-trip"},
    )
    assert batch.status == "validating" and batch.metadata == {"suite": "round-trip"}
    done = _wait(client, batch.id, TERMINAL)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        54,
        52,
        2,
    )
    assert done.finalizing_at is not None and done.completed_at >= done.finalizing_at

    output, errors = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
    answered = [x["custom_id"] for x in output]
    failed = [x["custom_id"] for x in errors]
    assert sorted(answered + failed) == sorted(x["custom_id"] for x in lines)  # every custom_id once
    assert sorted(failed) == ["too-long-0", "too-long-1"]
    for line in output:
        body = line["response"]["body"]
        n = 2 if line["custom_id"] in ("req-000", "req-001") else 1
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "chat.completion" and len(body["choices"]) == n
        assert [c["index"] for c in body["choices"]] == list(range(n))
        assert all(c["message"]["content"].strip() for c in body["choices"])
        # usage pays for every candidate generated: best of n costs n
        assert 0 < body["usage"]["completion_tokens"] <= 8 * max(n, settings.run_candidates)
    for x in errors:  # ran and failed: OpenAI's response shape, the request's fault
        assert x["error"] is None and x["response"]["status_code"] == 400
        assert x["response"]["body"]["error"]["code"] == "prompt_too_long"

    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]
    # Another key's caller sees neither the batch nor its files.
    stranger = _client(base_url, HASHED_INGEST_KEY)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        stranger.files.content(done.output_file_id)
    assert batch.id not in [b.id for b in stranger.batches.list().data]
    mine = {done.input_file_id, done.output_file_id, done.error_file_id}
    assert mine <= {f.id for f in client.files.list(limit=10_000)}
    assert mine.isdisjoint(f.id for f in stranger.files.list(limit=10_000))
    # The batch has ended: its files can be deleted, and are gone.
    for file in mine:
        assert client.files.delete(file).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(done.output_file_id)


@pytest.fixture()
def unserved_model(monkeypatch):
    """Batches created meanwhile go to a queue no worker consumes, so their turns stay unstarted."""
    model = "batch-unserved"
    monkeypatch.setattr(settings, "model", model)
    yield model
    with app.connection_for_write() as conn:
        for lane in ("live", "bulk"):
            conn.default_channel.queue_purge(queue_for_model(model, lane))


def test_a_batch_expires_over_http_and_reports_every_request(base_url, unserved_model, tmp_path) -> None:
    client = _client(base_url)
    lines = [openai_line(f"e{i}", [{"role": "user", "content": f"Still there, {i}?"}]) for i in range(5)]
    file_id = _upload(client, tmp_path / "late.jsonl", lines)
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="2s",  # type: ignore[arg-type]
    )
    assert batch.expires_at - batch.created_at == 2
    _wait(client, batch.id, {"in_progress"}, timeout=60)
    time.sleep(2.5)
    batches.housekeeping()  # what the workers' timer and the sweeper run
    expired = _wait(client, batch.id, TERMINAL, timeout=60)
    assert expired.status == "expired" and expired.expired_at is not None
    # Expired requests are neither completed nor failed, as OpenAI counts them.
    assert expired.request_counts.failed == 0 and expired.request_counts.completed == 0
    assert expired.output_file_id is None  # nothing answered: no output file, as at OpenAI
    errors = _jsonl(client, expired.error_file_id)
    assert sorted(x["custom_id"] for x in errors) == [f"e{i}" for i in range(5)]
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}


class _Receiver(BaseHTTPRequestHandler):
    calls: list[tuple[dict, bytes]] = []
    fail_first = 1

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).calls.append((dict(self.headers), body))
        self.send_response(500 if len(type(self).calls) <= type(self).fail_first else 204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_cancelled_batch_calls_back_signed_and_retries_after_a_failure(
    base_url, celery_worker, unserved_model, monkeypatch, tmp_path
) -> None:
    secret = "callback-secret-for-tests"
    monkeypatch.setattr(settings, "callback_secret", SecretStr(secret))
    monkeypatch.setattr(settings, "callback_allow_private", True)  # the receiver is on loopback
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = _client(base_url)
        file_id = _upload(
            client, tmp_path / "cb.jsonl", [openai_line("c0", [{"role": "user", "content": "Hi?"}])]
        )
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        batch = client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"callback_url": url},
        )
        _wait(client, batch.id, {"in_progress"}, timeout=60)
        client.batches.cancel(batch.id)
        assert _wait(client, batch.id, TERMINAL, timeout=60).status == "cancelled"
        deadline = time.monotonic() + 60
        while len(_Receiver.calls) < 2:
            assert time.monotonic() < deadline, f"{len(_Receiver.calls)} callback(s) arrived"
            time.sleep(0.2)
    finally:
        server.shutdown()
    tenants = client.get("/callbacks/secret", cast_to=object)  # the key's tenant signs its callbacks
    for headers, body in _Receiver.calls:
        assert verify_signature(headers[SIGNATURE_HEADER], body, tenants["secret"])  # type: ignore[index]
        assert not verify_signature(headers[SIGNATURE_HEADER], body, secret)  # not the operator's
        assert json.loads(body)["id"] == batch.id and json.loads(body)["status"] == "cancelled"
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == batch.id)).one()
        assert run.callback_attempts == 2 and run.callback_delivered_at is not None
        assert run.callback_error is None


def test_the_readme_curl_round_trip_runs_as_written(celery_worker, tmp_path) -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## OpenAI Batch files") : readme.index("## Roleplay")]
    (script,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    # The sample file as written, cut to 6 short lines to keep the suite's time.
    sample = (PROJECT_ROOT / "data" / "sample_openai_batch.jsonl").read_text(encoding="utf-8").splitlines()
    lines = [json.loads(x) for x in sample[:6]]
    for line in lines:
        line["body"]["max_completion_tokens"] = 8
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample_openai_batch.jsonl").write_text(
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8"
    )
    with serving_api(port=8000):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = [
        json.loads(x) for x in (tmp_path / "batch_output.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert sorted(x["custom_id"] for x in output) == sorted(x["custom_id"] for x in lines)


def test_the_openai_client_reads_each_refusal_of_files_and_batches_as_openai_words_it(
    base_url, tmp_path
) -> None:
    # Found in review: these routes answered `{"detail": …}`, so the client's exception said only
    # "Error code: 400" (its text is `error.message`), with no param, and a validation 422 was an
    # UnprocessableEntityError that `except openai.BadRequestError` does not catch.
    client = _client(base_url)
    with pytest.raises(openai.BadRequestError) as gone:
        client.batches.create(
            input_file_id="file-gone", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert "file-gone" in str(gone.value) and gone.value.param == "input_file_id", gone.value.body
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        client.files.list(purpose="user_data")
    assert "purpose" in str(bad_purpose.value) and bad_purpose.value.param == "purpose"
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.retrieve("batch_nope")
    assert "batch_nope" in str(missing.value) and missing.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError) as unknown_key:
        _client(base_url, key="no-such-key").files.list()
    assert unknown_key.value.code == "invalid_api_key" and "API key" in str(unknown_key.value)
    # The other routes keep their own shape.
    refused = httpx.get(f"{base_url}/v1/turns/{uuid.uuid4()}", headers={"X-API-Key": INGEST_KEY})
    assert refused.status_code == 404 and "detail" in refused.json()


def test_the_openai_client_lists_the_characters_as_its_models(base_url) -> None:
    """Found in review: there was no /v1/models, which `client.models.list()` and the tools built on
    OpenAI's API (a UI's model picker, a proxy's health check) read before they talk: a 404 in this
    API's own shape. The characters are the models a chat completion names."""
    client = _client(base_url)
    listed = {m.id: m for m in client.models.list()}
    assert {"elara", "luffy"} <= set(listed) and listed["elara"].object == "model"
    assert listed["elara"].owned_by == "mlchat" and listed["elara"].created > 0
    assert client.models.retrieve("elara").id == "elara"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-nobody")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    for odd in ("el%00ara", "el%ED%A0%80ara", "x" * 200):  # a NUL, a lone surrogate's bytes: no 500
        answer = httpx.get(f"{base_url}/v1/models/{odd}", headers={"Authorization": f"Bearer {INGEST_KEY}"})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", odd
    with pytest.raises(openai.AuthenticationError):
        _client(base_url, key="no-such-key").models.list()
    # and a chat completion naming no character is OpenAI's 404 too (it was a 400 BadRequestError)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello?"}])
    assert unknown.value.code == "model_not_found" and "gpt-4o" in str(unknown.value)


def test_a_refusal_on_an_openai_route_behind_a_proxys_prefix_is_in_openais_shape_too() -> None:
    # Review: the shape was chosen by the request's path, which under uvicorn's --root-path holds
    # the prefix: /mlchat/v1/files answered mlchat's own 422.
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(), root_path="/mlchat") as client:
        answer = client.get("/mlchat/v1/files", params={"limit": 0}, headers={"X-API-Key": INGEST_KEY})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "limit" and "limit" in answer.json()["error"]["message"]
