"""The hot reads of the turns table use an index built for them, also in a prepared statement's
generic plan (psycopg prepares a statement run five times on a connection): each test captures the
statement the code sends and asks PostgreSQL for its plan, sequential scans off (the test tables are
small: the planner would rightly scan them)."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, text

from db.callbacks import claim_lost_callbacks
from db.models import Turn
from db.runs import iter_run_turns
from db.session import get_engine, session_scope
from db.turns import claim_turns
from services.producer import enqueue_turns
from tests.conftest import new_conversation


@contextmanager
def _sent(matching: Callable[[str], bool]) -> Iterator[list[tuple[str, Any]]]:
    """The (statement, parameters) this thread sends while the block runs, of those `matching` (the
    session's worker and its housekeeping send theirs on threads of their own)."""
    seen: list[tuple[str, Any]] = []
    here = threading.get_ident()

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() == here and matching(statement):
            seen.append((statement, parameters))

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _generic_plan(statement: str, parameters: Any, *settings_first: str) -> str:
    """PostgreSQL's generic plan of the statement (its parameters as $n, their values unknown)."""
    names: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        names.append(match[1])
        return f"${len(names)}"

    dollar = re.sub(r"%\((\w+)\)s", numbered, statement).replace("%%", "%")
    with session_scope() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        for setting in settings_first:
            session.execute(text(setting))
        plan = session.connection().exec_driver_sql(f"EXPLAIN (GENERIC_PLAN) {dollar}").scalars().all()
    return "\n".join(plan)


def _ordered_plan(statement: str, parameters: Any) -> str:
    """The statement's generic plan with sorting off as well: a Sort node left in it means no index
    can give the order (whichever the planner would pick on the table's statistics of the day)."""
    return _generic_plan(statement, parameters, "SET LOCAL enable_sort = off")


def _custom_plan(statement: str, parameters: Any) -> str:
    with session_scope() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = session.connection().exec_driver_sql(f"EXPLAIN {statement}", parameters).scalars().all()
    return "\n".join(plan)


def test_a_claims_look_for_an_earlier_unfinished_turn_reads_only_unfinished_ones(world) -> None:
    # found in review: it read every turn the conversation ever had (a live chat grows without end)
    import time

    conversation = new_conversation()
    earlier, later = enqueue_turns([conversation | {"message": f"Plan {i}."} for i in range(2)], send=False)
    with session_scope() as session:
        claim_turns(session=session, turn_ids=[earlier], lease_s=0.2, max_attempts=3)
    time.sleep(0.4)  # its worker died: the later turn waits on it, and the claim defers it (_defer)
    with _sent(lambda s: "number <" in s and "conversation_id" in s) as seen, session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[later], lease_s=60, max_attempts=3)
    assert set(claim.deferred) == {later} and [s.id for s in claim.stalled] == [earlier]
    assert len(seen) >= 2, "the claim's check and its deferral's look at the turn it waits on"
    with session_scope() as session:  # the planner's choice on the table as it is, not stale statistics
        session.execute(text("ANALYZE turns"))
    for statement, parameters in seen:
        plan = _generic_plan(statement, parameters)
        assert "ix_turns_conversation_unfinished" in plan, (statement, plan)


def test_a_runs_turns_are_paged_through_their_own_index(world) -> None:
    paging = _sent(lambda s: s.lstrip().startswith("SELECT") and "ORDER BY turns.number" in s)
    with paging as seen, session_scope() as session:
        list(iter_run_turns(session=session, run_id=uuid.uuid4()))
    assert seen
    for statement, parameters in seen:
        assert "ix_turns_run_id_number" in _custom_plan(statement, parameters)


def test_housekeepings_look_for_turn_callbacks_never_tried_reads_only_those(world) -> None:
    with _sent(lambda s: "callback_attempts" in s) as seen, session_scope() as session:
        claim_lost_callbacks(session=session, older_than_s=300, of=Turn)
    assert seen
    for statement, parameters in seen:
        assert "ix_turns_callback_unattempted" in _generic_plan(statement, parameters)


def test_housekeepings_looks_for_runs_read_them_by_status(world) -> None:
    # found in review: runs are kept for good, and each look read the whole table
    from db.runs import due_to_expire, finalizing_runs

    with _sent(lambda s: s.lstrip().startswith("SELECT runs.id")) as seen, session_scope() as session:
        due_to_expire(session=session, limit=10)
        finalizing_runs(session=session, limit=10)
    assert len(seen) == 2
    for statement, parameters in seen:
        assert "ix_runs_status_expires_at" in _generic_plan(statement, parameters), statement


def test_housekeepings_sweep_of_expired_files_reads_only_files_that_expire(world) -> None:
    # found in review: its coalesce(expires_at <= now(), false) hid the index from the planner, and
    # every worker read the whole files table every housekeeping interval
    from db.files import delete_expired

    with _sent(lambda s: s.lstrip().startswith("DELETE FROM files")) as seen, session_scope() as session:
        delete_expired(session=session, limit=1)
        session.rollback()
    assert seen
    for statement, parameters in seen:
        assert "ix_files_expires_at" in _generic_plan(statement, parameters)


def test_a_deferred_turns_look_at_its_blocker_reads_one_earlier_turn_not_all_of_them(world) -> None:
    """Found in review: the look joined every earlier unfinished turn of the conversation and then
    kept the first: a run of thousands of lines in one conversation read thousands of rows at every
    deferral of each line. It reads the first blocker alone (LATERAL, LIMIT 1)."""

    conversation = new_conversation()
    *earlier, later = enqueue_turns([conversation | {"message": f"Line {i}."} for i in range(30)], send=False)
    looks = _sent(lambda s: s.lstrip().startswith("SELECT") and "number <" in s and "conversation_id" in s)
    with looks as seen, session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[later], lease_s=60, max_attempts=3)
    assert set(claim.deferred) == {later} and seen
    for statement, parameters in seen:
        read = _rows_read(statement, parameters, alias="turns_1")  # the earlier turns
        assert read and sum(read) <= 1, (read, len(earlier))


def _rows_read(
    statement: str, parameters: Any, relation: str | None = None, alias: str | None = None
) -> list[float]:
    """The rows each scan of `relation` (or of the table under `alias`) read when the statement ran
    (EXPLAIN ANALYZE)."""
    import json

    with session_scope() as session:
        plan = (
            session.connection()
            .exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters)
            .scalar_one()
        )
    nodes, read = [json.loads(plan)[0]["Plan"] if isinstance(plan, str) else plan[0]["Plan"]], []
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if (relation is not None and node.get("Relation Name") == relation) or (
            alias is not None and node.get("Alias") == alias
        ):
            read.append(node["Actual Rows"] * node["Actual Loops"])
    return read


def test_a_replys_store_reads_one_line_of_its_conversation_for_the_next_line_number(world) -> None:
    """Found in review: the store took each conversation's last line number with max() under GROUP BY,
    which reads every line of the conversation: O(n) for each reply, O(n²) over a run's lines that
    share one conversation. One index probe per conversation now."""
    from sqlalchemy import insert

    from db.models import Message, Role
    from db.turns import store_replies
    from tests.outcomes import outcome_of

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Hello."}], send=False)
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        (turn,) = claim.claimed
        session.execute(
            insert(Message),
            [
                {
                    "conversation_id": turn.conversation_id,
                    "seq": i,
                    "role": Role.USER,
                    "content": f"Line {i}.",
                }
                for i in range(1, 201)
            ],
        )
    looks = _sent(lambda s: re.search(r"max\((messages|m)\.seq\)", s) is not None)
    with looks as seen, session_scope() as session:
        assert store_replies(session=session, token=claim.token, outcomes=[outcome_of(turn)]) == [turn_id]
    assert seen
    for statement, parameters in seen:
        read = _rows_read(statement, parameters, "messages")
        assert read and sum(read) <= 1, (statement, read)
    with session_scope() as session:
        seqs = session.scalars(
            text("SELECT seq FROM messages WHERE conversation_id = :c AND seq > 200 ORDER BY seq"),
            {"c": turn.conversation_id},
        ).all()
    assert seqs == [201, 202]


def test_seeding_a_conversations_history_reads_one_of_its_lines_to_know_it_has_some(world) -> None:
    """Found in review: a chat request naming a conversation counted all of its lines (under the
    conversation's lock, which a reply's store needs) only to see whether it had any."""
    from sqlalchemy import insert

    from db.models import Message, Role
    from db.world import append_history_if_empty

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Hello."}], send=False)
    with session_scope() as session:
        conversation_id = session.get(Turn, turn_id).conversation_id
        session.execute(
            insert(Message),
            [
                {"conversation_id": conversation_id, "seq": i, "role": Role.USER, "content": f"Line {i}."}
                for i in range(1, 201)
            ],
        )
    looks = _sent(lambda s: "FROM messages" in s)
    with looks as seen, session_scope() as session:
        stored = append_history_if_empty(
            session=session, conversation_id=conversation_id, lines=[("user", "Again.")], embeddings=None
        )
    assert stored == 0 and seen
    for statement, parameters in seen:
        read = _rows_read(statement, parameters, "messages")
        assert read and sum(read) <= 1, (statement, read)


def test_a_claim_reads_each_characters_card_and_lorebook_once_not_once_per_turn(world) -> None:
    """Found in review: the claim's rows each carried the speaker's card and lorebook (a book can run
    to megabytes), decoded once per turn of the batch inside the claim's transaction."""
    from sqlalchemy import event as sa_event

    conversation = new_conversation()
    ids = enqueue_turns(
        [
            new_conversation() | {"character": conversation["character"], "message": f"Hi {i}."}
            for i in range(8)
        ],
        send=False,
    )
    rows: list[int] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if re.search(r"characters(_\d+)?\.(card|lorebook)", statement):
            rows.append(cursor.rowcount)

    sa_event.listen(get_engine(), "after_cursor_execute", count)
    try:
        with session_scope() as session:
            claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
            claimed = {t.id: (t.character.card, t.character.lorebook) for t in claim.claimed}
    finally:
        sa_event.remove(get_engine(), "after_cursor_execute", count)
    assert sorted(claimed) == sorted(ids)
    with session_scope() as session:
        stored = session.execute(
            text("SELECT card, lorebook FROM characters WHERE slug = :slug"),
            {"slug": conversation["character"]},
        ).one()
    assert all(book == (stored.card, stored.lorebook) for book in claimed.values())
    assert rows and sum(rows) == 1, rows


def test_a_batch_enqueue_looks_for_group_conversations_once_not_once_per_line(world) -> None:
    """Found in review: each line of a batch enqueue (up to 1,000) looked up its conversation's scene
    on its own, inside the enqueue's transaction."""
    with _sent(lambda s: "FROM scenes" in s) as seen:
        ids = enqueue_turns([new_conversation() | {"message": f"Hi {i}."} for i in range(50)], send=False)
    assert len(ids) == 50
    assert len(seen) == 1, len(seen)


def test_a_groups_member_list_leaves_the_members_cards_and_lorebooks_out(world) -> None:
    """Found in review: the member list (read at each player line and scene step) brought each
    member's card and lorebook through the member's eager character, for the slug and name alone."""
    from db.scenes import members_of

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Hello."}], send=False)
    with session_scope() as session:
        conversation_id = session.get(Turn, turn_id).conversation_id
    with _sent(lambda s: "conversation_members" in s) as seen, session_scope() as session:
        members_of(session=session, conversation_id=conversation_id)
    assert seen
    assert not [s for s, _ in seen if re.search(r"\.(card|lorebook)\b", s)]


def test_a_scene_steps_claim_reads_one_line_of_each_scene_for_the_line_it_answers(world) -> None:
    """Found in review: a claim found the line each scene step answers with DISTINCT ON over every
    line of the batch's scenes, sorted with their text: O(n) at each step, O(n²) over a long scene."""
    from sqlalchemy import insert

    from db.models import Message, Role
    from tests.test_scenes import _answer, _new_run, _open_step, _scene, _scene_id

    run_id = _new_run({"north": _scene(exchanges=4), "south": _scene(exchanges=4)})
    steps = []
    for name in ("north", "south"):
        scene_id = _scene_id(run_id, name)
        _answer(_open_step(scene_id), f"{name} line 1")
        steps.append(_open_step(scene_id))
    with session_scope() as session:
        for name, step in zip(("north", "south"), steps, strict=True):
            conversation_id, last = session.execute(
                text(
                    "SELECT t.conversation_id, max(m.seq) FROM turns t JOIN messages m"
                    " ON m.conversation_id = t.conversation_id WHERE t.id = :t GROUP BY t.conversation_id"
                ),
                {"t": step},
            ).one()
            session.execute(
                insert(Message),
                [
                    {
                        "conversation_id": conversation_id,
                        "seq": last + i,
                        "role": Role.ASSISTANT,
                        "content": f"{name} aside {i}.",
                    }
                    for i in range(1, 201)
                ],
            )
    with _sent(lambda s: "FROM messages" in s and "DESC" in s) as seen, session_scope() as session:
        claim = claim_turns(session=session, turn_ids=steps, lease_s=60, max_attempts=3)
    assert sorted(t.query for t in claim.claimed) == [
        "north aside 200.",
        "south aside 200.",
    ]  # the newest lines
    assert seen
    for statement, parameters in seen:
        read = _rows_read(statement, parameters, "messages")
        assert read and sum(read) <= 2, (statement, read)  # one line of each scene


def test_a_conversations_summaries_are_read_without_the_ones_merged_into_others(world) -> None:
    """Found in review: the summaries a prompt shows (those not merged into another) and the last
    line they cover were found by reading every summary of the conversation, merged ones included:
    thousands in a long conversation, read at every turn to keep a dozen."""
    from db.models import Summary
    from db.summaries import conversations_due, summaries_for

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Hello."}], send=False)
    with session_scope() as session:
        conv = session.get(Turn, turn_id).conversation_id
        tops = [
            Summary(conversation_id=conv, level=1, first_seq=1 + 40 * i, last_seq=40 * (i + 1), text="t")
            for i in range(3)
        ]
        session.add_all(tops)
        session.flush()
        session.add_all(
            Summary(
                conversation_id=conv,
                level=0,
                first_seq=1 + 4 * i,
                last_seq=4 * (i + 1),
                text="p",
                merged_into=tops[i // 10].id,
            )
            for i in range(30)
        )
    with _sent(lambda s: "FROM summaries" in s) as seen, session_scope() as session:
        shown = summaries_for(session=session, conversation_ids=[conv])[conv]
        conversations_due(
            session=session, conversation_ids=[conv], recent_n=12, threshold_tokens=1000, fanout=4
        )
    assert [s.level for s in shown] == [1, 1, 1]
    assert len(seen) == 2
    for statement, parameters in seen:
        read = _rows_read(statement, parameters, "summaries")
        assert read and sum(read) <= 3 * 2, (statement, read)  # the unmerged three, at most twice


def test_a_tenants_runs_and_batches_are_listed_newest_first_through_their_index(world) -> None:
    # found in review: no index served the order, so every page sorted every run of the table
    from services.batches import list_batches
    from services.desk import Reviewer, RunsAt, list_runs

    def listing(s: str) -> bool:
        return s.lstrip().startswith("SELECT") and "ORDER BY runs.created_at" in s

    somewhere = RunsAt(datetime.now(UTC), uuid.uuid4())  # a page past a run, either way (the desk's)
    with _sent(listing) as seen:
        for who in (
            Reviewer(key_id="k", tenant="plans", admin=False),
            Reviewer(key_id="a", tenant="", admin=True),
        ):
            list_runs(who)
            list_runs(who, older_than=somewhere)
            list_runs(who, newer_than=somewhere)  # and the newest page, as no newer run fills one
        list_batches(api_key="k", admin=False, after=None, limit=5, tenant="plans")
        list_batches(api_key=None, admin=True, after=None, limit=5)
    admin = [(statement, parameters) for statement, parameters in seen if "runs.tenant =" not in statement]
    assert len(seen) == 10 and len(admin) == 5
    with session_scope() as session:
        session.execute(text("ANALYZE runs"))
    # An index can give the order, no sort of every run (which one the planner picks, and whether it
    # sorts a few rows instead, is its choice on the table's statistics: asked with sorting off).
    # (review: named, not "ix_runs_", which another index of runs matches too)
    for statement, parameters in seen:
        plan = _ordered_plan(statement, parameters)
        indexes = ["ix_runs_created_at"] + (
            [] if (statement, parameters) in admin else ["ix_runs_tenant_created_at"]
        )
        assert any(f"using {index} on runs" in plan for index in indexes) and "Sort" not in plan, (
            statement,
            plan,
        )


def test_a_runs_scenes_are_paged_in_custom_id_order_through_their_index(world) -> None:
    # found in review: each page (the desk's, the scene export's) sorted every scene of the run
    from db.scenes import run_scenes

    paging = _sent(lambda s: s.lstrip().startswith("SELECT") and "FROM scenes" in s and "ORDER BY" in s)
    with paging as seen, session_scope() as session:
        run_scenes(session=session, run_id=uuid.uuid4(), limit=51)
        run_scenes(session=session, run_id=uuid.uuid4(), after=("scene-7", 12), limit=100)
    assert len(seen) == 2
    for statement, parameters in seen:  # the generic plan: psycopg prepares a statement run 5 times
        plan = _ordered_plan(statement, parameters)
        assert "ix_scenes_run_custom_id_order" in plan and "Sort" not in plan, (statement, plan)


def test_a_turn_read_by_an_ingest_key_does_not_read_its_prompt_or_context(world) -> None:
    # found in review: every read (a long poll's once a second) read the prompt and retrieved context,
    # tens of KB stored out of line, for a caller who is never shown them
    from api.deps import Caller
    from api.routes.turns import visible_turn

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Read me."}], send=False)

    def reads():  # type: ignore[no-untyped-def]
        return _sent(lambda s: s.lstrip().startswith("SELECT") and "FROM turns" in s)

    with reads() as seen:
        ingest = visible_turn(turn_id, Caller("k", frozenset({"ingest"}), ""))
    assert seen and not any("turns.prompt" in s or "turns.context" in s for s, _ in seen)
    assert ingest.id == turn_id and ingest.prompt is None and ingest.context is None
    with reads() as seen:
        admin = visible_turn(turn_id, Caller("a", frozenset({"admin"}), ""))
    assert any("turns.prompt" in s for s, _ in seen) and admin.id == turn_id


def test_a_batch_is_counted_from_the_index_of_turns_by_run_and_status_alone(world) -> None:
    # found in review: the count asked which queued turns were sent, in the row only: every poll of a
    # batch (its GET, each page of the list, the desk's row) read every row of its turns, a
    # million-line batch's too
    from services.batches import get_batch, list_batches
    from services.desk import Reviewer, run_summary
    from tests.desk_data import Spec, quality, queue_run

    key, tenant = "plans-key", f"plans-{uuid.uuid4().hex[:6]}"
    name = f"batch_{uuid.uuid4().hex}"
    run_id, _ = queue_run(tenant, [Spec("Count me.", "Counted.", quality(0.5))], name, batch_key=key)
    with session_scope() as session:  # the planner's choice on the table as it is
        session.execute(text("ANALYZE turns"))
    counting = _sent(lambda s: "GROUP BY turns.run_id, turns.status" in s)
    asking_sent = _sent(lambda s: "dispatched_at" in s and "FROM turns" in s)
    with counting as seen, asking_sent as sent:
        get_batch(name, api_key=key, admin=False, tenant=tenant)
        list_batches(api_key=key, admin=False, after=None, limit=5, tenant=tenant)
        run_summary(Reviewer(key_id=key, tenant=tenant, admin=False), run_id)  # the desk's row, every 2 s
    assert len(seen) == 3 and not sent
    for statement, parameters in seen:
        plan = _custom_plan(statement, parameters)
        assert "Index Only Scan using ix_turns_run_status_id" in plan, (statement, plan)


def test_a_cancel_of_a_run_just_stored_reads_its_turns_a_bounded_number_of_times(world) -> None:
    """Found running the bench: a cancel locked the run's turns in id order inside its UPDATE
    (`id IN (SELECT … ORDER BY id FOR NO KEY UPDATE)`), and the planner, taking the rows of a run
    just stored for a handful, joined the two in a nested loop that ran the locking subquery again for
    every row: a 100,000-line run's cancel ran for more than ten minutes. The turns are locked by a
    statement of their own now, and each statement's nodes handle each of them a few times."""
    import json

    from sqlalchemy.orm import Session

    from db.runs import cancel_run
    from tests.desk_data import Spec, quality, queue_run

    lines = 1500
    run_id, _ = queue_run(
        f"cancel-{uuid.uuid4().hex[:6]}", [Spec(f"Line {i}.", "", quality(0.5)) for i in range(lines)]
    )
    run_wide = _sent(
        lambda s: (
            "FROM turns" in s and "run_id" in s and "FOR NO KEY UPDATE" in s or s.startswith("UPDATE turns")
        )
    )
    with run_wide as seen, Session(get_engine()) as session:
        cancel_run(session=session, run_id=run_id)
        session.rollback()  # the cancel's statements only: each is measured below, rolled back too
    assert seen
    for statement, parameters in seen:
        with get_engine().connect() as conn:
            # The join the planner picks for rows it has no statistics for (seen in the bench): each
            # statement must stay linear whatever join it is given, and one with no join does.
            conn.exec_driver_sql("SET LOCAL enable_hashjoin = off")
            conn.exec_driver_sql("SET LOCAL enable_mergejoin = off")
            plan = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
            ).scalar_one()
            conn.rollback()
        nodes, read = [(json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]], 0.0
        while nodes:
            node = nodes.pop()
            nodes += node.get("Plans", [])
            read += node["Actual Rows"] * node["Actual Loops"]  # a rescanned inner side's too
        assert read <= 10 * lines, (read, statement)


def test_a_sweeps_look_for_lost_live_turns_reads_that_models_live_ones_not_every_bulk_line(world) -> None:
    """Review at fleet scale: the look for a model's stranded live turns had only the index of every
    unfinished turn, checking model and lane row by row: a player's lost turn was found after reading
    every bulk line still waiting (a large batch's backlog, each sweep). Migration 0052."""
    from services.sweeper import resend_stranded

    model = f"plans-{uuid.uuid4().hex[:6]}"
    live = _sent(lambda s: "ORDER BY turns.number" in s and "turns.run_id IS NOT NULL" not in s)
    with live as seen:
        resend_stranded(older_than_s=3600, models=[model])
    assert seen
    with session_scope() as session:  # the planner's choice on the table as it is
        session.execute(text("ANALYZE turns"))
    for statement, parameters in seen:  # a sweep's process is short-lived: never a generic plan
        plan = _custom_plan(statement, parameters)
        assert "ix_turns_live_unfinished" in plan, (statement, plan)


def test_a_keys_files_are_listed_and_summed_through_their_own_index(world) -> None:
    """Review at fleet scale: `files` had its primary key and the expiry index alone, and the owner
    was compared with IS NOT DISTINCT FROM, which no btree serves: each listing read and sorted every
    key's files, each upload summed them all under the key's quota lock. Migration 0053."""
    from db.files import list_files, stored_bytes

    key, tenant = "plans-key", f"plans-{uuid.uuid4().hex[:6]}"
    with _sent(lambda s: "FROM files" in s) as seen, session_scope() as session:
        list_files(
            session=session, owner=(key, tenant), purpose="batch", after=None, limit=10, newest_first=True
        )
        stored_bytes(session=session, api_key=key, tenant=tenant)
    assert len(seen) == 2
    for statement, parameters in seen:
        plan = _ordered_plan(statement, parameters)
        assert "ix_files_owner_created" in plan and "Sort" not in plan, (statement, plan)
