"""The producer API a game backend calls: enqueue turns, read them, wait for replies, cancel."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.settings import DEFAULT_TENANT, Lane, settings
from core.text import printable
from db.models import TURN_FINISHED, Turn, TurnErrorCode, TurnStatus
from db.scenes import scene_conversations, speaker_for_player
from db.session import DATABASE_OUTAGES, again_on_conflict, get_autocommit_engine, session_scope
from db.single_enqueue import create_turn_in_known_conversation, create_turn_in_new_conversation
from db.turns import (
    AUTO_KEY_PREFIX,
    IdempotencyRace,
    NewTurn,
    StoredTurn,
    awaiting_a_send,
    cancel_turns,
    create_turns,
    fail_unsent,
    revive_unsent,
    stamp_resend,
    stored_request_hashes,
    transaction_stamp,
    unstamp_resend,
)
from db.turns import get_turn as read_turn
from db.world import (
    CONVERSATION_START_FIELDS,
    append_history_if_empty,
    conversation_players,
    find_characters,
    find_conversations,
    upsert_conversations,
)
from services.callbacks import ResolverTooSlow, callback_destinations
from services.schemas import TurnRequest
from structured.spec import shown_params

logger = logging.getLogger(__name__)


class EnqueueError(RuntimeError):
    """The turn could not be queued; nothing was left half-queued."""


class LiveQueueFull(EnqueueError):
    """A model's live queue holds MLCHAT_LIVE_QUEUE_MAX messages waiting: refused before anything is
    stored (a 503 to try again)."""


# Each process reads a model's live queue depth at most once a second (one Redis round trip).
DEPTH_FRESH_S = 1.0
_live_depths: dict[str, tuple[float, int]] = {}


def refuse_when_live_queue_full(models: Collection[str]) -> None:
    """LiveQueueFull when one of these models' live queue holds MLCHAT_LIVE_QUEUE_MAX messages or
    more (as read within DEPTH_FRESH_S). Under overload, turns taken anyway wait behind the backlog
    until their players gave up, answered all the same: the fleet busy, nobody served (overload
    review). A broker that cannot be asked refuses nothing here: the send says so."""
    limit = settings.live_queue_max
    if not limit:
        return
    from tasks.queues import queue_depths  # one probe connection, tried once

    now = time.monotonic()
    for model in sorted(set(models)):
        seen = _live_depths.get(model)
        if seen is None or now - seen[0] > DEPTH_FRESH_S:
            # A queue that cannot be read is kept as empty for the interval: one probe and one line a
            # second, not one a request (review).
            try:
                (depth,) = queue_depths([(model, "live")]).values()
            except Exception as exc:
                logger.warning("the live queue of %s could not be read; not refused: %r", model, exc)
                depth = 0
            seen = _live_depths[model] = (now, depth)
        if seen[1] >= limit:
            raise LiveQueueFull(
                f"model {model!r} has {seen[1]} live turns waiting (MLCHAT_LIVE_QUEUE_MAX is {limit}): "
                "nothing was stored; try again shortly"
            )


@dataclass(frozen=True)
class ItemError:
    index: int  # the request's position in the call
    field: str
    reason: str


class TurnRejected(ValueError):
    """Requests that name what does not exist (or disagrees with what does); nothing was stored.
    Every bad request of the call is listed, with its position and field."""

    def __init__(self, errors: list[ItemError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"item {e.index}: {e.field}: {e.reason}" for e in errors))


class TurnView(BaseModel):
    """A turn as producers see it."""

    id: uuid.UUID
    status: TurnStatus
    # The database's serial (one sequence for every tenant): only an operator sees it; a tenant knows
    # its conversation by the name it sent, and two of its readings of this counted every tenant's
    # new conversations in between (tenant review).
    conversation_id: int | None = Field(exclude_if=lambda value: value is None)
    custom_id: str | None
    model: str
    speaker: str
    # The character who answers, by slug (in a group, the member picked); None when the narrator does.
    character: str | None = Field(validation_alias=AliasChoices("character_slug", "character"))
    message: str
    reply: str | None
    params: dict[str, Any]
    usage: dict[str, Any] | None
    timings: dict[str, Any] | None
    error: str | None
    error_code: str | None
    api_key: str | None
    # Whose turn it is: every key of the tenant may read it (never shown: tenants are configuration).
    tenant: str = Field(default=DEFAULT_TENANT, exclude=True)
    attempts: int
    prompt: str | None
    context: dict[str, Any] | None
    state: dict[str, Any] | None
    quality: dict[str, Any] | None
    alternatives: list[dict[str, Any]] | None = None  # best of n: the candidates not kept
    adapter: str | None = None  # the LoRA that answered ("slug@vN"); None: the base model
    structured: Any = None  # a structured reply, parsed: JSON, or an NPC's {say, emotion, action}
    created_at: datetime
    finished_at: datetime | None

    @field_validator("params")
    @classmethod
    def _schema_as_given(cls, params: dict[str, Any]) -> dict[str, Any]:
        return shown_params(params)

    @classmethod
    def of(cls, turn: Turn) -> TurnView:
        return cls.model_validate(turn, from_attributes=True)

    @property
    def finished(self) -> bool:
        return self.status in TURN_FINISHED

    def as_its_tenant_sees(self) -> TurnView:
        """The turn without what only an operator reads: its prompt, the context the prompt was
        built from, the size of the worker's batch (other tenants' turns shared it) and the
        conversation's serial."""
        return self.model_copy(
            update={
                "prompt": None,
                "context": None,
                "timings": tenant_timings(self.timings),
                "conversation_id": None,
            }
        )


# A turn's timing that counts the worker's whole batch, other tenants' turns with it: one tenant
# sending a turn a second read a rival game's traffic from it (tenant review). Operators have it in
# the mlchat_batch_size metric, the batch's log line and an admin key's view.
_OPERATORS_ONLY_TIMINGS = ("batch_size",)


def tenant_timings(timings: dict[str, Any] | None) -> dict[str, Any] | None:
    """A turn's timings as its tenant reads them (see _OPERATORS_ONLY_TIMINGS)."""
    if timings is None:
        return None
    return {k: v for k, v in timings.items() if k not in _OPERATORS_ONLY_TIMINGS}


def as_request(item: TurnRequest | dict[str, Any]) -> TurnRequest:
    return item if isinstance(item, TurnRequest) else TurnRequest.model_validate(item)


def enqueue_turn(request: TurnRequest | dict[str, Any] | None = None, /, **fields: Any) -> uuid.UUID:
    """Queue one turn and return its id; a repeated idempotency key returns the first turn's id.
    Fields given beside a request are added to it, replacing its own (a template and this call's
    `idempotency_key`, say): they were dropped unsaid (review)."""
    if request is None:
        return enqueue_turns([fields])[0]
    if fields:
        given = request.model_dump(exclude_unset=True) if isinstance(request, TurnRequest) else dict(request)
        return enqueue_turns([given | fields])[0]
    return enqueue_turns([request])[0]


def enqueue_turns(
    requests: Sequence[TurnRequest | dict[str, Any]],
    *,
    send: bool = True,
    lane: Lane = "live",
    run_id: uuid.UUID | None = None,
    custom_ids: Sequence[str] | None = None,
) -> list[uuid.UUID]:
    """Queue many turns in one transaction and one broker round; returns ids in input order."""
    return [t.id for t in submit_turns(requests, send=send, lane=lane, run_id=run_id, custom_ids=custom_ids)]


def submit_turns(
    requests: Sequence[TurnRequest | dict[str, Any]],
    *,
    send: bool = True,
    lane: Lane = "live",
    run_id: uuid.UUID | None = None,
    custom_ids: Sequence[str] | None = None,
    api_key: str | None = None,
    tenant: str = DEFAULT_TENANT,
    history: Sequence[tuple[str, str]] = (),
) -> list[StoredTurn]:
    """Queue many turns; one StoredTurn per request (its id, whether it is new, its real status).
    `history` (one request only): earlier lines (role, text) seeded as its conversation's history
    when it has none, in the turn's own transaction.

    A replay (same idempotency key, same request) returns the turn as it stands; a replay of a turn
    that failed only because the broker was down at its first enqueue queues and sends it again.

    Outage rules. Database unreachable: EnqueueError, and no message is sent. Broker unreachable:
    the rows are committed first (so a worker never gets an id it cannot read), then sent; if
    sending fails, the new turns are marked failed with the reason and EnqueueError is raised, so no
    turn stays queued with no message behind it.

    Conversations and idempotency keys are the `tenant`'s (an API key's; the default one for the CLI
    and the Python API): another tenant's of the same name are never read or written.
    """
    parsed = [as_request(r) for r in requests]
    unknown = [
        ItemError(
            i, "model", f"unknown model {req.model!r}; this deployment serves {', '.join(settings.models)}"
        )
        for i, req in enumerate(parsed)
        if (req.model or settings.model) not in settings.models
    ]
    if unknown:
        raise TurnRejected(unknown)
    _check_callback_hosts(parsed, tenant)
    if send and lane == "live" and run_id is None:
        refuse_when_live_queue_full({req.model or settings.model for req in parsed})
    if history and (len(parsed) != 1 or parsed[0].speaker_character is not None):
        raise ValueError("history seeds one request's conversation, not a group member's line")
    if len(parsed) == 1 and parsed[0].speaker_character is None:  # a named member: the full path
        automatic_key = parsed[0].idempotency_key is None
        if history:  # seeded with the turn, which the one-statement insert cannot do: the full path
            # its automatic key fixed first, as the fast path's is: a commit whose reply was lost is
            # found again under it (review: the client's keyless retry was a second turn, both answered)
            if automatic_key:
                parsed[0] = parsed[0].model_copy(
                    update={"idempotency_key": f"{AUTO_KEY_PREFIX}{uuid.uuid4()}"}
                )
            try:
                stored = _store_or_raise(
                    parsed,
                    run_id=run_id,
                    custom_ids=custom_ids,
                    api_key=api_key,
                    tenant=tenant,
                    history=history,
                )
            except EnqueueError:
                raised = True
            else:
                if send:
                    send_stored(stored, lane=lane)
                return stored
        else:
            fast, parsed[0], raised = _store_one_fast(
                parsed[0],
                run_id=run_id,
                custom_id=custom_ids[0] if custom_ids else None,
                api_key=api_key,
                tenant=tenant,
            )
            if fast is not None:
                if send:
                    send_new_turns({fast.model: [fast.id]}, lane=lane, sent_at=fast.sent_at)
                return [fast]
        if raised:
            return _store_after_lost_reply(
                parsed[0],
                automatic_key=automatic_key,
                send=send,
                lane=lane,
                run_id=run_id,
                custom_ids=custom_ids,
                api_key=api_key,
                tenant=tenant,
                history=history,
            )
    stored = _store_or_raise(parsed, run_id=run_id, custom_ids=custom_ids, api_key=api_key, tenant=tenant)
    if send:  # else the caller runs the pipeline itself (`mlchat chat --inline`, tests) or sends
        send_stored(stored, lane=lane)
    return stored


def send_stored(stored: Sequence[StoredTurn], *, lane: Lane) -> None:
    """Send what stored turns need: new or revived ones their message (send_new_turns), and a
    replay's turn still queued and never claimed its message again, since the request that stored
    it may have died before sending (a claimed one, waiting on an adapter's back-off say, has its
    message held by the broker, and each claim costs an attempt). Each turn once."""
    fresh: dict[str, dict[uuid.UUID, None]] = {}  # per model, each turn once, in input order
    replayed: dict[uuid.UUID, StoredTurn] = {}
    stamps = set()
    for turn in stored:
        if turn.unsent:
            fresh.setdefault(turn.model, {})[turn.id] = None
            stamps.add(turn.sent_at)
        elif not turn.created and turn.status == TurnStatus.QUEUED and turn.attempts == 0:
            replayed[turn.id] = turn
    if len(stamps) > 1:  # one call's turns are stored in one transaction, stamped alike
        raise ValueError(f"turns stored apart sent as one call: {sorted(map(str, stamps))}")
    (sent_at,) = stamps or {None}
    send_new_turns({model: list(ids) for model, ids in fresh.items()}, lane=lane, sent_at=sent_at)
    sent = {i for ids in fresh.values() for i in ids}
    try:
        send_again([t for i, t in replayed.items() if i not in sent], lane=lane)
    except _REPLAY_FAILURES as exc:
        # The call answers 503: a client retrying without keys would store its new turns again, and
        # both copies would be answered (review). Those not taken by a worker yet fail, as when the
        # broker fails the call's own sends (the database away too: as it stands, then).
        if sent:
            try:
                _fail_unkeyed_sent(sent, sent_at)
            except DATABASE_OUTAGES:
                logger.warning(
                    "could not fail the call's unkeyed turns after its replay failed", exc_info=True
                )
        if isinstance(exc, EnqueueError):
            raise
        # The Python API's callers are promised EnqueueError, not the driver's own error (review).
        logger.warning("database unreachable while sending a replay", exc_info=True)
        raise EnqueueError(
            "database unreachable while sending a replayed turn again (retry with the same idempotency key)"
        ) from exc


def _check_callback_hosts(parsed: Sequence[TurnRequest], tenant: str) -> None:
    """Each callback URL's host looked up (its syntax was checked with the request): TurnRejected
    naming every item whose host does not resolve or is not public; EnqueueError (try again) when
    the resolver cannot answer for now. A replay (its key names a turn asked with this very request)
    is not looked up again: it answers with its turn as it stands, whatever the host says now (the
    delivery checks the host once more)."""
    urls = {i: r.callback_url for i, r in enumerate(parsed) if r.callback_url}
    keys: dict[str, list[int]] = {}
    for i, r in enumerate(parsed):
        if i in urls and r.idempotency_key:
            keys.setdefault(r.idempotency_key, []).append(i)
    stored: dict[str, str] = {}
    if keys:
        try:
            with session_scope() as session:
                stored = stored_request_hashes(session=session, tenant=tenant, keys=list(keys))
        except DATABASE_OUTAGES:  # every host looked up; the store after answers for the database
            logger.warning("could not read the request's keys; its callback hosts are all looked up")
    for key, items in keys.items():
        if (digest := stored.get(key)) is None:  # a new key: its host is looked up
            continue
        for i in items:
            if digest in {parsed[i].request_hash(), *parsed[i].legacy_request_hashes()}:
                del urls[i]
    try:
        refused = callback_destinations(urls, tenant)
    except ResolverTooSlow as exc:
        raise EnqueueError(f"{exc}; nothing was stored (retry with the same idempotency key)") from None
    if refused:
        raise TurnRejected([ItemError(i, "callback_url", reason) for i, reason in sorted(refused.items())])


def _store_after_lost_reply(
    req: TurnRequest,
    *,
    automatic_key: bool,
    send: bool,
    lane: Lane,
    run_id: uuid.UUID | None,
    custom_ids: Sequence[str] | None,
    api_key: str | None,
    tenant: str,
    history: Sequence[tuple[str, str]] = (),
) -> list[StoredTurn]:
    """The full path after the fast INSERT (or a first full path, with `history`) raised: that
    statement may have committed with its reply lost, so the key it tried can already name its
    turn. A queued turn under that key is sent (a second message is harmless: claims are
    exactly-once) and, when the key was the automatic one, is reported created: no caller can have
    made it before. Under the client's key it may be another request's, whose send may be failing
    now: sent as a replay's (send_again: recorded sent first, so that request's late failure leaves
    it to this message; review)."""
    stored = _store_or_raise(
        [req], run_id=run_id, custom_ids=custom_ids, api_key=api_key, tenant=tenant, history=history
    )
    turn = stored[0]
    # new, revived, or committed unseen under the automatic key: ours (one claimed before is waiting
    # with its message held: sent again, it would be charged)
    if turn.status == TurnStatus.QUEUED and turn.attempts == 0 and (turn.unsent or automatic_key):
        turn = replace(turn, created=turn.created or automatic_key, unsent=True)
    if send:
        send_stored([turn], lane=lane)
    return [turn]


def _store_or_raise(
    parsed: Sequence[TurnRequest],
    *,
    run_id: uuid.UUID | None,
    custom_ids: Sequence[str] | None,
    api_key: str | None,
    tenant: str,
    history: Sequence[tuple[str, str]] = (),
) -> list[StoredTurn]:
    """_store_turns, with a database outage as EnqueueError. A transaction the server rolled back
    for a deadlock or a serialization failure (two producers inserting the same new conversations or
    keys in other orders) is run again: it left nothing behind."""
    try:
        store = partial(
            _store_turns,
            parsed,
            run_id=run_id,
            custom_ids=custom_ids,
            api_key=api_key,
            tenant=tenant,
            history=history,
        )
        return again_on_conflict(store, what="enqueue", also=lambda exc: isinstance(exc, IdempotencyRace))
    except DATABASE_OUTAGES as exc:  # no message was sent: a worker never sees a turn the database lacks
        # (a pool with no free connection in time too: the Python API's caller was handed the pool's
        # own TimeoutError, where HTTP said 503; review)
        logger.warning("database unreachable at enqueue", exc_info=True)  # its text names hosts and users
        raise EnqueueError(
            "database unreachable at enqueue; nothing was sent (retry with the same idempotency key)"
        ) from exc


def _store_turns(
    parsed: Sequence[TurnRequest],
    *,
    run_id: uuid.UUID | None,
    custom_ids: Sequence[str] | None,
    api_key: str | None = None,
    tenant: str = DEFAULT_TENANT,
    history: Sequence[tuple[str, str]] = (),
) -> list[StoredTurn]:
    """Insert the turns (and any new conversations) in one transaction; revive replays of turns that
    were never sent (marked unsent). Returns each request's StoredTurn. `history`: the one request's
    earlier lines, its conversation's history if it has none, in this same transaction (review: seeded
    in one of its own after the turn's, an API killed in between left a turn the worker answered
    without them, and the conversation's first reply kept every later seed out for good)."""
    with session_scope() as session:
        conv_ids = _resolve_conversations(session, parsed, tenant)
        if history:
            conv_id = conv_ids[parsed[0].conversation]
            append_history_if_empty(session=session, conversation_id=conv_id, lines=history, embeddings=None)
        speakers = _group_speakers(session, parsed, conv_ids, tenant)
        new = [
            _new_turn(
                req,
                conv_ids[req.conversation],
                run_id=run_id,
                custom_id=custom_ids[i] if custom_ids else None,
                api_key=api_key,
                tenant=tenant,
                character_id=speakers[i],
            )
            for i, req in enumerate(parsed)
        ]
        stored = create_turns(session=session, turns=new)
        unsent = [
            t.id
            for t in stored
            if not t.created
            and t.status == TurnStatus.FAILED
            and t.error_code == TurnErrorCode.BROKER_UNREACHABLE
        ]
        revived = set(revive_unsent(session=session, turn_ids=unsent)) if unsent else set()
        # what the revival stamped them with: the transaction's time, as every now() of it
        revived_at = transaction_stamp(session) if revived else None
        # Revived by a concurrent retry of the same key: as they stand now, not as first read.
        raced = [i for i in unsent if i not in revived]
        now = (
            {
                i: (TurnStatus(status), code)
                for i, status, code in session.execute(
                    select(Turn.id, Turn.status, Turn.error_code).where(Turn.id.in_(raced))
                ).tuples()
            }
            if raced
            else {}
        )
    return [
        replace(t, status=TurnStatus.QUEUED, error_code=None, unsent=True, sent_at=revived_at)
        if t.id in revived
        else replace(t, status=now[t.id][0], error_code=now[t.id][1])
        if t.id in now
        else t
        for t in stored
    ]


def _group_speakers(
    session: Any, requests: Sequence[TurnRequest], conv_ids: dict[str, int], tenant: str
) -> list[int | None]:
    """Each request's answering member in a group conversation (None elsewhere); TurnRejected lists
    every request whose named speaker cannot answer. A line of the call goes round after the lines
    before it that make a turn: not one whose key is stored already or repeats an earlier line's."""
    speakers: list[int | None] = []
    errors = []
    earlier: dict[int, list[int | None]] = {}  # by conversation: who answers this call's lines so far
    taken: set[str | None] | None = None  # the call's keys stored already: read once, for a group's line
    # Which conversations are groups, read once for the call (not once per line): a line of a
    # one-character conversation naming no speaker has none, and needs no look of its own.
    groups = scene_conversations(session=session, conversation_ids=sorted(set(conv_ids.values())))
    for i, req in enumerate(requests):
        narrator = req.speaker == "narrator" and req.speaker_character is None  # the narrator is no member
        conversation_id = conv_ids[req.conversation]
        if conversation_id in groups and req.one_character:  # read as the turn is stored, not before
            errors.append(_holds_a_scene(i, req))
            speakers.append(None)
            continue
        if conversation_id not in groups and req.speaker_character is None:
            speakers.append(None)
            continue
        try:
            speakers.append(
                speaker_for_player(
                    session=session,
                    conversation_id=conversation_id,
                    message=req.message,
                    slug=req.speaker_character,
                    pick=not narrator,
                    earlier=earlier.get(conversation_id, ()),
                )
            )
            if speakers[-1] is None and not narrator:  # no group: no round to go on
                continue
            if taken is None:
                keys = [r.idempotency_key for r in requests if r.idempotency_key]
                taken = set(stored_request_hashes(session=session, tenant=tenant, keys=keys))
            if req.idempotency_key not in taken:  # a replay or a repeat makes no new turn
                earlier.setdefault(conversation_id, []).append(speakers[-1])
                if req.idempotency_key:
                    taken.add(req.idempotency_key)
        except ValueError as exc:
            field, _, reason = str(exc).partition(": ")
            errors.append(ItemError(i, field, reason))
            speakers.append(None)
    if errors:
        raise TurnRejected(errors)
    return speakers


def _new_turn(
    req: TurnRequest,
    conversation_id: int,
    *,
    run_id: uuid.UUID | None,
    custom_id: str | None,
    api_key: str | None,
    tenant: str,
    character_id: int | None = None,
) -> NewTurn:
    return NewTurn(
        idempotency_key=req.idempotency_key or f"{AUTO_KEY_PREFIX}{uuid.uuid4()}",
        request_hash=req.request_hash(),
        legacy_hashes=req.legacy_request_hashes(),
        conversation_id=conversation_id,
        message=req.message,
        model=req.model or settings.model,
        params=req.params.resolved()
        | ({"stream": True} if req.stream else {})
        | ({"direction": req.direction} if req.direction is not None else {}),
        run_id=run_id,
        custom_id=custom_id,
        speaker=req.speaker,
        api_key=api_key,
        tenant=tenant,
        callback_url=req.callback_url,
        character_id=character_id,
    )


def _store_one_fast(
    req: TurnRequest, *, run_id: uuid.UUID | None, custom_id: str | None, api_key: str | None, tenant: str
) -> tuple[StoredTurn | None, TurnRequest, bool]:
    """The common single enqueue (a fresh key; a known conversation, or a new one of a named
    character) in one autocommitted statement, two for a conversation's first turn.
    Returns the new turn, or None when the full path must decide, with the request to give it (its
    automatic idempotency key fixed, so a statement that committed but whose reply was lost is found
    as a replay, never inserted twice) and whether the statement raised (its outcome unknown)."""
    turn = _new_turn(req, 0, run_id=run_id, custom_id=custom_id, api_key=api_key, tenant=tenant)
    keyed = req if req.idempotency_key else req.model_copy(update={"idempotency_key": turn.idempotency_key})
    try:
        with get_autocommit_engine().connect() as connection:
            stored = create_turn_in_known_conversation(
                connection=connection,
                turn=turn,
                external_id=req.conversation,
                character=req.character,
                player_id=req.player_id,
            )
            if stored is None and req.character:  # perhaps the conversation's first turn
                stored = create_turn_in_new_conversation(
                    connection=connection,
                    turn=turn,
                    external_id=req.conversation,
                    character=req.character,
                    conversation=_conversation_fields(req),
                )
    except PoolTimeout as exc:  # no free connection in time: no statement ran, and the full path
        # would wait as long again on its own pool before the same 503 (review)
        logger.warning("no database connection free in time at enqueue", exc_info=True)
        raise EnqueueError(
            "database busy at enqueue (no connection free in time); nothing was sent (retry with the same"
            " idempotency key)"
        ) from exc
    except DATABASE_OUTAGES:
        # A stale pooled connection (this path has no pre-ping), an outage, or a reply lost after
        # the commit: the full path decides.
        return None, keyed, True
    if stored is None:
        return None, keyed, False
    new = StoredTurn(stored.id, True, TurnStatus.QUEUED, turn.model, unsent=True, sent_at=stored.sent_at)
    return new, keyed, False


def _broker_full(exc: BaseException) -> bool:
    """Whether a send failed because Redis is at its maxmemory (it refuses writes, answering pings):
    said so, not "unreachable", which sent operators to the network (review)."""
    from redis.exceptions import OutOfMemoryError

    seen: BaseException | None = exc
    for _ in range(8):  # kombu wraps the client's error: its cause or context
        if seen is None:
            return False
        if isinstance(seen, OutOfMemoryError) or "OOM command not allowed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def send_new_turns(fresh: dict[str, list[uuid.UUID]], *, lane: Lane, sent_at: datetime | None) -> None:
    """Send committed new turns ({model: ids}), stored with `dispatched_at` `sent_at` (None: unstamped,
    a scene's step); on a broker failure mark them failed (unless sent again since: fail_unsent),
    raise EnqueueError."""
    from tasks.generate import dispatch  # imports the Celery app (and the broker URL) only when sending

    sent: list[uuid.UUID] = []
    try:
        for model, ids in fresh.items():
            dispatch(ids, model=model, lane=lane, sent=sent)
    except Exception as exc:
        # Only the turns whose message did not go: a sent one may be claimed and answered already.
        full = _broker_full(exc)
        what = (
            "broker full at enqueue (its maxmemory, noeviction)" if full else "broker unreachable at enqueue"
        )
        logger.warning(what, exc_info=True)  # its text names hosts
        went = set(sent)
        stranded = [i for ids in fresh.values() for i in ids if i not in went]
        if not stranded:  # every message went (the failure came after the last, releasing the broker)
            return
        try:
            with session_scope() as session:  # committed first: none is left queued with no message
                failed = fail_unsent(session=session, turn_ids=stranded, reason=what, sent_at=sent_at)
        except DATABASE_OUTAGES as away:  # the database gone too: they stay queued, for the sweep
            logger.warning("could not mark the unsent turns failed: the database is away", exc_info=True)
            raise EnqueueError(
                ("the broker is full (its maxmemory)" if full else "could not reach the broker")
                + f", and the database to mark the {len(stranded)} unsent turn(s) failed: they stay"
                " queued and the sweep sends them (a keyed request may be retried with its key; an"
                " unkeyed one is not to be sent again, or it is answered twice)"
            ) from away
        # None failed: their messages went though the send raised, and workers claimed them already.
        if not failed:
            return
        # The call answers 503: a client retrying without keys would store the sent ones again, and
        # both copies would be answered. Those not taken by a worker yet fail with the rest.
        sent_failed = _fail_unkeyed_sent(went, sent_at, what)
        failed_too = set(sent_failed)
        kept = [i for ids in fresh.values() for i in ids if i in went and i not in failed_too]  # call's order
        shown = ", ".join(str(i) for i in kept[:10]) + (", ..." if len(kept) > 10 else "")
        raise EnqueueError(
            ("the broker is full (its maxmemory)" if full else "could not reach the broker")
            + f"; {len(failed) + len(sent_failed)} turn(s) marked failed"
            + (
                f", {len(kept)} sent before it failed and kept (keyed, or taken by a worker): {shown}"
                if kept
                else ""
            )
            + " (retry with the same idempotency keys: a failed turn is sent again, a sent one replayed)"
        ) from exc


# What a replay's send raises for the call to answer 503: its broker send failed, or its database did.
_REPLAY_FAILURES: tuple[type[Exception], ...] = (EnqueueError, *DATABASE_OUTAGES)


def _fail_unkeyed_sent(
    sent: Collection[uuid.UUID], sent_at: datetime | None, what: str = "broker unreachable at enqueue"
) -> list[uuid.UUID]:
    """Fail the call's unkeyed turns whose message went, not taken by a worker yet: the call answers
    503, and a client retrying without keys would store them again, both copies answered. `what`:
    the broker's failure, as the call's other turns were failed for it."""
    with session_scope() as session:
        return fail_unsent(
            session=session,
            turn_ids=list(sent),
            reason=f"{what} (for the call's other turns)",
            sent_at=sent_at,
            unkeyed_only=True,
        )


def send_again(turns: Sequence[StoredTurn], *, lane: Lane) -> None:
    """Send replayed queued turns' messages once more: the request that stored them may have died
    between its commit and its send (its reply lost, its process killed). See resend. EnqueueError
    when one still waits for a message that went (the broker away, or the request that stored it
    failed it meanwhile, its own send having failed): a retry answered "queued" would leave it
    unanswered, never called back (review); the next retry under its key sends it."""
    by_model: dict[str, list[uuid.UUID]] = {}
    for turn in turns:
        by_model.setdefault(turn.model, []).append(turn.id)
    went = set(resend(by_model, lane=lane))
    if not_sent := [t.id for t in turns if t.id not in went]:
        with session_scope() as session:
            waiting = awaiting_a_send(session=session, turn_ids=not_sent)
        if waiting:
            raise EnqueueError(
                f"could not send {len(waiting)} stored turn(s) ({', '.join(map(str, waiting[:10]))}); "
                "retry with the same idempotency keys: they are sent then"
            )


def resend(by_model: dict[str, list[uuid.UUID]], *, lane: Lane) -> list[uuid.UUID]:
    """Send these queued turns' messages ({model: ids}) once more, each stamped sent first (so the
    request that stored it, its own send failing late, leaves it to this message: fail_unsent); the
    ids whose message went. One no longer queued is not sent. A broker error is logged and marks
    nothing failed (a first message may be on its way); a duplicate message is harmless (claims are
    exactly-once)."""
    from tasks.generate import dispatch

    went: list[uuid.UUID] = []
    for model, ids in by_model.items():
        with session_scope() as session:
            stamped = stamp_resend(session=session, turn_ids=ids)
        if not stamped:
            continue
        queued = [t.id for t in stamped]
        try:
            dispatch(queued, model=model, lane=lane)
        except Exception:
            logger.warning("%d turn(s): could not send again; the sweeper will", len(queued), exc_info=True)
            with session_scope() as session:  # stamped sent, none went: as they were, for the sweep
                unstamp_resend(session=session, stamped=stamped)
            continue
        went += queued
    return went


def _conversation_fields(req: TurnRequest) -> dict[str, Any]:
    """What a request's first turn writes on the conversation it starts, besides its id and character."""
    return {name: getattr(req, name) for name in CONVERSATION_START_FIELDS}


def _holds_a_scene(i: int, req: TurnRequest) -> ItemError:
    """A request that speaks as one character (a chat completion) into a group conversation."""
    reason = f"{printable(req.conversation, 80)!r} holds a scene; only a player's line speaks in it"
    return ItemError(i, "conversation", f"{reason} (POST /v1/turns)")


def _not_its_character(i: int, req: TurnRequest, slug: str, *, group: bool) -> ItemError:
    """A request naming a character its known conversation was not started with."""
    named = printable(req.conversation, 80)
    if not group:
        return ItemError(
            i, "character", f"conversation {named!r} belongs to character {slug!r}, not {req.character!r}"
        )
    if req.one_character:  # a chat completion: its `model` is the character, and a group has several
        return _holds_a_scene(i, req)
    reason = f"conversation {named!r} is a group led by {slug!r}: leave character out, and name the member"
    return ItemError(i, "character", f"{reason} who answers in speaker_character")


def _resolve_conversations(session: Any, requests: Sequence[TurnRequest], tenant: str) -> dict[str, int]:
    """Ids of the tenant's conversations the requests name; new ones are created in one statement.
    TurnRejected lists every request whose character or conversation does not fit (also one that
    another producer started with another character meanwhile); the caller's transaction then
    writes nothing."""
    known = find_conversations(
        session=session, external_ids=[r.conversation for r in requests], tenant=tenant, lock=True
    )
    missing = [r for r in requests if r.conversation not in known]
    slugs = [r.character for r in missing if r.character]
    characters = find_characters(session=session, slugs=slugs, tenant=tenant) if slugs else {}
    started_here: dict[str, str] = {}
    for r in missing:
        if r.character:
            started_here.setdefault(r.conversation, r.character)
    out: dict[str, int] = {}
    errors: list[ItemError] = []
    new_rows: dict[str, dict[str, Any]] = {}
    # A group named with a member who is not its lead: told as a group, not as another's conversation.
    clashing = {
        known[r.conversation][0]
        for r in requests
        if r.conversation in known and r.character and r.character != known[r.conversation][1]
    }
    groups = scene_conversations(session=session, conversation_ids=sorted(clashing)) if clashing else set()
    for i, req in enumerate(requests):
        if req.conversation in known:
            conv_id, slug = known[req.conversation]
            if req.character and req.character != slug:
                errors.append(_not_its_character(i, req, slug, group=conv_id in groups))
            out[req.conversation] = conv_id
        elif not req.character:
            if req.conversation not in started_here:
                reason = f"unknown conversation {req.conversation!r}; name a character to start it"
                errors.append(ItemError(i, "conversation", reason))
        elif req.character not in characters:
            errors.append(ItemError(i, "character", f"unknown character {req.character!r}"))
        elif started_here[req.conversation] != req.character:
            reason = (
                f"conversation {req.conversation!r} is started with two characters: "
                f"{started_here[req.conversation]!r} and {req.character!r}"
            )
            errors.append(ItemError(i, "character", reason))
        else:
            new_rows.setdefault(
                req.conversation,
                dict(
                    external_id=req.conversation,
                    character_id=characters[req.character],
                    **_conversation_fields(req),
                ),
            )
    if errors:
        raise TurnRejected(errors)
    made_here: set[str] = set()
    created = upsert_conversations(
        session=session, rows=list(new_rows.values()), tenant=tenant, created=made_here
    )
    for i, req in enumerate(requests):
        if req.conversation not in new_rows:
            continue
        conv_id, character_id = created[req.conversation]
        if character_id != new_rows[req.conversation]["character_id"]:
            reason = f"conversation {req.conversation!r} was just started with another character"
            errors.append(ItemError(i, "conversation", reason))
        out[req.conversation] = conv_id
    if errors:
        raise TurnRejected(errors)
    _refuse_another_players(session, requests, out, started={c: new_rows[c] for c in made_here})
    return out


def _refuse_another_players(
    session: Any, requests: Sequence[TurnRequest], ids: dict[str, int], started: dict[str, dict[str, Any]]
) -> None:
    """TurnRejected for each request naming a player whose conversation is another player's: its
    line would become that player's memory (their summaries, facts extracted under their id, facts
    about them in its prompt) and no erasure of the player who said it would find it. A conversation
    of no player (a group, an anonymous one) takes any player's line."""
    named = [r for r in requests if r.player_id]
    if not named:
        return
    owners = {c: str(row["player_id"]) for c, row in started.items()}
    stored = conversation_players(
        session=session, conversation_ids=[ids[r.conversation] for r in named if r.conversation not in owners]
    )
    owners |= {r.conversation: stored[ids[r.conversation]] for r in named if ids[r.conversation] in stored}
    errors = [
        ItemError(i, "player_id", reason)
        for i, req in enumerate(requests)
        if (reason := another_players(req.conversation, owners.get(req.conversation, ""), req.player_id))
    ]
    if errors:
        raise TurnRejected(errors)


def another_players(conversation: str, owner: str, player: str) -> str | None:
    """Why a line of `player` may not go into `conversation`, started for `owner`: another player's
    (None when either names no player, or both the same one)."""
    if not player or not owner or owner == player:
        return None
    whose = f"player {printable(owner, 80)!r}'s, not player {printable(player, 80)!r}'s"
    return f"conversation {printable(conversation, 80)!r} is {whose}"


def get_turn(turn_id: uuid.UUID | str, *, with_prompt: bool = True) -> TurnView | None:
    """The turn's status, reply, usage and timings, or None if there is no such turn. Without
    `with_prompt` its prompt and retrieved context (tens of KB, stored out of line) are not read:
    only an admin sees them, and a long poll reads the turn every second."""
    with session_scope() as session:
        turn = read_turn(session=session, turn_id=uuid.UUID(str(turn_id)), with_prompt=with_prompt)
        return TurnView.of(turn) if turn else None


WAIT_POLL_MAX_S = 1.0  # as the long poll's: a long wait costs a read a second, not ten


def wait_for_reply(turn_id: uuid.UUID | str, timeout: float = 120.0, poll: float = 0.1) -> TurnView:
    """Poll until the turn is finished (done, failed or cancelled); TimeoutError after `timeout` s.
    Blocks its thread (from asyncio: `await asyncio.to_thread(wait_for_reply, …)`). Read `poll` s
    after the first read, the interval doubling up to a second, and without the prompt until it is
    finished (review: 500 players waiting read 5,000 whole turns a second from a 10-connection pool)."""
    deadline = time.monotonic() + timeout
    interval = poll
    while True:
        view = get_turn(turn_id, with_prompt=False)
        if view is None:
            raise KeyError(f"no turn {turn_id}")
        if view.finished:
            return get_turn(turn_id) or view
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"turn {turn_id} still {view.status} after {timeout:.0f}s")
        time.sleep(min(interval, left))
        interval = min(interval * 2, max(poll, WAIT_POLL_MAX_S))


def cancel_turn(turn_id: uuid.UUID | str) -> bool:
    """Cancel a turn that has not started or whose worker is gone (db/turns.py cancel_turns); False
    if a worker is answering it or it finished. A cancelled turn that asked for a callback gets it
    now (housekeeping would only find it 5 minutes later, as a callback whose message was lost), and
    a streamed one's stream ends now (no worker writes its end: readers would wait for a status check)."""
    with session_scope() as session:
        cancelled = cancel_turns(session=session, turn_ids=[uuid.UUID(str(turn_id))])
    tell_ended(cancelled)
    return bool(cancelled)


def tell_ended(turn_ids: Sequence[uuid.UUID]) -> None:
    """After turns were ended by no worker (a cancel, the sweep's failure of an unserved model's):
    their streams end and their callbacks are sent."""
    from services.turn_callbacks import send_turn_callbacks
    from streaming.publisher import publisher

    if not turn_ids:
        return
    with session_scope() as session:
        told = session.execute(
            select(Turn.id, Turn.callback_url, Turn.params).where(Turn.id.in_(list(turn_ids)))
        ).all()
    calls_back = [t.id for t in told if t.callback_url]
    streamed = [t.id for t in told if (t.params or {}).get("stream")]
    try:  # the cancel is committed: a stream that cannot be told ends at the readers' next status check
        for each in streamed:
            publisher().end(each)  # queued, never waits (the callbacks may, on a slow broker)
    except Exception:
        logger.warning("could not end the streams of cancelled turns %s", streamed, exc_info=True)
    send_turn_callbacks(calls_back)
