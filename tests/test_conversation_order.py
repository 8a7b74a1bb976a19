"""Order within a conversation, both ways, at the claim: two database sessions, no worker.

An earlier turn whose worker died still holds its conversation back (and is reported stalled, so it
is sent again and claimed first); an earlier turn that was never sent does not hold it back for
ever; a turn that waits backs off, and past the limit fails naming the turn it waited for.
"""

import time
import uuid

from sqlalchemy import update

from core.settings import settings
from db.models import Turn, TurnErrorCode, TurnStatus
from db.session import session_scope
from db.turns import claim_turns
from services.producer import enqueue_turns, get_turn
from tasks.generate import deferral_delay
from tests.conftest import new_conversation


def _conversation_turns(n: int = 2) -> list[uuid.UUID]:
    conversation = new_conversation()
    return enqueue_turns([conversation | {"message": f"Order check {i}."} for i in range(n)], send=False)


def _claim(ids, *, lease_s: float = 60.0, wait_limit_s: float | None = None):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return claim_turns(
            session=session, turn_ids=ids, lease_s=lease_s, max_attempts=3, wait_limit_s=wait_limit_s
        )


def test_an_earlier_turn_whose_lease_expired_still_blocks_and_is_claimed_first(world) -> None:
    earlier, later = _conversation_turns()
    assert [t.id for t in _claim([earlier], lease_s=0.2).claimed] == [earlier]
    time.sleep(0.4)  # its worker died: the lease ran out
    claim = _claim([later])
    assert claim.claimed == [] and set(claim.deferred) == {later}
    assert [s.id for s in claim.stalled] == [earlier]  # sent again now, so that a claim takes it first
    assert get_turn(later).status == TurnStatus.QUEUED
    assert [t.id for t in _claim([earlier]).claimed] == [earlier]


def test_an_earlier_turn_never_sent_does_not_hold_later_turns_back(world) -> None:
    earlier, later = _conversation_turns()
    with session_scope() as session:  # a run's line stored by a submission that died before sending it
        session.execute(update(Turn).where(Turn.id == earlier).values(dispatched_at=None))
    claim = _claim([later])
    assert [t.id for t in claim.claimed] == [later] and not claim.deferred


def test_a_deferred_turn_backs_off_and_fails_past_the_limit_naming_the_turn_it_waited_for(world) -> None:
    earlier, later = _conversation_turns()
    _claim([earlier])  # answered by a worker that takes its time
    assert _claim([later], wait_limit_s=0.5).deferred == {later: 1}
    assert _claim([later], wait_limit_s=0.5).deferred == {later: 2}
    delays = [deferral_delay(n) for n in (1, 2, 3, 40)]
    assert delays[:3] == [settings.flush_interval, 2 * settings.flush_interval, 4 * settings.flush_interval]
    assert delays[3] == settings.defer_max_delay_s
    time.sleep(0.6)
    claim = _claim([later], wait_limit_s=0.5)
    assert claim.claimed == [] and not claim.deferred and set(claim.blocked) == {later}
    view = get_turn(later)
    assert view.status == TurnStatus.FAILED
    assert view.error_code == TurnErrorCode.BLOCKED_BY_EARLIER_TURN
    assert str(earlier) in view.error and "running" in view.error
    assert get_turn(earlier).status == TurnStatus.RUNNING  # the earlier turn is untouched


def test_a_claimed_turn_starts_its_wait_afresh(world) -> None:
    earlier, later = _conversation_turns()
    held = _claim([earlier], lease_s=0.2)
    assert _claim([later], wait_limit_s=0.5).deferred == {later: 1}
    time.sleep(0.3)
    # The earlier turn's worker is gone: the later one waits on, and the earlier is claimed first.
    assert [s.id for s in _claim([later], wait_limit_s=30).stalled] == [earlier]
    again = _claim([earlier])
    assert [t.id for t in again.claimed] == [earlier] and again.token != held.token
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id == earlier).values(status=TurnStatus.DONE))
    claim = _claim([later], wait_limit_s=0.5)
    assert [t.id for t in claim.claimed] == [later]
    with session_scope() as session:
        row = session.get_one(Turn, later)
        assert row.deferrals == 0 and row.deferred_since is None
