"""The single enqueue in one autocommitted statement (one round trip): a turn into the tenant's known
conversation, or a turn that starts its conversation.

Each statement writes only when create_turns (the full path, db/turns.py) would write the same rows
with no question asked; whatever else holds, it writes nothing and the caller takes the full path,
which decides with every check and says what is wrong. Compiled once per shape to the driver's SQL
and run on the driver's cursor: SQLAlchemy's statement, parameter and result machinery cost ~0.1 ms
of the producer's CPU per enqueue, and psycopg prepares a statement it runs often.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple, cast

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import (
    JSON,
    Connection,
    Select,
    Table,
    UniqueConstraint,
    bindparam,
    exists,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from db.models import Character, Conversation, ConversationMember, Turn, TurnStatus
from db.session import READ_ONLY_SERVER
from db.turns import NOT_STORED, NewTurn
from db.world import CONVERSATION_START_FIELDS, named_by

_FAST_TURN_FIELDS = tuple(
    name for name in NewTurn.__dataclass_fields__ if name != "conversation_id" and name not in NOT_STORED
)
_KEY = next(  # turns' unique constraint on (tenant, idempotency_key)
    c.name
    for c in cast(Table, Turn.__table__).constraints
    if isinstance(c, UniqueConstraint) and {x.key for x in c.columns} == {"tenant", "idempotency_key"}
)


class FastTurn(NamedTuple):
    """A turn one statement stored: its id and the `dispatched_at` it was stamped with (the send
    that follows may fail it only while no later send has stamped it again: fail_unsent)."""

    id: uuid.UUID
    sent_at: datetime


def create_turn_in_known_conversation(
    *, connection: Connection, turn: NewTurn, external_id: str, character: str | None, player_id: str = ""
) -> FastTurn | None:
    """Insert one turn into the tenant's existing conversation `external_id` (of `character`, when
    named; of `player_id` or of no player, when one is named) in a single statement; the turn stored,
    or None if nothing was written: no such conversation, another character's or player's, a group
    conversation (its answering member is chosen on the full path), or the idempotency key is taken
    (create_turns then decides, with its checks). `turn.conversation_id` is not read. For an
    autocommit connection (a conversation erased meanwhile is then no error)."""
    sql, fixed, json_fields = _insert_in_known_conversation(
        connection.dialect, character is not None, bool(player_id)
    )
    values = _turn_values(turn, fixed, json_fields) | {"external_id": external_id}
    if character is not None:
        values["character"] = character
    if player_id:
        values["player_id"] = player_id
    try:
        return _run(connection, sql, values)
    except IntegrityError as exc:
        # The conversation was found, then erased (db/erasure.py) before the turn's foreign key was
        # checked: the statement wrote nothing, and the full path finds the conversation gone.
        if not isinstance(exc.orig, psycopg.errors.ForeignKeyViolation):
            raise
        if not connection.connection.driver_connection.autocommit:  # type: ignore[union-attr]
            raise  # in a transaction the error aborted it: the caller must know
        return None


def create_turn_in_new_conversation(
    *, connection: Connection, turn: NewTurn, external_id: str, character: str, conversation: dict[str, Any]
) -> FastTurn | None:
    """Start the tenant's conversation `external_id` with `character` (`conversation`: its player_id,
    player_name, story and story_time) and insert its first turn, in a single statement; the turn
    stored, or None if nothing was written: the conversation exists or was started meanwhile (the full
    path decides), the character does not exist (the full path says so), or the idempotency key is
    taken (before or meanwhile). Both rows are written or neither: a refused request never leaves a
    conversation behind. For an autocommit connection (a key taken meanwhile is then no error)."""
    if set(conversation) != set(CONVERSATION_START_FIELDS):
        raise ValueError(
            f"a new conversation's fields are {CONVERSATION_START_FIELDS}, not {sorted(conversation)}"
        )
    sql, fixed, json_fields = _insert_in_new_conversation(connection.dialect)
    values = _turn_values(turn, fixed, json_fields) | {"external_id": external_id, "character": character}
    try:
        return _run(connection, sql, values | conversation)
    except IntegrityError as exc:
        orig = exc.orig
        if not isinstance(orig, psycopg.errors.UniqueViolation) or orig.diag.constraint_name != _KEY:
            raise
        if not connection.connection.driver_connection.autocommit:  # type: ignore[union-attr]
            raise  # in a transaction the error aborted it: the caller must know
        return None  # another request took the key meanwhile: the statement wrote nothing


def _turn_values(turn: NewTurn, fixed: dict[str, Any], json_fields: list[str]) -> dict[str, Any]:
    values = fixed | {name: getattr(turn, name) for name in _FAST_TURN_FIELDS}
    for name in json_fields:
        if values[name] is not None:
            values[name] = Jsonb(values[name])
    return values | {"id": uuid.uuid4()}


def _run(connection: Connection, sql: str, values: dict[str, Any]) -> FastTurn | None:
    """The statement on the driver's cursor. What SQLAlchemy would do on an error is done here: the
    error wrapped in SQLAlchemy's class (an OperationalError: the caller's fall-back) and a connection
    the error broke (closed or broken, its psycopg dialect's test) invalidated, so the pool never
    hands it out again. Other pooled connections a restart cut each fail once the same way."""
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"expected a psycopg 3 connection, got {type(driver).__name__}")
    try:
        with driver.cursor() as cursor:
            cursor.execute(sql, values)
            row = cursor.fetchone()
    except psycopg.Error as exc:
        read_only = exc.sqlstate == READ_ONLY_SERVER  # as the pooled engines' handler (db/session.py)
        broken = driver.closed or driver.broken or read_only
        if broken:
            connection.invalidate(exc)
        if read_only:
            raise OperationalError(
                sql, values, exc, connection_invalidated=True, hide_parameters=True
            ) from exc
        raise DBAPIError.instance(
            sql,
            values,
            exc,
            psycopg.Error,
            connection_invalidated=broken,
            dialect=connection.dialect,
            hide_parameters=True,  # as the engines': a player's line in an error's text reaches the logs
        ) from exc
    return FastTurn(*row) if row is not None else None


def _turn_columns() -> tuple[list[str], dict[str, Any], list[str]]:
    """The columns a fast insert writes, the values every such turn has (queued, and each other
    column's Python-side default, which a compiled string does not fill in), and its JSON fields."""
    columns = Turn.__table__.c
    fixed: dict[str, Any] = {"status": TurnStatus.QUEUED.value, "attempts": 0}
    given = {*_FAST_TURN_FIELDS, "id", "dispatched_at", *fixed}
    for column in columns:
        if column.default is None or column.key in given:
            continue
        if not column.default.is_scalar:  # a new column with a computed default: give it a value here
            raise TypeError(f"turns.{column.key}: the one-statement insert cannot compute its default")
        fixed[column.key] = column.default.arg
    json_fields = [name for name in _FAST_TURN_FIELDS if isinstance(columns[name].type, JSON)]
    return [*_FAST_TURN_FIELDS, "id", "dispatched_at", *fixed], fixed, json_fields


def _turn_insert(
    conversation_id: Any, narrow: Callable[[Select[Any]], Select[Any]] = lambda source: source
) -> tuple[Any, dict[str, Any], list[str]]:
    """INSERT INTO turns ... SELECT the turn's values and `conversation_id` (the source that `narrow`
    joins and filters)."""
    inserted, fixed, json_fields = _turn_columns()
    columns = Turn.__table__.c
    # dispatched_at (sent right after, as create_turns stamps it) on the database's clock
    values = [
        func.now() if name == "dispatched_at" else bindparam(name, type_=columns[name].type)
        for name in inserted
    ]
    source = select(*values, conversation_id)
    return insert(Turn).from_select([*inserted, "conversation_id"], narrow(source)), fixed, json_fields


@cache
def _insert_in_known_conversation(
    dialect: Any, named_character: bool, named_player: bool
) -> tuple[str, dict[str, Any], list[str]]:
    """create_turn_in_known_conversation's statement, its fixed values and JSON fields."""
    found = [Conversation.tenant == bindparam("tenant"), Conversation.external_id == bindparam("external_id")]
    if named_character:
        found.append(Character.slug == bindparam("character"))
    if named_player:
        found.append(Conversation.player_id.in_([literal_column("''"), bindparam("player_id")]))
    stmt, fixed, json_fields = _turn_insert(
        Conversation.id,
        lambda source: source.join(Character, Character.id == Conversation.character_id).where(
            *found, ~exists().where(ConversationMember.conversation_id == Conversation.id)
        ),
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=[Turn.tenant, Turn.idempotency_key])
    return str(stmt.returning(Turn.id, Turn.dispatched_at).compile(dialect=dialect)), fixed, json_fields


@cache
def _insert_in_new_conversation(dialect: Any) -> tuple[str, dict[str, Any], list[str]]:
    """create_turn_in_new_conversation's statement, all or nothing, taking its locks in the full
    path's order (the conversation, then the key): the conversation's INSERT as a data-modifying CTE
    (a known character, a key no turn has), skipped when the conversation exists or another producer
    is starting it; the turn's INSERT from what it returned, with no ON CONFLICT: a key another
    request took meanwhile fails the whole statement (a unique violation: the caller takes the full
    path), so a conversation is never left without its turn."""
    conv = Conversation.__table__.c
    written = {"tenant", "external_id", "character_id", *CONVERSATION_START_FIELDS}
    for column in conv:  # a compiled string fills in no Python-side default: the server must have one
        if column.key not in written and column.default is not None and column.server_default is None:
            raise TypeError(f"conversations.{column.key}: the one-statement start has no value for it")
    key_taken = exists().where(
        Turn.tenant == bindparam("tenant"), Turn.idempotency_key == bindparam("idempotency_key")
    )
    own = [bindparam(name, type_=conv[name].type) for name in ("tenant", "external_id")]
    fields = [bindparam(name, type_=conv[name].type) for name in CONVERSATION_START_FIELDS]
    named = named_by(bindparam("tenant"))  # an inline persona is no character to a key's tenant
    started = (
        insert(Conversation)
        .from_select(
            ["tenant", "external_id", "character_id", *CONVERSATION_START_FIELDS],
            select(*own, Character.id, *fields).where(
                Character.slug == bindparam("character"), named, ~key_taken
            ),
            include_defaults=False,  # emotion and affinity: the server's defaults, the same values
        )
        .on_conflict_do_nothing(index_elements=[Conversation.tenant, Conversation.external_id])
        .returning(Conversation.id)
        .cte("started")
    )
    stmt, fixed, json_fields = _turn_insert(started.c.id)
    return (
        str(stmt.add_cte(started).returning(Turn.id, Turn.dispatched_at).compile(dialect=dialect)),
        fixed,
        json_fields,
    )
