"""Bulk runs: whole-file validation, submit → progress → export on the real worker, cancel, priority."""

import json
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.settings import PROJECT_ROOT
from db.models import Run, RunStatus, Turn, TurnStatus
from db.session import session_scope
from scripts.cli import main as cli
from services.producer import enqueue_turns, wait_for_reply
from services.runs import RunValidationError, export_run, run_state, submit_run
from tests.conftest import new_conversation

SAMPLE = PROJECT_ROOT / "data" / "sample_run_2000.jsonl"


def _slice(tmp_path: Path, n: int, name: str) -> Path:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _turns() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Turn))


def _wait_until_finished(ref: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        state = run_state(ref)
        if state.status in (RunStatus.COMPLETED, RunStatus.CANCELLED) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


BAD_FILE = "\n".join(
    [
        '{"custom_id": "a", "character": "elara", "message": "Hello"}',
        "{not json",
        '{"custom_id": "b", "character": "elara", "message": 42}',
        '{"character": "elara", "message": "no id"}',
        '{"custom_id": "a", "character": "elara", "message": "dup"}',
        '{"custom_id": "c", "character": "elara", "message": ""}',
        '{"custom_id": "d", "character": "elara", "message": "hi", "colour": "red"}',
        '{"custom_id": "e", "message": "who am I talking to?"}',
        '["a", "list"]',
        '{"custom_id": "f", "character": "elara", "message": "ok", "params": {"temperature": 9}}',
    ]
)


def test_every_bad_line_is_reported_before_anything_is_enqueued(world, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_FILE + "\n", encoding="utf-8")
    before = _turns()
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="bad-" + tmp_path.name)
    reasons = {e.line: e.reason for e in caught.value.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "not valid JSON" in reasons[2]
    assert "message" in reasons[3] and "custom_id" in reasons[4]
    assert "duplicate custom_id 'a'" in reasons[5] and "message is empty" in reasons[6]
    assert "colour" in reasons[7] and "must name a character" in reasons[8]
    assert "JSON object" in reasons[9] and "temperature" in reasons[10]
    assert _turns() == before
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == "bad-" + tmp_path.name)).one()
        assert run.status == RunStatus.FAILED and "9 bad line(s)" in run.error


def test_a_line_too_deep_or_with_a_number_too_long_is_a_bad_line_not_a_crash(world, tmp_path) -> None:
    """Found in review: RecursionError (and the ValueError of a 5,000-digit number) escaped the line
    check, so a CLI submission printed a traceback and a batch retried it as a server fault."""
    path = tmp_path / "deep.jsonl"
    lines = [
        '{"custom_id": "a", "character": "elara", "message": "x", "params": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"custom_id": "b", "character": "elara", "message": "x", "params": {"seed": ' + "1" * 5000 + "}}",
        '{"custom_id": "c", "character": "elara", "message": "Hello"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = _turns()
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="deep-" + tmp_path.name)
    reasons = {e.line: e.reason for e in caught.value.errors}
    assert sorted(reasons) == [1, 2]
    assert "nested too deeply" in reasons[1] and "not JSON that can be read" in reasons[2]
    assert _turns() == before


def test_a_bad_lines_error_quoting_a_nul_or_a_lone_surrogate_is_stored_escaped(world, tmp_path) -> None:
    """Found in review: an error names the place at fault, and pydantic's place holds the line's own
    keys verbatim; a key with a NUL or a lone surrogate made the run's error (or an OpenAI line's
    refusal) unstorable, so the submission raised a database error (a batch: retried as a server
    fault, the line never named). A quoted value (an OpenAI line's method) was kept whole, however
    long."""
    good = '{"custom_id": "c", "character": "elara", "message": "Hello"}\n'
    native = tmp_path / "keys.jsonl"
    native.write_text(
        '{"custom_id": "a", "character": "elara", "message": "hi", "\\u0000": 1}\n'
        '{"custom_id": "b", "character": "elara", "message": "hi", "x\\ud800": 1}\n' + good,
        encoding="utf-8",
    )
    with pytest.raises(RunValidationError) as caught:
        submit_run(native, name="keys-" + tmp_path.name)
    reasons = {e.line: e.reason for e in caught.value.errors}
    assert sorted(reasons) == [1, 2]
    # the NUL key is the place named (a lone surrogate's line is refused as a whole)
    assert reasons[1].startswith("\\u0000: ")
    assert _stored_line_errors("keys-" + tmp_path.name) == [reasons[1], reasons[2]]

    def openai_line(custom_id: str, method: str = "POST", extra: str = "") -> str:
        body = '{"model": "elara", "messages": [{"role": "user", "content": "hi"}]' + extra + "}"
        return (
            f'{{"custom_id": "{custom_id}", "method": "{method}", "url": "/v1/chat/completions", '
            f'"body": {body}}}\n'
        )

    long_method = tmp_path / "method.jsonl"
    long_method.write_text(openai_line("d", method="P" * 100_000) + openai_line("e"), encoding="utf-8")
    with pytest.raises(RunValidationError) as caught:
        submit_run(long_method, name="method-" + tmp_path.name)
    (stored,) = _stored_line_errors("method-" + tmp_path.name)
    assert stored.startswith("method: 'PPP") and len(stored) <= 500

    refused = tmp_path / "refused.jsonl"
    refused.write_text(openai_line("f", extra=', "\\u0000": 1') + openai_line("g"), encoding="utf-8")
    submit_run(refused, name="refused-" + tmp_path.name)
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == "refused-" + tmp_path.name)).one()
        assert [r["custom_id"] for r in run.refused] == ["f"]
        assert "body.\\u0000" in run.refused[0]["message"]


def _stored_line_errors(name: str) -> list[str]:
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == name)).one()
        assert run.status == RunStatus.FAILED
        return [e["message"] for e in run.line_errors]


def test_skip_bad_lines_enqueues_the_good_ones(world, tmp_path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(BAD_FILE + "\n", encoding="utf-8")
    submitted = submit_run(path, name="mixed-" + tmp_path.name, skip_bad_lines=True)
    assert submitted.enqueued == 1 and len(submitted.skipped_lines) == 9


def test_submit_progress_export_and_resubmit(world, celery_worker, tmp_path, capsys) -> None:
    path = _slice(tmp_path, 24, "npc-lines")
    name = "npc-lines-" + tmp_path.name
    assert cli(["run", "submit", str(path), "--name", name]) == 0
    run_id = capsys.readouterr().out.strip()
    state = _wait_until_finished(run_id)
    assert state.status == RunStatus.COMPLETED, state
    assert (state.counts.total, state.counts.completed, state.counts.failed) == (24, 24, 0)

    assert state.quality["scored"] == 24  # every reply's quality, summarised per run
    assert 0 <= state.quality["language_match_rate"] <= 1 and -1 <= state.quality["persona_mean"] <= 1
    assert cli(["run", "status", name]) == 0
    status_out = capsys.readouterr().out
    assert "completed total=24 completed=24 failed=0" in status_out
    assert "quality scored=24 persona_mean=" in status_out
    assert cli(["run", "list"]) == 0 and name in capsys.readouterr().out

    again = submit_run(path, name=name)
    assert not again.created and again.id == state.id and again.enqueued == 0

    results, errors, n_ok, n_err = export_run(name, tmp_path / "out")
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    inputs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in rows] == [i["custom_id"] for i in inputs]  # input order
    assert [r["seed"] for r in rows] == [i["params"]["seed"] for i in inputs]  # reproducible
    assert all(r["reply"] and r["usage"]["completion_tokens"] > 0 for r in rows)
    assert all("persona" in r["quality"] and r["state"]["after"]["emotion"] for r in rows)
    assert n_ok == 24 and n_err == 0 and errors.read_text() == ""


def test_a_native_error_line_carries_its_error_code_and_a_refused_line_its_field(world, tmp_path) -> None:
    """Review (stop 75): native errors.jsonl lines had only `error`, the text for people: a program
    told prompt_too_long from engine_error by parsing English; a refused line lost its `param`."""
    from sqlalchemy import update

    from db.models import TurnErrorCode
    from db.turns import Failure, claim_turns, fail_turns
    from tests.desk_data import Spec, answer, quality, queue_run

    specs = [Spec("Hi", "Hello.", quality(0.5)), Spec("Ho", "Hey.", quality(0.5))]
    run_id, (ok, bad) = queue_run("", specs, name=f"native-errors-{uuid.uuid4().hex[:6]}")
    answer([ok], specs[:1])
    with session_scope() as s:
        token = claim_turns(session=s, turn_ids=[bad], lease_s=60, max_attempts=3).token
        fail_turns(
            session=s,
            token=token,
            failures={bad: Failure("the prompt is too long", TurnErrorCode.PROMPT_TOO_LONG)},
        )
        refused = [
            {"line": 3, "custom_id": "line-3", "message": "model: not a character here", "param": "model"}
        ]
        s.execute(update(Run).where(Run.id == run_id).values(refused=refused))
    _, errors, n_ok, n_err = export_run(str(run_id), tmp_path / "out")
    lines = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    assert n_ok == 1 and n_err == 2
    by_id = {line["custom_id"]: line for line in lines}
    assert (
        by_id["line-2"]["error_code"] == "prompt_too_long"
        and by_id["line-2"]["error"] == "the prompt is too long"
    )
    assert (
        by_id["line-3"] | {"error_code": "invalid_request", "param": "model", "status": "refused"}
        == by_id["line-3"]
    )


def test_cancel_keeps_finished_results(world, celery_worker, tmp_path, capsys) -> None:
    path = _slice(tmp_path, 80, "to-cancel")
    name = "to-cancel-" + tmp_path.name
    submit_run(path, name=name)
    assert cli(["run", "cancel", name]) == 0
    state = _wait_until_finished(name)
    assert state.status == RunStatus.CANCELLED
    c = state.counts
    assert c.queued == 0 and c.running == 0 and c.cancelled > 0
    assert c.completed + c.failed + c.cancelled == c.total == 80
    _, errors, n_ok, n_err = export_run(name, tmp_path / "out")
    assert n_ok == c.completed and n_err == c.cancelled + c.failed


def test_a_live_turn_overtakes_a_bulk_backlog(world, celery_worker, tmp_path) -> None:
    from core.settings import settings

    path = _slice(tmp_path, 120, "backlog")
    name = "backlog-" + tmp_path.name
    submit_run(path, name=name)
    time.sleep(1.0)  # the worker is into the backlog
    done_before = run_state(name).counts.completed
    (live,) = enqueue_turns([new_conversation() | {"message": "Quick, the guards are coming!"}])
    view = wait_for_reply(live, timeout=120)
    done_during = run_state(name).counts.completed - done_before
    assert view.status == TurnStatus.DONE
    backlog = run_state(name).counts
    assert backlog.total - backlog.completed - backlog.failed > 0  # the live turn jumped a backlog
    from services.runs import cancel

    cancel(name)
    _wait_until_finished(name)
    # Bulk turns keep finishing while the live one is generated (they share the engine's steps, and
    # a slower machine makes that take longer); what must not happen is the live turn waiting in line:
    # bulk turns claimed between its enqueue and its claim (failed ones too) are at most the batch in
    # hand, the prefetched one and one more.
    claimed_during = _bulk_claimed_while_waiting(name, live)
    print(
        f"bulk turns claimed while the live turn waited for its claim: {claimed_during}, finished while it "
        f"waited for its reply: {done_during} (batch size {settings.batch_size})"
    )
    assert claimed_during <= 3 * settings.batch_size


def _bulk_claimed_while_waiting(run_name: str, live: uuid.UUID) -> int:
    """Bulk turns of the run claimed after the live turn was enqueued and before it was claimed (a
    claim stamps `started_at`; a turn claimed again keeps its last claim)."""
    with session_scope() as s:
        waiting = s.get(Turn, live)
        assert waiting is not None and waiting.started_at is not None
        claimed = (
            select(func.count())
            .select_from(Turn)
            .join(Run, Run.id == Turn.run_id)
            .where(
                Run.name == run_name,
                Turn.started_at > waiting.created_at,
                Turn.started_at <= waiting.started_at,
            )
        )
        return int(s.scalar(claimed) or 0)


def test_characters_and_conversations_are_checked_against_the_database(world, tmp_path) -> None:
    taken = new_conversation("elara")
    enqueue_turns([taken | {"message": "Hello"}], send=False)
    lines = [
        {"custom_id": "1", "character": "nobody", "message": "Hi"},
        {"custom_id": "2", "conversation": "ghost-" + tmp_path.name, "message": "Anyone?"},
        {"custom_id": "3", "conversation": taken["conversation"], "character": "luffy", "message": "Yo"},
        {"custom_id": "4", "conversation": "fresh-" + tmp_path.name, "character": "luffy", "message": "Hi"},
        {"custom_id": "5", "conversation": "fresh-" + tmp_path.name, "message": "Again"},
        {"custom_id": "6", "conversation": taken["conversation"], "message": "Still me"},
    ]
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    before = _turns()
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="refs-" + tmp_path.name)
    reasons = {e.line: e.reason for e in caught.value.errors}
    assert sorted(reasons) == [1, 2, 3]
    assert "unknown character 'nobody'" in reasons[1]
    assert "unknown conversation" in reasons[2] and "must name a character" in reasons[2]
    assert "belongs to character 'elara', not 'luffy'" in reasons[3]
    assert _turns() == before


def test_a_run_keeps_input_order_and_starts_conversations_from_their_first_line(world, tmp_path) -> None:
    name = "chain-" + tmp_path.name
    lines = [
        {"custom_id": f"c{i}", "conversation": name, "message": f"Line {i}"}
        | ({"character": "haneul"} if i == 0 else {})
        for i in range(12)
    ]
    path = tmp_path / "chain.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    from services.runs import submit

    real_chunks = submit._chunks
    sizes: list[int] = []

    def chunks(lines):  # type: ignore[no-untyped-def]
        for chunk in real_chunks(lines):
            sizes.append(len(chunk))
            yield chunk

    with pytest.MonkeyPatch.context() as mp:
        # Several chunks, so the pipelined writer and sender are exercised, and the conversation's
        # later lines are stored in chunks after the one holding its character (review: the package's
        # re-exported CHUNK was patched, not the one the chunker reads: one chunk of 12).
        mp.setattr(submit, "CHUNK", 5)
        mp.setattr(submit, "_chunks", chunks)
        submitted = submit_run(path, name=name)
    assert sizes == [5, 5, 2]
    assert submitted.enqueued == 12
    with session_scope() as s:
        rows = s.execute(
            select(Turn.custom_id, Turn.conversation_id, Turn.status)
            .where(Turn.run_id == submitted.id)
            .order_by(Turn.number)
        ).all()
    assert [r.custom_id for r in rows] == [f"c{i}" for i in range(12)]
    assert len({r.conversation_id for r in rows}) == 1
    from services.runs import cancel

    cancel(name)


def test_a_submission_that_finds_its_run_cancelled_cancels_it_holding_no_lock_on_the_run(
    world, tmp_path, monkeypatch
) -> None:
    """Found in review: a submission that found its run cancelled mid-way cancelled the turns stored
    since in the transaction that had just locked the run's row. A claim finishing one of those turns
    locks the turn, then the run: the two could deadlock (40P01 out of the submission)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from db.runs import cancel_run
    from db.session import get_engine
    from db.turns import claim_turns
    from services.runs import submit

    path = tmp_path / "cancelled.jsonl"
    path.write_text(
        "".join(
            json.dumps({"custom_id": f"c{i}", "character": "elara", "message": f"Hi {i}?"}) + "\n"
            for i in range(2)
        ),
        encoding="utf-8",
    )
    store = submit._store_and_send

    def cancelled_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = store(*args, **kwargs)
        with session_scope() as s:  # a worker holds one line, and a user's cancel lands
            first = s.scalar(select(Turn.id).where(Turn.run_id == args[4]).order_by(Turn.number).limit(1))
            claim_turns(session=s, turn_ids=[first], lease_s=60, max_attempts=3)
        with session_scope() as s:
            cancel_run(session=s, run_id=args[4])
        return out

    run_locked: list[bool] = []

    def cancel_run_looking(*, session, run_id, **kwargs):  # type: ignore[no-untyped-def]
        with get_engine().connect() as other:
            try:
                other.execute(text("SET lock_timeout = '200ms'"))
                other.execute(select(Run.id).where(Run.id == run_id).with_for_update(nowait=True))
                run_locked.append(False)
            except OperationalError:
                run_locked.append(True)
            other.rollback()
        return cancel_run(session=session, run_id=run_id, **kwargs)

    monkeypatch.setattr(submit, "_send", lambda ids, model: None)  # the session's worker must not answer them
    monkeypatch.setattr(submit, "_store_and_send", cancelled_meanwhile)
    monkeypatch.setattr(submit, "cancel_run", cancel_run_looking)
    submitted = submit_run(path, name="cancelled-" + tmp_path.name)
    assert run_locked == [False]
    assert submitted.status in (RunStatus.CANCELLING, RunStatus.CANCELLED)


def test_a_runs_turns_are_read_for_export_without_their_prompt_and_context(world) -> None:
    """Found in review: an export, a batch's output and every desk edit's rewrite of it read each
    turn whole, its prompt and retrieved context too (tens of kilobytes a turn, never written)."""
    import threading
    import uuid

    from sqlalchemy import event

    from db.runs import iter_run_turns
    from db.session import get_engine, session_scope

    statements: list[str] = []
    me = threading.get_ident()  # the session's worker threads query the turns table meanwhile

    def seen(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() == me:
            statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", seen)
    try:
        with session_scope() as session:
            assert list(iter_run_turns(session=session, run_id=uuid.uuid4())) == []
    finally:
        event.remove(get_engine(), "before_cursor_execute", seen)
    (select_turns,) = [s for s in statements if "FROM turns" in s]
    columns = select_turns.split("FROM turns")[0]
    assert "turns.reply" in columns and "turns.prompt" not in columns and "turns.context" not in columns


def test_lines_validation_passed_are_stored_though_their_grammars_would_not_build_again(
    world, tmp_path, monkeypatch
) -> None:
    """Found in review: a line was parsed again to be stored, and its response format's grammar
    built again when its verdict had left the cache (a file of more distinct schemas than it holds):
    a build near the time limit, or finding the builders busy, then raised mid-submission, and the
    run stopped half-stored as failed, naming no line. Lines validation passed are stored as passed."""
    import services.runs.submit as submit
    from structured import spec

    def schema(n: int) -> dict:
        props = {f"k{n}": {"type": "string"}}
        return {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": {"type": "object", "properties": props}},
        }

    path = tmp_path / "formats.jsonl"
    lines = [
        {
            "custom_id": f"s{n}",
            "character": "elara",
            "message": "Well?",
            "params": {"response_format": schema(n)},
        }
        for n in range(3)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    validate = submit.validate_file

    def validated_then_evicted(*args, **kwargs):  # type: ignore[no-untyped-def]
        check = validate(*args, **kwargs)
        spec._refusal.cache_clear()  # as a file of more than 512 distinct schemas would

        def busy(*_, **__):  # type: ignore[no-untyped-def]
            raise spec.GrammarBusy(": the grammar builders are busy")

        monkeypatch.setattr(spec, "_built_in_time", busy)
        return check

    monkeypatch.setattr(submit, "validate_file", validated_then_evicted)
    name = "passed-" + tmp_path.name
    submitted = submit_run(path, name=name)
    assert submitted.stored == 3 and submitted.status != RunStatus.FAILED
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Turn).where(Turn.run_id == submitted.id)) == 3
