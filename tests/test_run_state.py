"""The run state machine and resumable submission, on the real PostgreSQL and Redis, without a worker.

Runs here are submitted for a model no worker serves, so their messages stay in Redis where they can
be counted. Each case failed on the code before the run state machine: a cancel overwritten by
`queued`, status written from read paths, zero-turn runs stuck in `queued`, cancelled completed runs,
insert-time failures after earlier chunks were sent, and a run stuck in `validating` for ever.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from core.settings import queue_for_model, settings
from db.models import Run, RunStatus, Turn, TurnStatus
from db.runs import create_run, submission_lock
from db.session import session_scope
from services import runs
from services.runs import RunBusy, RunConflict, RunValidationError, SubmissionFailed, run_state, submit_run
from tasks.app import app
from tasks.queues import queue_depth
from tests.conftest import off_the_worker
from tests.lock_order import errors_beside

MODEL = "runs-check"  # a queue no worker consumes


@pytest.fixture()
def quiet_model(world, monkeypatch):
    monkeypatch.setattr(settings, "model", MODEL)
    monkeypatch.setattr(settings, "served_models", [MODEL])
    yield MODEL
    with app.connection_for_write() as conn:
        for lane in ("live", "bulk"):
            conn.default_channel.queue_purge(queue_for_model(MODEL, lane))


def _file(tmp_path: Path, n: int, name: str = "lines", **extra) -> Path:
    path = tmp_path / f"{name}.jsonl"
    lines = [
        {"custom_id": f"c{i}", "character": "elara", "message": f"Line {i}, {tmp_path.name}."} | extra
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _sent_ids() -> list[str]:
    """Every turn id in the bulk queue's messages (a turn sent twice appears twice)."""
    ids: list[str] = []
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        for raw in client.lrange(queue_for_model(MODEL, "bulk"), 0, -1):
            body = json.loads(raw)["body"]
            import base64

            args = json.loads(base64.b64decode(body))
            # A memory job shares the lane (one the session's worker sent back while this model was
            # the settings' own: a clone's run met one): no turn of it.
            ids += args[1].get("turn_ids", [])
    return ids


def _turn_ids(run_id) -> list[str]:
    with session_scope() as s:
        return [str(i) for i in s.scalars(select(Turn.id).where(Turn.run_id == run_id).order_by(Turn.number))]


def _status(run_id) -> RunStatus:
    with session_scope() as s:
        return s.scalar(select(Run.status).where(Run.id == run_id))


def test_a_run_whose_every_line_was_skipped_completes_at_once(quiet_model, tmp_path) -> None:
    # (A file of no lines at all is refused: test_openai_batches.py, OpenAI's empty_file.)
    bad = tmp_path / "all-bad.jsonl"
    bad.write_text('{"custom_id": "a"}\nnot json\n', encoding="utf-8")
    skipped = submit_run(bad, name="all-bad-" + tmp_path.name, skip_bad_lines=True)
    assert skipped.status == RunStatus.COMPLETED and len(skipped.skipped_lines) == 2


def test_a_cli_run_whose_every_line_is_refused_says_so_and_takes_its_file_again(
    quiet_model, tmp_path, capsys
) -> None:
    """Found in review: an OpenAI file whose lines name no character (a model's name instead) was
    refused line by line, silently: the run completed empty, exit 0; the same file again with
    `--character` was "already submitted", and a mended one a conflict with turns it never held."""
    from scripts.cli import main as cli

    path = tmp_path / "openai.jsonl"
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Hello {i}."}]},
        }
        for i in range(2)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    name = "all-refused-" + tmp_path.name
    assert cli(["run", "submit", str(path), "--name", name]) == 2
    err = capsys.readouterr().err
    assert "refused line 1: " in err and "refused line 2: " in err and "no line stored" in err
    assert run_state(name).counts.total == 0
    assert cli(["run", "submit", str(path), "--name", name, "--character", "elara"]) == 0
    said = capsys.readouterr()
    assert "2 lines stored, 2 turns sent" in said.err and "refused line" not in said.err
    assert run_state(name).counts.total == 2
    # CLI review: submitted again, stdout held the id and a note, not the id alone
    run_id = said.out.strip()
    assert cli(["run", "submit", str(path), "--name", name, "--character", "elara"]) == 0
    again = capsys.readouterr()
    assert again.out.strip() == run_id == str(uuid.UUID(run_id)) and "already submitted" in again.err


def test_an_export_of_a_run_not_finished_says_what_it_left_out(quiet_model, tmp_path, capsys) -> None:
    """Found in a CLI review: exporting a run still going wrote the lines finished so far and exited
    0 with no word: a partial OpenAI-format export looked complete."""
    from scripts.cli import main as cli

    sub = submit_run(_file(tmp_path, 3), name="partial-" + tmp_path.name)  # a model no worker serves
    assert cli(["run", "export", sub.name, "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr()
    assert "0 results" in said.out
    assert f"run {sub.name} is queued: 3 line(s) not finished were left out" in said.err


def test_an_export_of_a_run_its_submission_failed_says_the_turns_it_still_answers(
    quiet_model, tmp_path, capsys
) -> None:
    """Bulk runs review: a run its submission failed (the broker away mid-file, its submitter killed)
    still answers the turns it stored, but its export said nothing of those, as the run had
    "finished", and the desk's row stopped following them."""
    from scripts.cli import main as cli
    from services import desk

    sub = submit_run(_file(tmp_path, 3), name="failed-sub-" + tmp_path.name)  # a model no worker serves
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == sub.id).values(status=RunStatus.FAILED))
    capsys.readouterr()
    assert cli(["run", "export", sub.name, "--out", str(tmp_path / "out")]) == 0
    assert f"run {sub.name} is failed: 3 line(s) not finished were left out" in capsys.readouterr().err
    with session_scope() as s:
        assert desk._row(s, s.get_one(Run, sub.id)).live
        # Review: turns it stored and never sent are not being answered: they wait for a resume
        # (said with the lines never stored), and the row must not poll them for ever.
        s.execute(update(Turn).where(Turn.run_id == sub.id).values(dispatched_at=None))
    assert cli(["run", "export", sub.name, "--out", str(tmp_path / "out")]) == 0
    assert "not finished were left out" not in capsys.readouterr().err
    with session_scope() as s:
        assert not desk._row(s, s.get_one(Run, sub.id)).live


def test_a_cancel_during_submission_is_never_overwritten(quiet_model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(runs.submit, "CHUNK", 10)
    path = _file(tmp_path, 60)
    name = "cancel-mid-" + tmp_path.name
    cancelled = []

    def cancel_after_first_chunk(stored: int, sent: int) -> None:
        if not cancelled:
            cancelled.append(runs.cancel(name))  # another process's cancel, between two chunks

    sub = submit_run(path, name=name, progress=cancel_after_first_chunk)
    state = run_state(name)
    print(f"cancel mid-submission: {cancelled[0]}; final {state.status} {state.counts}")
    assert cancelled[0].before == RunStatus.VALIDATING
    assert sub.status == state.status == RunStatus.CANCELLED
    assert state.counts.queued == 0 and state.counts.total < 60  # it stopped storing, and cancelled the rest
    # CLI review: the submission said "0 lines stored, 0 turns sent" of what it had stored and sent
    assert sub.stored == state.counts.total > 0 and sub.sent > 0
    # CLI review: its export and status said nothing of the lines never stored
    from scripts.cli import main as cli

    assert state.lines == 60 and state.never_stored == 60 - state.counts.total
    capsys.readouterr()
    assert cli(["run", "export", name, "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr()
    assert f"{state.never_stored} line(s) of its file were never stored" in said.err, said.err
    assert cli(["run", "status", name]) == 0
    assert " cancelled total=60 " in capsys.readouterr().out


def test_a_submission_whose_run_failed_under_it_fails_not_reads_as_cancelled(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """CLI review: the run failed under its submission (housekeeping took it for abandoned) was taken
    for a cancel: "0 lines stored; status failed", exit 0."""
    from db.runs import fail_submission
    from scripts.cli import main as cli

    monkeypatch.setattr(runs.submit, "CHUNK", 10)
    path = _file(tmp_path, 30)
    real_insert, failed = runs.submit._insert_chunk, []

    def then_failed(run_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        ids = real_insert(run_id, *args, **kwargs)
        if not failed:
            with session_scope() as s:  # another process's transaction, after the first chunk
                failed.append(
                    fail_submission(session=s, run_id=run_id, error="abandoned", error_code="server_error")
                )
        return ids

    monkeypatch.setattr(runs.submit, "_insert_chunk", then_failed)
    name = "failed-mid-" + tmp_path.name
    with pytest.raises(SubmissionFailed, match="failed during its submission: abandoned"):
        submit_run(path, name=name)
    assert failed == [True] and run_state(name).status == RunStatus.FAILED
    failed.clear()
    assert cli(["run", "submit", str(path), "--name", "failed-mid-cli-" + tmp_path.name]) == 1
    assert failed == [True]


def test_reading_a_run_never_writes_it(quiet_model, tmp_path) -> None:
    sub = submit_run(_file(tmp_path, 3), name="read-only-" + tmp_path.name)
    with session_scope() as s:  # every turn finished, but no transition has advanced the run yet
        s.execute(update(Turn).where(Turn.run_id == sub.id).values(status=TurnStatus.DONE))
        before = s.execute(text("SELECT xmin::text FROM runs WHERE id = :id"), {"id": sub.id}).scalar()
    state = run_state(sub.name)
    with session_scope() as s:
        after = s.execute(text("SELECT xmin::text FROM runs WHERE id = :id"), {"id": sub.id}).scalar()
    assert state.status == RunStatus.QUEUED and after == before  # the read path wrote nothing


def test_cancelling_a_finished_run_is_a_no_op_that_says_so(quiet_model, tmp_path, capsys) -> None:
    from scripts.cli import main as cli

    skipped = tmp_path / "done.jsonl"
    skipped.write_text("not json\n", encoding="utf-8")  # its one line skipped: done at once
    sub = submit_run(skipped, name="finished-" + tmp_path.name, skip_bad_lines=True)
    outcome = runs.cancel(sub.name)
    assert not outcome.changed and outcome.after == RunStatus.COMPLETED == _status(sub.id)
    assert cli(["run", "cancel", sub.name]) == 0
    assert "run is completed: nothing to cancel" in capsys.readouterr().out
    # CLI review: --watch drew its progress bar on stdout, which scripts read for the status line
    assert cli(["run", "status", sub.name, "--watch"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines()[0].startswith(f"{sub.id} completed total=") and sub.name in said.err
    assert (
        f"{sub.name} [completed]" in said.err
    )  # CLI review: rich took "[completed]" for a style and dropped it
    # ...and exits 0 only for a run that completed: a script waiting on it reads the code
    cancelled = submit_run(_file(tmp_path, 2, name="cancelled"), name="cancelled-" + tmp_path.name)
    assert runs.cancel(cancelled.name).changed
    assert cli(["run", "status", cancelled.name]) == 0  # a look, not a wait
    assert cli(["run", "status", cancelled.name, "--watch"]) == 1
    assert "cancelled" in capsys.readouterr().out


def test_what_would_fail_the_insert_is_caught_by_validation_with_the_line(quiet_model, tmp_path) -> None:
    lines = [
        {"custom_id": "ok", "character": "elara", "message": "Fine."},
        {"custom_id": "big", "character": "elara", "message": "x", "story_time": 2**40},
        {"custom_id": "nul", "character": "elara", "message": "x", "player_name": "Ro\u0000wan"},
        {"custom_id": "sur", "character": "elara", "message": "x", "story": "ash\udcfffall"},
        {"custom_id": "stop", "character": "elara", "message": "x", "params": {"stop": ["\u0000"]}},
        {"custom_id": "conv", "conversation": "a\u0000b", "character": "elara", "message": "x"},
    ]
    path = tmp_path / "insert-traps.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="traps-" + tmp_path.name)
    reasons = {e.line: e.reason for e in caught.value.errors}
    print(reasons)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert reasons[2].startswith("story_time:") and reasons[3].startswith("player_name:")
    assert reasons[4].startswith("story:") and "surrogate" in reasons[4]
    assert reasons[5].startswith("params.stop.0:") and reasons[6].startswith("conversation:")
    assert _sent_ids() == []


def test_long_custom_ids_and_run_names_still_fit_their_keys(quiet_model, tmp_path) -> None:
    path = tmp_path / "long.jsonl"
    lines = [{"custom_id": f"{i}-" + "k" * 195, "character": "elara", "message": "Hi."} for i in range(3)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    sub = submit_run(path, name="n" * 190)  # run:<name>:<custom_id> would be ~390 characters
    assert sub.status == RunStatus.QUEUED and sub.stored == 3
    assert len(set(_sent_ids())) == 3


def _broker_drops_on_send(monkeypatch, nth: int):
    """Make the nth send of turns to the broker fail; returns the real dispatch."""
    import tasks.generate

    real = tasks.generate.dispatch
    calls = []

    def dispatch(ids, **kwargs):
        calls.append(len(ids))
        if len(calls) == nth:
            raise ConnectionError("injected: broker connection lost")
        return real(ids, **kwargs)

    monkeypatch.setattr(tasks.generate, "dispatch", off_the_worker(real, dispatch))
    return real


def test_a_submission_that_fails_part_way_is_resumed_by_resubmitting(
    quiet_model, tmp_path, monkeypatch
) -> None:
    import tasks.generate

    monkeypatch.setattr(runs.submit, "CHUNK", 10)
    path = _file(tmp_path, 45)
    name = "resume-" + tmp_path.name
    real = _broker_drops_on_send(monkeypatch, 3)
    with pytest.raises(SubmissionFailed, match="resubmit to resume"):
        submit_run(path, name=name)
    state = run_state(name)
    print(f"after the failure: {state.status} {state.counts} {state.error}")
    assert state.status == RunStatus.FAILED and "resubmit the same file" in state.error
    assert len(_sent_ids()) == 20  # two chunks went out before the broker dropped
    monkeypatch.setattr(tasks.generate, "dispatch", real)
    again = submit_run(path, name=name)
    sent = _sent_ids()
    print(f"resumed: stored {again.stored}, sent {again.sent}; {len(sent)} messages' turns in the queue")
    assert again.status == RunStatus.QUEUED and again.sent == 25
    assert sorted(sent) == sorted(_turn_ids(again.id)) and len(sent) == 45  # each line sent exactly once
    assert submit_run(path, name=name).sent == 0  # a third submission has nothing left to do


def test_a_run_submitted_skipping_bad_lines_resumes_skipping_them(quiet_model, tmp_path, monkeypatch) -> None:
    """Found in review: `mlchat run resume` (and the file sent again, as the failure says) validated
    without --skip-bad-lines, so a run submitted with it that stopped part-way failed for good on
    the very lines it had skipped, its stored turns left as they were."""
    import tasks.generate

    monkeypatch.setattr(runs.submit, "CHUNK", 10)
    path = _file(tmp_path, 30)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"custom_id": "bad", "character": "elara", "message": ""}) + "\n")
    name = "skip-resume-" + tmp_path.name
    real = _broker_drops_on_send(monkeypatch, 2)
    with pytest.raises(SubmissionFailed):
        submit_run(path, name=name, skip_bad_lines=True)
    monkeypatch.setattr(tasks.generate, "dispatch", real)
    resumed = runs.resume(name, path)
    assert resumed.status == RunStatus.QUEUED and resumed.sent == 20
    assert [e.line for e in resumed.skipped_lines] == [31]
    assert sorted(_sent_ids()) == sorted(_turn_ids(resumed.id)) and len(_turn_ids(resumed.id)) == 30
    # CLI review: stopped before its first chunk was stored, it resumed without skipping (refused)
    first = "skip-resume-first-" + tmp_path.name
    real_insert, calls = runs.submit._insert_chunk, []

    def dies_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the database went away")
        return real_insert(*args, **kwargs)

    monkeypatch.setattr(runs.submit, "_insert_chunk", dies_once)
    with pytest.raises(SubmissionFailed):
        submit_run(path, name=first, skip_bad_lines=True)
    assert run_state(first).counts.total == 0
    resumed = runs.resume(first, path)
    assert resumed.status == RunStatus.QUEUED and [e.line for e in resumed.skipped_lines] == [31]
    assert len(_turn_ids(resumed.id)) == 30
    # diff review: not for a run that ended: one left empty by skipping every line takes a mended file
    # without the flag, and its bad line is refused, nothing stored
    monkeypatch.setattr(runs.submit, "_insert_chunk", real_insert)
    empty, bad = "skip-empty-" + tmp_path.name, {"custom_id": "bad", "character": "elara", "message": ""}
    all_bad = tmp_path / "all-bad.jsonl"
    all_bad.write_text(json.dumps(bad) + "\n", encoding="utf-8")
    assert submit_run(all_bad, name=empty, skip_bad_lines=True).status == RunStatus.COMPLETED
    mended = tmp_path / "mended.jsonl"
    good = {"custom_id": "ok", "character": "elara", "message": "Fine."}
    mended.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(RunValidationError):
        submit_run(mended, name=empty)
    assert run_state(empty).counts.total == 0


def test_a_file_sent_again_to_its_failed_run_leaves_the_run_naming_its_bad_lines_now(
    quiet_model, tmp_path
) -> None:
    """CLI review: a run failed for two bad lines, sent again once one was mended (its character
    imported), kept the first failure's error and lines: `run status` named a line that was fine."""
    from services.characters import import_card

    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    lines = [
        {"custom_id": "a", "character": "elara", "message": "Fine."},
        {"custom_id": "b", "character": ghost, "message": "Boo?"},
        {"custom_id": "c", "character": "elara", "message": ""},
    ]
    path = tmp_path / "two-bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    name = "fail-again-" + tmp_path.name
    with pytest.raises(RunValidationError):
        submit_run(path, name=name)
    with session_scope() as s:
        assert [e["line"] for e in s.scalars(select(Run.line_errors).where(Run.name == name)).one()] == [2, 3]
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": "Ghost", "description": "A ghost."},
    }
    import_card(json.dumps(card).encode(), ghost)
    with pytest.raises(RunValidationError, match="line 3"):
        submit_run(path, name=name)
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == name)).one()
        assert run.status == RunStatus.FAILED and [e["line"] for e in run.line_errors] == [3]
        assert "line 2" not in run.error
    # diff review: a file refused at validation was never to be stored: no line "never stored"
    state = run_state(name)
    assert state.lines == 0 and state.never_stored == 0


def test_a_line_whose_own_conversation_another_run_made_is_refused_naming_its_custom_id(
    quiet_model, tmp_path
) -> None:
    """Found in review: a line naming no conversation goes under `run:<name>:<custom_id>`; one
    that existed (another run's line had named it) was joined silently, so the line was answered by
    that conversation's character in its history, and a scene line's failed the whole submission
    after the plain lines were sent. Refused at validation, naming the line; a run's own
    conversations (a resubmission's) are not."""
    from services.runs.validate import validate_file

    name = "own-conv-" + tmp_path.name
    squatter = tmp_path / "squatter.jsonl"
    squatter.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": cid,
                    "conversation": f"run:{name}:{cid}",
                    "character": "luffy",
                    "message": "Yo.",
                }
            )
            + "\n"
            for cid in ("c1", "scene")
        ),
        encoding="utf-8",
    )
    assert submit_run(squatter, name="squatter-" + tmp_path.name).stored == 2
    path = _file(tmp_path, 3)
    scene = {"participants": ["elara", "luffy"], "premise": "A rainy night.", "exchanges": 2}
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"custom_id": "scene", "scene": scene}) + "\n")
    reason = (
        "custom_id: its conversation 'run:{name}:{cid}' exists already (a player's, or another run's line "
        "named it); give the run another name, or the line another custom_id"
    )
    submitted = submit_run(path, name=name, skip_bad_lines=True)
    assert [(e.line, e.reason) for e in submitted.skipped_lines] == [
        (2, reason.format(name=name, cid="c1")),
        (4, reason.format(name=name, cid="scene")),
    ]
    assert submitted.stored == 2  # c0 and c2, each in a conversation of its own
    with session_scope() as s:
        convs = s.scalars(select(Turn.conversation_id).where(Turn.run_id == submitted.id)).all()
    assert len(set(convs)) == 2
    again = validate_file(path, run_name=name, every_error=True)  # its own two are not refused
    assert [e.line for e in again.errors] == [2, 4] and again.good == 2


def test_a_cancelled_turn_says_nothing_of_an_earlier_attempts_error(quiet_model, tmp_path) -> None:
    """Found in review: a turn put back in the queue with its attempt's error (the batch raised, the
    engine died) kept that text when its run was cancelled, and the exports gave it as the outcome:
    `{"code": "batch_cancelled", "message": "engine died: ..."}`. Cleared by every cancel."""
    from db.turns import cancel_turns

    submitted = submit_run(_file(tmp_path, 2), name="stale-" + tmp_path.name)
    one, two = (uuid.UUID(i) for i in _turn_ids(submitted.id))
    with session_scope() as s:
        s.execute(
            update(Turn)
            .where(Turn.id.in_([one, two]))
            .values(error="the batch raised (RuntimeError: boom)", error_code="server_error")
        )
    with session_scope() as s:
        assert cancel_turns(session=s, turn_ids=[one]) == [one]
    runs.cancel(submitted.name)
    with session_scope() as s:
        rows = s.execute(
            select(Turn.status, Turn.error, Turn.error_code).where(Turn.id.in_([one, two]))
        ).all()
    assert [tuple(r) for r in rows] == [(TurnStatus.CANCELLED, None, None)] * 2


def test_a_live_runs_quality_is_read_once_per_refresh_while_polled_a_finished_runs_afresh(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: `run status --watch` (every second) and the desk's live rows (every 2 s
    each) read every answered turn's quality at each poll: a million-line run's turns in full."""
    from services.runs import quality_summary

    reads: list[uuid.UUID] = []
    real = quality_summary.run_quality

    def counted(**kwargs):  # type: ignore[no-untyped-def]
        reads.append(kwargs["run_id"])
        return real(**kwargs)

    monkeypatch.setattr(quality_summary, "run_quality", counted)
    submitted = submit_run(_file(tmp_path, 2), name="polled-" + tmp_path.name)
    for _ in range(3):
        assert run_state(submitted.name).quality == {"scored": 0}
    assert len(reads) == 1
    monkeypatch.setattr(quality_summary, "LIVE_REFRESH_S", 0.0)
    run_state(submitted.name)
    assert len(reads) == 2
    runs.cancel(submitted.name)
    monkeypatch.setattr(quality_summary, "LIVE_REFRESH_S", 3600.0)
    run_state(submitted.name)
    run_state(submitted.name)
    assert len(reads) == 4  # finished: read afresh each time


def test_a_run_whose_submission_failed_can_be_cancelled_with_its_stored_turns(
    quiet_model, tmp_path, monkeypatch
) -> None:

    monkeypatch.setattr(runs.submit, "CHUNK", 10)
    path = _file(tmp_path, 30)
    name = "abandon-" + tmp_path.name
    _broker_drops_on_send(monkeypatch, 2)
    with pytest.raises(SubmissionFailed):
        submit_run(path, name=name)
    run_id = run_state(name).id
    assert _status(run_id) == RunStatus.FAILED
    outcome = runs.cancel(name)
    assert (outcome.before, outcome.after) == (RunStatus.FAILED, RunStatus.CANCELLED)
    with session_scope() as s:
        statuses = set(s.scalars(select(Turn.status).where(Turn.run_id == run_id)))
    assert statuses == {TurnStatus.CANCELLED} and outcome.cancelled_turns == len(_turn_ids(run_id))
    assert runs.cancel(name).after == RunStatus.CANCELLED  # a second cancel changes nothing


def test_a_fixed_file_may_replace_a_run_that_failed_validation(quiet_model, tmp_path) -> None:
    name = "fixed-" + tmp_path.name
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"custom_id": "a", "character": "elara", "message": ""}\n', encoding="utf-8")
    with pytest.raises(RunValidationError):
        submit_run(broken, name=name)
    assert run_state(name).status == RunStatus.FAILED
    sub = submit_run(_file(tmp_path, 2), name=name)
    assert sub.created and sub.status == RunStatus.QUEUED and sub.stored == 2
    with pytest.raises(RunConflict, match="already holds turns from a different file"):
        submit_run(_file(tmp_path, 3, name="other"), name=name)


def test_a_second_submitter_of_the_same_run_is_refused(quiet_model, tmp_path, monkeypatch) -> None:
    from services.runs import submit

    monkeypatch.setattr(submit, "BUSY_WAIT_S", 0.2)
    name = "busy-" + tmp_path.name
    with submission_lock(name) as got:
        assert got
        with pytest.raises(RunBusy, match="is busy"):
            submit_run(_file(tmp_path, 2), name=name)


def test_a_submission_that_meets_housekeepings_moment_on_the_run_waits_it_out(quiet_model, tmp_path) -> None:
    """Found in review: housekeeping holds a run's submission lock for a moment (failing an abandoned
    submission, finishing a cancel); a submission or resume landing then was refused, told another
    process was submitting the run."""
    import threading

    name = "swept-" + tmp_path.name
    held, release = threading.Event(), threading.Event()

    def housekeeping() -> None:
        with submission_lock(name) as got:
            assert got
            held.set()
            release.wait(10)

    thread = threading.Thread(target=housekeeping)
    thread.start()
    assert held.wait(10)
    threading.Timer(0.5, release.set).start()
    submitted = submit_run(_file(tmp_path, 2), name=name)
    thread.join()
    assert submitted.status == RunStatus.QUEUED


_SUBMITTER = """
import sys, time
from pathlib import Path
from services import runs
from services.runs import submit
submit.CHUNK = 20
def slow(stored, sent):
    print(f"sent {sent}", flush=True)
    time.sleep(30)  # killed here, between two chunks
runs.submit_run(Path(sys.argv[1]), name=sys.argv[2], progress=slow)
"""


def test_a_submitter_killed_mid_way_leaves_a_run_that_says_so_and_resumes(quiet_model, tmp_path) -> None:
    path = _file(tmp_path, 70)
    name = "killed-" + tmp_path.name
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUBMITTER, str(path), name],
        env=os.environ | {"MLCHAT_MODEL": MODEL},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("sent 20")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30  # the server notices the dropped connection and releases its lock
    while not (state := run_state(name)).interrupted and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"after SIGKILL: {state.status} interrupted={state.interrupted} {state.counts} | {state.error}")
    assert state.status == RunStatus.VALIDATING and state.interrupted
    assert "submission interrupted" in state.error and state.counts.total - state.counts.unsent == 20
    from services.sweeper import close_abandoned_runs

    assert close_abandoned_runs(older_than_s=0).get(name) == "failed: submission interrupted"
    assert run_state(name).status == RunStatus.FAILED
    again = submit_run(path, name=name)
    sent = _sent_ids()
    assert (
        again.status == RunStatus.QUEUED and sorted(sent) == sorted(_turn_ids(again.id)) and len(sent) == 70
    )


def test_a_file_changed_after_its_validation_stores_only_what_was_validated(
    quiet_model, tmp_path, monkeypatch
) -> None:
    # The file is read once to be validated and again to be stored: lines edited in between (here two
    # changed and one added, which no check read) were stored unchecked.
    import services.runs.submit as submit_module

    path = _file(tmp_path, 2)
    validated = submit_module.validate_file

    def validate_then_edit(*args: Any, **kwargs: Any) -> Any:
        check = validated(*args, **kwargs)
        edited = [
            {"custom_id": f"c{i}", "character": "elara", "message": "edited after validation"}
            for i in range(3)
        ]
        path.write_text("".join(json.dumps(line) + "\n" for line in edited), encoding="utf-8")
        return check

    monkeypatch.setattr(submit_module, "validate_file", validate_then_edit)
    sub = submit_run(path, name="edited-" + tmp_path.name)
    with session_scope() as s:
        messages = s.scalars(select(Turn.message).where(Turn.run_id == sub.id).order_by(Turn.number)).all()
    assert sub.stored == 2 and messages == [f"Line {i}, {tmp_path.name}." for i in range(2)]


def test_a_run_file_still_growing_is_refused_not_copied_for_as_long_as_it_grows(
    tmp_path, monkeypatch
) -> None:
    """Found in review: the private copy checked the file's size by name, then copied by name to
    its end: a file still being written (or a name swapped for a device meanwhile) was copied past
    the room checked for it. One open file is checked and at most its checked size copied; a file
    that grew meanwhile is refused, naming it."""
    import shutil

    import services.runs.submit as submit_module

    path = _file(tmp_path, 2)
    disk_usage = shutil.disk_usage

    def room_then_the_writer_appends(folder):  # type: ignore[no-untyped-def]
        with path.open("a", encoding="utf-8") as more:
            more.write(json.dumps({"custom_id": "late", "character": "elara", "message": "Late."}) + "\n")
        return disk_usage(folder)

    monkeypatch.setattr(submit_module.shutil, "disk_usage", room_then_the_writer_appends)
    refused = pytest.raises(ValueError, match=r"changed while it was read; submit it once it is written")
    with refused, submit_module._private_copy(path):
        raise AssertionError("a growing file was copied")
    monkeypatch.setattr(submit_module.shutil, "disk_usage", disk_usage)
    with submit_module._private_copy(path) as copy:  # written: copied whole
        assert copy.read_bytes() == path.read_bytes() and copy != path


def test_queue_depth_counts_the_runs_messages(quiet_model, tmp_path) -> None:
    sub = submit_run(_file(tmp_path, 20), name="depth-" + tmp_path.name)
    assert queue_depth(MODEL, "bulk") == -(-20 // settings.batch_size) and sub.sent == 20


def test_a_run_whose_answered_turns_carry_no_scores_reads_without_error(quiet_model, tmp_path) -> None:
    # A reply stored without scores (quality as JSON null, as SQLAlchemy writes None into a JSON
    # column) must not break the run's summary: it is not a scored reply.
    sub = submit_run(_file(tmp_path, 2), name="unscored-" + tmp_path.name)
    with session_scope() as s:
        s.execute(
            text("UPDATE turns SET status = 'done', quality = 'null'::jsonb WHERE run_id = :id"),
            {"id": sub.id},
        )
    state = run_state(sub.name)
    assert state.quality == {"scored": 0}


def test_retry_failed_with_the_broker_down_leaves_the_turns_failed_and_says_so_in_one_line(
    quiet_model, tmp_path, monkeypatch, capsys
) -> None:
    """Found in review: `mlchat run retry-failed` reopened the failed turns and committed, then the
    send raised (a kombu error, a traceback): the turns sat queued with no message for the sweeper's
    hour, and a second retry-failed said "re-sent 0"."""
    from scripts.cli import main as cli

    sub = submit_run(_file(tmp_path, 3), name="retry-down-" + tmp_path.name)
    with session_scope() as s:
        s.execute(
            update(Turn).where(Turn.run_id == sub.id).values(status=TurnStatus.FAILED, error="x", attempts=3)
        )
        s.execute(update(Run).where(Run.id == sub.id).values(status=RunStatus.COMPLETED))
    before = len(_sent_ids())
    _broker_drops_on_send(monkeypatch, 1)
    assert cli(["run", "retry-failed", sub.name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not reach the broker; 3 turn(s) marked failed" in err, err
    with session_scope() as s:
        statuses = s.scalars(select(Turn.status).where(Turn.run_id == sub.id)).all()
    assert statuses == [TurnStatus.FAILED] * 3 and len(_sent_ids()) == before
    assert _status(sub.id) == RunStatus.COMPLETED  # review: not left in_progress with nothing to do
    assert cli(["run", "retry-failed", sub.name]) == 0  # the broker back: each sent once more
    assert "re-sent 3 failed turn(s)" in capsys.readouterr().out and len(_sent_ids()) == before + 3


def test_retry_failed_on_a_run_it_cannot_reopen_is_refused_with_exit_code_2(
    quiet_model, tmp_path, capsys
) -> None:
    """Found in review: the refusal (a cancelled run, a completed batch) was a plain ValueError, so
    the CLI said it as a failure (exit code 1), not as input it refuses (2, as every other refusal)."""
    from scripts.cli import main as cli

    sub = submit_run(_file(tmp_path, 2), name="retry-refused-" + tmp_path.name)
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == sub.id).values(status=RunStatus.CANCELLED))
    assert cli(["run", "retry-failed", sub.name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run is cancelled: only a completed or in-progress run" in err, err


def test_a_broker_error_in_any_command_is_one_line_not_a_traceback(monkeypatch, capsys) -> None:
    """Found in review: kombu's and redis's errors are not OSErrors or RuntimeErrors, so the CLI
    re-raised them as a traceback."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisDown

    from scripts.cli import main as cli

    for error in (OperationalError("[Errno 111] Connection refused"), RedisDown("Connection refused")):

        def down(ref: str, error: Exception = error) -> int:
            raise error

        monkeypatch.setattr(runs, "retry_failed", down)
        assert cli(["run", "retry-failed", "any"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Connection refused" in err, err


def test_migrate_to_a_revision_that_does_not_exist_is_one_line(world, capsys) -> None:
    """Found in review: alembic's CommandError came out as a traceback."""
    from scripts.cli import main as cli

    assert cli(["migrate", "nosuchrev"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "migrate nosuchrev: " in err and "nosuchrev" in err, err
    # review: what it did was said by nothing; and a server before PostgreSQL 18 migrated, then every
    # run's submission failed on uuidv7()
    from db.migrate import code_head, server_too_old

    assert cli(["migrate"]) == 0
    assert capsys.readouterr().out == f"schema at {code_head()}: nothing to do\n"
    assert server_too_old(180001) is None and server_too_old(180000) is None
    assert "PostgreSQL 17; mlchat needs PostgreSQL 18 or later" in (server_too_old(170004) or "")


def test_the_api_without_keys_is_one_line_not_uvicorns_traceback(monkeypatch, capsys) -> None:
    """Found in review: create_app's refusal was raised inside uvicorn's factory, a traceback."""
    from scripts.cli import main as cli

    monkeypatch.setattr(settings, "api_keys", [])
    assert cli(["api", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlchat: MLCHAT_API_KEYS: set it"), err
    # review: `uvicorn api.main:create_app --factory`, which api/main.py documents, got a traceback
    from api.main import create_app

    with pytest.raises(SystemExit, match=r"^mlchat: bad setting: MLCHAT_API_KEYS: set it"):
        create_app()


def test_an_api_with_an_embedder_device_this_host_has_not_is_refused_at_start(monkeypatch) -> None:
    """Found in review: MLCHAT_EMBEDDER_DEVICE=cuda, meant for the workers but in the env file every
    role reads, started a GPU-less API whose fact writes, story events and desk edits were each a 503
    while its health stayed green."""
    import api.main
    from worker.embedder import device_refusal

    assert device_refusal(None) is None and device_refusal("cpu") is None
    # a copy, in the module tested: the session's worker reads the embedder's settings (README, Tests)
    gpu = settings.model_copy(update={"embedder_device": "cuda:99"})  # no host here has a 100th
    monkeypatch.setattr(api.main, "settings", gpu)
    with pytest.raises(SystemExit, match=r"^mlchat: bad setting: MLCHAT_EMBEDDER_DEVICE: 'cuda:99', but"):
        api.main.create_app()


def test_the_sweeper_never_fails_a_run_whose_resume_took_its_lock_after_the_sweeper_looked(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: the sweeper read whether a submission held the run's lock, then failed the
    run; a resume taking the lock and committing in between had its run failed under it (its next
    chunk then stopped as "cancelled mid-way"). The sweeper now holds the lock itself, or skips."""
    from services import sweeper

    sub = submit_run(_file(tmp_path, 2), name="resumed-" + tmp_path.name)
    with session_scope() as s:  # as an interrupted submission leaves it
        s.execute(update(Run).where(Run.id == sub.id).values(status=RunStatus.VALIDATING))
    with submission_lock(sub.name) as got:  # the resume, holding the lock since just after the look
        assert got
        with session_scope() as s:
            looked = [s.get_one(Run, sub.id)]
            s.expunge_all()
        monkeypatch.setattr(sweeper, "abandoned_submissions", lambda **_: looked)
        assert sub.name not in sweeper.close_abandoned_runs(older_than_s=0)
        with session_scope() as s:
            assert s.get_one(Run, sub.id).status == RunStatus.VALIDATING
    assert sweeper.close_abandoned_runs(older_than_s=0).get(sub.name) == "failed: submission interrupted"


def test_the_sweeper_never_fails_a_run_whose_submitter_stores_on_after_losing_its_locks_connection(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Poison review: the submission lock sits on an idle connection of its own, which a pooler, a
    NAT or `idle_session_timeout` may close while the submitter goes on storing; the sweeper took the
    run for an interrupted one and failed it under the submitter. A run whose turns were stored or
    sent within the sweep's age is not abandoned."""
    from sqlalchemy import text

    from db.runs import abandoned_submissions

    sub = submit_run(_file(tmp_path, 2), name="lockless-" + tmp_path.name)
    with session_scope() as s:  # validating, its lock gone, created long ago: its last chunk just stored
        s.execute(
            update(Run)
            .where(Run.id == sub.id)
            .values(status=RunStatus.VALIDATING, created_at=text("now() - interval '1 hour'"))
        )
        s.execute(
            text(
                "UPDATE turns SET created_at = now() - interval '1 hour', dispatched_at = now()"
                " WHERE run_id = :r"
            ),
            {"r": sub.id},
        )
    with session_scope() as s:
        assert sub.id not in {r.id for r in abandoned_submissions(session=s, older_than_s=60)}
        s.execute(
            text("UPDATE turns SET dispatched_at = now() - interval '1 hour' WHERE run_id = :r"),
            {"r": sub.id},
        )
    with session_scope() as s:  # nothing for a minute: the submitter is gone
        assert sub.id in {r.id for r in abandoned_submissions(session=s, older_than_s=60)}
    # review: read again under the run's lock before it is failed (a chunk stored since the look)
    from services import sweeper

    with session_scope() as s:
        looked = [s.get_one(Run, sub.id)]
        s.expunge_all()
        s.execute(text("UPDATE turns SET dispatched_at = now() WHERE run_id = :r"), {"r": sub.id})
    monkeypatch.setattr(sweeper, "abandoned_submissions", lambda **_: looked)
    assert sub.name not in sweeper.close_abandoned_runs(older_than_s=60)
    with session_scope() as s:
        assert s.get_one(Run, sub.id).status == RunStatus.VALIDATING


def test_a_failed_batchs_line_whose_worker_died_is_cancelled_with_it_not_left_running(world) -> None:
    """Found in review: a batch whose submission failed for good cancelled its queued lines only;
    one a worker died holding (its lease lapsed) stayed running in the batch's counts, ended only if
    a worker of its model claimed it again. Cancelling such a batch skipped it the same way."""
    from db.runs import cancel_run, fail_submission
    from db.turns import claim_turns
    from services.producer import submit_turns
    from tests.conftest import new_conversation

    def batch_with_a_lapsed_line() -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
        with session_scope() as s:
            run, _ = create_run(
                session=s,
                name=f"lapsed-{uuid.uuid4().hex[:8]}",
                model=settings.model,
                file_hash=uuid.uuid4().hex,
                total=2,
                fields={"input_file_id": f"file-{uuid.uuid4().hex}", "api_key": "k"},
            )
            run_id = run.id
        lines = [new_conversation() | {"message": "Hi"} for _ in range(2)]
        queued, lapsed = (t.id for t in submit_turns(lines, send=False, lane="bulk", run_id=run_id))
        with session_scope() as s:
            assert claim_turns(session=s, turn_ids=[lapsed], lease_s=60, max_attempts=3).claimed
            s.execute(
                update(Turn).where(Turn.id == lapsed).values(lease_until=text("now() - interval '1 minute'"))
            )
        return run_id, queued, lapsed

    def statuses(*ids: uuid.UUID) -> list[TurnStatus]:
        with session_scope() as s:
            return [s.get_one(Turn, i).status for i in ids]

    run_id, queued, lapsed = batch_with_a_lapsed_line()
    with session_scope() as s:
        assert fail_submission(
            session=s, run_id=run_id, error="gave up", error_code="server_error", final=True
        )
    assert statuses(queued, lapsed) == [TurnStatus.CANCELLED, TurnStatus.CANCELLED]

    run_id, queued, lapsed = batch_with_a_lapsed_line()
    with session_scope() as s:  # failed before its lines were cancelled with it (before migration 0026)
        s.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.FAILED))
    with session_scope() as s:
        assert cancel_run(session=s, run_id=run_id).cancelled_turns == 2
    assert statuses(queued, lapsed) == [TurnStatus.CANCELLED, TurnStatus.CANCELLED]


def test_retried_lines_go_after_the_lines_of_their_conversation_that_went_past_them(world) -> None:
    """Found in review: `run retry-failed` put a failed line back in the queue with its number, so
    while a later line of its conversation was running the retry was claimed beside it (a claim
    waits only for the turns numbered before it): neither prompt held the other's exchange. The
    retried lines move after those, keeping their own order, and the conversation's later lines not
    yet started move with them (review: they came after the retried line, and were answered before
    it without its exchange)."""
    from db.models import TurnErrorCode
    from db.runs import reopen_failed
    from db.turns import Failure, claim_turns, fail_turns
    from tests.desk_data import Spec, quality, queue_run

    run_id, (first, done, third, running, waiting) = queue_run(
        "studio-a", [Spec(f"Line {i}", "Hello.", quality(0.5)) for i in range(5)]
    )
    with session_scope() as s:
        conversation = s.get_one(Turn, first).conversation_id
        later = [done, third, running, waiting]
        s.execute(update(Turn).where(Turn.id.in_(later)).values(conversation_id=conversation))
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[first], lease_s=60, max_attempts=3)
        assert fail_turns(
            session=s, token=claim.token, failures={first: Failure("empty", TurnErrorCode.EMPTY_REPLY)}
        ) == [first]
        s.execute(update(Turn).where(Turn.id == done).values(status=TurnStatus.DONE))
        claim = claim_turns(session=s, turn_ids=[third], lease_s=60, max_attempts=3)
        assert fail_turns(
            session=s, token=claim.token, failures={third: Failure("empty", TurnErrorCode.EMPTY_REPLY)}
        ) == [third]
        assert [
            t.id for t in claim_turns(session=s, turn_ids=[running], lease_s=60, max_attempts=3).claimed
        ] == [running]
    with session_scope() as s:
        assert sorted(reopen_failed(session=s, run_id=run_id)) == sorted([first, third])
    with session_scope() as s:
        numbers = {t: s.get_one(Turn, t).number for t in (first, done, third, running, waiting)}
        # after it, in their own order, the line not yet started still after them
        assert numbers[done] < numbers[running] < numbers[first] < numbers[third] < numbers[waiting]
        retry = claim_turns(session=s, turn_ids=[first, third, waiting], lease_s=60, max_attempts=3)
        assert retry.claimed == []  # each waits: the running line, then the one before it


def test_a_retry_whose_batch_is_finalized_meanwhile_reopens_nothing(world, monkeypatch) -> None:
    """Review (stop 75): the retry read the run's status unlocked and its final UPDATE took a
    completed run too: a batch finalized (its files written, its callback queued) between the two
    was reopened and later wrote a second set of files. The run must still be as it was read."""
    from db import runs
    from db.models import Run, RunStatus, TurnErrorCode
    from db.turns import Failure, claim_turns, fail_turns
    from tests.desk_data import Spec, quality, queue_run

    run_id, (failed, _) = queue_run(
        "studio-a", [Spec(f"Line {i}", "Hello.", quality(0.5)) for i in range(2)], batch_key="key-a"
    )
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[failed], lease_s=60, max_attempts=3)
        fail_turns(
            session=s, token=claim.token, failures={failed: Failure("empty", TurnErrorCode.EMPTY_REPLY)}
        )
        s.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.IN_PROGRESS))
    real = runs.locked_in_id_order

    def finalized_meanwhile(*args: Any, **kwargs: Any) -> Any:
        with session_scope() as other:  # housekeeping finalizes the batch between the retry's reads
            other.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.COMPLETED))
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "locked_in_id_order", finalized_meanwhile)
    with pytest.raises(ValueError, match="changed state meanwhile"), session_scope() as s:
        runs.reopen_failed(session=s, run_id=run_id)
    with session_scope() as s:
        assert s.get_one(Run, run_id).status == RunStatus.COMPLETED
        assert s.get_one(Turn, failed).status == TurnStatus.FAILED
    # A run that is no batch writes no files: completed meanwhile, it is reopened as before (review).
    run_id, (failed, _) = queue_run("studio-a", [Spec(f"Line {i}", "Hello.", quality(0.5)) for i in range(2)])
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[failed], lease_s=60, max_attempts=3)
        fail_turns(
            session=s, token=claim.token, failures={failed: Failure("empty", TurnErrorCode.EMPTY_REPLY)}
        )
        s.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.IN_PROGRESS))
    with session_scope() as s:
        assert runs.reopen_failed(session=s, run_id=run_id) == [failed]
    with session_scope() as s:
        assert s.get_one(Run, run_id).status == RunStatus.IN_PROGRESS


def _a_failed_line_then_a_later_one() -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A run of two lines of one conversation, the first failed, the later one queued: (run, first, later)."""
    from db.models import TurnErrorCode
    from db.turns import Failure, claim_turns, fail_turns
    from tests.desk_data import Spec, quality, queue_run

    run_id, (first, later) = queue_run(
        "studio-a", [Spec(f"Line {i}", "Hello.", quality(0.5)) for i in range(2)]
    )
    with session_scope() as s:
        conversation = s.get_one(Turn, first).conversation_id
        s.execute(update(Turn).where(Turn.id == later).values(conversation_id=conversation))
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[first], lease_s=60, max_attempts=3)
        failure = Failure("empty", TurnErrorCode.EMPTY_REPLY)
        assert fail_turns(session=s, token=claim.token, failures={first: failure}) == [first]
    return run_id, first, later


def test_an_export_reading_while_a_retry_moves_a_line_writes_that_line_once(world) -> None:
    """Found in review: an export reads a run in chunks by number, each in a transaction of its own;
    a retry-failed between two chunks moved a failed line already read past the cursor, and the
    export wrote it twice (failed, then queued or answered)."""
    from db.runs import iter_run_turns, reopen_failed

    run_id, first, done = _a_failed_line_then_a_later_one()
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == done).values(status=TurnStatus.DONE))
    reading = iter_run_turns(session=None, run_id=run_id, chunk=1)
    read = [next(reading).id]
    with session_scope() as s:  # between the export's chunks: the failed line moves after the done one
        assert reopen_failed(session=s, run_id=run_id) == [first]
    read += [t.id for t in reading]
    assert read == [first, done]


def test_an_export_that_read_a_queued_line_a_retry_moves_still_writes_it_once_answered(world) -> None:
    """Review of the fix above: it remembered queued lines too, so one read while queued (nothing
    written), moved past the cursor with the retried line and answered before the cursor reached it,
    was skipped: missing from the export."""
    from db.runs import iter_run_turns, reopen_failed

    run_id, failed, done = _a_failed_line_then_a_later_one()
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == done).values(status=TurnStatus.DONE))
        conversation = s.get_one(Turn, failed).conversation_id
    from tests.desk_data import Spec, quality, queue_run

    _, (queued,) = queue_run("studio-a", [Spec("Line 2", "Hello.", quality(0.5))])
    with session_scope() as s:  # the conversation's third line, of the same run
        s.execute(update(Turn).where(Turn.id == queued).values(conversation_id=conversation, run_id=run_id))
    reading = iter_run_turns(session=None, run_id=run_id, chunk=3)
    read = [next(reading).id for _ in range(3)]
    with session_scope() as s:  # the failed line and the queued one behind it move after the done one
        assert reopen_failed(session=s, run_id=run_id) == [failed]
        s.execute(update(Turn).where(Turn.id == queued).values(status=TurnStatus.DONE))
    read += [t.id for t in reading]
    assert read == [failed, done, queued, queued]  # the failed line once; the answered one read again


def test_a_retried_line_keeps_its_place_before_a_later_line_not_yet_started(world) -> None:
    """Review of the renumbering: any later turn of the conversation moved a retried line after it,
    a queued one never started too, which then was answered first, without the retried exchange
    that came before it in the file. Only a later line that started goes first."""
    from db.runs import reopen_failed
    from db.turns import claim_turns

    run_id, first, later = _a_failed_line_then_a_later_one()
    with session_scope() as s:
        before = s.get_one(Turn, first).number
        assert reopen_failed(session=s, run_id=run_id) == [first]
    with session_scope() as s:
        assert s.get_one(Turn, first).number == before < s.get_one(Turn, later).number
        assert claim_turns(session=s, turn_ids=[later], lease_s=60, max_attempts=3).claimed == []  # waits


def test_a_retried_turn_starts_afresh_its_engine_deaths_and_deferrals_forgotten(world) -> None:
    """Found in review: `retry_failed` reset a turn's attempts but not its engine deaths or its
    deferral clock, so after the fix it was retried for, one unrelated engine restart (or one more
    stall of the turn before it) failed it again at once. One death is kept (review of the fix): a
    turn that killed engines runs alone first, and one more death fails it."""
    from db.models import TurnErrorCode
    from db.runs import reopen_failed
    from db.turns import Failure, claim_turns, fail_turns
    from tests.desk_data import Spec, quality, queue_run

    run_id, (turn_id,) = queue_run("studio-a", [Spec("Hi", "Hello.", quality(0.5))])
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == turn_id).values(params=Turn.params.op("||")({"seed": 41})))
        claim = claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        crash = Failure("inside the engine at 2 engine deaths", TurnErrorCode.ENGINE_CRASH_LOOP)
        stages = {"claim_ms": 3.2143871, "batch_size": 2}
        assert fail_turns(session=s, token=claim.token, failures={turn_id: crash}, timings=stages) == [
            turn_id
        ]
        # review: stored raw, unlike a reply's, and kept on the queued turn after its retry
        assert s.get_one(Turn, turn_id).timings == {"claim_ms": 3.2, "batch_size": 2}
        s.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(engine_deaths=2, deferrals=5, deferred_since=text("now() - interval '1 hour'"))
        )
    with session_scope() as s:
        assert reopen_failed(session=s, run_id=run_id) == [turn_id]
    with session_scope() as s:
        turn = s.get(Turn, turn_id)
        assert (turn.status, turn.engine_deaths, turn.deferrals, turn.deferred_since, turn.timings) == (
            TurnStatus.QUEUED,
            1,
            0,
            None,
            None,
        )
        assert turn.params["seed"] == 41  # not the reply's own failure: the seed it was asked for
    # One the reply itself failed (empty, say) would be written again by the same seed: it moves on.
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        empty = Failure("model produced an empty reply", TurnErrorCode.EMPTY_REPLY)
        assert fail_turns(session=s, token=claim.token, failures={turn_id: empty}) == [turn_id]
    with session_scope() as s:
        assert reopen_failed(session=s, run_id=run_id) == [turn_id]
        assert s.get_one(Turn, turn_id).params["seed"] == 41 + 1_000_003
    # Review of that: a seed near 2^63 (GenerationParams takes up to it) plus the step was past bigint,
    # and the whole retry-failed raised.
    with session_scope() as s:
        big = 2**63 - 5
        s.execute(update(Turn).where(Turn.id == turn_id).values(params=Turn.params.op("||")({"seed": big})))
        claim = claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        assert fail_turns(session=s, token=claim.token, failures={turn_id: empty}) == [turn_id]
    with session_scope() as s:
        assert reopen_failed(session=s, run_id=run_id) == [turn_id]
        assert s.get_one(Turn, turn_id).params["seed"] == (big % 2**31 + 1_000_003) % 2**31


def test_a_run_named_like_an_id_is_found_by_its_name(world) -> None:
    """Found in review: a name that reads as a UUID (a file named by its content hash: the default
    name is the file's stem) was looked up as an id only, and its run was never found by name."""
    from db.runs import find_run
    from tests.desk_data import Spec, quality, queue_run

    name = uuid.uuid4().hex  # 32 hex characters: uuid.UUID() reads it
    run_id, _ = queue_run("studio-a", [Spec("Hi", "Hello.", quality(0.5))], name=name)
    with session_scope() as s:
        assert (found := find_run(session=s, ref=name)) is not None and found.id == run_id
        assert find_run(session=s, ref=str(run_id)).id == run_id  # type: ignore[union-attr]


def test_a_run_named_in_a_decomposed_form_is_found_by_its_name_as_typed(world) -> None:
    """Review (stop 75): a run named after a file keeps the file's name as macOS writes it (NFD); the
    name typed to `run status` is composed (NFC), and no run was found."""
    import unicodedata

    from db.runs import find_run
    from tests.desk_data import Spec, quality, queue_run

    typed = f"서울-{uuid.uuid4().hex[:6]}"
    run_id, _ = queue_run(
        "studio-a", [Spec("Hi", "Hello.", quality(0.5))], name=unicodedata.normalize("NFD", typed)
    )
    with session_scope() as s:
        assert (found := find_run(session=s, ref=typed)) is not None and found.id == run_id


# a lone surrogate and a NUL: a file's name (the default run name) may hold them (found in review:
# the refusal named neither the run name nor --name)
@pytest.mark.parametrize("name", ["a/b", "/tmp/x", "a\\b", ".", "..", "nightly:x", "night\udcffly", "a\x00b"])
def test_a_run_name_that_names_no_file_of_its_own_is_refused(tmp_path, name) -> None:
    """Found in review: the export writes `<name>.results.jsonl` in its folder; a name with a "/" was
    a FileNotFoundError at export, and an absolute one wrote outside the folder. And a later review:
    a line's fresh conversation is `run:<name>:<custom_id>`, so run `nightly`'s line `x:s1` and run
    `nightly:x`'s line `s1` shared one conversation."""
    from services.runs.submit import check_run_name

    with pytest.raises(ValueError, match="^run name: "):
        check_run_name(name)
    assert check_run_name("nightly-2026.12.04") == "nightly-2026.12.04"


def test_a_run_named_with_a_colon_before_that_was_refused_can_still_be_resumed(world, tmp_path) -> None:
    """Review of the refusal of ':' in run names: a run made before it could no longer be resumed."""
    from services.runs.submit import check_run_name, submit_run

    name = f"old:{uuid.uuid4().hex[:8]}"
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps({"custom_id": "a", "character": "elara", "message": "Hi there."}) + "\n")
    with pytest.raises(ValueError, match="must not hold ':'"):
        submit_run(lines, name=name)  # a new one: refused
    with pytest.raises(ValueError, match="NUL"):  # refused as a name, before any lookup of it
        submit_run(lines, name="bad:\x00name")
    assert check_run_name(name, existing=True) == name
    with session_scope() as s:
        create_run(session=s, name=name, model=settings.model, file_hash="", total=0)  # as made before
    resumed = submit_run(lines, name=name)
    assert resumed.name == name and resumed.stored == 1


def test_a_submission_lock_of_another_database_on_the_server_is_not_this_ones(world, scratch_db) -> None:
    """Found in review: the check read pg_locks for the whole server, so a run of the same name in
    another database (staging beside production) made a dead submission here look alive."""
    from db.advisory_locks import held_by, name_key

    namespace, key = 0x6D6C7274, name_key(f"nightly-{uuid.uuid4().hex[:6]}")
    scratch_db.execute(text("SELECT pg_advisory_lock(:ns, :key)"), {"ns": namespace, "key": key})
    try:
        with session_scope() as s:
            assert not held_by(session=s, namespace=namespace, key=key)
        from db.session import get_engine

        with get_engine().connect() as conn:  # this database's own holder: seen
            conn.execute(text("SELECT pg_advisory_lock(:ns, :key)"), {"ns": namespace, "key": key})
            with session_scope() as s:
                assert held_by(session=s, namespace=namespace, key=key)
            conn.execute(text("SELECT pg_advisory_unlock(:ns, :key)"), {"ns": namespace, "key": key})
    finally:
        scratch_db.execute(text("SELECT pg_advisory_unlock(:ns, :key)"), {"ns": namespace, "key": key})


def test_a_submission_lock_takes_no_connection_from_the_request_pool(world) -> None:
    """Found in review: the lock's connection came from the pool its holder's sessions use, so ten
    OpenAI batches submitted at once held all ten connections and each waited for an eleventh (every
    request of the API process with them) until the pool's 30 s timeout, then failed."""
    from db.session import get_engine

    pool = get_engine().pool
    held = [get_engine().connect() for _ in range(pool.size() + get_engine().pool._max_overflow)]  # type: ignore[attr-defined]
    try:
        started = time.monotonic()
        with submission_lock(f"pool-{uuid.uuid4().hex[:6]}") as got:
            assert got
        assert time.monotonic() - started < 10
    finally:
        for conn in held:
            conn.close()


def test_a_run_that_stored_nothing_takes_the_options_it_is_sent_again_with(quiet_model, tmp_path) -> None:
    """Found in review: the options a run was first submitted with always won, so a file refused
    with "this run does not allow a system prompt of its own", sent again with that option as the
    error asks, was refused the same way for good under its name."""
    from services.runs.validate import LineOptions

    path = _file(tmp_path, 3, system_prompt="You are a terse ferryman.")
    name = "options-" + tmp_path.name
    with pytest.raises(RunValidationError, match="system_prompt"):
        submit_run(path, name=name)
    sub = submit_run(path, name=name, options=LineOptions(allow_system_prompt=True))
    assert sub.stored == 3
    # Once it holds turns, a resume keeps the options they were stored under.
    with session_scope() as s:
        assert s.scalar(select(Run.options).where(Run.name == name))["allow_system_prompt"] is True


def test_a_cancel_locks_the_runs_turns_in_id_order(world) -> None:
    """Found in review: a cancel (an expiry in every worker's housekeeping, a failing batch
    submission, a retry of failed turns) updated a whole run's turns in its plan's order (by turn
    number, or queued before running): with a lower-id turn running under a lapsed lease and a
    higher-id one queued ahead of it in that order, the cancel took the higher first and waited for
    the lower, while a worker writing both in id order held the lower and waited for the higher."""
    from db.runs import cancel_run
    from tests.desk_data import Spec, quality, queue_run

    run_id, ids = queue_run("studio-a", [Spec("One?", "1", quality(0.5)), Spec("Two?", "2", quality(0.5))])
    low, high = sorted(ids)
    with session_scope() as s:
        # Turn numbers follow insertion, ids (uuid4 from the producer) do not: the lower id numbered
        # after the higher, as half of such pairs are, so the run's (run_id, number) index visits
        # the higher id first.
        low_n, high_n = (s.scalar(select(Turn.number).where(Turn.id == t)) for t in (low, high))
        if low_n < high_n:  # swapped through a number no turn holds (never one the sequence gives out)
            s.execute(update(Turn).where(Turn.id == low).values(number=-low_n))
            s.execute(update(Turn).where(Turn.id == high).values(number=low_n))
            s.execute(update(Turn).where(Turn.id == low).values(number=high_n))
        # The lower one's worker went quiet: running under a lapsed lease.
        s.execute(
            update(Turn)
            .where(Turn.id == low)
            .values(
                status=TurnStatus.RUNNING,
                claim_token=uuid.uuid4(),
                lease_until=text("now() - interval '1 minute'"),
            )
        )

    def cancel() -> None:
        with session_scope() as s:  # the plan through the (run_id, number) index
            s.execute(text("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off"))
            cancel_run(session=s, run_id=run_id)

    # A worker's write in id order: the lower turn, then the higher.
    assert errors_beside(cancel, first=_lock(Turn, low), then=_lock(Turn, high)) == []
    with session_scope() as s:
        statuses = set(s.scalars(select(Turn.status).where(Turn.id.in_(ids))))
    assert statuses == {TurnStatus.CANCELLED}


def test_the_runs_a_write_ends_turns_of_are_locked_in_one_pass_in_id_order(world) -> None:
    """Found in review: a write ending a scene's step and another run's line locked the scene's run
    first (the scene hook) and the other run after (the advance), each pass in id order but not the
    two together; a worker storing lines of both runs in id order held the lower and waited for the
    higher while this held the higher and waited for the lower: a deadlock."""
    from db.runs import advance_runs_of_turns, cancel_run
    from tests.desk_data import Spec, answer, build_scene_run, quality, queue_run

    def drop(run_id: uuid.UUID) -> None:
        with session_scope() as s:  # not left queued for a later test's worker
            cancel_run(session=s, run_id=run_id)

    # Ids are random: a scene run in the upper half first, so that each plain run that follows
    # sorts below it at least half the time (one pick of 40 plain runs failed in CI: the scene
    # run's id was 015e…).
    for _ in range(40):
        scene_run, _, (step,) = build_scene_run("studio-a", ["elara", "luffy"], ["Who knocks?"])
        if scene_run.int >> 127:
            break
        drop(scene_run)
    assert scene_run.int >> 127
    specs = [Spec("Hello?", "Hi.", quality(0.5))]
    for _ in range(40):
        plain_run, (line,) = queue_run("studio-a", specs)
        if plain_run < scene_run:
            break
        drop(plain_run)
    assert plain_run < scene_run
    answer([line], specs)  # its only line done: nothing to pin, so the advance locks its run

    def advance() -> None:
        with session_scope() as s:
            advance_runs_of_turns(session=s, turn_ids=[step, line])

    # Another worker's store: the runs in id order.
    assert errors_beside(advance, first=_lock(Run, plain_run), then=_lock(Run, scene_run)) == []


def _lock(model: Any, row_id: uuid.UUID) -> Callable[[Any], Any]:
    """A row of `model` locked FOR UPDATE in the session given."""
    return lambda s: s.execute(select(model.id).where(model.id == row_id).with_for_update())


def test_a_file_with_more_bad_lines_than_are_named_counts_them_all(quiet_model, tmp_path, capsys) -> None:
    """Found in a CLI review: the one line counted the bad lines named (at most 1,000), so a file of
    1,005 bad lines said 1000."""
    from scripts.cli import main as cli

    path = tmp_path / "bad.jsonl"
    path.write_text(
        "".join(json.dumps({"custom_id": f"c{i}", "character": "nobody"}) + "\n" for i in range(1005))
    )
    assert cli(["run", "submit", str(path), "--name", "many-bad-" + tmp_path.name]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "mlchat: rejected: 1,005 bad line(s) (the first 1,000 listed), nothing stored", last


def test_a_batch_waiting_for_its_submissions_retry_is_not_interrupted(quiet_model, tmp_path, capsys) -> None:
    """Found in review: a `/v1/batches` run waiting for its submission's retry after a transient error
    (validating, nobody submitting, the sweeper to submit it again) read as "submission interrupted",
    and `run status --watch` stopped and exited 1 on a batch that still completes. A CLI run
    (no input file) so left is interrupted, as before."""
    from scripts.cli import main as cli

    names = {"batch": f"batch-{tmp_path.name}", "cli": f"cli-{tmp_path.name}"}
    with session_scope() as s:
        create_run(
            session=s,
            name=names["batch"],
            model=MODEL,
            file_hash="0" * 64,
            total=1,
            fields={"input_file_id": "file-waiting"},
        )
        create_run(session=s, name=names["cli"], model=MODEL, file_hash="0" * 64, total=1)
    assert not run_state(names["batch"]).interrupted
    assert run_state(names["cli"]).interrupted
    assert cli(["run", "status", names["cli"], "--watch"]) == 1
    assert "submission interrupted" in capsys.readouterr().out


def test_a_retried_lines_queue_time_counts_from_its_retry_not_its_first_insert(world) -> None:
    """Review (stop 78, numbers): `queue_ms` ran from the turn's insert across every attempt, so a
    run's failed line retried a day later showed a day in the queue. A fresh start counts anew; a
    hand-back after a lost worker keeps counting (the player is still waiting)."""
    from db import runs
    from db.models import TurnErrorCode
    from db.turns import Failure, claim_turns, fail_turns, requeue_turns
    from tests.desk_data import Spec, quality, queue_run

    run_id, (failed, handed_back) = queue_run(
        "studio-a", [Spec(f"Line {i}", "Hello.", quality(0.5)) for i in range(2)]
    )
    day_ago = text("now() - interval '1 day'")
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.run_id == run_id).values(created_at=day_ago, queued_at=day_ago))
        claim = claim_turns(session=s, turn_ids=[failed, handed_back], lease_s=60, max_attempts=3)
        assert {t.id for t in claim.claimed} == {failed, handed_back}
        fail_turns(
            session=s, token=claim.token, failures={failed: Failure("empty", TurnErrorCode.EMPTY_REPLY)}
        )
        assert requeue_turns(session=s, token=claim.token, reasons={handed_back: "worker lost"}) == [
            handed_back
        ]
        s.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.IN_PROGRESS))
    with session_scope() as s:
        assert runs.reopen_failed(session=s, run_id=run_id) == [failed]
    with session_scope() as s:
        waited = {
            t.id: t.queued_ms
            for t in claim_turns(
                session=s, turn_ids=[failed, handed_back], lease_s=60, max_attempts=3
            ).claimed
        }
    assert waited[failed] < 60_000, waited  # since its retry, a moment ago
    assert waited[handed_back] > 86_000_000, waited  # since it was sent, a day ago


def test_a_lines_conversation_erased_after_validation_is_never_made_again(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Review (deletes racing use): a run's line naming a player's conversation (and its character)
    was validated against it, then stored minutes later with nothing checked again: the player
    erased meanwhile, the line made the conversation again, the erased history's place now holding
    the line and its reply, out of the erasure's reach. The line is refused, as a policy's refusals
    are (review: a first version failed the whole run, and its resubmission made the conversation
    again), and the rest of its chunk stored."""
    from sqlalchemy import delete

    from db.models import Conversation
    from services.producer import enqueue_turns
    from services.runs import submit as submitting
    from tests.conftest import new_conversation

    player = new_conversation()
    enqueue_turns([player | {"message": "Hello."}], send=False)  # the player's conversation
    path = tmp_path / "lines.jsonl"
    kept = new_conversation()
    lines = [
        player | {"custom_id": "c1", "message": "Any news?"},
        kept | {"custom_id": "c2", "message": "Hi."},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    real = submitting._insert_chunk

    def erased_first(*args: Any) -> Any:  # the erasure commits between validation and storing
        with session_scope() as s:
            s.execute(delete(Conversation).where(Conversation.external_id == player["conversation"]))
        return real(*args)

    monkeypatch.setattr(submitting, "_insert_chunk", erased_first)
    submitted = submit_run(path, name="erased-" + tmp_path.name)
    assert submitted.stored == 1  # c2
    gone = select(Conversation.id).where(Conversation.external_id == player["conversation"])
    with session_scope() as s:
        assert s.scalar(gone) is None
        run = s.get_one(Run, submitted.id)
        (refusal,) = run.refused
        assert refusal["custom_id"] == "c1" and refusal["line"] == 1 and refusal["param"] == "conversation"
        assert "deleted after the file was validated" in refusal["message"] and run.total == 1
    assert run_state(submitted.name).turns == 2  # c2, and c1 refused: the API's count too


def test_watching_a_run_rides_out_the_database_away_for_a_moment(quiet_model, tmp_path, monkeypatch) -> None:
    """CLI review: `run status --watch` read the run each second with no retry, so one second of a
    failover during an hours-long run exited 1, "ended otherwise", and a script took a running run
    for a failed one. The last state read stands while the database is away (up to 5 minutes)."""
    import dataclasses

    import psycopg
    from sqlalchemy.exc import OperationalError

    import services.runs
    from scripts.cli import main as cli

    skipped = tmp_path / "done.jsonl"
    skipped.write_text("not json\n", encoding="utf-8")  # its one line skipped: done at once
    sub = submit_run(skipped, name="watched-" + tmp_path.name, skip_bad_lines=True)
    real = services.runs.run_state
    reads: list[str] = []

    def blinking(ref: str):  # type: ignore[no-untyped-def]
        reads.append(ref)
        if len(reads) == 1:  # still going when the watch starts
            return dataclasses.replace(real(ref), status=RunStatus.IN_PROGRESS)
        if len(reads) == 2:  # then a failover
            raise OperationalError("SELECT …", {}, psycopg.OperationalError("server closed the connection"))
        return real(ref)

    monkeypatch.setattr(services.runs, "run_state", blinking)
    assert cli(["run", "status", sub.name, "--watch"]) == 0
    assert len(reads) == 3
