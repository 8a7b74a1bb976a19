"""What the sweep deletes past MLCHAT_RUN_RETENTION_DAYS and MLCHAT_PROMPT_RETENTION_DAYS (review,
stop 76: nothing was ever deleted, and a fleet's turns, prompts, lines and vectors grew by tens of
gigabytes a day until the disk was full)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select, text

from core.settings import settings
from db.models import Conversation, Message, Run, Turn
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
