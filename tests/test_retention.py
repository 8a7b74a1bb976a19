"""What the sweep deletes past MLCHAT_RUN_RETENTION_DAYS and MLCHAT_PROMPT_RETENTION_DAYS (review,
stop 76: nothing was ever deleted, and a fleet's turns, prompts, lines and vectors grew by tens of
gigabytes a day until the disk was full)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select, text

from core.settings import settings
from db.models import Conversation, Message, Run, Turn, TurnReview
from db.runs import create_run, finish_submission
from db.session import session_scope
from services.producer import submit_turns
from services.retention import prune
from services.runs.line_keys import line_conversation
from tests.desk_data import Spec, answer, quality

pytestmark = pytest.mark.usefixtures("world")


def _spec(i: int) -> Spec:
    return Spec(f"Hello {i}.", f"Well met {i}.", quality(0.9), candidates=(("Other.", quality(0.5)),))


def _run(
    lines: int, *, named: tuple[str, ...] = (), answered: bool = True
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A run of `lines` lines in conversations of its own (`run:<name>:<custom id>`), the last ones
    in the `named` ones instead (a game's own conversations its lines named)."""
    name = f"ret-{uuid.uuid4().hex[:10]}"
    with session_scope() as s:
        run, _ = create_run(
            session=s, name=name, model="smollm2-135m", file_hash=uuid.uuid4().hex, total=lines
        )
        run_id = run.id
    custom = [f"line-{i}" for i in range(1, lines + 1)]
    conversations = [line_conversation(name, c) for c in custom]
    if named:
        conversations[-len(named) :] = named
    stored = submit_turns(
        [
            {"conversation": c, "character": "elara", "message": f"Hello {i}."}
            for i, c in enumerate(conversations)
        ],
        send=False,
        lane="bulk",
        run_id=run_id,
        custom_ids=custom,
    )
    ids = [t.id for t in stored]
    with session_scope() as s:
        finish_submission(session=s, run_id=run_id)
    if answered:
        answer(ids, [_spec(i) for i in range(lines)])
    return run_id, ids


def _live(conversation: str) -> uuid.UUID:
    (turn,) = submit_turns(
        [{"conversation": conversation, "character": "elara", "message": "Hi."}], send=False
    )
    answer([turn.id], [_spec(0)])
    return turn.id


def _age(days: int, *, run_id: uuid.UUID | None = None, turn_id: uuid.UUID | None = None) -> None:
    """Move a run's creation and end (an unfinished one's creation), or a turn's end, `days` back."""
    with session_scope() as s:
        if run_id is not None:
            s.execute(
                text(
                    "UPDATE runs SET created_at = created_at - make_interval(days => :d),"
                    " finished_at = finished_at - make_interval(days => :d) WHERE id = :id"
                ),
                {"d": days, "id": run_id},
            )
        if turn_id is not None:
            s.execute(
                text("UPDATE turns SET finished_at = finished_at - make_interval(days => :d) WHERE id = :id"),
                {"d": days, "id": turn_id},
            )


def _counts(run_id: uuid.UUID, conversations: list[str]) -> tuple[int, int, int, int]:
    with session_scope() as s:
        runs = s.scalar(select(func.count()).select_from(Run).where(Run.id == run_id))
        turns = s.scalar(select(func.count()).select_from(Turn).where(Turn.run_id == run_id))
        convs = s.scalar(
            select(func.count()).select_from(Conversation).where(Conversation.external_id.in_(conversations))
        )
        lines = s.scalar(
            select(func.count())
            .select_from(Message)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Conversation.external_id.in_(conversations))
        )
    return int(runs or 0), int(turns or 0), int(convs or 0), int(lines or 0)


def _conversations_of(run_id: uuid.UUID) -> list[str]:
    with session_scope() as s:
        return list(
            s.scalars(
                select(Conversation.external_id)
                .join(Turn, Turn.conversation_id == Conversation.id)
                .where(Turn.run_id == run_id)
            )
        )


def test_an_ended_run_past_its_retention_goes_with_its_own_conversations_and_nothing_else(
    monkeypatch,
) -> None:
    import db.retention

    monkeypatch.setattr(db.retention, "CHUNK", 1)  # a chunk a statement: several transactions a run
    named = f"npc-{uuid.uuid4().hex[:8]}"
    live = _live(named)  # the game's own conversation, which a line of the old run also named
    # review: a game's own name that looks like a run's long name's digest, named by a line alone
    digest_like = "sha256:" + uuid.uuid4().hex * 2
    old, _ = _run(4, named=(named, digest_like))
    old_conversations = _conversations_of(old)
    recent, _ = _run(2)
    unfinished, _ = _run(2, answered=False)  # still running, however old
    for run_id in (old, unfinished):
        _age(40, run_id=run_id)
    before = _counts(old, old_conversations)
    assert before == (1, 4, 4, 10)  # two lines a turn, and the live turn's two in the named one
    assert prune() == {"runs": 0, "prompts": 0, "request_copies": 0}  # kept for good by default
    assert _counts(old, old_conversations) == before

    monkeypatch.setattr(settings, "run_retention_days", 30)
    assert prune()["runs"] == 1
    runs, turns, conversations, lines = _counts(old, old_conversations)
    assert (runs, turns) == (0, 0)
    # the game's conversations stay, with their lines (the old run's lines in them among them)
    assert conversations == 2 and lines == 6
    with session_scope() as s:
        assert s.get(Turn, live) is not None
    for kept in (recent, unfinished):
        assert _counts(kept, _conversations_of(kept))[:2] == (1, 2)
    assert prune()["runs"] == 0


def test_a_reopened_run_is_not_deleted_under_its_retry(monkeypatch) -> None:
    from db.retention import delete_run_chunk

    run_id, _ = _run(1)
    _age(40, run_id=run_id)
    with session_scope() as s:
        s.execute(
            text("UPDATE runs SET status = 'in_progress', finished_at = NULL WHERE id = :id"), {"id": run_id}
        )
    with session_scope() as s:
        assert delete_run_chunk(session=s, run_id=run_id, days=30, phase="conversations") is None
    assert _counts(run_id, _conversations_of(run_id))[:2] == (1, 1)


def test_a_live_turn_past_its_retention_forgets_its_prompt_and_keeps_its_reply_and_lines(monkeypatch) -> None:
    old = _live(f"npc-{uuid.uuid4().hex[:8]}")
    recent = _live(f"npc-{uuid.uuid4().hex[:8]}")
    run_id, (line,) = _run(1)
    for turn_id in (old, line):
        _age(40, turn_id=turn_id)
    monkeypatch.setattr(settings, "prompt_retention_days", 30)
    assert prune()["prompts"] == 1
    with session_scope() as s:
        forgotten, kept, run_line = (s.get_one(Turn, t) for t in (old, recent, line))
        assert (forgotten.prompt, forgotten.context, forgotten.alternatives) == (None, None, None)
        assert forgotten.reply == "Well met 0." and forgotten.usage and forgotten.quality
        assert s.scalar(select(func.count()).select_from(Message).where(Message.turn_id == old)) == 2
        assert kept.prompt and kept.alternatives and run_line.prompt and run_line.alternatives
    assert prune()["prompts"] == 0


def test_the_sweep_deletes_past_retention_and_says_so(monkeypatch, capsys) -> None:
    import memory.schedule
    import services.batches
    import services.sweeper
    from scripts.cli import main

    # The sweep's other steps left out: re-sent memory jobs reached later files' queues (a clone's run).
    monkeypatch.setattr(services.sweeper, "resend_stranded", lambda **_: {})
    monkeypatch.setattr(services.sweeper, "close_abandoned_runs", dict)
    monkeypatch.setattr(services.batches, "housekeeping", dict)
    monkeypatch.setattr(memory.schedule, "reschedule_stalled", lambda: 0)

    run_id, _ = _run(1)
    _age(40, run_id=run_id)
    monkeypatch.setattr(settings, "run_retention_days", 30)
    assert main(["sweep"]) == 0
    assert '"pruned": {"runs": ' in capsys.readouterr().out  # (another file's aged runs may go too)
    assert _counts(run_id, [])[:2] == (0, 0)


def _aged_conversation(external_id: str, turns: int) -> None:
    """A conversation of `turns` answered turns, made and answered 40 days ago."""
    ids = [_live(external_id) for _ in range(turns)]
    with session_scope() as s:
        s.execute(
            text(
                "UPDATE conversations SET created_at = created_at - interval '40 days' WHERE external_id = :e"
            ),
            {"e": external_id},
        )
    for turn_id in ids:
        _age(40, turn_id=turn_id)


def test_conversations_made_for_one_request_go_past_their_retention_and_no_other(monkeypatch) -> None:
    chat_copy, inline_copy = f"chat-{uuid.uuid4()}", f"inline-{uuid.uuid4().hex}-{uuid.uuid4().hex[:12]}"
    continued = f"chat-{uuid.uuid4()}"  # a client's own name of that form, continued: kept
    history_cache = f"inline-{uuid.uuid4().hex}"  # what copies are copied from: kept
    named = f"npc-{uuid.uuid4().hex[:8]}"
    _aged_conversation(chat_copy, 1)
    _aged_conversation(inline_copy, 1)
    _aged_conversation(continued, 2)
    _aged_conversation(history_cache, 1)
    _aged_conversation(named, 1)
    fresh = f"chat-{uuid.uuid4()}"
    _live(fresh)
    everything = [chat_copy, inline_copy, continued, history_cache, named, fresh]

    def left() -> set[str]:
        with session_scope() as s:
            return set(
                s.scalars(select(Conversation.external_id).where(Conversation.external_id.in_(everything)))
            )

    assert prune()["request_copies"] == 0 and left() == set(everything)  # kept for good by default
    monkeypatch.setattr(settings, "request_copy_retention_days", 30)
    assert prune()["request_copies"] >= 1
    # review: a chat completion's is kept too (`chat-` is no reserved name: a game's own of one turn)
    assert left() == {chat_copy, continued, history_cache, named, fresh}


def test_the_copies_pattern_is_the_one_their_names_are_made_by() -> None:
    from db.models import Conversation
    from db.retention import _DELETE_REQUEST_COPIES
    from services.characters import INLINE_COPY

    # the statement's and migration 0049's index's, written out: the names' own
    (index,) = [i for i in Conversation.__table__.indexes if i.name == "ix_conversations_request_copies"]
    assert str(index.dialect_options["postgresql"]["where"]) == f"external_id ~ '{INLINE_COPY}'"
    assert f"~ '{INLINE_COPY}'" in str(_DELETE_REQUEST_COPIES)
    # review: the migrated database's index itself (the models' comparison reads no predicate)
    with session_scope() as s:
        predicate = s.scalar(
            text(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
                " WHERE indexrelid = 'ix_conversations_request_copies'::regclass"
            )
        )
    assert predicate == f"((external_id)::text ~ '{INLINE_COPY}'::text)", predicate


def test_a_run_still_answering_owing_a_callback_or_reviewed_is_not_deleted(monkeypatch) -> None:
    """Review (stop 76): a failed CLI run's sent lines may still be answered long after; a callback
    still owed would be dropped; a writer's review keeps a rejected line out of LoRA training data."""
    from db.models import TurnReview

    failed, (queued, _) = _run(2, answered=False)
    owing, _ = _run(1)
    reviewed, (line,) = _run(1)
    with session_scope() as s:
        s.execute(
            text("UPDATE runs SET status = 'failed', finished_at = now() WHERE id = :id"), {"id": failed}
        )
        s.execute(
            text("UPDATE runs SET callback_retry_at = now() + interval '1 hour' WHERE id = :id"),
            {"id": owing},
        )
        s.add(TurnReview(turn_id=line, original_reply="Well met 0.", label="rejected"))
    for run_id in (failed, owing, reviewed):
        _age(40, run_id=run_id)
    monkeypatch.setattr(settings, "run_retention_days", 30)
    prune()
    for run_id in (failed, owing, reviewed):
        assert _counts(run_id, [])[0] == 1


def test_a_batch_deleted_past_its_retention_takes_its_output_files(monkeypatch) -> None:
    from db.files import get_file
    from services.batches import finalize_run
    from tests.desk_data import build_run

    admin = next(k for k in settings.api_keys if "admin" in k.scopes)
    run_id, _ = build_run("", [_spec(0)], batch_key=admin.id)
    finalize_run(run_id)
    with session_scope() as s:
        output = s.get_one(Run, run_id).output_file_id
        row = get_file(session=s, file_id=output) if output else None
    assert row is not None and (settings.batch_files_dir / row.path).exists()
    _age(40, run_id=run_id)
    monkeypatch.setattr(settings, "run_retention_days", 30)
    assert prune()["runs"] >= 1
    with session_scope() as s:
        assert get_file(session=s, file_id=output) is None
    assert not (settings.batch_files_dir / row.path).exists()


def test_a_run_whose_deletion_began_is_finished_and_nothing_changes_or_exports_it_meanwhile(
    monkeypatch, tmp_path
) -> None:
    """Review: a large run is deleted over many sweeps, and half deleted it was taken for a whole run:
    a writer's edit rewrote its batch's output from the half left, the verdict kept the run half
    deleted for good, a retry reopened it, an export came out short and said nothing. Its first
    chunk marks it: the desk, a retry and an export refuse it, and the next sweeps finish it."""
    import db.retention
    from db.retention import delete_run_chunk
    from db.runs import NotRetryable, RunDeleting
    from services import desk
    from services.runs import export_run, retry_failed

    monkeypatch.setattr(db.retention, "CHUNK", 1)
    run_id, (first, second, third) = _run(3)
    with session_scope() as s:
        s.execute(text("UPDATE turns SET status = 'failed', reply = NULL WHERE id = :id"), {"id": third})
        name = s.get_one(Run, run_id).name
    _age(40, run_id=run_id)
    out = tmp_path / "exports"
    before = export_run(name, out)  # whole, before its deletion
    written = before[0].read_bytes()
    assert before[2:] == (2, 1)

    with session_scope() as s:  # the first chunk: one of its conversations, and the mark
        chunk = delete_run_chunk(session=s, run_id=run_id, days=30, phase="conversations")
    assert chunk is not None and chunk.deleted == 1
    writer = desk.Reviewer("writer-ret", "", admin=False)
    with session_scope() as s:
        left = [t for t in (first, second) if s.get(Turn, t) is not None]
    assert len(left) == 1
    with pytest.raises(desk.DeskError, match="is being deleted") as refused:
        desk.label(writer, left[0], "approve", "", "0")
    assert refused.value.status == 409
    with pytest.raises(desk.DeskError, match="is being deleted"):
        desk.edit(writer, left[0], "Another reply.", "0")
    with pytest.raises(NotRetryable, match="is being deleted"):
        retry_failed(name)
    with pytest.raises(RunDeleting, match="MLCHAT_RUN_RETENTION_DAYS"):
        export_run(name, out)
    assert before[0].read_bytes() == written  # the whole export of before left in place
    with session_scope() as s:
        assert not s.scalars(select(TurnReview).where(TurnReview.turn_id.in_(left))).all()

    with session_scope() as s, pytest.raises(RunDeleting):  # nor is it submitted again (a resume)
        create_run(session=s, name=name, model="smollm2-135m", file_hash=uuid.uuid4().hex, total=3)
    # the sweeps go on with it first, even with retention switched off since (review: it stayed half
    # deleted, refused by every writer, for good)
    assert settings.run_retention_days == 0
    assert prune()["runs"] >= 1
    assert _counts(run_id, [])[:2] == (0, 0)


def test_a_verdict_committed_while_the_deletion_waits_for_the_run_keeps_it(monkeypatch) -> None:
    """Review: the deletion's check of the run ("no review") read the lines as they were when its
    statement began; the desk's verdict, committed while the deletion waited for the run's lock
    (the desk locks the run, never updates it), went unseen, and went with its line."""
    import threading

    import db.retention
    from db.retention import delete_run_chunk
    from tests.conftest import another_session_waits_on_a_lock

    monkeypatch.setattr(db.retention, "LOCK_TIMEOUT_MS", 20_000)  # waits for the desk, however slow here
    run_id, (line,) = _run(1)
    _age(40, run_id=run_id)
    outcome: dict[str, object] = {}

    def sweep() -> None:
        with session_scope() as s:
            outcome["chunk"] = delete_run_chunk(session=s, run_id=run_id, days=30, phase="conversations")

    thread = threading.Thread(target=sweep)
    with session_scope() as desk_session:  # as lock_line_run: the run FOR KEY SHARE, then the verdict
        desk_session.execute(
            select(Run.id).where(Run.id == run_id).with_for_update(read=True, key_share=True)
        )
        desk_session.add(TurnReview(turn_id=line, original_reply="Well met 0.", label="approved"))
        desk_session.flush()
        thread.start()
        assert another_session_waits_on_a_lock(held_by=desk_session)
    thread.join(30)
    assert not thread.is_alive() and outcome == {"chunk": None}
    assert _counts(run_id, [])[:2] == (1, 1)
    with session_scope() as s:
        assert s.get(TurnReview, line) is not None and s.get_one(Run, run_id).deleting_since is None


def test_an_export_whose_run_starts_being_deleted_meanwhile_is_refused_not_written_short(
    monkeypatch, tmp_path
) -> None:
    """Review: an export reads a chunk a transaction; a sweep deleting the run meanwhile left it
    short, exit 0 with those counts."""
    from db.retention import delete_run_chunk
    from db.runs import RunDeleting
    from services.runs import export as run_export

    run_id, _ = _run(2)
    _age(40, run_id=run_id)
    with session_scope() as s:
        name = s.get_one(Run, run_id).name
    real = run_export.write_outputs

    def a_sweep_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        with session_scope() as s:
            delete_run_chunk(session=s, run_id=run_id, days=30, phase="conversations")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_export, "write_outputs", a_sweep_meanwhile)
    with pytest.raises(RunDeleting):
        run_export.export_run(name, tmp_path)
    assert not list(tmp_path.glob("*.jsonl"))  # nothing put in place


def test_a_failed_runs_lines_never_sent_do_not_keep_it_for_good(monkeypatch) -> None:
    """Review: a CLI submission killed between storing chunks and sending them left its lines queued
    and never sent (nothing sends them: resubmitting the file does); counted as still to answer,
    they kept the run, its conversations and lines for good."""
    run_id, _ = _run(2, answered=False)
    with session_scope() as s:
        s.execute(
            text("UPDATE runs SET status = 'failed', finished_at = now() WHERE id = :id"), {"id": run_id}
        )
        s.execute(text("UPDATE turns SET dispatched_at = NULL WHERE run_id = :id"), {"id": run_id})
    _age(40, run_id=run_id)
    monkeypatch.setattr(settings, "run_retention_days", 30)
    prune()
    assert _counts(run_id, [])[:2] == (0, 0)


def test_a_run_whose_callback_was_never_tried_is_kept_while_the_sweeps_may_still_send_it(monkeypatch) -> None:
    """Review: during a broker outage a run's callback is claimed and given back untried, its due
    time empty again: retention shorter than the callbacks' window deleted the run before its
    callback was ever sent."""
    run_id, _ = _run(1)
    with session_scope() as s:
        s.execute(
            text("UPDATE runs SET callback_url = 'https://game.example/hook' WHERE id = :id"), {"id": run_id}
        )
    _age(40, run_id=run_id)
    monkeypatch.setattr(settings, "run_retention_days", 30)
    monkeypatch.setattr(settings, "callback_retry_window_s", 60 * 86400.0)  # still sent for 60 days
    prune()
    assert _counts(run_id, [])[0] == 1
    monkeypatch.setattr(settings, "callback_retry_window_s", 86400.0)  # its window closed long ago
    prune()
    assert _counts(run_id, [])[0] == 0


def test_a_batch_output_file_whose_advertised_expiry_is_ahead_outlives_its_run(monkeypatch) -> None:
    """Review: a batch created with `output_expires_after` of 30 days showed its output file's
    `expires_at` 30 days on, and retention of 7 days deleted it on day 7 (a 404 before its time)."""
    from db.files import get_file
    from db.models import StoredFile
    from services.batches import finalize_run
    from tests.desk_data import build_run

    admin = next(k for k in settings.api_keys if "admin" in k.scopes)
    run_id, _ = build_run("", [_spec(0)], batch_key=admin.id)
    finalize_run(run_id)
    with session_scope() as s:
        output = s.get_one(Run, run_id).output_file_id
        assert output is not None
        s.execute(
            text("UPDATE files SET expires_at = now() + interval '10 days' WHERE id = :id"), {"id": output}
        )
        path = s.get_one(StoredFile, output).path
    _age(40, run_id=run_id)
    monkeypatch.setattr(settings, "run_retention_days", 30)
    prune()
    assert _counts(run_id, [])[0] == 0
    with session_scope() as s:
        assert get_file(session=s, file_id=output) is not None  # left to its own expiry
    assert (settings.batch_files_dir / path).exists()
