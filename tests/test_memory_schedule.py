"""Memory jobs on the bulk lane without the engine: one step per message, a per-worker cap that
sends a job back to the queue instead of holding a thread, and at most one message per job on the
queue. Checked on the real broker's queue (Redis) and the memory_jobs rows."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis
from sqlalchemy import delete, func, select, update

from core.services import broker_url
from core.settings import settings
from db.memory_jobs import SUMMARY, claim_job, mark_queued, release_job
from db.models import MemoryJob, Message, Role, Summary
from db.session import session_scope
from db.world import find_characters, upsert_conversations
from memory.schedule import schedule_memory
from memory.summarize import run_summary_job

pytestmark = pytest.mark.usefixtures("world")


def _conversation(lines: int, *, external: str = "") -> int:
    external = external or f"sched-{uuid.uuid4().hex[:10]}"
    with session_scope() as s:
        char_id = find_characters(session=s, slugs=["elara"])["elara"]
        row = {
            "external_id": external,
            "player_id": external,
            "player_name": "Rowan",
            "character_id": char_id,
        }
        conv = upsert_conversations(session=s, rows=[row], tenant="")[external][0]
        for seq in range(1, lines + 1):
            role = Role.USER if seq % 2 else Role.ASSISTANT
            s.add(Message(conversation_id=conv, seq=seq, role=role, content=f"line {seq} " + "x" * 400))
    return conv


QUIET_QUEUE = "gen.memory-schedule-check.bulk"  # a queue no worker consumes


def _queued_kwargs(conversation_id: int) -> list[dict]:
    """The arguments of the bulk queue's memory-job messages for this conversation."""
    found = []
    for raw in redis.Redis.from_url(broker_url()).lrange(QUIET_QUEUE, 0, -1):
        message = json.loads(raw)
        if message["headers"].get("task") == "mlchat.memory_job":
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            if kwargs.get("conversation_id") == conversation_id:
                found.append(kwargs)
    return found


def _refused(*args, **kwargs):  # type: ignore[no-untyped-def]
    """A write the database refuses: its connection refused (an outage)."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    raise OperationalError("UPDATE memory_jobs …", {}, psycopg.OperationalError("connection refused"))


def _steps_meet_the_database_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every summary step's generation finds the database's connection closed."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from memory import summarize

    def database_away(system, body, max_tokens, alone):  # type: ignore[no-untyped-def]
        raise OperationalError("SELECT …", {}, psycopg.OperationalError("server closed the connection"))

    original = summarize.run_summary_job
    monkeypatch.setattr(
        summarize, "run_summary_job", lambda c, **kw: original(c, generate=database_away, **kw)
    )


def _queued(conversation_id: int) -> list[dict]:
    """The headers of the bulk queue's memory-job messages for this conversation."""
    client = redis.Redis.from_url(broker_url())
    found = []
    for raw in client.lrange(QUIET_QUEUE, 0, -1):
        message = json.loads(raw)
        headers = message["headers"]
        if headers.get("task") != "mlchat.memory_job":
            continue
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if kwargs.get("conversation_id") == conversation_id:
            found.append(headers)
    return found


@pytest.fixture
def summaries_due(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from tasks import memory as memory_tasks

    monkeypatch.setattr(settings, "memory_summary_threshold_tokens", 1000)
    monkeypatch.setattr(settings, "memory_summary_chunk_tokens", 1500)
    monkeypatch.setattr(settings, "memory_extract_every_lines", 0)
    # In the whole suite a test worker consumes the model's bulk queue and would take the messages
    # these tests look for: memory jobs go to a queue nobody consumes here.
    monkeypatch.setattr(memory_tasks, "queue_for_model", lambda model, lane="live": QUIET_QUEUE)
    yield
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)


def test_a_summary_job_writes_one_summary_per_message(summaries_due: None) -> None:
    conv = _conversation(80)  # several summaries due
    assert run_summary_job(conv, generate=lambda system, body, max_tokens, alone: "They talked.") == 1


def test_a_memory_job_finding_the_workers_slots_taken_goes_back_on_the_queue_later(
    summaries_due: None,
) -> None:
    from tasks import memory as memory_tasks

    conv = _conversation(40)
    taken = 0
    while memory_tasks.slots.acquire(blocking=False):  # other memory jobs hold every slot
        taken += 1
    try:
        done = threading.Event()
        thread = threading.Thread(target=lambda: (memory_tasks.memory_job(conv, SUMMARY), done.set()))
        thread.start()
        assert done.wait(10)  # the thread is free at once: the job did not wait for a slot
    finally:
        for _ in range(taken):
            memory_tasks.slots.release()
    (headers,) = _queued(conv)
    assert headers["eta"] is not None  # sent again, with a delay
    with session_scope() as s:  # and it did not run: never claimed
        assert s.scalar(select(MemoryJob.token).where(MemoryJob.conversation_id == conv)) is None


def test_scheduling_a_due_job_twice_without_a_worker_sends_one_message(summaries_due: None) -> None:
    conv = _conversation(40)
    assert schedule_memory([conv]) == 1
    assert schedule_memory([conv]) == 0  # its message is still on the queue
    assert len(_queued(conv)) == 1
    with session_scope() as s:  # the job runs (its claim clears the mark) and gives the job back
        token = claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=60)
        assert token is not None
    with session_scope() as s:
        release_job(session=s, conversation_id=conv, kind=SUMMARY, token=token)
    assert schedule_memory([conv]) == 1  # still due: the next step is sent
    assert len(_queued(conv)) == 2


def test_a_message_dropped_while_its_job_ran_does_not_hold_back_the_next_step(summaries_due: None) -> None:
    """Found in review: a message sent while the job ran (its mark set) found the job held and was
    dropped; its mark then refused the running job's next step for MLCHAT_MEMORY_JOB_LEASE_S."""
    from tasks import memory as memory_tasks

    conv = _conversation(40)
    with session_scope() as s:
        token = claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=60)
    assert token is not None
    # A reply stored just before the claim found the job due and marks its message after it.
    with session_scope() as s:
        assert mark_queued(session=s, jobs=[(conv, SUMMARY)], stale_s=600) == [(conv, SUMMARY)]
    memory_tasks.memory_job(conv, SUMMARY)  # that message: the job is held, nothing runs
    with session_scope() as s:
        release_job(session=s, conversation_id=conv, kind=SUMMARY, token=token)
    assert schedule_memory([conv]) == 1  # the job's next step is sent


def test_the_original_request_shapes_conversations_get_no_memory_jobs(summaries_due: None) -> None:
    """Found in review: a request of the original service's shape without a conversation is answered
    in a copy of its history made for it alone (`inline-<digest>-<hex>`), never continued; its memory
    jobs summarised the whole history again on the bulk lane for every such request."""
    copy = _conversation(40, external=f"inline-{uuid.uuid4().hex}-{uuid.uuid4().hex[:12]}")
    kept = _conversation(40)
    named = _conversation(40, external=f"inline-{uuid.uuid4().hex[:8]}")  # a client's own name
    # Review (stop 76): a stateless chat completion's (no conversation named) was missed.
    chat = _conversation(40, external=f"chat-{uuid.uuid4()}")
    chat_named = _conversation(40, external=f"chat-{uuid.uuid4().hex[:8]}")
    assert schedule_memory([copy, kept, named, chat, chat_named]) == 3
    assert _queued(copy) == [] == _queued(chat)
    assert len(_queued(kept)) == len(_queued(named)) == len(_queued(chat_named)) == 1


def test_a_memory_job_whose_engine_died_stops_the_worker_and_hands_the_job_on(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memory import summarize
    from tasks import memory as memory_tasks
    from worker import lifecycle
    from worker.engine import EngineDead

    def dead(system: str, body: str, max_tokens: int, alone: bool) -> str:
        raise EngineDead("the engine died: test")

    monkeypatch.setattr(summarize, "_engine_generate", dead)
    # Not Celery's own state: the session's in-process worker (tests/conftest.py) reads that one.
    state = SimpleNamespace(should_stop=None)
    monkeypatch.setattr(lifecycle, "worker_state", state)
    conv = _conversation(40)
    memory_tasks.memory_job(conv, SUMMARY)
    assert state.should_stop == lifecycle.EXIT_ENGINE_DEAD  # the worker stops, as after an engine death
    assert len(_queued(conv)) == 1  # and the job is on the queue for another worker
    # Found in review: the step released the job (its claim and queued mark gone) before it was handed
    # on; with the broker away too, nothing had a mark to find lapsed, and the job waited for the
    # conversation's next reply, which a player who had gone quiet never sent. The sweep finds it.
    from memory.schedule import reschedule_stalled

    state.should_stop, lost = None, _conversation(40)
    with _broker_away(monkeypatch):
        memory_tasks.memory_job(lost, SUMMARY)
    assert state.should_stop == lifecycle.EXIT_ENGINE_DEAD and not _queued(lost)
    assert reschedule_stalled() >= 1
    assert len(_queued(lost)) == 1


def test_a_job_whose_generation_outlasts_its_lease_keeps_its_claim(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a memory job's lease was never renewed, so a generation waiting longer than
    a lease behind live work was taken for a dead worker's: the conversation's next reply sent the
    job again, another worker claimed it, and the first answer was thrown away (over and over under
    load). The job's lease is renewed while it runs, as a batch's turns' are."""
    import time

    from db.models import Summary

    monkeypatch.setattr(settings, "memory_job_lease_s", 2.0)  # renewed every 0.67 s
    conv = _conversation(80)
    taken: list[object] = []

    def slow(system: str, body: str, max_tokens: int, alone: bool) -> str:
        time.sleep(3.0)  # past its lease; meanwhile another worker tries to take the job over
        with session_scope() as s:
            taken.append(claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=60))
        time.sleep(0.5)
        return "They met at the gate."

    assert run_summary_job(conv, generate=slow) == 1
    assert taken == [None]
    with session_scope() as s:
        stored = s.scalars(select(Summary.text).where(Summary.conversation_id == conv)).all()
    assert stored == ["They met at the gate."]


def test_a_memory_job_whose_message_could_not_be_sent_is_sent_by_the_next_scheduling(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a send that failed (the broker away) left the job marked queued, so no reply
    sent it again for a lease's length (10 minutes), and nothing else ever did."""
    conv = _conversation(80)
    with _broker_away(monkeypatch):
        assert schedule_memory([conv]) == 0
    assert schedule_memory([conv]) == 1
    assert len(_queued(conv)) == 1


def test_the_sweep_sends_again_a_memory_job_whose_message_was_lost_or_whose_worker_died(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: nothing re-sent a memory job whose message a broker lost (marked queued,
    never run) or whose worker died holding it: its conversation's summaries and facts waited for
    the player's next reply, and a player who had gone quiet never got them."""
    from sqlalchemy import text

    from memory.schedule import reschedule_stalled

    lost, orphaned, running = _conversation(80), _conversation(80), _conversation(80)
    monkeypatch.setattr(settings, "memory_job_lease_s", 30)
    with session_scope() as s:
        assert mark_queued(session=s, jobs=[(lost, SUMMARY)], stale_s=30) == [(lost, SUMMARY)]
        dead = claim_job(session=s, conversation_id=orphaned, kind=SUMMARY, lease_s=30)
        alive = claim_job(session=s, conversation_id=running, kind=SUMMARY, lease_s=30)
        assert dead is not None and alive is not None
    reschedule_stalled()  # neither is stalled yet (other tests' conversations may be)
    assert not _queued(lost) and not _queued(orphaned)
    lapse = "UPDATE memory_jobs SET {} = now() - interval '{} seconds' WHERE conversation_id = :c"
    with session_scope() as s:  # the mark lapsed, the dead claim a lease ago, the live one just now
        for column, seconds, conv in (
            ("queued_until", 1, lost),
            ("lease_until", 31, orphaned),
            ("lease_until", 1, running),
        ):
            s.execute(text(lapse.format(column, seconds)), {"c": conv})
    assert reschedule_stalled() >= 2
    assert len(_queued(lost)) == 1 and len(_queued(orphaned)) == 1 and not _queued(running)
    reschedule_stalled()  # each is found once: sent now, they are marked queued afresh
    assert len(_queued(lost)) == 1 and len(_queued(orphaned)) == 1


def test_a_memory_job_whose_worker_dies_as_it_runs_is_counted_and_given_up_not_sent_for_ever(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in a poison review: the sweep sent again a job whose worker had died holding it, counting
    nothing, so a step that kills its worker (a process killed for memory, a native crash) was sent,
    and killed a worker, for ever. Each such death counts as a failure of the job; at the limit it is
    given up, said in the log, and no longer sent. Found in a reread: a death was sent again at once,
    where a raised step waits out a backoff; one rule (record_failure) decides both now."""
    from sqlalchemy import text

    from db.memory_jobs import DIED
    from memory.schedule import reschedule_stalled

    monkeypatch.setattr(settings, "memory_job_lease_s", 30)
    monkeypatch.setattr(settings, "memory_job_max_failures", 2)
    conv = _conversation(80)
    for deaths in (1, 2):
        with session_scope() as s:
            assert claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=30) is not None
            s.execute(
                text(
                    "UPDATE memory_jobs SET lease_until = now() - interval '31 s' WHERE conversation_id = :c"
                ),
                {"c": conv},
            )
        reschedule_stalled()
        with session_scope() as s:
            row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
            assert (row.failures, row.last_error, row.token) == (deaths, DIED, None)
            given_up = row.retry_after is not None and row.queued_until is None
            # reread: sent again after the backoff a raised step gets (record_failure), not at once
            backing_off = s.scalar(
                select(MemoryJob.retry_after > func.now() + text("interval '20 s'")).where(
                    MemoryJob.conversation_id == conv
                )
            )
        assert len(_queued(conv)) == (0 if deaths == 2 else 1) and given_up == (deaths == 2)
        assert backing_off and all(headers["eta"] for headers in _queued(conv))
        redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    reschedule_stalled()
    assert not _queued(conv)  # given up: no sweep sends it
    # review: nor does a claim take it (a message the broker delivers again, unacked an hour on)
    with session_scope() as s:
        assert claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=30) is None
        s.execute(
            text("UPDATE memory_jobs SET retry_after = now() - interval '1 s' WHERE conversation_id = :c"),
            {"c": conv},
        )
    # a day on, it runs again and dies again: counted, and given up for another day
    with session_scope() as s:
        assert claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=30) is not None
        s.execute(
            text("UPDATE memory_jobs SET lease_until = now() - interval '31 s' WHERE conversation_id = :c"),
            {"c": conv},
        )
    reschedule_stalled()
    with session_scope() as s:
        row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (row.failures, row.token, row.queued_until) == (3, None, None)
        assert s.scalar(select(MemoryJob.retry_after > func.now()).where(MemoryJob.conversation_id == conv))
    assert not _queued(conv)
    with session_scope() as s:  # review: past the limit with no give-up time (the limit lowered since)
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == conv).values(retry_after=None))
        assert claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=30) is not None


def test_a_step_failing_for_the_database_away_gives_its_claim_back_once_it_is_back(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of the count of a dead worker's jobs: a step whose database went away tried once to give
    its claim back, failed (the database still away), and the claim, left held, lapsed; the sweep
    then took it back as its worker's death and counted it, which an outage is not. The release is
    tried again while the database comes back."""
    from memory import claim, summarize
    from tasks import memory as memory_tasks

    conv = _conversation(80)
    monkeypatch.setattr(claim, "RELEASE_FIRST_WAIT_S", 0.01)
    real_release, refused = claim._release, []

    def away_twice(*args, **kwargs):  # type: ignore[no-untyped-def]
        if len(refused) < 2:
            refused.append(1)
            _refused()
        return real_release(*args, **kwargs)

    monkeypatch.setattr(claim, "_release", away_twice)
    original = summarize.run_summary_job
    _steps_meet_the_database_away(monkeypatch)
    memory_tasks.memory_job(conv, SUMMARY)
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    assert refused == [1, 1]
    with session_scope() as s:
        row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (row.token, row.failures, row.outage_retries) == (None, 0, 1)
    # review: a step that ran, whose release met the outage, gave its claim back once only
    refused.clear()
    monkeypatch.setattr(summarize, "run_summary_job", original)
    assert run_summary_job(conv, generate=lambda system, body, max_tokens, alone: "They talked.") == 1
    assert refused == [1, 1]
    with session_scope() as s:
        row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (row.token, row.failures, row.outage_retries) == (None, 0, 0)


def test_a_step_whose_claim_stayed_held_through_an_outage_gives_it_back_when_sent_again(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory review: past RELEASE_WITHIN_S of outage the claim stayed held, and the step was sent
    again 30 s on: that message found the job taken and was dropped, and the sweep later took the
    claim back as its worker's death (counted). The resend carries the claim and gives it back
    first: the step runs, nothing counted; so does a step that ran and then met the outage."""
    from memory import claim, summarize
    from tasks import memory as memory_tasks

    monkeypatch.setattr(claim, "RELEASE_WITHIN_S", 0.0)
    original, real_release = summarize.run_summary_job, claim._release

    def talked(c, **kw):  # type: ignore[no-untyped-def]
        return original(c, generate=lambda system, body, max_tokens, alone: "They talked.", **kw)

    for step_ran in (False, True):
        conv = _conversation(80)
        monkeypatch.setattr(claim, "_release", _refused)
        if step_ran:
            monkeypatch.setattr(summarize, "run_summary_job", talked)
        else:
            _steps_meet_the_database_away(monkeypatch)
        memory_tasks.memory_job(conv, SUMMARY)  # sent again, 30 s on, carrying its held claim
        (sent,) = _queued_kwargs(conv)
        redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
        with session_scope() as s:
            row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
            assert row.token is not None and str(row.token) == sent["release"], sent
        monkeypatch.setattr(claim, "_release", real_release)
        monkeypatch.setattr(summarize, "run_summary_job", talked)
        memory_tasks.memory_job(**sent)  # its lease still running: given back, then run
        # a malformed claim in a message is dropped, never sent round again
        memory_tasks.memory_job(conv, SUMMARY, release="not-a-token")
        assert all("release" not in kwargs for kwargs in _queued_kwargs(conv))
        redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
        with session_scope() as s:
            row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
            assert (row.token, row.failures) == (None, 0)
            assert s.scalar(select(func.count()).select_from(Summary).where(Summary.conversation_id == conv))


def test_a_failing_step_whose_claim_stayed_held_gives_it_back_with_its_failure_or_its_resend(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of the resend that carries a held claim: a step failing of its own (counted) whose
    claim could not be given back kept it on its record's exits (given up, or the record failing),
    and the sweep later counted the claim as its worker's death over the step's own error; a step
    meeting another embedder's vectors was resent without it."""
    from db.vector_space import EmbedderMismatch
    from memory import claim, summarize
    from tasks import memory as memory_tasks

    monkeypatch.setattr(claim, "RELEASE_WITHIN_S", 0.0)
    monkeypatch.setattr(settings, "memory_job_max_failures", 1)  # its first failure gives it up

    def failing(raised: BaseException):  # type: ignore[no-untyped-def]
        def step(conversation_id: int, **kw):  # type: ignore[no-untyped-def]
            with session_scope() as s:
                token = claim_job(session=s, conversation_id=conversation_id, kind=SUMMARY, lease_s=600)
            assert token is not None
            with claim.released(conversation_id, SUMMARY, token):
                raise raised

        return step

    conv = _conversation(80)
    monkeypatch.setattr(claim, "_release", _refused)
    monkeypatch.setattr(summarize, "run_summary_job", failing(RuntimeError("hiccup")))
    memory_tasks.memory_job(conv, SUMMARY)
    with session_scope() as s:
        row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (row.token, row.failures) == (None, 1) and (row.last_error or "").startswith("RuntimeError")
    other = _conversation(80)
    monkeypatch.setattr(summarize, "run_summary_job", failing(EmbedderMismatch("another embedder's vectors")))
    memory_tasks.memory_job(other, SUMMARY)
    (sent,) = _queued_kwargs(other)
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    with session_scope() as s:
        held = s.scalar(select(MemoryJob.token).where(MemoryJob.conversation_id == other))
    assert held is not None and sent.get("release") == str(held)


def test_a_sweep_that_cannot_send_a_stalled_memory_job_says_so_and_a_later_one_sends_it(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review of the fix above: the sweep freed a stalled job before sending it, and a
    send that failed (the broker away) then lost it for good, with the sweep saying nothing stranded."""
    from sqlalchemy import text

    from memory.schedule import reschedule_stalled

    conv = _conversation(80)
    _marked_long_ago(conv)
    with _broker_away(monkeypatch), pytest.raises(ConnectionError):
        reschedule_stalled()
    with session_scope() as s:  # its fresh mark lapses (a lease later)
        s.execute(
            text(
                "UPDATE memory_jobs SET queued_until = now() - interval '1 second' WHERE conversation_id = :c"
            ),
            {"c": conv},
        )
    reschedule_stalled()
    assert len(_queued(conv)) == 1


def test_a_memory_jobs_steps_leave_the_characters_card_and_lorebook_out(summaries_due: None) -> None:
    """Found in review: each step of a summary or an extraction loaded the conversation with its
    character's card and lorebook (the eager load), for the character's name alone."""
    from sqlalchemy import event

    from db.session import get_engine
    from memory.extract import run_extract_job

    conv = _conversation(80)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", seen)
    try:
        assert run_summary_job(conv, generate=lambda system, body, max_tokens, alone: "They talked.") == 1
        assert run_extract_job(conv, generate=lambda *args: '{"facts": []}').get("lines")
    finally:
        event.remove(get_engine(), "before_cursor_execute", seen)
    assert any("FROM conversations" in s for s in statements)
    assert not [s for s in statements if "lorebook" in s]


def test_the_sweep_sends_no_memory_job_of_a_kind_switched_off(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the sweep sent a stalled job as it was, without the checks scheduling makes:
    with summaries switched off, a stale row still had a summary generated."""

    from memory.schedule import reschedule_stalled

    conv = _conversation(80)
    _marked_long_ago(conv)
    monkeypatch.setattr(settings, "memory_summary_threshold_tokens", 0)
    reschedule_stalled()
    assert not _queued(conv)


def _marked_long_ago(conv: int) -> None:
    """The conversation's summary job marked queued, the mark past its time (its message lost)."""
    from sqlalchemy import text

    with session_scope() as s:
        assert mark_queued(session=s, jobs=[(conv, SUMMARY)], stale_s=1) == [(conv, SUMMARY)]
        s.execute(
            text(
                "UPDATE memory_jobs SET queued_until = now() - interval '1 second' WHERE conversation_id = :c"
            ),
            {"c": conv},
        )


def test_a_memory_job_whose_send_failed_is_found_by_the_next_sweep(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in the final reread: a failed send took its mark back to NULL, which the sweep never
    looks at: a quiet player's conversation was then never sent again. The mark lapses at once."""
    from memory.schedule import reschedule_stalled

    conv = _conversation(80)
    with _broker_away(monkeypatch):
        assert schedule_memory([conv]) == 0
    reschedule_stalled()  # the player says nothing more: the sweep sends it
    assert len(_queued(conv)) == 1


@contextmanager
def _broker_away(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Memory jobs cannot be sent while inside (the broker away)."""
    from tasks import memory as memory_tasks

    send = memory_tasks.send_memory_jobs

    def away(jobs: object, **kw: object) -> None:
        raise ConnectionError("broker away")

    monkeypatch.setattr(memory_tasks, "send_memory_jobs", away)
    try:
        yield
    finally:
        monkeypatch.setattr(memory_tasks, "send_memory_jobs", send)


def test_a_memory_jobs_store_rolled_back_for_a_deadlock_is_run_again_not_its_generation(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a summary's or an extraction's store met by a deadlock (facts are locked by
    the desk's drop of an edited line's, by supersede and by gossip) raised, and the job's generation,
    a bulk-lane request behind live work, was thrown away and asked again. The store is run again."""
    from psycopg.errors import DeadlockDetected
    from sqlalchemy.exc import OperationalError

    from db.models import Fact, Summary
    from memory import extract, summarize
    from memory.extract import run_extract_job

    def once_a_deadlock(real):  # type: ignore[no-untyped-def]
        met: list[int] = []

        def call(**kwargs):  # type: ignore[no-untyped-def]
            if not met:  # the first attempt writes, then the server rolls it back
                met.append(1)
                real(**kwargs)
                raise OperationalError("UPDATE facts …", {}, DeadlockDetected("deadlock detected"))
            return real(**kwargs)

        return call

    conv = _conversation(80)
    asked: list[str] = []

    def summary(system: str, body: str, max_tokens: int, alone: bool) -> str:
        asked.append("summary")
        return "They talked."

    monkeypatch.setattr(summarize, "store_summary", once_a_deadlock(summarize.store_summary))
    assert run_summary_job(conv, generate=summary) == 1 and asked == ["summary"]

    def facts(system: str, body: str, max_tokens: int, schema: dict, alone: bool) -> str:
        asked.append("facts")
        told = {"subject": "Rowan", "kind": "player", "text": "Rowan keeps bees.", "importance": 5}
        return json.dumps({"facts": [told]})

    monkeypatch.setattr(extract, "store_extracted", once_a_deadlock(extract.store_extracted))
    assert run_extract_job(conv, generate=facts)["added"] == 1 and asked == ["summary", "facts"]
    with session_scope() as s:
        assert s.scalars(select(Summary.text).where(Summary.conversation_id == conv)).all() == [
            "They talked."
        ]
        assert s.scalars(select(Fact.text).where(Fact.scope_ref == str(conv))).all() == ["Rowan keeps bees."]


def test_a_memory_job_that_raises_is_sent_again_after_a_backoff_and_given_up_after_its_failures(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a step that raised (the database or the engine away a moment) was logged and
    given back with its queued mark cleared: nothing sent it again but the conversation's next reply,
    which an idle conversation never has (a transient failure, final); and one that failed every time
    ran again at every reply, unseen. It is counted and sent again after a backoff, no scheduling
    sends it meanwhile, and after MLCHAT_MEMORY_JOB_MAX_FAILURES in a row it is given up, said in the
    log, until `mlchat memory retry`; a stored step clears the count."""
    import logging

    from memory import summarize
    from memory.schedule import reschedule_stalled
    from tasks import memory as memory_tasks

    monkeypatch.setattr(settings, "memory_job_max_failures", 2)
    conv = _conversation(80)

    class Panic(BaseException):  # as a Rust library's (pyo3's PanicException): no Exception
        pass

    raised: list[BaseException] = [ConnectionError("the engine is away")]

    def engine_away(system, body, max_tokens, alone):  # type: ignore[no-untyped-def]
        raise raised[0]

    original = summarize.run_summary_job
    monkeypatch.setattr(summarize, "run_summary_job", lambda c, **kw: original(c, generate=engine_away, **kw))

    def job() -> MemoryJob:
        with session_scope() as s:
            return s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()

    memory_tasks.memory_job(conv, SUMMARY)
    (headers,) = _queued(conv)
    assert headers["eta"] is not None  # sent again, after its backoff
    row = job()
    assert row.failures == 1 and "the engine is away" in (row.last_error or "")
    assert schedule_memory([conv]) == 0 and reschedule_stalled() == 0  # backing off: not sent twice
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    caplog.set_level(logging.ERROR, logger="tasks.memory")
    # its delayed message runs, and fails again: given up; a native panic counted as any failure is
    # (review: one was taken for a shutdown, its claim given back uncounted, run at every reply)
    raised[0] = Panic("called `Option::unwrap()` on a `None` value")
    memory_tasks.memory_job(conv, SUMMARY)
    assert not _queued(conv) and job().failures == 2 and "Panic" in (job().last_error or "")
    assert "given up until `mlchat memory retry`" in caplog.text
    with session_scope() as s:  # its mark long lapsed: the sweep never sends a job given up
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == conv).values(queued_until=func.now()))
    assert schedule_memory([conv]) == 0 and reschedule_stalled() == 0 and not _queued(conv)
    with session_scope() as s:  # a day on (review: given up for good), the next reply tries it again
        s.execute(
            update(MemoryJob)
            .where(MemoryJob.conversation_id == conv)
            .values(retry_after=func.now() - timedelta(seconds=1), queued_until=None)
        )
    assert schedule_memory([conv]) == 1
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    with session_scope() as s:
        s.execute(
            update(MemoryJob).where(MemoryJob.conversation_id == conv).values(failures=2, queued_until=None)
        )
    from memory.schedule import retry_given_up_jobs

    monkeypatch.setattr(summarize, "run_summary_job", original)
    retried = [(c, k) for c, k, _ in retry_given_up_jobs()]
    assert (conv, SUMMARY) in retried and len(_queued(conv)) == 1 and job().failures == 0
    assert run_summary_job(conv, generate=lambda system, body, max_tokens, alone: "They talked.") == 1


def test_a_memory_job_failing_for_a_database_away_or_a_deadlock_is_sent_again_uncounted(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in a deadlock review: a step whose database went away, or whose deadlock outlasted its
    tries, was counted as the job's failure: five in an outage of minutes gave the job up for a day,
    where a turn has its outage refunded. It is sent again after a delay, uncounted, up to
    MLCHAT_MAX_OUTAGE_REFUNDS in a row (review: unbounded, a deadlock every time regenerated for
    ever); past them it counts, and a stored step clears both counts."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from memory import summarize
    from tasks import memory as memory_tasks

    monkeypatch.setattr(settings, "memory_job_max_failures", 3)
    monkeypatch.setattr(settings, "max_outage_refunds", 4)
    conv = _conversation(80)
    causes = [
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
    ] * 3

    def database_away(system, body, max_tokens, alone):  # type: ignore[no-untyped-def]
        raise OperationalError("UPDATE memory_jobs …", {}, causes.pop(0))

    original = summarize.run_summary_job
    monkeypatch.setattr(
        summarize, "run_summary_job", lambda c, **kw: original(c, generate=database_away, **kw)
    )
    for n in range(1, 7):  # twice the failures that would give a job up, and past the refunds
        memory_tasks.memory_job(conv, SUMMARY)
        (headers,) = _queued(conv)
        assert headers["eta"] is not None  # sent again, after a delay
        redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
        with session_scope() as s:
            row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
            assert (row.failures, row.token, row.outage_retries) == (max(0, n - 4), None, n)
            s.execute(update(MemoryJob).where(MemoryJob.conversation_id == conv).values(retry_after=None))
    assert not causes
    # review: `mlchat memory retry` cleared the failures and left the outages, so the next blip counted
    from memory.schedule import retry_given_up_jobs

    with session_scope() as s:
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == conv).values(failures=3))
    assert (conv, SUMMARY) in [(c, k) for c, k, _ in retry_given_up_jobs()]
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    with session_scope() as s:
        row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (row.failures, row.outage_retries) == (0, 0)
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == conv).values(outage_retries=5))
    monkeypatch.setattr(summarize, "run_summary_job", original)
    assert run_summary_job(conv, generate=lambda system, body, max_tokens, alone: "They talked.") == 1
    with session_scope() as s:
        row = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (row.failures, row.outage_retries) == (0, 0)


def test_a_step_failing_after_another_claim_took_its_job_counts_no_failure_against_it(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a step's failure was recorded against whoever held the job by then. A claim
    whose lease lapsed while it generated, failing after another claim had taken the job and run it
    cleanly, counted a failure and backed the job off (given up for a day at the limit)."""
    from db.memory_jobs import claim_job, release_job
    from memory import summarize
    from tasks import memory as memory_tasks

    conv = _conversation(80)

    def taken_over_then_away(system, body, max_tokens, alone):  # type: ignore[no-untyped-def]
        with session_scope() as s:  # this claim's lease lapses; another worker claims and runs it
            s.execute(
                update(MemoryJob).where(MemoryJob.conversation_id == conv).values(lease_until=func.now())
            )
        with session_scope() as s:
            other = claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=600)
            assert other is not None
        with session_scope() as s:
            assert release_job(session=s, conversation_id=conv, kind=SUMMARY, token=other, ran=True)
        raise ConnectionError("the engine is away")

    original = summarize.run_summary_job
    monkeypatch.setattr(
        summarize, "run_summary_job", lambda c, **kw: original(c, generate=taken_over_then_away, **kw)
    )
    memory_tasks.memory_job(conv, SUMMARY)
    with session_scope() as s:
        job = s.scalars(select(MemoryJob).where(MemoryJob.conversation_id == conv)).one()
        assert (job.failures, job.retry_after, job.last_error) == (0, None, None)
    assert not _queued(conv)  # not sent again after a backoff either: the job is the other claim's


def test_a_memory_job_meeting_another_embedders_vectors_is_sent_on_uncounted_and_a_clean_step_clears_failures(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of the failures above: a worker still on the old embedder during a reembed's swap (its
    step raises EmbedderMismatch, by design left to a worker of the stored vectors' embedder) was
    counted a failure, five of them giving the job up; and a step that ran without raising but found
    nothing due left the count, so a later single failure gave the job up early."""
    from db.vector_space import EmbedderMismatch
    from memory import summarize
    from tasks import memory as memory_tasks

    conv = _conversation(80)
    real = summarize.run_summary_job

    def talked(system, body, max_tokens, alone):  # type: ignore[no-untyped-def]
        return "They talked."

    def swapped(c, **kw):  # type: ignore[no-untyped-def]
        raise EmbedderMismatch("the stored vectors moved to another embedder")

    monkeypatch.setattr(summarize, "run_summary_job", swapped)
    memory_tasks.memory_job(conv, SUMMARY)
    (headers,) = _queued(conv)
    assert headers["eta"] is not None  # sent on, for a worker whose embedder is the stored one
    with session_scope() as s:
        assert s.scalar(select(MemoryJob.failures).where(MemoryJob.conversation_id == conv)) in (None, 0)
        s.merge(MemoryJob(conversation_id=conv, kind=SUMMARY, failures=3))

    def failures() -> int:
        with session_scope() as s:
            return int(s.scalar(select(MemoryJob.failures).where(MemoryJob.conversation_id == conv)))

    # review: the embedder unavailable (a subclass of the swap's error) is a failure, counted
    from worker.embedder import EmbedderUnavailable

    def unavailable(c, **kw):  # type: ignore[no-untyped-def]
        raise EmbedderUnavailable("the embedder's weights are not on this machine")

    monkeypatch.setattr(summarize, "run_summary_job", unavailable)
    memory_tasks.memory_job(conv, SUMMARY)
    assert failures() == 4
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    with session_scope() as s:  # its backoff over, for the steps below
        s.execute(
            update(MemoryJob)
            .where(MemoryJob.conversation_id == conv)
            .values(failures=3, retry_after=None, queued_until=None)
        )
    # another worker holds the job (review: a step that never claimed it cleared the count)
    monkeypatch.setattr(summarize, "run_summary_job", lambda c, **kw: 0)
    memory_tasks.memory_job(conv, SUMMARY)
    assert failures() == 3
    # this worker's claim runs a step without raising (a summary stored): the failures in a row end
    monkeypatch.setattr(summarize, "run_summary_job", lambda c, **kw: real(c, generate=talked, **kw))
    memory_tasks.memory_job(conv, SUMMARY)
    assert failures() == 0


def test_an_imported_log_has_its_memory_jobs_sent_without_waiting_for_the_next_turn(
    summaries_due: None,
) -> None:
    """Found in review: `mlchat history import` scheduled no memory job, so the first turn after
    a long import was answered with none of the log's summaries or facts (the job was sent only
    when that turn's reply was stored). A log imported again, held already, sends nothing more."""
    from memory.history_import import import_history

    external = f"imp-{uuid.uuid4().hex[:10]}"
    log = json.dumps(
        [{"role": "user" if n % 2 else "assistant", "content": f"line {n} " + "x" * 400} for n in range(40)]
    )
    conv, first, last, _ = import_history(log, "openai", conversation=external, character="elara")
    assert (first, last) == (1, 40)
    assert len(_queued(conv)) == 1
    assert import_history(log, "openai", conversation=external, character="elara")[1:3] == (1, 0)
    assert len(_queued(conv)) == 1  # its message is still on the queue: none more
    # review: the first send lost (the broker away): importing the log again sends it
    redis.Redis.from_url(broker_url()).delete(QUIET_QUEUE)
    with session_scope() as s:
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == conv).values(queued_until=None))
    assert import_history(log, "openai", conversation=external, character="elara")[1:3] == (1, 0)
    assert len(_queued(conv)) == 1


def test_a_memory_job_of_a_conversation_erased_since_its_message_went_is_dropped_quietly(
    summaries_due: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a job's message still queued when its player was erased claimed a job row for
    a conversation that was gone, a foreign-key error logged as the job's failure, and the failure's
    own record failed the same way. The claim finds no conversation and the step is dropped."""
    import logging

    from db.models import Conversation
    from tasks import memory as memory_tasks

    conv = _conversation(80)
    with session_scope() as s:
        s.execute(delete(MemoryJob).where(MemoryJob.conversation_id == conv))
        s.execute(delete(Conversation).where(Conversation.id == conv))  # as an erasure's cascade leaves it
    with caplog.at_level(logging.WARNING, logger="tasks.memory"):
        assert memory_tasks._run_step(conv, SUMMARY) is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    with session_scope() as s:
        assert claim_job(session=s, conversation_id=conv, kind=SUMMARY, lease_s=60) is None
        assert s.scalar(select(func.count()).where(MemoryJob.conversation_id == conv)) == 0


def test_an_extractions_facts_are_embedded_before_its_store_holds_the_jobs_row(monkeypatch) -> None:
    """Found in a deadlock review: the facts were embedded inside the store's transaction, after it
    had updated the job's row: a desk change or an erasure waiting on that row waited for the
    embedder too, and each deadlock retry of the store embedded again. They are embedded first."""
    from db.memory_jobs import EXTRACT
    from db.models import MemoryJob
    from memory import extract
    from memory.extract import run_extract_job

    conv = _conversation(80)
    held: list[bool] = []
    real = extract.embed

    def watching(texts):  # type: ignore[no-untyped-def]
        with session_scope() as probe:
            free = probe.scalar(
                select(MemoryJob.conversation_id)
                .where(MemoryJob.conversation_id == conv, MemoryJob.kind == EXTRACT)
                .with_for_update(skip_locked=True)
            )
        held.append(free is None)
        return real(texts)

    def facts(system: str, body: str, max_tokens: int, schema: dict, alone: bool) -> str:
        told = {"subject": "Rowan", "kind": "player", "text": "Rowan keeps bees.", "importance": 5}
        return json.dumps({"facts": [told]})

    monkeypatch.setattr(extract, "embed", watching)
    assert run_extract_job(conv, generate=facts)["added"] == 1
    assert held == [False]


def test_a_shutdown_during_a_step_stays_a_shutdown_when_its_claim_cannot_be_given_back(monkeypatch) -> None:
    """Review: a shutdown (SystemExit) mid-step tried once to give the claim back, and a database
    away then raised its own error in the shutdown's place: the task took it for an outage and went on."""
    import uuid

    from memory import claim

    monkeypatch.setattr(claim, "_release", _refused)
    with pytest.raises(SystemExit), claim.released(1, SUMMARY, uuid.uuid4()):
        raise SystemExit(0)


def test_a_memory_job_goes_to_its_conversations_model_whoever_sends_it(
    summaries_due: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory review: a job sent by the API (a desk edit, an import) or the sweep went to the
    sender's model's lane, and each later step went on there: another model summarised the
    conversation, or none did (no worker of the sender's model)."""
    from db.models import Turn
    from services.producer import enqueue_turns
    from tasks import memory as memory_tasks

    lanes: list[str] = []
    monkeypatch.setattr(
        memory_tasks, "queue_for_model", lambda model, lane="live": lanes.append(model) or QUIET_QUEUE
    )
    external = f"sched-{uuid.uuid4().hex[:10]}"
    answered, alone = _conversation(80, external=external), _conversation(80)
    enqueue_turns([{"conversation": external, "message": "Hello?"}], send=False)
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.conversation_id == answered).values(model="eeve-10.8b"))
    monkeypatch.setattr(settings, "served_models", [settings.model, "eeve-10.8b"])
    assert schedule_memory([answered]) == 1 and lanes == ["eeve-10.8b"]
    assert schedule_memory([alone]) == 1 and lanes[-1] == settings.model  # no turns: the sender's
    # review: its newest turn's model, and never one no longer served (no worker reads its queue)
    with session_scope() as s:
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == answered).values(queued_until=None))
    enqueue_turns([{"conversation": external, "message": "Still there?"}], send=False)
    with session_scope() as s:  # the first turn's model retired since
        first = s.scalar(select(func.min(Turn.number)).where(Turn.conversation_id == answered))
        s.execute(
            update(Turn)
            .where(Turn.conversation_id == answered, Turn.number == first)
            .values(model="retired-x")
        )
        s.execute(
            update(Turn)
            .where(Turn.conversation_id == answered, Turn.number > first)
            .values(model="eeve-10.8b")
        )
    assert schedule_memory([answered]) == 1 and lanes[-1] == "eeve-10.8b"
    with session_scope() as s:
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == answered).values(queued_until=None))
        s.execute(update(Turn).where(Turn.conversation_id == answered).values(model="retired-x"))
    assert schedule_memory([answered]) == 1 and lanes[-1] == settings.model
    # review: with no MLCHAT_SERVED_MODELS, the served model is MLCHAT_MODEL alone
    monkeypatch.setattr(settings, "served_models", [])
    with session_scope() as s:
        s.execute(update(MemoryJob).where(MemoryJob.conversation_id == answered).values(queued_until=None))
        s.execute(update(Turn).where(Turn.conversation_id == answered).values(model="eeve-10.8b"))
    assert schedule_memory([answered]) == 1 and lanes[-1] == settings.model
