"""Live group conversations: start one (a scene on the live lane), ask it to go on for N exchanges
with no player line, read its transcript. The player talks to it through the turn API."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import exists, select

from core.paging import cut
from core.settings import DEFAULT_TENANT, settings
from db.history import lock_conversation
from db.models import Conversation, Fact, FactScope, Message, Scene, Turn
from db.scenes import (
    NewScene,
    NewStep,
    SceneClosed,
    SceneConflict,
    SceneNotFound,
    StopOvertaken,
    cancel_stopped_step,
    create_scene,
    extend_scene,
    last_lines_after,
    pop_new_steps,
    replay_unsent_step,
    scene_transcript,
    stop_scene,
)
from db.session import DATABASE_OUTAGES, session_scope
from db.turns import IdempotencyConflict, mark_dispatched
from db.world import adopt_empty_conversation, character_names, find_characters, upsert_conversations
from db.write_keys import fingerprint, record_ids, take_key
from scenes.spec import GroupSpec, name_clash
from scenes.transcript import scene_record
from services.producer import EnqueueError, resend, send_new_turns, tell_ended
from services.runs.scene_lines import scene_of

logger = logging.getLogger(__name__)


class SceneRefused(ValueError):
    """The request cannot be served as asked; the message starts with the field at fault."""


SCENES_KEY = "scenes"
CONTINUE_KEY = "scene_continue"


def start_group(
    spec: GroupSpec,
    *,
    tenant: str = DEFAULT_TENANT,
    api_key: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Create the group conversation and its live scene (and its first step, if it asks for
    exchanges now); its view, with `replayed` true when an earlier request under `idempotency_key`
    created it (its view as it stands now; only a next step whose message never went is sent
    again). SceneRefused for an unknown character or a conversation in use; KeyReused when the key
    was used for another group."""
    earlier: list[int] | None = None
    again: list[NewStep] = []
    with session_scope() as session:
        if idempotency_key is not None:  # taken first: a second start under the key waits for this one
            digest = fingerprint(spec.model_dump(mode="json"))
            earlier = take_key(
                session=session, tenant=tenant, kind=SCENES_KEY, key=idempotency_key, request_hash=digest
            )
        if earlier is not None:
            conv_id = _started_group(session, spec.conversation, tenant, scene_id=earlier[0])
            steps, again = replay_unsent_step(session=session, conversation_id=conv_id)
        else:
            steps = _create_group(session, spec, tenant=tenant, api_key=api_key, key=idempotency_key)
    go_on = f"POST /v1/scenes/{spec.conversation}:continue"
    if idempotency_key is not None:
        go_on = f"the same request again under its Idempotency-Key, or {go_on},"
    go_on += " sends its next line"
    # the group is stored: a second POST would find it a group already
    keyed = idempotency_key is not None
    view = _sent_view(
        spec.conversation, tenant, steps, again, stored="the group is stored", go_on=go_on, keyed=keyed
    )
    return view | {"replayed": earlier is not None}


def _create_group(
    session: Any, spec: GroupSpec, *, tenant: str, api_key: str | None, key: str | None
) -> list[NewStep]:
    """Store the group's conversation and scene (and its first step); the steps to send."""
    ids = find_characters(session=session, slugs=spec.slugs(), tenant=tenant)
    for i, slug in enumerate(spec.slugs()):
        if slug not in ids:
            raise SceneRefused(f"participants.{i}.character: unknown character {slug!r}")
    clash = name_clash(spec, character_names(session=session, slugs=spec.slugs()))
    if clash is not None:
        raise SceneRefused(clash)
    lead = ids[spec.participants[0].character]
    row = {"external_id": spec.conversation, "character_id": lead, "player_name": spec.player_name}
    conv_id, _ = upsert_conversations(session=session, rows=[row], tenant=tenant)[spec.conversation]
    # Held before what it holds is read: a line appended meanwhile (an import, a one-character
    # turn) is seen, not overlaid by a group (scenes review).
    lock_conversation(session=session, conversation_id=conv_id)
    # Lines imported into it count as its own (history import, the original service's shape): its
    # player and character would otherwise stay the stored ones, past the name-clash check. So does a
    # fact of its own scope: what its one NPC knows of its player, which every member would then know.
    has_turns = exists().where(Turn.conversation_id == conv_id)
    has_facts = exists().where(  # current ones (ix_facts_current_scope): a superseded one reaches no prompt
        Fact.tenant == tenant,
        Fact.scope == FactScope.CONVERSATION,
        Fact.scope_ref == str(conv_id),
        Fact.superseded_by.is_(None),
    )
    holds = session.scalar(select(has_turns | has_facts | exists().where(Message.conversation_id == conv_id)))
    has_scene = session.scalar(select(Scene.id).where(Scene.conversation_id == conv_id))
    if holds and has_scene is None:
        raise SceneRefused(f"conversation: {spec.conversation!r} is a one-character conversation already")
    if not holds:  # an empty conversation stored before (an import of nothing): it is this group's
        adopt_empty_conversation(
            session=session, conversation_id=conv_id, character_id=lead, player_name=spec.player_name
        )
    scene = scene_of(
        spec, conversation_id=conv_id, ids=ids, model=settings.model, tenant=tenant, candidates=1
    )
    scene = NewScene(**{**scene.__dict__, "lane": "live", "api_key": api_key})
    try:
        scene_id, created = create_scene(session=session, scene=scene)
    except SceneConflict:  # another scene took the conversation and went meanwhile (review: a 500)
        raise SceneRefused(
            f"conversation: {spec.conversation!r} was changed by another request meanwhile; send it again"
        ) from None
    if not created:
        raise SceneRefused(f"conversation: {spec.conversation!r} is a group already")
    if key is not None:
        record_ids(session=session, tenant=tenant, kind=SCENES_KEY, key=key, ids=[scene_id])
    return pop_new_steps(session)


def continue_group(
    conversation: str,
    exchanges: int,
    *,
    tenant: str = DEFAULT_TENANT,
    api_key: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Ask the group to go on for `exchanges` more lines with no player line, on the live lane (a
    group whose step failed or was cancelled goes on from that step). Under an `idempotency_key` an
    earlier call used, nothing more is asked (`replayed`; only a step whose message never went is
    sent again). SceneNotFound if the tenant has no such group; KeyReused when the key was used for
    another call."""
    earlier: list[int] | None = None
    again: list[NewStep] = []
    with session_scope() as session:
        if idempotency_key is not None:
            digest = fingerprint({"conversation": conversation, "exchanges": exchanges})
            earlier = take_key(
                session=session, tenant=tenant, kind=CONTINUE_KEY, key=idempotency_key, request_hash=digest
            )
        if earlier is not None:  # the group the key's first call continued, not one named so since
            conv_id = _started_group(session, conversation, tenant, scene_id=earlier[0], did="continued")
            steps, again = replay_unsent_step(session=session, conversation_id=conv_id)
        else:
            conv_id = _conversation_id(session, conversation, tenant)
            try:
                scene, steps = extend_scene(
                    session=session, conversation_id=conv_id, exchanges=exchanges, api_key=api_key
                )
            except SceneNotFound:  # erased since it was looked up
                raise SceneNotFound(f"no group conversation {conversation!r}") from None
            if idempotency_key is not None:
                ids = [scene.id]
                record_ids(session=session, tenant=tenant, kind=CONTINUE_KEY, key=idempotency_key, ids=ids)
    go_on = (
        "the same request again under its Idempotency-Key sends the next line"
        if idempotency_key is not None
        else f"POST /v1/scenes/{conversation}:continue again would ask for more lines still"
    )
    stored = f"{exchanges} more lines are asked for" if earlier is None else "nothing more is asked for"
    view = _sent_view(
        conversation, tenant, steps, again, stored=stored, go_on=go_on, keyed=idempotency_key is not None
    )
    return view | {"replayed": earlier is not None}


def stop_group(conversation: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
    """Stop a group's chatter (the player left): it owes no line past those stored. A step being
    written is kept and ends it; one still queued is cancelled (unless a `:continue` came since,
    which wins); with none, it ends now. A stopped group goes on again at its next
    `:continue`. Safe to send again: a group stopped already is answered as it is. SceneNotFound if
    the tenant has no such group; SceneClosed for a run's (its run's cancel stops it)."""
    with session_scope() as session:
        conv_id = _conversation_id(session, conversation, tenant)
        try:
            scene, queued = stop_scene(session=session, conversation_id=conv_id)
        except SceneNotFound:  # erased since it was looked up
            raise SceneNotFound(f"no group conversation {conversation!r}") from None
        scene_id, owed = scene.id, scene.exchanges
    if queued is not None:  # its own transaction: a turn is locked before its scene
        try:
            with session_scope() as session:
                cancelled = cancel_stopped_step(session=session, turn_id=queued, scene_id=scene_id, owed=owed)
        except StopOvertaken:  # a `:continue` since: it wins, its step stays
            cancelled = []
        tell_ended(cancelled)
    return scene_view(conversation, tenant=tenant, tail=True)


def _sent_view(
    conversation: str,
    tenant: str,
    steps: list[NewStep],
    again: list[NewStep],
    *,
    stored: str,
    go_on: str,
    keyed: bool,
) -> dict[str, Any]:
    """Send the committed steps (and those to send again) and read the group's view, with `sent`.
    What the request stored is committed: a broker or a database that fails now is a 503 that says
    so (`stored`) and what to do, never the plain "try again" of a request that stored nothing (a
    retry without a key would find the group a group already, or ask for its lines twice). The
    broker away: no line went, and `go_on` sends it. The database failing once the lines' messages
    went (recording them sent, or reading the view): nothing is to be asked again, only read."""
    went: list[uuid.UUID] = []  # the lines whose messages went, recorded sent or not
    try:
        _send(steps, went)
        sent = steps + _send_again(again, went)
        view = scene_view(conversation, tenant=tenant, tail=True)
    except EnqueueError as exc:
        raise EnqueueError(f"{exc}; {stored}: {go_on}") from None
    except DATABASE_OUTAGES:
        logger.warning(
            "scene %r: the database failed after the request was stored", conversation, exc_info=True
        )
        # Said only of what went: the broker away and then the database failing the steps' failure
        # sent nothing (the sweeper or a replay sends them).
        went_too = "; its next line was sent" if went else ""
        replay = "; the same request again under its Idempotency-Key answers with it" if keyed else ""
        raise EnqueueError(
            f"the database failed once the request was stored ({stored}{went_too}): GET "
            f"/v1/scenes/{conversation} reads the group when it answers{replay}"
        ) from None
    return view | {"sent": [str(s.turn_id) for s in sent]}


# Transcript lines a view returns at most: a long-lived group's transcript grows without end.
PAGE_LINES = 200


def scene_view(
    conversation: str,
    *,
    tenant: str = DEFAULT_TENANT,
    after: int = 0,
    limit: int = PAGE_LINES,
    tail: bool = False,
) -> dict[str, Any]:
    """The group's scene and a page of its transcript: the lines after line `after`, at most `limit`
    (with `tail`, the last `limit` of those: what a group that goes on said last); `next_after` is the
    cursor past the page's last line (for the next page, or for lines written later) and `more`
    whether lines are waiting past it. SceneNotFound if the tenant has no such group."""
    with session_scope() as session:
        conv_id = _conversation_id(session, conversation, tenant)
        scene = session.scalars(select(Scene).where(Scene.conversation_id == conv_id)).one_or_none()
        if scene is None:  # erased since the line above (review: a 500)
            raise SceneNotFound(f"no group conversation {conversation!r}")
        if tail:
            after = max(after, last_lines_after(session=session, conversation_id=conv_id, n=limit))
        lines = scene_transcript(session=session, scene_id=scene.id, after=after, limit=limit + 1)
        page = cut(lines, after=after, limit=limit, cursor=lambda line: line.seq)
        return scene_record(scene, page.items) | {
            "conversation": conversation,
            "exchanges": scene.exchanges,
            "next_after": page.next_after,
            "more": page.more,
        }


def _started_group(
    session: Any, conversation: str, tenant: str, *, scene_id: int, did: str = "started"
) -> int:
    """The group conversation a keyed start's (or continue's) first request started (its scene
    `scene_id`); IdempotencyConflict (409) once it is gone (a player's erasure named it) or its name
    is another group's now: the retry would answer with (or send again a step of) what the key never
    asked for."""
    conv_id = session.scalar(
        select(Conversation.id)
        .join(Scene, Scene.conversation_id == Conversation.id)
        .where(Scene.id == scene_id, Conversation.tenant == tenant, Conversation.external_id == conversation)
    )
    if conv_id is None:
        raise IdempotencyConflict(
            f"Idempotency-Key (header): the group {conversation!r} this key {did} is gone (erased, or"
            f" the name is another group's now); {'start' if did == 'started' else 'continue'} it again"
            " under a new key"
        )
    return int(conv_id)


def _conversation_id(session: Any, conversation: str, tenant: str) -> int:
    conv_id = session.scalar(
        select(Conversation.id)
        .join(Scene, Scene.conversation_id == Conversation.id)
        .where(
            Conversation.tenant == tenant,
            Conversation.external_id == conversation,
            Scene.run_id.is_(None),  # a run's scenes are the run's to advance
        )
    )
    if conv_id is None:
        raise SceneNotFound(f"no group conversation {conversation!r}")
    return int(conv_id)


def _send_again(steps: list[NewStep], went_ids: list[uuid.UUID]) -> list[NewStep]:
    """Send queued steps never recorded sent once more (producer.resend, which records them sent
    first: the broker away fails nothing, the worker that created a step may be sending it now);
    those that went (added to `went_ids`)."""
    went: set[uuid.UUID] = set()
    for lane, fresh in _by_lane(steps).items():
        went.update(resend(fresh, lane=lane))  # type: ignore[arg-type]
    went_ids += sorted(went)
    return [step for step in steps if step.turn_id in went]


def send_created_steps(steps: list[NewStep]) -> None:
    """Send the steps a reply stored outside a worker created (answered inline: `mlchat chat
    --inline`, the serverless handler), and record them sent; a broker away, or a database lost
    before the record, leaves them to the sweeper (an unsent step is its `step_unsent`)."""
    if not steps:
        return
    try:
        _send_again(steps, [])
    except Exception:
        logger.warning("could not send %d scene steps; the sweeper will", len(steps), exc_info=True)


def _by_lane(steps: list[NewStep]) -> dict[str, dict[str, list[uuid.UUID]]]:
    """The steps' ids by lane, then by model."""
    by_lane: dict[str, dict[str, list[uuid.UUID]]] = {}
    for step in steps:
        by_lane.setdefault(step.lane, {}).setdefault(step.model, []).append(step.turn_id)
    return by_lane


def _send(steps: list[NewStep], went: list[uuid.UUID]) -> None:
    """Send the committed steps on their lane and record them sent (each lane's ids added to `went`
    once its messages went, before that record); the broker unreachable: the steps are failed
    (broker_unreachable) and EnqueueError raised (503), as for a player's turn."""
    for lane, fresh in _by_lane(steps).items():
        send_new_turns(fresh, lane=lane, sent_at=None)  # type: ignore[arg-type]  # stored unstamped
        went += [i for ids in fresh.values() for i in ids]
        with session_scope() as session:
            mark_dispatched(session=session, turn_ids=[i for ids in fresh.values() for i in ids])


__all__ = ["SceneClosed", "SceneNotFound", "SceneRefused", "continue_group", "scene_view", "start_group"]
