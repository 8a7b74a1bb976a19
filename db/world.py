"""Idempotent upserts of the world a game defines: characters, conversations, story events, history."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import case, exists, func, literal_column, or_, select, true, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, joinedload

from core.settings import DEFAULT_TENANT
from db.advisory_locks import advisory_lock, name_key
from db.models import TURN_UNFINISHED, Character, Conversation, Message, Role, StoryEvent, Turn

# What a request sets on the conversation its first turn starts, besides its id and character
# (upsert_conversations' rows, and the single enqueue's one-statement start, db/single_enqueue.py).
CONVERSATION_START_FIELDS = ("player_id", "player_name", "story", "story_time")
CHARACTER_FIELDS = (
    "name",
    "language",
    "description",
    "personality",
    "scenario",
    "speech_style",
    "example_dialogues",
    "first_message",
    "system_prompt",
    "post_history_instructions",
    "card",
    "lorebook",
)


def character_defaults(*names: str) -> dict[str, Any]:
    """The characters table's own defaults of these columns (what a new row gets)."""
    return {name: Character.__table__.c[name].default.arg for name in names}


def upsert_character(*, session: Session, slug: str, fields: dict[str, Any]) -> int:
    """Insert or update a character by slug; returns its id."""
    stored = save_character(session=session, slug=slug, fields=fields)
    assert stored is not None
    return stored[0]


def save_character(
    *, session: Session, slug: str, fields: dict[str, Any], same_name_only: bool = False
) -> tuple[int, bool] | None:
    """Insert or update a character by slug; returns (id, created). Every update bumps `version`, the
    key of the workers' per-character caches (validated lorebook, persona vector).

    With `same_name_only`, an existing character of that slug is updated only if it has the same
    name (a re-import of the same character); otherwise nothing is written and None is returned.
    """
    values = {k: fields[k] for k in CHARACTER_FIELDS if k in fields}
    stmt = insert(Character).values(slug=slug, **values)
    upsert: Any = stmt.on_conflict_do_update(
        index_elements=[Character.slug],
        set_={**values, "version": Character.version + 1, "updated_at": func.now()},
        where=(Character.name == stmt.excluded.name) if same_name_only else None,
    ).returning(Character.id, literal_column("xmax = 0"))
    row = session.execute(upsert).first()
    return None if row is None else (int(row[0]), bool(row[1]))


def save_character_if_changed(
    *, session: Session, slug: str, fields: dict[str, Any]
) -> tuple[int, int, bool]:
    """Insert a character, or update it only if one of `fields` differs from what is stored (one
    version up); (id, version, written). The same content twice leaves the version as it is."""
    values = {k: fields[k] for k in CHARACTER_FIELDS if k in fields}
    stmt = insert(Character).values(slug=slug, **values)
    # IS DISTINCT FROM, not !=: a NULL compared with a value is a change. The row lock taken by
    # ON CONFLICT makes two writers of the same new content bump the version once.
    changed = or_(*(getattr(Character, k).is_distinct_from(stmt.excluded[k]) for k in values))
    upsert = stmt.on_conflict_do_update(
        index_elements=[Character.slug],
        set_={**values, "version": Character.version + 1, "updated_at": func.now()},
        where=changed,
    ).returning(Character.id, Character.version)
    row = session.execute(upsert).first()
    if row is not None:
        return int(row[0]), int(row[1]), True
    same = session.execute(select(Character.id, Character.version).where(Character.slug == slug)).one()
    return int(same[0]), int(same[1]), False


class ConversationTaken(ValueError):
    """The conversation exists with another character or player: its message names the field."""


def add_conversation(
    *,
    session: Session,
    external_id: str,
    character_id: int,
    player_id: str = "",
    player_name: str = "",
    story: str | None = None,
    story_time: int | None = None,
    tenant: str = DEFAULT_TENANT,
) -> int:
    """The conversation of the tenant's external id, inserted with these values; or the stored one,
    when it is this character's with this player: its story then moves to this one as a turn's does
    (set_conversation_story: not while a turn of it is unanswered, StoryBusy), and its player name
    stays the one its turns gave it. ConversationTaken when it is another character's or player's:
    its lines, facts and queued turns are theirs."""
    values = dict(
        character_id=character_id,
        player_id=player_id,
        player_name=player_name,
        story=story,
        story_time=story_time,
    )
    while True:  # one erased between the insert and the read is made again (as upsert_conversations)
        inserted = session.scalar(
            insert(Conversation)
            .values(tenant=tenant, external_id=external_id, **values)
            .on_conflict_do_nothing(index_elements=[Conversation.tenant, Conversation.external_id])
            .returning(Conversation.id)
        )
        if inserted is not None:
            return int(inserted)
        stored = session.execute(
            select(Conversation.id, Conversation.character_id, Conversation.player_id).where(
                Conversation.tenant == tenant, Conversation.external_id == external_id
            )
        ).one_or_none()
        if stored is not None:
            break
    if stored.character_id != character_id:
        raise ConversationTaken(f"character: conversation {external_id!r} is another character's")
    if stored.player_id != player_id:
        raise ConversationTaken(f"player_id: conversation {external_id!r} is another player's")
    if story is not None and not set_conversation_story(
        session=session, conversation_id=stored.id, story=story, story_time=story_time
    ):
        raise StoryBusy(
            f"story: conversation {external_id!r} has a turn unanswered; its story moves after it"
        )
    return int(stored.id)


def upsert_story_events(*, session: Session, events: Sequence[dict[str, Any]], embeddings: np.ndarray) -> int:
    """Insert or update story events keyed by (story, ordinal), with their embeddings; returns the count."""
    if not events:
        return 0
    rows = [
        dict(
            story=e["story"],
            ordinal=e["ordinal"],
            scene=e.get("scene", ""),
            time=e.get("time", 0),
            text=e["text"],
            embedding=vec,
        )
        for e, vec in zip(events, embeddings, strict=True)
    ]
    stmt = insert(StoryEvent)
    stmt = stmt.on_conflict_do_update(
        constraint="uq_story_events_story_ordinal",
        # A re-embed's next vector of an old text is dropped: left to its catch-up (db/reembed.py).
        set_={
            **{c: stmt.excluded[c] for c in ("scene", "time", "text", "embedding")},
            "embedding_next": case(
                (StoryEvent.text.is_distinct_from(stmt.excluded.text), None), else_=StoryEvent.embedding_next
            ),
        },
    )
    session.execute(stmt, rows)
    return len(rows)


def count_story_events(*, session: Session, story: str) -> int:
    """How many events the story has."""
    return int(session.scalar(select(func.count()).where(StoryEvent.story == story)) or 0)


def story_event_texts(*, session: Session, ids: Sequence[int]) -> dict[int, str]:
    """{id: text} of these story events."""
    rows = session.execute(select(StoryEvent.id, StoryEvent.text).where(StoryEvent.id.in_(list(ids))))
    return dict(rows.tuples().all())


def set_conversation_story(
    *, session: Session, conversation_id: int, story: str, story_time: int | None
) -> bool:
    """Point the conversation at a story from now on, unless a turn of it is still unanswered (its
    prompt reads the conversation's story when it runs); without a story time the one it has for
    this story is kept. True when the conversation now points at this story."""
    time = (
        story_time if story_time is not None else case((Conversation.story == story, Conversation.story_time))
    )
    # A turn being stored holds the row's key-share lock until it commits, unseen by the update's
    # snapshot: this lock waits for it, and the update (a statement of its own) then sees the turn.
    session.execute(select(Conversation.id).where(Conversation.id == conversation_id).with_for_update())
    session.execute(
        update(Conversation)
        .where(
            Conversation.id == conversation_id,
            or_(
                Conversation.story.is_distinct_from(story),
                Conversation.story_time.is_distinct_from(time),
            ),
            ~exists().where(Turn.conversation_id == conversation_id, Turn.status.in_(TURN_UNFINISHED)),
        )
        .values(story=story, story_time=time)
    )
    current = session.execute(
        select(Conversation.story, Conversation.story_time).where(Conversation.id == conversation_id)
    ).one()
    return current[0] == story and (story_time is None or current[1] == story_time)


_STORY_LOCK_NAMESPACE = 0x6D6C7374  # "mlst"
STORY_LOCK_WAIT_S = 30


class StoryBusy(RuntimeError):
    """Another request held a lock this one needs (the conversation's story switch, or its
    idempotency key) for STORY_LOCK_WAIT_S: nothing was stored."""


_KEY_LOCK_NAMESPACE = 0x6D6C696B  # "mlik"


@contextmanager
def idempotency_key_lock(tenant: str, key: str) -> Iterator[None]:
    """Held, on a connection of its own, from an inline request's key check until its turn is
    stored: a second request under the key waits, then finds the turn (a replay, or a conflict
    refused before it stores anything). StoryBusy after STORY_LOCK_WAIT_S."""
    with advisory_lock(_KEY_LOCK_NAMESPACE, name_key(f"{tenant}\n{key}"), wait_s=STORY_LOCK_WAIT_S) as holder:
        if holder is None:
            raise StoryBusy(
                f"idempotency key {key!r}: another request under it is being stored; send it again"
            )
        yield


@contextmanager
def story_switch_lock(tenant: str, conversation: str) -> Iterator[None]:
    """Held, on a connection of its own, from a request's story switch of a named conversation until
    its turn is stored: a second switch waits, then finds that turn unanswered. StoryBusy after
    STORY_LOCK_WAIT_S."""
    # The server's hashtext, as the processes before the shared helper keyed it: during a rollout,
    # old and new processes still exclude each other.
    key = func.hashtext(f"{tenant}\n{conversation}")
    with advisory_lock(_STORY_LOCK_NAMESPACE, key, wait_s=STORY_LOCK_WAIT_S) as holder:
        if holder is None:
            raise StoryBusy(
                f"conversation {conversation!r}: another request is switching its story;"
                " send the request again"
            )
        yield


def conversation_for_memory(*, session: Session, conversation_id: int) -> Conversation | None:
    """The conversation with its character's name alone (a memory job's prompt names the speakers):
    not the card and lorebook the character's eager load would bring (megabytes, maybe) at each step."""
    return session.get(
        Conversation,
        conversation_id,
        options=[joinedload(Conversation.character).load_only(Character.name, Character.slug)],
    )


def append_history_if_empty(
    *,
    session: Session,
    conversation_id: int,
    lines: Sequence[tuple[str, str]],
    embeddings: np.ndarray | None,
) -> int:
    """Seed a conversation's history once: nothing is written if it already has messages. Without
    embeddings the lines are recent history only (retrieval finds embedded messages). The
    conversation's row is held first: two requests seeding one new conversation at once would both
    count none, and the second's lines would collide with the first's (a 500)."""
    session.execute(
        select(Conversation.id).where(Conversation.id == conversation_id).with_for_update(key_share=True)
    )
    existing = session.scalar(select(exists().where(Message.conversation_id == conversation_id)))
    if existing or not lines:
        return 0
    vectors = list(embeddings) if embeddings is not None else [None] * len(lines)
    rows = [
        dict(conversation_id=conversation_id, seq=i, role=Role(role), content=text, embedding=vec)
        for i, ((role, text), vec) in enumerate(zip(lines, vectors, strict=True), start=1)
    ]
    session.execute(insert(Message), rows)
    return len(rows)


def adopt_empty_conversation(
    *, session: Session, conversation_id: int, character_id: int, player_name: str
) -> None:
    """An empty conversation stored before (an import of nothing) becomes a new group's: its lead
    character and player, as a new one would have. The caller holds its lock and saw it empty."""
    session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(character_id=character_id, player_name=player_name)
    )


def upsert_conversations(
    *,
    session: Session,
    rows: Sequence[dict[str, Any]],
    tenant: str = DEFAULT_TENANT,
    created: set[str] | None = None,
) -> dict[str, tuple[int, int]]:
    """Create the tenant's conversations that do not exist yet; {external_id: (id, character id)} of
    each row's conversation as it stands (`created`, when given, gets the external ids this call
    made).

    A conversation that another producer created meanwhile is left as it is (never reassigned to
    this row's character or player): the caller compares the character id it gets back.
    """
    if not rows:
        return {}
    # In one order for every producer, so two creating the same new conversations never deadlock.
    pending = sorted(rows, key=lambda row: row["external_id"])
    out: dict[str, tuple[int, int]] = {}
    # Until each row's conversation is found or made: one another producer made meanwhile is read in a
    # new statement (it sees the rows committed while this insert waited), and one an erasure deleted
    # between the insert and that read is made again, as it would be for a turn a moment later.
    while pending:
        stmt = insert(Conversation).values([{**row, "tenant": tenant} for row in pending])
        new_only = stmt.on_conflict_do_nothing(index_elements=[Conversation.tenant, Conversation.external_id])
        made = {
            ext: (conv_id, character_id)
            for ext, conv_id, character_id in session.execute(
                new_only.returning(Conversation.external_id, Conversation.id, Conversation.character_id)
            ).tuples()
        }
        if created is not None:
            created.update(made)
        out |= made
        raced = [row["external_id"] for row in pending if row["external_id"] not in made]
        if raced:
            out |= {
                ext: (conv_id, character_id)
                for ext, conv_id, character_id in session.execute(
                    select(Conversation.external_id, Conversation.id, Conversation.character_id).where(
                        Conversation.tenant == tenant, Conversation.external_id.in_(raced)
                    )
                ).tuples()
            }
        pending = [row for row in pending if row["external_id"] not in out]
    return out


def find_conversations(
    *, session: Session, external_ids: Sequence[str], tenant: str = DEFAULT_TENANT, lock: bool = False
) -> dict[str, tuple[int, str]]:
    """The tenant's conversations by external id: {external_id: (id, character slug)}. With `lock`,
    each is key-share locked until the transaction ends (the lock its turns' foreign key takes), so
    an erasure deleting one (db/erasure.py) waits for this writer, or this lookup waits for it and
    finds the conversation gone, never a turn inserted into a deleted conversation."""
    query = (
        select(Conversation.external_id, Conversation.id, Character.slug)
        .join(Character, Character.id == Conversation.character_id)
        .where(Conversation.tenant == tenant, Conversation.external_id.in_(list(set(external_ids))))
        .order_by(Conversation.id)
    )
    if lock:
        query = query.with_for_update(key_share=True, of=Conversation)
    rows = session.execute(query).tuples()
    return {ext: (conv_id, slug) for ext, conv_id, slug in rows}


def conversation_players(*, session: Session, conversation_ids: Collection[int]) -> dict[int, str]:
    """The player each conversation was started for ('' for none: a group, an anonymous player)."""
    if not conversation_ids:
        return {}
    query = select(Conversation.id, Conversation.player_id).where(Conversation.id.in_(list(conversation_ids)))
    return {conv_id: player for conv_id, player in session.execute(query).tuples()}


# The characters (and stories) of the original service's inline request shape (a persona sent with
# each request, services/original_request.py): the default tenant's own, made from one caller's
# persona. No other creator may take the prefix, and no API key's tenant names, lists or uses them.
INLINE_PREFIX = "inline-"


def named_by(tenant: Any) -> Any:
    """Which characters `tenant` may name: every one for the default tenant (the CLI, the inline
    shape), every one but the inline personas for an API key's. `tenant` is a value or a SQL
    expression (a statement compiled once names the request's tenant by a parameter); the
    constants are literals, so such a statement carries no parameter of its own."""
    assert re.fullmatch(r"[a-z-]*", DEFAULT_TENANT + INLINE_PREFIX)  # nothing to quote or escape
    not_inline = ~Character.slug.like(literal_column(f"'{INLINE_PREFIX}%'"))
    if isinstance(tenant, str):
        return true() if tenant == DEFAULT_TENANT else not_inline
    return or_(tenant == literal_column(f"'{DEFAULT_TENANT}'"), not_inline)


def find_characters(
    *, session: Session, slugs: Sequence[str], tenant: str = DEFAULT_TENANT
) -> dict[str, int]:
    """Character ids by slug (of those `tenant` may name)."""
    named = select(Character.slug, Character.id).where(Character.slug.in_(list(set(slugs))), named_by(tenant))
    return dict(session.execute(named).tuples().all())


def all_character_slugs(*, session: Session, tenant: str = DEFAULT_TENANT) -> list[str]:
    """Every character's slug (that `tenant` may name)."""
    return list(session.scalars(select(Character.slug).where(named_by(tenant))).all())


def character_listing(
    *, session: Session, slug: str | None = None, tenant: str = DEFAULT_TENANT
) -> list[tuple[str, datetime]]:
    """(slug, created_at) of every character `tenant` may name (or of the one `slug` names), by slug."""
    query = select(Character.slug, Character.created_at).where(named_by(tenant)).order_by(Character.slug)
    if slug is not None:
        query = query.where(Character.slug == slug)
    return list(session.execute(query).tuples())


def character_names(*, session: Session, slugs: Sequence[str]) -> dict[str, str]:
    """{slug: display name} of these characters (the unknown ones left out)."""
    rows = session.execute(select(Character.slug, Character.name).where(Character.slug.in_(list(slugs))))
    return dict(rows.tuples().all())


def get_character(*, session: Session, slug: str) -> Character | None:
    return session.scalars(select(Character).where(Character.slug == slug)).one_or_none()


def append_story_event(
    *, session: Session, story: str, text: str, scene: str, time: int | None, embedding: Any
) -> tuple[int, int]:
    """Add an event at the end of a story (next ordinal; time defaults to the last event's); (id, ordinal)."""
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(story))))  # one appender per story
    last = session.execute(
        select(StoryEvent.ordinal, StoryEvent.time)
        .where(StoryEvent.story == story)
        .order_by(StoryEvent.ordinal.desc())
        .limit(1)
    ).first()
    ordinal = (last[0] + 1) if last else 1
    event_time = time if time is not None else (last[1] if last else 0)
    row = StoryEvent(
        story=story, ordinal=ordinal, scene=scene, time=event_time, text=text, embedding=embedding
    )
    session.add(row)
    session.flush()
    return row.id, ordinal


def story_event_place(*, session: Session, event_id: int) -> tuple[str, int]:
    """The story and the ordinal of the event of this id."""
    story, ordinal = session.execute(
        select(StoryEvent.story, StoryEvent.ordinal).where(StoryEvent.id == event_id)
    ).one()
    return story, ordinal


def registered_adapter_path(*, session: Session, slug: str) -> str | None:
    """The path of the character's registered LoRA, if any."""
    return session.scalar(select(Character.lora_path).where(Character.slug == slug))


def registered_adapter_paths(*, session: Session) -> set[str]:
    """The folder of every character's registered LoRA."""
    return set(session.scalars(select(Character.lora_path).where(Character.lora_path.is_not(None))))


def register_adapter(
    *, session: Session, slug: str, path: str, tenant: str | None = None, model: str | None = None
) -> int | None:
    """The character's LoRA is now the one at `path`, one version up, answering `tenant`'s turns
    alone (None: every tenant's) on `model` alone (None: every model's); its new version, or None if
    there is no such character."""
    return session.scalar(
        update(Character)
        .where(Character.slug == slug)
        .values(lora_path=path, lora_version=Character.lora_version + 1, lora_tenant=tenant, lora_model=model)
        .returning(Character.lora_version)
    )


def unregister_adapter(*, session: Session, slug: str) -> int | None:
    """The character's turns are answered by the base model again: the version of the LoRA taken off,
    or None if it had none (or there is no such character). The version stays, so that a later
    registration is another adapter to every worker."""
    return session.scalar(
        update(Character)
        .where(Character.slug == slug, Character.lora_path.is_not(None))
        .values(lora_path=None, lora_tenant=None, lora_model=None)
        .returning(Character.lora_version)
    )
