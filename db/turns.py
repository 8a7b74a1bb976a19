"""The turn state machine, and every query on turns. Each transition is one conditional UPDATE:

    create                      → queued
    claim     queued, or running with an expired lease → running (new token and lease, attempts + 1)
    exhaust   claimable with no attempts left          → failed (attempts_exhausted)
    defer     claimable behind an earlier open turn    → deferrals + 1, or, that turn stalled past
                                                         the wait limit → failed (blocked_by_earlier_turn)
    renew     running under our token                  → lease extended
    complete  running under our token                  → done (the reply stored once)
    fail      running under our token                  → failed
    requeue   running under our token                  → queued (the attempt kept, or refunded)
    engine death  running under our token              → queued (attempt refunded, engine_deaths + 1
                  for those inside the engine), or failed (engine_crash_loop) at max_engine_deaths
    cancel    queued                                   → cancelled (also at claim: a scene step
                                                         whose scene closed or whose run is stopping)
    fail_unsent / revive_unsent: queued ↔ failed(broker_unreachable), for turns never sent (or sent
      without a client's key in a call whose other messages could not be, and not taken yet)

A worker that lost its lease (it ran past lease_until and another worker claimed the turn) changes
nothing: every write after the claim names the claim token. A transition that finishes turns of a
bulk run advances that run in the same transaction (db/runs.py), so a run's status never lags its
turns and is never written from a read path.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased, defer, lazyload, undefer
from sqlalchemy.orm.attributes import set_committed_value

from db.models import (
    TURN_FINISHED,
    TURN_UNFINISHED,
    Character,
    Conversation,
    ConversationMember,
    Message,
    Role,
    Run,
    RunStatus,
    Scene,
    SceneStatus,
    Turn,
    TurnErrorCode,
    TurnStatus,
)
from db.params import any_of
from db.runs import CANCEL_CLEARS, EXPIRED_TURN, advance_runs_of_turns, expired_turn_error, locked_in_id_order
from db.scenes import GroupView, group_views, run_stopped
from db.turn_leases import claimable, lease_live
from db.vectors import binary_vector_param
from roleplay.mood import AFFINITY_MAX, AFFINITY_MIN

ERROR_CHARS = 2000


class IdempotencyConflict(ValueError):
    """An idempotency key was reused for a different request."""


@dataclass(frozen=True)
class NewTurn:
    """A validated turn ready to insert."""

    idempotency_key: str
    request_hash: str
    conversation_id: int
    message: str
    model: str
    params: dict[str, Any]
    run_id: uuid.UUID | None = None
    custom_id: str | None = None
    speaker: str = "character"
    api_key: str | None = None
    tenant: str = ""  # the caller's tenant ('' for the CLI and the Python API)
    callback_url: str | None = None
    character_id: int | None = None  # a group conversation's member who answers
    # The request's fingerprint as a release before this one computed it, also taken as the same
    # request (a retry across an upgrade).
    legacy_hashes: tuple[str, ...] = ()  # what earlier releases stored for the same request


NOT_STORED = frozenset({"legacy_hashes"})  # NewTurn's fields that are no column of turns


@dataclass(frozen=True)
class StoredTurn:
    """What create_turns did with one request: a new turn, or the turn its idempotency key names."""

    id: uuid.UUID
    created: bool
    status: TurnStatus
    model: str
    error_code: str | None = None
    # Its message is still to be sent: new, revived after a failed send, or committed with its
    # reply lost (the producer sets the last two). A plain replay's turn was sent when it was made.
    unsent: bool = False
    attempts: int = 0  # claims it has had: a queued turn with none may have lost its message
    # its `dispatched_at` as this request stored or read it: a failing send of it fails it only if
    # nothing sent it again since (fail_unsent)
    sent_at: datetime | None = None


@dataclass(frozen=True)
class ClaimedTurn:
    """Everything the pipeline needs about one turn, read in the claim's single query."""

    id: uuid.UUID
    conversation_id: int
    message: str
    params: dict[str, Any]
    attempts: int
    character: Character
    player_name: str
    story: str | None
    story_time: int | None
    queued_ms: float
    speaker: str = "character"
    emotion: str = "neutral"
    affinity: int = 0
    run_id: uuid.UUID | None = None
    engine_deaths: int = 0
    engine_deaths_seen: int = 0
    # A group conversation's turn: who is present (its `character` is the member who speaks).
    group: GroupView | None = None
    # What retrieval searches with: the message, or for a scene step (no player line) the newest line.
    query: str = ""
    # A group member's affinity toward each other member (by character id), and, for a scene step
    # answering another member's line, that member (id, name): the line moves the regard toward them.
    regard: dict[int, int] = field(default_factory=dict)
    answers: tuple[int, str] | None = None
    # False for a scene step whose newest line is not the player's (the narrator's, its own): the
    # player said nothing, so the affinity toward the player stays.
    player_spoke: bool = True
    callback: bool = False  # it has a callback_url (POSTed its outcome once finished)
    last_error: str | None = None  # why its last attempt came back, if one did (the stored error)
    claims: int = 0  # this claim's rank in its stream: above every earlier claim's (turns.claims)
    tenant: str = ""  # whose turn (a character's adapter trained on one tenant's dialogue answers it alone)


@dataclass(frozen=True)
class StalledTurn:
    """An earlier turn that blocks a deferred one while nobody answers it: running under an expired
    lease (its worker is presumed gone), stamped sent by the claim that found it. Sending it again
    now lets the next claim take it first."""

    id: uuid.UUID
    model: str
    run_id: uuid.UUID | None


@dataclass
class ClaimResult:
    """The claim's outcome for each turn id of a batch."""

    token: uuid.UUID
    claimed: list[ClaimedTurn] = field(default_factory=list)
    # An earlier turn of its conversation is unfinished: {turn id: times it has been deferred so far}.
    deferred: dict[uuid.UUID, int] = field(default_factory=dict)
    stalled: list[StalledTurn] = field(default_factory=list)
    # Failed now: waited past the limit for an earlier turn ({turn id: the reason, naming that turn}).
    blocked: dict[uuid.UUID, str] = field(default_factory=dict)
    # Running under another worker's live lease (a duplicate message): {turn id: seconds the lease has left}.
    held: dict[uuid.UUID, float] = field(default_factory=dict)
    skipped: list[uuid.UUID] = field(default_factory=list)  # done, failed, cancelled or unknown
    exhausted: list[uuid.UUID] = field(default_factory=list)  # failed now: no attempts left
    # Finished by the claim (failed or cancelled) and streamed: no worker writes their stream's end.
    streams_ended: list[uuid.UUID] = field(default_factory=list)
    # Of another model than the claim's: stamped sent, for their own model's queue.
    elsewhere: list[StalledTurn] = field(default_factory=list)


def _seconds(value: float) -> Any:
    return func.make_interval(0, 0, 0, 0, 0, 0, value)


def _blocks_later_turns(turn: Any) -> Any:
    """An earlier turn holds its conversation's later ones back while it may still be answered:
    running (under any lease: one that expired is re-sent and claimed first), or queued, unless it
    was never sent and its run's submission is over (failed): nothing will send it then. A run's
    line stored and not yet stamped sent does block: its submission sends the chunk before
    stamping it, so its message may be out already."""
    # The statuses as literals, not parameters: a prepared statement's generic plan can then use the
    # partial index of unfinished turns (ix_turns_conversation_unfinished), as a custom plan does.
    return or_(
        turn.status == literal_column(f"'{TurnStatus.RUNNING.value}'"),
        and_(
            turn.status == literal_column(f"'{TurnStatus.QUEUED.value}'"),
            or_(
                turn.dispatched_at.is_not(None),
                ~exists().where(Run.id == turn.run_id, Run.status == RunStatus.FAILED),
            ),
        ),
    )


def _lapsed(turn: Any) -> Any:
    """When the running turn's lease expired (a turn from before leases: when it started)."""
    return func.coalesce(turn.lease_until, turn.started_at)


_RESEND_LOCK_NAMESPACE = 0x6D6C7273  # "mlrs"


@contextmanager
def resend_lock() -> Iterator[bool]:
    """Hold the deployment's one re-send of stranded turns for the block; yields False (holding
    nothing) when another sweep holds it: two at once (cron beside compose's loop, an operator's
    `mlchat sweep`) each read the queues and the turns before the other's sends and stamps, and sent
    every stranded turn twice."""
    from db.advisory_locks import advisory_lock

    with advisory_lock(_RESEND_LOCK_NAMESPACE, 0) as holder:
        yield holder is not None


def lapsed_and_unsent(turn: Any) -> Any:
    """Running under an expired lease with no message sent for it since the lease expired: nobody
    is answering it and nothing will bring it to a worker."""
    return and_(
        turn.status == TurnStatus.RUNNING,
        _lapsed(turn) <= func.now(),
        or_(turn.dispatched_at.is_(None), turn.dispatched_at < _lapsed(turn)),
    )


def _stalled(turn: Any) -> Any:
    """A blocking turn that is not progressing: queued and never sent, or running under an expired
    lease with no message out for it since. One running under a live lease, or queued with a message
    out (behind however long a backlog; a lost message is the sweeper's to recover), is progressing."""
    return or_(and_(turn.status == TurnStatus.QUEUED, turn.dispatched_at.is_(None)), lapsed_and_unsent(turn))


def claimable_before(*, session: Session, turn_ids: Sequence[uuid.UUID], model: str) -> list[uuid.UUID]:
    """The earlier turns of these turns' conversations, for `model`, that block them and that a
    claim can take now (queued, or running under an expired lease), oldest first: what answering in
    this process, with no worker to send them (worker/inline.py), has to answer first."""
    later = aliased(Turn)
    rows = session.execute(
        select(Turn.id, Turn.conversation_id, Turn.number)
        .join(later, and_(later.conversation_id == Turn.conversation_id, later.number > Turn.number))
        .where(
            later.id.in_(list(turn_ids)),
            ~Turn.id.in_(list(turn_ids)),
            Turn.model == model,
            _blocks_later_turns(Turn),
            claimable(),
        )
        .distinct()
        .order_by(Turn.conversation_id, Turn.number)
    ).all()
    return [turn_id for turn_id, _, _ in rows]


def running_elsewhere(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> bool:
    """Whether a turn of these turns' conversations (one of them, or one they wait behind) runs under
    a live lease: another caller is answering it, and will finish it or let its lease lapse."""
    conversations = select(Turn.conversation_id).where(Turn.id.in_(list(turn_ids)))
    return bool(
        session.scalar(
            select(
                exists().where(
                    Turn.conversation_id.in_(conversations), Turn.status == TurnStatus.RUNNING, lease_live()
                )
            )
        )
    )


def _ours(token: uuid.UUID) -> Any:
    return and_(Turn.status == TurnStatus.RUNNING, Turn.claim_token == token)


def _by_id(values: dict[uuid.UUID, Any]) -> Any:
    """A per-row value in one UPDATE (CASE on the turn id)."""
    return case({turn_id: value for turn_id, value in values.items()}, value=Turn.id)


class IdempotencyRace(RuntimeError):
    """A key the insert found taken whose turn was gone when read back: an erasure deleted it between
    the two statements. The transaction is run again (the key is free then); never a 500."""


def create_turns(*, session: Session, turns: Sequence[NewTurn]) -> list[StoredTurn]:
    """Insert turns, deduplicating on (tenant, idempotency key); one StoredTurn per request, in input order.

    Two requests of one call with the same key are one turn (created once, sent once) when they ask
    the same thing, and an IdempotencyConflict naming both items when they do not. Another tenant's
    turn of the same key is never seen. New turns are stamped dispatched now: the caller sends them
    right after the commit.
    """
    if not turns:
        return []
    first: dict[tuple[str, str], int] = {}
    for i, t in enumerate(turns):
        j = first.setdefault((t.tenant, t.idempotency_key), i)
        if turns[j].request_hash != t.request_hash:
            raise IdempotencyConflict(
                f"items {j} and {i} use idempotency key {t.idempotency_key!r} for different requests"
            )
    unique = [turns[i] for i in first.values()]
    stored = [{k: v for k, v in t.__dict__.items() if k not in NOT_STORED} for t in unique]
    rows = [dict(id=uuid.uuid4(), **fields) for fields in stored]
    stmt = (
        insert(Turn)
        # The database's clock, as every lease and sweep compares it with: an API host's clock ahead
        # of it hid a dead worker's turn as "sent after its claim" from the sweeper for an hour.
        .values(dispatched_at=func.now())
        .on_conflict_do_nothing(index_elements=[Turn.tenant, Turn.idempotency_key])
        .returning(Turn.tenant, Turn.idempotency_key, Turn.id, Turn.dispatched_at)
    )
    created: dict[tuple[str, str], tuple[uuid.UUID, datetime | None]] = {
        (tenant, key): (turn_id, sent_at)
        for tenant, key, turn_id, sent_at in session.execute(stmt, rows).tuples()
    }
    repeated = [(t.tenant, t.idempotency_key) for t in unique if (t.tenant, t.idempotency_key) not in created]
    known = (
        {
            (tenant, key): (request_hash, turn_id, status, model, code, attempts, sent_at)
            for tenant, key, request_hash, turn_id, status, model, code, attempts, sent_at in session.execute(
                select(
                    Turn.tenant,
                    Turn.idempotency_key,
                    Turn.request_hash,
                    Turn.id,
                    Turn.status,
                    Turn.model,
                    Turn.error_code,
                    Turn.attempts,
                    Turn.dispatched_at,
                ).where(tuple_(Turn.tenant, Turn.idempotency_key).in_(repeated))
            ).tuples()
        }
        if repeated
        else {}
    )
    out: list[StoredTurn] = []
    for i, t in enumerate(turns):
        key = (t.tenant, t.idempotency_key)
        if key in created:
            new = first[key] == i
            turn_id, sent_at = created[key]
            out.append(StoredTurn(turn_id, new, TurnStatus.QUEUED, t.model, unsent=new, sent_at=sent_at))
            continue
        if key not in known:  # taken at the insert, gone at the read (a player's erasure between)
            raise IdempotencyRace(
                f"idempotency key {t.idempotency_key!r}: its turn was removed while this request was "
                "stored; run again"
            )
        request_hash, turn_id, status, model, code, attempts, sent_at = known[key]
        if request_hash not in (t.request_hash, *t.legacy_hashes):
            raise IdempotencyConflict(
                f"idempotency key {t.idempotency_key!r} was already used for a different request"
            )
        out.append(
            StoredTurn(turn_id, False, TurnStatus(status), model, code, attempts=attempts, sent_at=sent_at)
        )
    return out


def stored_request_hashes(*, session: Session, tenant: str, keys: Sequence[str]) -> dict[str, str]:
    """The request fingerprints of the tenant's stored turns under these idempotency keys, by key."""
    if not keys:
        return {}
    rows = session.execute(
        select(Turn.idempotency_key, Turn.request_hash).where(
            Turn.tenant == tenant, Turn.idempotency_key.in_(list(keys))
        )
    ).tuples()
    return {key: digest for key, digest in rows if key is not None and digest is not None}


def keyed_turn(*, session: Session, tenant: str, key: str, request_hashes: set[str]) -> uuid.UUID | None:
    """The stored turn the tenant's idempotency key names (None: none yet); IdempotencyConflict when
    it was asked with another request (none of `request_hashes`, this request's fingerprints)."""
    stored = session.execute(
        select(Turn.id, Turn.request_hash).where(Turn.tenant == tenant, Turn.idempotency_key == key)
    ).first()
    if stored is None:
        return None
    if stored.request_hash not in request_hashes:
        raise IdempotencyConflict(f"idempotency key {key!r} was already used for a different request")
    return stored.id


def claim_turns(
    *,
    session: Session,
    turn_ids: Sequence[uuid.UUID],
    lease_s: float,
    max_attempts: int,
    token: uuid.UUID | None = None,
    wait_limit_s: float | None = None,
    models: Collection[str] | None = None,
) -> ClaimResult:
    """Take the batch's claimable turns under one claim token and a lease of `lease_s` seconds.

    With `models` (the names the worker's weights answer), a claimable turn of another model is not
    taken: it is stamped sent and reported in `elsewhere`, for its own model's queue (a worker given
    another model's queue, by Celery's `add_consumer` say, answered that model's turns with its own
    weights, stored under the model asked for; review).

    Claimable: queued, or running under a lease that has expired (its worker is presumed gone). A
    turn running under a live lease is another worker's: it is reported `held`, never generated
    twice. A claimable turn that has used up `max_attempts` is failed here instead (the dead-letter
    state), so a message that keeps coming back, because its batch keeps dying, cannot loop forever.
    A turn is deferred while an earlier turn of its conversation may still be answered (see
    _blocks_later_turns), so a conversation's turns are answered in order and each sees the
    previous reply; an earlier turn whose lease expired is reported `stalled` (once: it is stamped
    sent), to be sent again and claimed first. A turn whose earlier turn stays stalled (never sent,
    or under an expired lease with no message out) for longer than `wait_limit_s` fails instead,
    naming that turn; one behind a turn that is progressing waits as long as that takes.
    """
    result = ClaimResult(token=token or uuid.uuid4())
    earlier = aliased(Turn)
    blocked = exists().where(
        earlier.conversation_id == Turn.conversation_id,
        earlier.number < Turn.number,
        _blocks_later_turns(earlier),
    )
    # Row locks in one order, skipping rows another claim or write holds right now: two workers
    # with the same turn ids (a duplicate message) never wait on each other or deadlock.
    ours = Turn.model.in_(list(models)) if models is not None else true()
    candidates = list(
        session.scalars(
            select(Turn.id)
            .where(Turn.id.in_(list(turn_ids)), claimable(), ours)
            .order_by(Turn.id)
            .with_for_update(skip_locked=True)
        ).all()
    )
    if models is not None:
        theirs = session.execute(
            select(Turn.id, Turn.model, Turn.run_id).where(Turn.id.in_(list(turn_ids)), claimable(), ~ours)
        ).all()
        if theirs:
            mark_dispatched(session=session, turn_ids=[t.id for t in theirs])
            result.elsewhere = [StalledTurn(t.id, t.model, t.run_id) for t in theirs]
    # A stopped run's turn is cancelled first, at its attempt cap too (exported as its run's end, not
    # as a server error).
    stopped = _cancel_stopped(session, candidates)
    candidates = [i for i in candidates if i not in set(stopped)]
    result.exhausted = (
        list(
            session.scalars(
                update(Turn)
                .where(Turn.id.in_(candidates), Turn.attempts >= max_attempts)
                .values(
                    status=TurnStatus.FAILED,
                    error_code=TurnErrorCode.ATTEMPTS_EXHAUSTED.value,
                    error=func.concat(
                        f"gave up after {max_attempts} attempts; last error: ",
                        func.coalesce(Turn.error, "the batch died"),
                    ),
                    finished_at=func.now(),
                    lease_until=None,
                )
                .returning(Turn.id)
            ).all()
        )
        if candidates
        else []
    )
    fresh = [i for i in candidates if i not in set(result.exhausted)]
    claimed_ids = (
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(fresh), ~blocked)
            .values(
                status=TurnStatus.RUNNING,
                attempts=Turn.attempts + 1,
                # never back, and past the attempts a claim of before migration 0039 ranked by
                claims=func.greatest(Turn.claims, Turn.attempts + 1) + 1,
                started_at=func.now(),
                claim_token=result.token,
                lease_until=func.now() + _seconds(lease_s),
                deferred_since=None,
                deferrals=0,
            )
            .returning(Turn.id)
        ).all()
        if fresh
        else []
    )
    waiting = [i for i in fresh if i not in set(claimed_ids)]
    if waiting:
        _defer(session=session, turn_ids=waiting, wait_limit_s=wait_limit_s, result=result)
    if claimed_ids:
        # A group's turn speaks as its member (its own mood); any other as the conversation's character.
        speaker_id = func.coalesce(Turn.character_id, Conversation.character_id)
        rows = session.execute(
            select(
                Turn,
                Conversation,
                Character,
                ConversationMember,
                func.extract("epoch", func.now() - func.coalesce(Turn.queued_at, Turn.created_at)),
            )
            .join(Conversation, Conversation.id == Turn.conversation_id)
            .join(Character, Character.id == speaker_id)
            .outerjoin(
                ConversationMember,
                and_(
                    ConversationMember.conversation_id == Conversation.id,
                    ConversationMember.character_id == speaker_id,
                ),
            )
            .where(Turn.id.in_(claimed_ids))
            .order_by(Turn.number)
            # The speaker is joined above; the rows' own joined-eager characters would load it twice more.
            # Its card and lorebook (a book can run to megabytes) are read once per character below, not
            # once per turn.
            .options(
                lazyload(Conversation.character),
                lazyload(ConversationMember.character),
                defer(Character.card),
                defer(Character.lorebook),
            )
        ).all()
        _load_books(session, {char.id: char for _, _, char, _, _ in rows})
        # A group is told by its scene, not by the speaker's member row: a member who left keeps the
        # step created for them before they left, which still speaks in the group; and the narrator
        # answering a player's turn (no member, no step) speaks in it too.
        groups = group_views(session=session, conversation_ids=sorted({conv.id for _, conv, _, _, _ in rows}))
        step_convs = sorted({conv.id for turn, conv, _, _, _ in rows if turn.scene_id is not None})
        newest: dict[int, str] = {}
        newest_by: dict[int, tuple[int, str]] = {}  # a member's newest line: (speaker id, name)
        player_last: set[int] = set()  # scene conversations whose newest line is the player's
        if step_convs:
            for conv_id, content, role, by_id, by_name in session.execute(
                _NEWEST_LINES, {"ids": step_convs}
            ).tuples():
                newest[conv_id] = content
                if role == Role.USER:
                    player_last.add(conv_id)
                if role == Role.ASSISTANT and by_id is not None:
                    newest_by[conv_id] = (by_id, by_name or "")
        for turn, conv, char, member, waited_s in rows:
            mood_of = member or conv
            answered = newest_by.get(conv.id) if turn.scene_id is not None else None
            result.claimed.append(
                ClaimedTurn(
                    id=turn.id,
                    conversation_id=conv.id,
                    message=turn.message,
                    params=turn.params,
                    attempts=turn.attempts,
                    character=char,
                    player_name=conv.player_name,
                    story=conv.story,
                    story_time=conv.story_time,
                    queued_ms=float(waited_s) * 1000.0,
                    speaker=turn.speaker,
                    emotion=mood_of.emotion,
                    affinity=mood_of.affinity,
                    run_id=turn.run_id,
                    engine_deaths=turn.engine_deaths,
                    engine_deaths_seen=turn.engine_deaths_seen,
                    group=groups.get(conv.id),
                    query=turn.message or (newest.get(conv.id, "") if turn.scene_id is not None else ""),
                    regard={int(k): int(v) for k, v in member.regard.items()} if member else {},
                    answers=answered if answered is not None and answered[0] != char.id else None,
                    player_spoke=turn.scene_id is None or conv.id in player_last,
                    callback=turn.callback_url is not None,
                    last_error=turn.error,
                    claims=turn.claims,
                    tenant=turn.tenant,
                )
            )
    if ended := [*result.exhausted, *result.blocked, *stopped]:
        advance_runs_of_turns(session=session, turn_ids=ended)
        result.streams_ended = list(
            session.scalars(
                select(Turn.id).where(Turn.id.in_(ended), Turn.params["stream"].as_boolean().is_(True))
            ).all()
        )
    taken = set(claimed_ids) | set(result.exhausted) | set(result.deferred) | set(result.blocked)
    taken |= {t.id for t in result.elsewhere}  # sent to their own model's queue, not deferred here too
    unclaimed = [i for i in turn_ids if i not in taken]
    if unclaimed:
        open_now = {
            turn_id: (status, lease_left)
            for turn_id, status, lease_left in session.execute(
                select(
                    Turn.id,
                    Turn.status,
                    func.extract("epoch", Turn.lease_until - func.now()),
                ).where(Turn.id.in_(unclaimed), Turn.status.in_((TurnStatus.QUEUED, TurnStatus.RUNNING)))
            ).tuples()
        }
        for turn_id in unclaimed:
            if turn_id not in open_now:
                result.skipped.append(turn_id)
                continue
            status, lease_left = open_now[turn_id]
            if status == TurnStatus.RUNNING and lease_left is not None and lease_left > 0:
                result.held[turn_id] = float(lease_left)
            else:  # another claim or write holds the row right now: look again shortly
                result.deferred[turn_id] = 0
    return result


def _cancel_stopped(session: Session, turn_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Cancel, instead of generating, these (locked, claimable) turns whose run is stopping or
    stopped, or that are steps of a scene no longer open: a cancel cancels what is queued at its
    snapshot, and a turn can be queued again after it (a retry, an engine death's hand-back, a
    reopen or a submission chunk committed just before it, a store's next scene step) or be running
    under an expired lease, its worker gone."""
    if not turn_ids:
        return []
    # Read, not locked: turns → runs → scenes is the lock order, and the runs are locked after this.
    closed_scene = exists().where(
        Scene.id == Turn.scene_id,
        or_(
            Scene.status != SceneStatus.OPEN,
            exists().where(Run.id == Scene.run_id, run_stopped()),
        ),
    )
    stopped_run = exists().where(Run.id == Turn.run_id, run_stopped())
    expired = exists().where(
        Run.id == Turn.run_id, or_(Run.status == RunStatus.EXPIRED, Run.cancel_reason == "expired")
    )
    return list(
        session.scalars(
            update(Turn)
            .where(
                Turn.id.in_(turn_ids),
                Turn.status.in_((TurnStatus.QUEUED, TurnStatus.RUNNING)),
                or_(closed_scene, stopped_run),
            )
            .values(
                status=TurnStatus.CANCELLED,
                finished_at=func.now(),
                lease_until=None,
                # As cancel_run labels them: the export answers them batch_expired.
                error=case((expired, expired_turn_error()), else_=None),
                error_code=case((expired, EXPIRED_TURN["error_code"]), else_=None),
            )
            .returning(Turn.id)
        ).all()
    )


def _defer(
    *, session: Session, turn_ids: list[uuid.UUID], wait_limit_s: float | None, result: ClaimResult
) -> None:
    """Count a look at turns an earlier turn blocks. The wait limit applies only while that turn is
    stalled (see _stalled): a look that finds it progressing starts the wait afresh, so a conversation
    behind a slow turn or a bulk backlog is never failed. A turn whose blocker stayed stalled past
    the limit fails, naming it. A blocker running under an expired lease with no message out since
    is stamped sent here, once, and reported `stalled` for the caller to send."""
    earlier = aliased(Turn)
    # Each turn's first blocker, and only that one read (LATERAL, LIMIT 1 on the unfinished turns'
    # index): joining every blocker, then keeping the first, read all the turns queued ahead of each
    # (a run of thousands of lines in one conversation: thousands of rows a look, every few seconds).
    first = (
        select(
            earlier.id,
            earlier.status,
            _stalled(earlier).label("stalled"),
            lapsed_and_unsent(earlier).label("lapsed"),
        )
        .where(
            earlier.conversation_id == Turn.conversation_id,
            earlier.number < Turn.number,
            _blocks_later_turns(earlier),
        )
        .order_by(earlier.number)
        .limit(1)
        .lateral("first_blocker")
    )
    blockers = {
        turn_id: (blocker_id, status, stalled, lapsed)
        for turn_id, blocker_id, status, stalled, lapsed in session.execute(
            select(Turn.id, first.c.id, first.c.status, first.c.stalled, first.c.lapsed)
            .join(first, true())
            .where(Turn.id.in_(turn_ids))
        ).tuples()
    }
    waiting_on_stalled = [turn_id for turn_id, (_, _, stalled, _) in blockers.items() if stalled]
    counted = session.execute(
        update(Turn)
        .where(Turn.id.in_(turn_ids))
        .values(
            deferred_since=case(
                (Turn.id.in_(waiting_on_stalled), func.coalesce(Turn.deferred_since, func.now())),
                else_=func.now(),
            ),
            deferrals=Turn.deferrals + 1,
        )
        .returning(Turn.id, Turn.deferrals, func.extract("epoch", func.now() - Turn.deferred_since))
    ).tuples()
    too_long: dict[uuid.UUID, str] = {}
    for turn_id, deferrals, waited_s in counted:
        blocker = blockers.get(turn_id)
        if wait_limit_s is not None and blocker is not None and blocker[2] and float(waited_s) > wait_limit_s:
            blocker_id, status, _, lapsed = blocker
            state = "running, lease expired" if lapsed else f"{TurnStatus(status).value}, never sent"
            too_long[turn_id] = (
                f"waited {float(waited_s):.0f} s (limit {wait_limit_s:g} s) for earlier turn "
                f"{blocker_id} of its conversation, stalled ({state})"
            )
        else:
            result.deferred[turn_id] = int(deferrals)
    if too_long:
        failed = session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(too_long)))
            .values(
                status=TurnStatus.FAILED,
                error_code=TurnErrorCode.BLOCKED_BY_EARLIER_TURN.value,
                error=_by_id({t: r[:ERROR_CHARS] for t, r in too_long.items()}),
                finished_at=func.now(),
                lease_until=None,
            )
            .returning(Turn.id)
        ).all()
        result.blocked = {t: too_long[t] for t in failed}
    lapsed_ids = sorted({b[0] for t, b in blockers.items() if b[3] and t in result.deferred})
    if lapsed_ids:
        # Stamped sent in this transaction, so the next look (this worker's or another's) sends it no
        # more; rows another transaction holds are being claimed or stamped already.
        free = (
            select(Turn.id)
            .where(Turn.id.in_(lapsed_ids), lapsed_and_unsent(Turn))
            .order_by(Turn.id)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        result.stalled = [
            StalledTurn(turn_id, model, run_id)
            for turn_id, model, run_id in session.execute(
                update(Turn)
                .where(Turn.id.in_(free), lapsed_and_unsent(Turn))
                .values(dispatched_at=func.now())
                .returning(Turn.id, Turn.model, Turn.run_id)
            ).tuples()
        ]


def _lock_claim(
    *,
    session: Session,
    token: uuid.UUID,
    turn_ids: Sequence[uuid.UUID] | None = None,
    skip_locked: bool = False,
) -> list[uuid.UUID]:
    """Lock the claim's running turns (those of `turn_ids`, or all) in id order; returns their ids.

    Every writer of a claim that runs while its LeaseKeeper may renew it takes its rows this way
    first, as store_replies does: an UPDATE alone takes rows in scan order, which deadlocks with a
    renewal holding some of them."""
    query = select(Turn.id).where(_ours(token))
    if turn_ids is not None:
        query = query.where(Turn.id.in_(list(turn_ids)))
    return list(session.scalars(query.order_by(Turn.id).with_for_update(skip_locked=skip_locked)))


def renew_lease(
    *, session: Session, token: uuid.UUID, lease_s: float, turn_ids: Sequence[uuid.UUID] | None = None
) -> int:
    """Extend the lease of every turn still running under this claim (of `turn_ids`, the claim's:
    found by id, where a look by token alone read every unfinished turn, a bulk backlog's million at
    each renewal of each batch; fleet review) and not locked by a writer; returns how many.

    It never waits for a row: the batch's own write takes the rows it stores, fails and hands back in
    three goes (each in id order), so a renewal waiting for one of them while holding another could
    deadlock with it. A row a writer holds is being finished or handed back; if that writer rolls
    back, the next renewal (a third of a lease later) takes it."""
    ours = _lock_claim(session=session, token=token, turn_ids=turn_ids, skip_locked=True)
    if not ours:
        return 0
    result = session.execute(
        update(Turn).where(Turn.id.in_(ours), _ours(token)).values(lease_until=func.now() + _seconds(lease_s))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TurnOutcome:
    """A generated reply to store, with everything the turn row records about it."""

    turn_id: uuid.UUID
    conversation_id: int
    user_message: str
    user_embedding: Any
    reply: str
    reply_embedding: Any
    prompt: str
    context: dict[str, Any]
    usage: dict[str, Any]
    timings: dict[str, Any]
    params: dict[str, Any]
    reply_role: Role = Role.ASSISTANT  # NARRATOR for a narrator turn
    state: dict[str, Any] | None = None  # the mood update: {"before", "after", ...}
    quality: dict[str, Any] | None = None
    alternatives: list[dict[str, Any]] | None = None  # best of n: the candidates not kept
    adapter: str | None = None  # the LoRA that answered ("slug@vN"), None for the base model
    # A group conversation's reply: the member who spoke (its name as spoken, its own mood).
    speaker_id: int | None = None
    speaker_name: str | None = None
    structured: Any = None  # the structured reply, parsed (None for free text)


# One index probe per conversation (max over its (conversation_id, seq) key): a max() under GROUP BY
# would read every line of each conversation, O(n) for each reply of a long one.
_LAST_SEQS = text(
    "SELECT c.id, COALESCE((SELECT max(m.seq) FROM messages m WHERE m.conversation_id = c.id), 0)"
    " FROM unnest(CAST(:ids AS bigint[])) AS c(id)"
)


def last_seqs(session: Session, conv_ids: Sequence[int]) -> dict[int, int]:
    """The last line number of each conversation (0: none yet)."""
    return {int(c): int(n) for c, n in session.execute(_LAST_SEQS, {"ids": list(conv_ids)}).tuples()}


# Each conversation's newest line by one backward probe of its (conversation_id, seq) key: DISTINCT ON
# sorted every line of the conversation, text and all, at each step of a scene.
_NEWEST_LINES = text(
    """
SELECT c.id, m.content, m.role, m.speaker_id, m.speaker_name
FROM unnest(CAST(:ids AS bigint[])) AS c(id)
CROSS JOIN LATERAL (
    SELECT content, role, speaker_id, speaker_name FROM messages
    WHERE conversation_id = c.id ORDER BY seq DESC LIMIT 1
) m
"""
)


def _load_books(session: Session, characters: dict[int, Character]) -> None:
    """The card and lorebook of each claimed speaker, one row per character (the claim defers them).
    The whole row is read again, every column from this one statement: a card imported between the
    claim's read and this one gave a batch one version's persona with the next one's lorebook and
    card, cached under the first version (review)."""
    session.execute(
        select(Character)
        .where(Character.id.in_(list(characters)))
        .options(undefer(Character.card), undefer(Character.lorebook))
        .execution_options(populate_existing=True)
    ).scalars().all()


def store_replies(*, session: Session, token: uuid.UUID, outcomes: Sequence[TurnOutcome]) -> list[uuid.UUID]:
    """complete: write each turn's user line and reply and mark it done, in the caller's transaction.

    Only turns still running under this claim token are written, so a worker whose lease lapsed
    while another answered the turn stores nothing. The partial unique index on messages
    (turn_id, role) backs that up: a turn's reply can only ever be stored once. Returns the turn ids
    this call stored.
    """
    if not outcomes:
        return []
    conv_ids = sorted({o.conversation_id for o in outcomes})
    # Row locks in id order (conversations, then turns) serialise writers without deadlocks. The
    # conversation lock is the weakest that still serialises messages.seq: FOR UPDATE would conflict
    # with the FOR KEY SHARE that every insert of a turn or message referencing it takes, so a
    # producer naming conversations in another order could deadlock with this store.
    session.execute(
        select(Conversation.id)
        .where(Conversation.id.in_(conv_ids))
        .order_by(Conversation.id)
        .with_for_update(key_share=True)
    )
    # A turn's run and scene never change: read with the lock, they spare a live turn's store the
    # run and scene advance's own reads.
    owned = {
        turn_id: run_id is not None or scene_id is not None
        for turn_id, run_id, scene_id in session.execute(
            select(Turn.id, Turn.run_id, Turn.scene_id)
            .where(Turn.id.in_([o.turn_id for o in outcomes]), _ours(token))
            .order_by(Turn.id)
            .with_for_update()
        ).tuples()
    }
    outcomes = [o for o in outcomes if o.turn_id in owned]
    if not outcomes:
        return []
    next_seq = last_seqs(session, conv_ids)
    rows = []
    for o in outcomes:
        seq = next_seq.get(o.conversation_id, 0)
        lines: list[tuple[Role, str, Any, int | None, str | None]] = []
        if o.user_message:  # a scene's step has no player line
            lines.append((Role.USER, o.user_message, o.user_embedding, None, None))
        lines.append((o.reply_role, o.reply, o.reply_embedding, o.speaker_id, o.speaker_name))
        for offset, (role, content, vector, speaker_id, speaker_name) in enumerate(lines, start=1):
            rows.append(
                dict(
                    conversation_id=o.conversation_id,
                    seq=seq + offset,
                    role=role,
                    content=content,
                    embedding=vector,
                    turn_id=o.turn_id,
                    speaker_id=speaker_id,
                    speaker_name=speaker_name,
                )
            )
        next_seq[o.conversation_id] = seq + len(lines)
    columns = ("conversation_id", "seq", "role", "content", "turn_id", "speaker_id", "speaker_name")
    stmt = (
        insert(Message)
        .values(
            {c: bindparam(c) for c in columns}
            | {"embedding": binary_vector_param(session, "embedding", Message.embedding.type.dim)}
        )
        .on_conflict_do_nothing(
            index_elements=[Message.turn_id, Message.role], index_where=text("turn_id IS NOT NULL")
        )
        .returning(Message.id, Message.turn_id, Message.role)
    )
    inserted: dict[uuid.UUID, dict[Role, int]] = {}
    for msg_id, turn_id, role in session.execute(stmt, rows).tuples():
        if turn_id is not None:
            inserted.setdefault(turn_id, {})[Role(role)] = msg_id
    stored = [o for o in outcomes if o.reply_role in inserted.get(o.turn_id, {})]
    if not stored:
        return []
    session.execute(
        # finished_at on the database's clock, as started_at and every other end is
        update(Turn).where(_ours(token)).values(finished_at=func.now()),
        [
            dict(
                id=o.turn_id,
                status=TurnStatus.DONE,
                reply=o.reply,
                prompt=o.prompt,
                context=o.context,
                usage=o.usage,
                timings=o.timings,
                params=o.params,
                state=o.state,
                quality=o.quality,
                alternatives=o.alternatives,
                adapter=o.adapter,
                structured=o.structured,
                error=None,
                error_code=None,
                user_message_id=inserted[o.turn_id].get(Role.USER),
                reply_message_id=inserted[o.turn_id][o.reply_role],
                lease_until=None,
            )
            for o in stored
        ],
        execution_options={"synchronize_session": None},
    )
    moods = [o for o in stored if o.state is not None and o.speaker_id is None]
    if moods:  # in the reply's transaction: the state never moves without the reply that moved it
        session.execute(
            update(Conversation),
            [
                dict(
                    id=o.conversation_id,
                    emotion=o.state["after"]["emotion"],  # type: ignore[index]
                    affinity=o.state["after"]["affinity"],  # type: ignore[index]
                )
                for o in moods
            ],
        )
    for o in stored:  # a group member's mood is its own, and so is its regard for the others
        if o.state is not None and o.speaker_id is not None:
            # Only what the line moved is written, and the regard as a bounded delta: a concurrent
            # change to the member's row (another step, an edit) is kept rather than overwritten
            # by the values read at claim time.
            values: dict[str, Any] = dict(emotion=o.state["after"]["emotion"])
            if o.state["after"]["affinity"] != o.state["before"]["affinity"]:
                values["affinity"] = o.state["after"]["affinity"]
            toward = o.state.get("toward")
            if toward is not None:
                key = str(toward["character_id"])
                now = func.coalesce(ConversationMember.regard.op("->>")(key).cast(Integer), 0)
                delta = int(toward["step"])  # the line's own, bounded here against the row as it is
                after = func.greatest(AFFINITY_MIN, func.least(AFFINITY_MAX, now + delta))
                values["regard"] = ConversationMember.regard.op("||")(func.jsonb_build_object(key, after))
            session.execute(
                update(ConversationMember)
                .where(
                    ConversationMember.conversation_id == o.conversation_id,
                    ConversationMember.character_id == o.speaker_id,
                )
                .values(**values)
            )
    done = [o.turn_id for o in stored]
    advance_runs_of_turns(session=session, turn_ids=[t for t in done if owned[t]])
    return done


@dataclass(frozen=True)
class Failure:
    """Why a claimed turn failed: the text for people, the code for machines."""

    reason: str
    code: TurnErrorCode


def _tenth(value: Any) -> Any:
    return round(value, 1) if isinstance(value, float) else value


def fail_turns(
    *,
    session: Session,
    token: uuid.UUID,
    failures: dict[uuid.UUID, Failure],
    timings: dict[str, Any] | None = None,
) -> list[uuid.UUID]:
    """fail: mark turns running under this claim failed with their reason; returns those failed."""
    if not failures:
        return []
    _lock_claim(session=session, token=token, turn_ids=list(failures))
    failed = list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(failures)), _ours(token))
            .values(
                status=TurnStatus.FAILED,
                error=_by_id({t: f.reason[:ERROR_CHARS] for t, f in failures.items()}),
                error_code=_by_id({t: f.code.value for t, f in failures.items()}),
                # as a stored reply's are: to a tenth of a millisecond (review: raw floats)
                timings=None if timings is None else {k: _tenth(v) for k, v in timings.items()},
                finished_at=func.now(),
                lease_until=None,
            )
            .returning(Turn.id)
        ).all()
    )
    if failed:
        advance_runs_of_turns(session=session, turn_ids=failed)
    return failed


def requeue_turns(
    *,
    session: Session,
    token: uuid.UUID,
    reasons: dict[uuid.UUID, str],
    refund_attempt: bool = False,
    max_refunds: int | None = None,
) -> list[uuid.UUID]:
    """requeue: put turns running under this claim back to queued, keeping each one's reason.

    `refund_attempt` hands the attempt back too: the turn was not at fault (the database's
    connection was lost under its batch, or its writes kept meeting deadlocks), for a turn refunded
    fewer than `max_refunds` times so far
    (None: no limit); each refund is counted. The caller sends them again after the commit, so they
    are stamped dispatched now.
    """
    if not reasons:
        return []
    _lock_claim(session=session, token=token, turn_ids=list(reasons))
    return list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(list(reasons)), _ours(token))
            .values(
                status=TurnStatus.QUEUED,
                error=_by_id({t: r[:ERROR_CHARS] for t, r in reasons.items()}),
                attempts=_refunded(max_refunds) if refund_attempt else Turn.attempts,
                outage_refunds=Turn.outage_refunds + 1 if refund_attempt else Turn.outage_refunds,
                lease_until=None,
                dispatched_at=func.now(),
            )
            .returning(Turn.id)
        ).all()
    )


def _refunded(max_refunds: int | None) -> Any:
    """The attempts of a turn handed back with its attempt refunded, while it has refunds left."""
    refunded = func.greatest(Turn.attempts - 1, 0)
    if max_refunds is None:
        return refunded
    return case((Turn.outage_refunds < max_refunds, refunded), else_=Turn.attempts)


@dataclass(frozen=True)
class EngineDeathOutcome:
    """What an engine death did to a claim's turns."""

    requeued: list[uuid.UUID]
    crash_looped: list[uuid.UUID]  # failed: inside the engine at too many deaths


def hand_back_after_engine_death(
    *,
    session: Session,
    token: uuid.UUID,
    turn_ids: Sequence[uuid.UUID],
    in_engine: Sequence[uuid.UUID],
    reason: str,
    max_deaths: int,
    present: Sequence[uuid.UUID] = (),
) -> EngineDeathOutcome:
    """engine death: the claim's turns go back to queued with their attempt refunded (a dead engine
    is not a turn's failed attempt), and each turn that was inside the engine as a suspect counts one
    more engine death. One that reaches `max_deaths` is failed with engine_crash_loop instead: it was
    inside the engine every time it died, so it is likely what kills it, and sending it again would
    kill worker after worker. One `present` (inside, not a suspect) counts a death seen."""
    if not turn_ids:
        return EngineDeathOutcome([], [])
    _lock_claim(session=session, token=token, turn_ids=turn_ids)
    inside = [t for t in turn_ids if t in set(in_engine)]
    crash_looped = (
        list(
            session.scalars(
                update(Turn)
                .where(Turn.id.in_(inside), _ours(token), Turn.engine_deaths + 1 >= max_deaths)
                .values(
                    status=TurnStatus.FAILED,
                    error_code=TurnErrorCode.ENGINE_CRASH_LOOP.value,
                    error=func.concat(
                        "the engine died each of the ",
                        Turn.engine_deaths + 1,
                        " times this turn was inside it; not sent again (last: ",
                        reason[:ERROR_CHARS],
                        ")",
                    ),
                    engine_deaths=Turn.engine_deaths + 1,
                    attempts=func.greatest(Turn.attempts - 1, 0),
                    finished_at=func.now(),
                    lease_until=None,
                )
                .returning(Turn.id)
            ).all()
        )
        if inside
        else []
    )
    if crash_looped:
        advance_runs_of_turns(session=session, turn_ids=crash_looped)
    rest = [t for t in turn_ids if t not in set(crash_looped)]
    session.execute(
        update(Turn)
        .where(Turn.id.in_(rest), _ours(token))
        .values(
            status=TurnStatus.QUEUED,
            error=reason[:ERROR_CHARS],
            attempts=func.greatest(Turn.attempts - 1, 0),
            engine_deaths=case((Turn.id.in_(inside), Turn.engine_deaths + 1), else_=Turn.engine_deaths),
            engine_deaths_seen=case(
                (Turn.id.in_(sorted(set(present) - set(inside))), Turn.engine_deaths_seen + 1),
                else_=Turn.engine_deaths_seen,
            ),
            lease_until=None,
            dispatched_at=func.now(),
        )
    )
    # Those queued under this claim, requeued just now or by an earlier try of this same hand-back
    # whose COMMIT went through with its reply lost (the write is retried on a lost connection): all
    # are the caller's to send again, or they would wait out the visibility timeout unsent.
    requeued = list(
        session.scalars(
            select(Turn.id).where(
                Turn.id.in_(rest), Turn.claim_token == token, Turn.status == TurnStatus.QUEUED
            )
        ).all()
    )
    return EngineDeathOutcome(requeued, crash_looped)


# The idempotency key a turn stored without one gets (services/producer.py); no client key has it.
AUTO_KEY_PREFIX = "auto:"
# The automatic key of a turn an in-process call stored (worker/inline.py): one without a client's key.
INLINE_KEY_PREFIX = AUTO_KEY_PREFIX + "inline:"


def inline_key(call: uuid.UUID, place: int) -> str:
    """The automatic key of the `place`-th turn an in-process call stored."""
    return f"{INLINE_KEY_PREFIX}{call}:{place}"


def inline_call(key: str | None) -> str | None:
    """The prefix every key of that call's turns starts with (None: no key of a call's shape)."""
    if not key or not key.startswith(INLINE_KEY_PREFIX) or key.count(":") != 3:
        return None
    return key.rsplit(":", 1)[0] + ":"


def cancel_dead_calls_turns(
    *, session: Session, turn_ids: Sequence[uuid.UUID], reason: str
) -> list[uuid.UUID]:
    """cancel: those of these turns an in-process call stored without a client's key whose claim
    lapsed (the call died mid-answer: a SIGKILL, a platform's timeout), and that call's other turns
    of the same conversations still claimable (queued behind them). The call's client, told
    nothing, sends them again, which stores its lines anew: taken over and answered here, each was
    answered twice in its conversation (review of kills between commits). Those cancelled."""
    running = dict(
        session.execute(
            select(Turn.id, Turn.idempotency_key).where(
                Turn.id.in_(list(turn_ids)),
                Turn.idempotency_key.startswith(INLINE_KEY_PREFIX, autoescape=True),
                Turn.status == TurnStatus.RUNNING,
            )
        )
        .tuples()
        .all()
    )
    # The calls of those cancelled (their lease re-checked under the row lock: review, one renewed
    # since the claim saw it lapsed is its live call's), each named by its key's call id.
    dead = cancel_turns(session=session, turn_ids=list(running), reason=reason) if running else []
    calls = {call for turn in dead if (call := inline_call(running[turn])) is not None}
    if not calls:
        return dead
    conversations = select(Turn.conversation_id).where(Turn.id.in_(dead))
    its = or_(*(Turn.idempotency_key.startswith(call, autoescape=True) for call in sorted(calls)))
    siblings = session.scalars(select(Turn.id).where(Turn.conversation_id.in_(conversations), its)).all()
    return [
        *dead,
        *cancel_turns(session=session, turn_ids=[t for t in siblings if t not in dead], reason=reason),
    ]


def cancel_turns(
    *, session: Session, turn_ids: Sequence[uuid.UUID], unkeyed_only: bool = False, reason: str | None = None
) -> list[uuid.UUID]:
    """cancel: turns a claim could take, those not started or running under a lease that lapsed (its
    worker gone: with no worker of its model left, such a turn stayed running, holding back its
    conversation's later turns, and no DELETE could clear it); with `unkeyed_only`, only those stored
    without a client's idempotency key, which a replay cannot reach. Returns those cancelled. A
    worker that still answers one stores nothing: its writes name its claim, which needs RUNNING.
    `reason`: kept as their error (a call that returns them unanswered says why), none by default."""
    unkeyed = Turn.idempotency_key.startswith(AUTO_KEY_PREFIX, autoescape=True) if unkeyed_only else true()
    why = CANCEL_CLEARS | ({"error": reason[:ERROR_CHARS]} if reason else {})
    cancelled = list(
        session.scalars(
            update(Turn)
            .where(*locked_in_id_order(session, Turn.id.in_(list(turn_ids)), claimable(), unkeyed))
            .values(status=TurnStatus.CANCELLED, finished_at=func.now(), lease_until=None, **why)
            .returning(Turn.id)
        ).all()
    )
    if cancelled:
        advance_runs_of_turns(session=session, turn_ids=cancelled)
    return cancelled


def fail_unsent(
    *,
    session: Session,
    turn_ids: Sequence[uuid.UUID],
    reason: str,
    sent_at: datetime | None,
    unkeyed_only: bool = False,
) -> list[uuid.UUID]:
    """fail_unsent: queued turns whose message could not be sent (broker down at enqueue, or at a
    run's retry-failed), or (`unkeyed_only`) sent in a call whose other messages could not be, with
    no client's key to replay them by; their runs advance (a reopened run whose turns all failed
    again ends). A turn a worker took already is left to it, and so is one sent again since the
    caller stored it: `sent_at` is the `dispatched_at` the caller stored (None: none), and a retry
    under the turn's key that sent it meanwhile stamped another (stamp_resend; review: a retry told
    "queued" found its turn failed by the first request's late broker error, and never answered)."""
    unkeyed = Turn.idempotency_key.startswith(AUTO_KEY_PREFIX, autoescape=True) if unkeyed_only else true()
    # A retry's send that failed gave the stamp back (unstamp_resend): it took nothing over, and a
    # turn with no message out fails here as ever (review: the first request answered "queued").
    as_stored = Turn.dispatched_at.is_(None) if sent_at is None else Turn.dispatched_at == sent_at
    failed = list(
        session.scalars(
            update(Turn)
            .where(
                *locked_in_id_order(
                    session,
                    Turn.id.in_(list(turn_ids)),
                    Turn.status == TurnStatus.QUEUED,
                    Turn.attempts == 0,
                    unkeyed,
                    as_stored,
                )
            )
            .values(
                status=TurnStatus.FAILED,
                error=reason[:ERROR_CHARS],
                error_code=TurnErrorCode.BROKER_UNREACHABLE.value,
                finished_at=func.now(),
            )
            .returning(Turn.id)
        ).all()
    )
    advance_runs_of_turns(session=session, turn_ids=failed)
    return failed


def revive_unsent(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """revive_unsent: turns that failed only because they were never sent go back to queued, their
    callback owed again (a failure's callback sent meanwhile must not stand for the answer). A turn
    of the conversation that went on after it (accepted once the broker was back) moves it to the end
    of the conversation's order: answered after that turn, with it in its history, never beside it (a
    claim waits only for the turns numbered before it), as a scene's requeued step is. One statement
    per turn, in their order: the ones of a conversation keep theirs."""

    def failed_unsent(turn: Any) -> Any:
        return (turn.status == TurnStatus.FAILED) & (
            turn.error_code == TurnErrorCode.BROKER_UNREACHABLE.value
        )

    unsent = failed_unsent(Turn)
    later = aliased(Turn)
    overtaken = exists().where(
        later.conversation_id == Turn.conversation_id, later.number > Turn.number, ~failed_unsent(later)
    )
    ordered = session.scalars(
        select(Turn.id).where(Turn.id.in_(list(turn_ids)), unsent).order_by(Turn.number)
    ).all()
    revived: list[uuid.UUID] = []
    for turn_id in ordered:
        revived += session.scalars(
            update(Turn)
            .where(Turn.id == turn_id, unsent)
            .values(
                number=case(
                    (overtaken, func.nextval(func.pg_get_serial_sequence("turns", "number"))),
                    else_=Turn.number,
                ),
                status=TurnStatus.QUEUED,
                error=None,
                error_code=None,
                timings=None,
                finished_at=None,
                queued_at=func.now(),
                dispatched_at=func.now(),
                callback_attempts=0,
                callback_delivered_at=None,
                callback_error=None,
                callback_retry_at=None,
            )
            .returning(Turn.id)
        ).all()
    return revived


def transaction_stamp(session: Session) -> datetime:
    """What this transaction stamps `dispatched_at` with: now(), its start, in each of its statements."""
    return session.execute(select(func.now())).scalar_one()


# What a failed re-send records as the turn's last send: long enough ago for any sweep.
SEND_FAILED_AT = datetime(2000, 1, 1, tzinfo=UTC)


def mark_send_failed(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> int:
    """A worker could not send these turns again (the broker away past its retries) and its
    flush's messages are acked all the same: their last send is recorded as long ago, so the next
    sweep sends them (it re-sends what has had no message for the visibility timeout, an hour by
    default, and would otherwise wait that long). For a running one under an expired lease (a
    blocker the claim found stalled) it also makes the next claim that waits on it send it again.
    Returns how many were marked."""
    return _stamp_send(session, turn_ids, SEND_FAILED_AT)


def mark_dispatched(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> int:
    """Record that a message for these queued turns, or running ones under an expired lease, was
    just sent (resumed submissions, the claim's order check and the sweeper read it). A store's
    run-advance pin (db/runs.py) never holds an unsent turn, so it hides none of them from this."""
    return _stamp_send(session, turn_ids, func.now())


def live_models_waiting(*, session: Session) -> list[str]:
    """The models of live turns (no run's) queued now (the partial index of them, migration 0051)."""
    waiting = select(Turn.model).where(Turn.status == TurnStatus.QUEUED, Turn.run_id.is_(None))
    return sorted(session.scalars(waiting.distinct()))


def fail_unserved(
    *, session: Session, model: str, older_than_s: float, reason: str, limit: int
) -> list[uuid.UUID]:
    """fail: a chunk of `model`'s live turns queued longer than `older_than_s`, no worker serving it
    (the caller found so: tasks/presence.py); their scenes go on as after any failed step. Rows
    another transaction holds (a claim taking them after all) are skipped."""
    cutoff = func.now() - _seconds(older_than_s)
    waiting = (
        select(Turn.id)
        .where(
            Turn.model == model,
            Turn.status == TurnStatus.QUEUED,
            Turn.run_id.is_(None),
            Turn.created_at < cutoff,  # the partial index's column (migration 0051)
            # queued that long since it was last put in line (review: a turn revived a moment ago was
            # failed for the hour since its insert; queued_at is never before created_at)
            func.coalesce(Turn.queued_at, Turn.created_at) < cutoff,
        )
        .order_by(Turn.created_at)  # the partial index's order, the oldest first
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    failed = list(
        session.scalars(
            update(Turn)
            .where(Turn.id.in_(waiting.scalar_subquery()), Turn.status == TurnStatus.QUEUED)
            .values(
                status=TurnStatus.FAILED,
                error=reason[:ERROR_CHARS],
                error_code=TurnErrorCode.MODEL_UNAVAILABLE.value,
                finished_at=func.now(),
                lease_until=None,
            )
            .returning(Turn.id)
        ).all()
    )
    advance_runs_of_turns(session=session, turn_ids=failed)
    return failed


def awaiting_a_send(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Those of these turns that still wait for a message: queued and never claimed, or failed only
    because their send failed (a retry under their key sends them)."""
    if not turn_ids:
        return []
    never_sent = and_(
        Turn.status == TurnStatus.FAILED, Turn.error_code == TurnErrorCode.BROKER_UNREACHABLE.value
    )
    unclaimed = and_(Turn.status == TurnStatus.QUEUED, Turn.attempts == 0)
    return list(
        session.scalars(
            select(Turn.id).where(Turn.id.in_(list(turn_ids)), or_(unclaimed, never_sent)).order_by(Turn.id)
        ).all()
    )


class Stamped(NamedTuple):
    """A turn stamp_resend recorded sent: its `dispatched_at` before, and the one it wrote."""

    id: uuid.UUID
    before: datetime | None
    at: datetime


def stamp_resend(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[Stamped]:
    """Stamp queued turns sent now, before a retry sends their message once more; those stamped (the
    others are not queued: claimed, cancelled, or failed by the request that stored them). The rows
    are locked in id order and waited for, not skipped as mark_dispatched does: a request failing its
    own send of them either commits first (they are failed, not stamped) or then finds them stamped
    and leaves them to this message (fail_unsent)."""
    if not turn_ids:
        return []
    where = locked_in_id_order(session, Turn.id.in_(list(turn_ids)), Turn.status == TurnStatus.QUEUED)
    before = dict(session.execute(select(Turn.id, Turn.dispatched_at).where(*where)).tuples().all())
    # Only the rows read: one queued meanwhile (revived by another retry) was not read, and its
    # `before` unknown (review: restored as "never sent", nothing would send it).
    stamped = session.execute(
        update(Turn)
        .where(*where, Turn.id.in_(list(before)))
        .values(dispatched_at=func.now())
        .returning(Turn.id, Turn.dispatched_at)
    ).tuples()
    return [Stamped(turn_id, before.get(turn_id), at) for turn_id, at in stamped if at is not None]


def unstamp_resend(*, session: Session, stamped: Sequence[Stamped]) -> None:
    """The retry's send of these stamped turns failed: each gets back the stamp it had (a scene's
    step never recorded sent, none: the sweep and the next replay find it as such), so the request
    whose stamp it was still fails it if its own send fails (review: a stamp of "sent long ago" let
    another retry's late failure fail a turn whose message was out). A turn stamped again since, or
    no longer queued, is left as it is."""
    where = locked_in_id_order(
        session,
        Turn.id.in_([t.id for t in stamped]),
        Turn.status == TurnStatus.QUEUED,
        Turn.dispatched_at.in_({t.at for t in stamped}),
    )
    before = {t.id: t.before for t in stamped}
    session.execute(
        update(Turn).where(*where).values(dispatched_at=case(before, value=Turn.id, else_=Turn.dispatched_at))
    )


def _stamp_send(session: Session, turn_ids: Sequence[uuid.UUID], sent_at: Any) -> int:
    """Set `dispatched_at` of the queued turns, and running ones under an expired lease, among
    `turn_ids`. Rows another transaction holds are skipped rather than waited for: a worker claiming
    them takes them anyway, and waiting could deadlock with that claim."""
    if not turn_ids:
        return 0
    lapsed = and_(Turn.status == TurnStatus.RUNNING, _lapsed(Turn) <= func.now())
    # A sweep re-sends up to 100,000 turns of a queue at once: with a bind per id its stamp failed
    # after the messages went (each later sweep then found them lost again and sent them once more).
    free = (
        select(Turn.id)
        .where(
            any_of(Turn.id, turn_ids, PG_UUID(as_uuid=True)), or_(Turn.status == TurnStatus.QUEUED, lapsed)
        )
        .order_by(Turn.id)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = session.execute(update(Turn).where(Turn.id.in_(free)).values(dispatched_at=sent_at))
    return int(result.rowcount)  # type: ignore[attr-defined]


def answering_claim(*, session: Session, turn_id: uuid.UUID) -> tuple[bool, uuid.UUID | None]:
    """(whether the turn is still to be answered, the claim answering it now): the claim's token
    while it runs under a live lease; None while it is queued or its lease lapsed (no claim is
    answering it: the next one will), and once it is finished."""
    row = session.execute(
        select(Turn.status, Turn.claim_token, and_(Turn.status == TurnStatus.RUNNING, lease_live())).where(
            Turn.id == turn_id
        )
    ).first()
    if row is None:
        return False, None
    status, token, live = row
    if status not in TURN_UNFINISHED:
        return False, None
    return True, token if live else None


def finished_within(*, session: Session, turn_id: uuid.UUID, seconds: float) -> bool:
    """Whether the turn finished less than `seconds` ago (or is not finished), on the database's clock,
    which stamped it: another host's runs ahead or behind by as much as it likes."""
    long_ago = session.scalar(
        select(Turn.finished_at < func.now() - _seconds(seconds)).where(Turn.id == turn_id)
    )
    return not long_ago


def get_turn(*, session: Session, turn_id: uuid.UUID, with_prompt: bool = True) -> Turn | None:
    """The turn row, or None; without `with_prompt`, its prompt and context left unread (None)."""
    answered_by = undefer(Turn.character_slug)
    if with_prompt:
        return session.get(Turn, turn_id, options=[answered_by])
    turn = session.get(Turn, turn_id, options=[defer(Turn.prompt), defer(Turn.context), answered_by])
    if turn is not None and "prompt" not in turn.__dict__:  # not loaded by an earlier read: say None
        set_committed_value(turn, "prompt", None)
        set_committed_value(turn, "context", None)
    return turn


def finished_turns(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these turns are finished (done, failed or cancelled): one light query for many readers."""
    rows = session.execute(
        select(Turn.id).where(
            any_of(Turn.id, turn_ids, PG_UUID(as_uuid=True)), Turn.status.in_(TURN_FINISHED)
        )
    )
    return set(rows.scalars())
