"""The original service's request shape: a persona, a chat history and a story inline with the
message (its `handler.py --persona --chat_history --story --message`, and the same fields as a
RunPod event's input), so a team moving from that service can replay its files unchanged.

The persona becomes a stored character matched by content (the same content is the same
character, a changed one another), the story becomes stored story events matched by content (a
replay embeds nothing again), the history becomes a conversation's first lines (embedded once);
without a named conversation each request is answered alone, as the original's were; then the turn
runs as any other, and the answer comes back as the original's ChatResponse.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.settings import DEFAULT_TENANT
from core.validation import error_line
from db.models import Conversation, Role
from memory.history_import import HistoryRefused, ParsedHistory, embed_texts, parse_original_history
from services.characters import INLINE_COPY, INLINE_PREFIX, slug_for
from services.producer import TurnView, another_players
from services.schemas import Int4, Text, TurnRequest

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

TEXT_MAX = 20_000  # one persona field
STORY_MAX_EVENTS = 10_000
PARTS = ("persona", "chat_history", "story")  # the parts the original handler read from files
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


class InlineRefused(ValueError):
    """A malformed inline request: `part` is persona, chat_history, story or the event's other
    fields; the message names the field (and the item) within it."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


class ExampleDialogue(BaseModel):
    """One example exchange of the persona: what the user says, what the character answers."""

    model_config = ConfigDict(extra="ignore")

    user: Text = Field(max_length=TEXT_MAX)
    character: Text = Field(
        max_length=TEXT_MAX, validation_alias=AliasChoices("character", "assistant", "char")
    )


class Persona(BaseModel):
    """The original's Persona with the other fields a stored character has; keys it does not know
    are ignored. Its own names are read as they are (review: its sample files were refused for a
    missing `name`, or lost their sheet unsaid): `character_name` for `name`, `persona` for
    `personality`, `speaking_style` (text, or a list of lines) for `speech_style`,
    `example_dialogue` (its `{role, content}` turns, paired) for `example_dialogues`, and its
    `constraints` (a list of rules) kept as the instructions after the history."""

    model_config = ConfigDict(extra="ignore")

    name: Text = Field(min_length=1, max_length=200, validation_alias=AliasChoices("name", "character_name"))
    language: Text | None = Field(default=None, min_length=1, max_length=16)
    description: Text = Field(default="", max_length=TEXT_MAX)
    personality: Text = Field(
        default="", max_length=TEXT_MAX, validation_alias=AliasChoices("personality", "persona")
    )
    scenario: Text = Field(default="", max_length=TEXT_MAX)
    speech_style: Text = Field(
        default="", max_length=TEXT_MAX, validation_alias=AliasChoices("speech_style", "speaking_style")
    )
    example_dialogues: list[ExampleDialogue] = Field(
        default_factory=list,
        max_length=100,
        validation_alias=AliasChoices("example_dialogues", "example_dialogue"),
    )
    constraints: list[Annotated[Text, Field(max_length=2000)]] = Field(default_factory=list, max_length=100)
    first_message: Text = Field(default="", max_length=TEXT_MAX)
    system_prompt: Text = Field(default="", max_length=TEXT_MAX)
    post_history_instructions: Text = Field(default="", max_length=TEXT_MAX)

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("speech_style", mode="before")
    @classmethod
    def _lines_of_style(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        return value

    @field_validator("example_dialogues", mode="before")
    @classmethod
    def _paired(cls, value: Any) -> Any:
        """The original's example dialogue, a list of `{role, content}` turns, as exchanges: each
        player turn with the character's turn after it (one without a player turn before it answers
        an empty one; a player turn the character does not answer is left out)."""
        if not isinstance(value, list) or not any(isinstance(v, dict) and "role" in v for v in value):
            return value
        pairs: list[dict[str, Any]] = []
        asked: Any = None
        for i, turn in enumerate(value):
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
                raise ValueError(f"item {i}: a {{role, content}} object is expected")
            if turn["role"] == "user":
                asked = turn.get("content")
            elif turn["role"] in ("assistant", "character"):
                pairs.append({"user": "" if asked is None else asked, "character": turn.get("content")})
                asked = None
        return pairs

    def character_fields(self) -> dict[str, Any]:
        """The character's columns; without a language, Korean if the persona is written in Hangul.
        The original's constraints follow the persona's own post-history instructions, a line each."""
        fields = self.model_dump(exclude={"language", "example_dialogues", "constraints"})
        fields["example_dialogues"] = [d.model_dump() for d in self.example_dialogues]
        if self.constraints:
            rules = "\n".join(f"- {rule}" for rule in self.constraints)
            fields["post_history_instructions"] = "\n".join(
                filter(None, [self.post_history_instructions, rules])
            )
        text = " ".join(str(v) for v in fields.values())
        fields["language"] = self.language or ("ko" if _HANGUL.search(text) else "en")
        return fields


class StoryEventItem(BaseModel):
    """One event of the inline story: its text (or content), scene and story time."""

    model_config = ConfigDict(extra="ignore")

    text: Text = Field(min_length=1, max_length=4000, validation_alias=AliasChoices("text", "content"))
    scene: Text = Field(default="", max_length=200)
    time: Int4 = 0

    @model_validator(mode="before")
    @classmethod
    def _plain_text(cls, value: Any) -> Any:
        return {"text": value} if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value


@dataclass(frozen=True)
class InlineRequest:
    """An inline request, checked: nothing of it is stored yet."""

    persona: Persona
    lines: list[tuple[Role, str]]
    story: list[StoryEventItem] | None
    turn: TurnRequest  # conversation and character are placeholders until it is stored
    conversation: str | None  # the caller's; None: the request's own, a copy of its history
    line_items: tuple[str, ...] = ()  # each line's item in the request (`history[4]`), for refusals
    ignored: tuple[str, ...] = ()  # the request's keys nothing reads (the answer lists them)

    @property
    def slug(self) -> str:
        """The persona's character: its name and a digest of its content in a slug space no other
        creator may use, so one content is one character and no game-defined character is replaced."""
        name = (INLINE_PREFIX + slug_for(self.persona.name))[:50].rstrip("-")
        return f"{name}-{_digest(self.persona.character_fields())[:12]}"

    @property
    def story_key(self) -> str | None:
        """The story's name: a digest of its events, so the same story is stored once."""
        if self.story is None:
            return None
        events = [[e.text, e.scene, e.time] for e in self.story]
        return INLINE_PREFIX + _digest(events)

    @property
    def history_key(self) -> str:
        """The conversation that keeps this persona's, player's and history's embedded lines and
        never runs a turn: each unnamed request copies it into a conversation of its own."""
        lines = [[r.value, t] for r, t in self.lines]
        return INLINE_PREFIX + _digest([self.slug, self.turn.player_id, lines])


@dataclass(frozen=True)
class StoredInline:
    """What storing an inline request did."""

    character: str
    character_version: int
    character_written: bool
    story: str | None
    story_events_stored: int
    conversation: str
    lines_imported: int
    ignored: tuple[str, ...] = ()  # the request's keys nothing read


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()[:32]


def _where(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _refused(part: str, prefix: str, exc: ValidationError) -> InlineRefused:
    first = exc.errors()[0]
    where = (prefix + "." + _where(first["loc"])).rstrip(".").replace(".[", "[")
    return InlineRefused(part, error_line(where, first["msg"]))


def parse_persona(doc: Any) -> Persona:
    """The persona, checked; InlineRefused names the field."""
    if not isinstance(doc, dict):
        raise InlineRefused("persona", "persona: must be a JSON object with at least a name")
    try:
        return Persona.model_validate(doc)
    except ValidationError as exc:
        raise _refused("persona", "persona", exc) from None


def parse_story(doc: Any) -> list[StoryEventItem]:
    """The story's events: a list, or one under events / story_events / story; InlineRefused names
    the item and field."""
    where = "story"
    if isinstance(doc, dict):
        key = next((k for k in ("events", "story_events", "story") if k in doc), None)
        if key is None:
            raise InlineRefused("story", "story: missing the list of events (events)")
        doc, where = doc[key], f"story.{key}"
    if not isinstance(doc, list):
        raise InlineRefused("story", f"{where}: must be a list of events")
    if len(doc) > STORY_MAX_EVENTS:
        raise InlineRefused("story", f"{where}: more than {STORY_MAX_EVENTS} events")
    events = []
    for i, item in enumerate(doc):
        try:
            events.append(StoryEventItem.model_validate(item))
        except ValidationError as exc:
            raise _refused("story", f"{where}[{i}]", exc) from None
    return events


def parse_chat_history(doc: Any, key: str = "chat_history") -> ParsedHistory:
    """The history's lines (the original's list of {role, content}, sent under `key`); InlineRefused
    names the item under that key."""
    if doc is None:
        return ParsedHistory([])
    try:
        return parse_original_history(doc, key)
    except HistoryRefused as exc:
        raise InlineRefused(key, str(exc)) from None


# The turn's fields, each under its name here or the original's (`user_id`, `user_name`).
_TURN_FIELDS = {
    "player_id": ("player_id", "user_id"),
    "player_name": ("player_name", "user_name"),
    "story_time": ("story_time",),
    "idempotency_key": ("idempotency_key",),
    "speaker": ("speaker",),
}
_MODEL_CONFIGS = ("model_config", "model_cfg")  # the original's names for its ModelConfig, over time
_GEN_CONFIGS = ("gen", "gen_config", "params")  # its sampling settings (`gen`), ours; later ones win
# Every key of a request read here; the others are listed in the answer's `mlchat.ignored`.
READ_KEYS = frozenset(
    {"persona", "chat_history", "history", "story", "message", "conversation", "model"}
    | set(_MODEL_CONFIGS)
    | set(_GEN_CONFIGS)
    | {name for names in _TURN_FIELDS.values() for name in names}
)


def _asked_model(payload: dict[str, Any], models: Sequence[str]) -> dict[str, str]:
    """The model the request names, as the original chose one per request (`model` as a name or its
    ModelConfig `{"name"}`, or `model_config` / `model_cfg` with `name` or `model_name`): {"model":
    name}, or {} for the deployment's default. The rest of the config (its GPUs) is the worker's to
    decide. Refused naming the field when it is not one of `models`, or when two disagree."""
    model = payload.get("model")
    named: list[tuple[str, Any]] = (
        [("model.name", model.get("name"))] if isinstance(model, dict) else [("model", model)]
    )
    for key in _MODEL_CONFIGS:
        config = payload.get(key)
        if config is not None and not isinstance(config, dict):
            raise InlineRefused("request", f"{key}: must be a JSON object")
        named += [(f"{key}.{inner}", (config or {}).get(inner)) for inner in ("name", "model_name")]
    asked: dict[str, str] = {}
    for field, name in named:
        if name is None:
            continue
        if not isinstance(name, str):
            raise InlineRefused("request", f"{field}: must be a string, a model's name")
        if name not in models:
            raise InlineRefused(
                "request", f"{field}: {name[:64]!r} is not served here; served: {', '.join(models)}"
            )
        if asked and asked["model"] != name:
            raise InlineRefused("request", f"{field}: {name[:64]!r}, but model names {asked['model']!r}")
        asked = {"model": name}
    return asked


def read_request(payload: dict[str, Any], models: Sequence[str] | None = None) -> InlineRequest:
    """Check every part of an inline request before anything is stored.

    Fields: persona (required), chat_history (or history), story, message, and optionally gen_config
    (temperature, top_p, max_new_tokens) or params, conversation, player_id, player_name, story_time,
    and the model (`model_config.name` or `model`, one of `models`: the deployment's served models,
    or only this process's when it answers the turn itself).
    """
    from core.settings import settings

    if "persona" not in payload:
        raise InlineRefused("persona", "persona: missing")
    persona = parse_persona(payload["persona"])
    # The key the request used, named in a refusal (`history`: the original's other name for it).
    key = next((k for k in ("chat_history", "history") if payload.get(k) is not None), "chat_history")
    history = parse_chat_history(payload.get(key), key)
    lines = history.lines
    # An empty story is no story: nothing to store, and the conversation keeps the one it has.
    story = parse_story(payload["story"]) or None if payload.get("story") is not None else None
    conversation = payload.get("conversation")
    if conversation is not None and (not isinstance(conversation, str) or not conversation.strip()):
        # Read as "no conversation", a request meant to go on with one was answered statelessly.
        raise InlineRefused("request", "conversation: must be a non-empty string (or left out)")
    if isinstance(conversation, str) and conversation.startswith(INLINE_PREFIX):
        raise InlineRefused(
            "request",
            f"conversation: {conversation[:64]!r} starts with {INLINE_PREFIX!r}, kept for requests "
            "without a conversation (each answered on its own); name one of yours to go on with it",
        )
    for key in _GEN_CONFIGS:
        if payload.get(key) is not None and not isinstance(payload[key], dict):  # [] and 0 too
            raise InlineRefused("request", f"{key}: must be a JSON object")
    params = {k: v for key in _GEN_CONFIGS for k, v in (payload.get(key) or {}).items()}
    turn = {
        "conversation": conversation or "inline",
        "character": "inline",
        "message": payload.get("message"),
        "params": params,
        **{
            field: payload[given]
            for field, names in _TURN_FIELDS.items()
            if (given := next((n for n in names if payload.get(n) is not None), None)) is not None
        },
        **_asked_model(payload, settings.models if models is None else models),
    }
    try:
        request = TurnRequest.model_validate(turn)
    except ValidationError as exc:
        first = exc.errors()[0]
        where, said = _where(first["loc"]), first["msg"]
        if not where:  # a check of the whole turn: its message names the field (`params.actions: …`)
            said = said.removeprefix("Value error, ")
            where, _, said = said.partition(": ") if ": " in said else ("input", "", said)
        if where.startswith("params."):  # name the object that held it (the last of them that did)
            field = where.split(".")[1].split("[")[0]
            held_by = next((k for k in reversed(_GEN_CONFIGS) if field in (payload.get(k) or {})), "params")
            where = where.replace("params.", f"{held_by}.", 1)
        raise InlineRefused("request", error_line(where, said)) from None
    if not request.message.strip():
        raise InlineRefused("request", "message: is empty")
    ignored = tuple(sorted(k for k in payload if k not in READ_KEYS))
    inline = InlineRequest(persona, lines, story, request, conversation, history.items, ignored)
    # The history and the story are what was asked too: a key reused with others is a conflict, not
    # a replay (it stored them, moved a named conversation to the story, and returned the old reply).
    asked = [{"role": role.value, "content": text} for role, text in lines]
    request.with_earlier_messages(
        asked + ([{"story": inline.story_key}] if inline.story_key else []), new_to_the_hash=True
    )
    return inline


def _missing_from(req: InlineRequest, stored: list[tuple[Role, str]], conversation: str) -> int:
    """How many of the history's lines the conversation already holds, in order; refused when the
    two disagree (another conversation's history, or one edited since), naming the item as sent."""
    for i, (line, have) in enumerate(zip(req.lines, stored, strict=False)):
        if line != have:
            item = req.line_items[i] if i < len(req.line_items) else f"chat_history[{i}]"
            raise InlineRefused(
                item.split("[", 1)[0].split(".", 1)[0],
                f"{item}: differs from line {i + 1} of conversation {conversation!r} "
                f"({have[0].value}: {have[1][:40]!r}); pass another conversation",
            )
    return min(len(req.lines), len(stored))


def store_request(req: InlineRequest, *, tenant: str = DEFAULT_TENANT) -> StoredInline:
    """Store the persona, story and history (idempotent: a replay stores nothing new), in one
    transaction; the embeddings are computed before it, for what is not stored yet.

    A named conversation takes the history's new lines. Without one the request is stateless like
    the original's: the history is kept once per persona, player and history, and each request
    answers in a conversation of its own holding a copy of it, so no other request's lines, player
    or facts reach its prompt. EmbedderMismatch, with nothing stored, when the stored vectors are
    another embedder's (a keyed replay through store_and_enqueue finds its turn before this)."""
    from db.history import conversation_lines, copy_lines, lock_conversation
    from db.session import session_scope
    from db.vector_space import refuse_if_moved
    from db.world import (
        StoryBusy,
        conversation_players,
        count_story_events,
        find_conversations,
        save_character_if_changed,
        set_conversation_story,
        upsert_conversations,
        upsert_story_events,
    )
    from worker.embedder import check_space  # the embedder loads on first use, in the calling process

    check_space()
    kept, story_key = req.conversation or req.history_key, req.story_key
    with session_scope() as session:
        story_stored = story_key is None or count_story_events(session=session, story=story_key) > 0
        known = find_conversations(session=session, external_ids=[kept], tenant=tenant)
        if kept in known and known[kept][1] != req.slug:
            raise _not_its_own(kept)
        held = conversation_lines(session=session, conversation_id=known[kept][0]) if kept in known else []
    start = _missing_from(req, held, kept)
    events = [] if story_stored or req.story is None else req.story
    vectors = embed_texts([text for _, text in req.lines[start:]] + [e.text for e in events])
    line_vectors, event_vectors = vectors[: len(req.lines) - start], vectors[len(req.lines) - start :]

    with session_scope() as session:
        char_id, version, written = save_character_if_changed(
            session=session, slug=req.slug, fields=req.persona.character_fields()
        )
        if events:  # keyed by (story, ordinal): a replay racing this one writes the same rows
            rows = [
                {"story": story_key, "ordinal": i, "scene": e.scene, "time": e.time, "text": e.text}
                for i, e in enumerate(events, start=1)
            ]
            upsert_story_events(session=session, events=rows, embeddings=event_vectors)
        row = {
            "external_id": kept,
            "character_id": char_id,
            "player_id": req.turn.player_id,
            "player_name": req.turn.player_name,
            "story": story_key if req.conversation else None,
            "story_time": req.turn.story_time if req.conversation else None,
        }
        kept_id, owner = upsert_conversations(session=session, rows=[row], tenant=tenant)[kept]
        if owner != char_id:
            raise _not_its_own(kept)
        player = conversation_players(session=session, conversation_ids=[kept_id]).get(kept_id)
        if player is None:  # erased since the upsert found it
            raise HistoryMoved("request", f"conversation {kept!r} changed meanwhile; try again")
        # As its turn would be refused, before the story switch and the persona this transaction
        # wrote are committed (review): a refused request stores nothing.
        if req.conversation and (clash := another_players(kept, player, req.turn.player_id)):
            raise InlineRefused("request", f"player_id: {clash}")
        if (
            req.conversation
            and story_key is not None
            and not set_conversation_story(
                session=session, conversation_id=kept_id, story=story_key, story_time=req.turn.story_time
            )
        ):
            # A turn in flight, not the request, is in the way (as add_conversation says): try again.
            raise StoryBusy(
                f"story: conversation {kept!r} has unanswered turns with another story or story_time; "
                "send this one again when they are answered, or pass another conversation"
            )
        added = _append_missing(session, req, kept_id, kept, start, line_vectors)
        # Before a copy, which names the stored vectors' embedder to copy them as they are.
        refuse_if_moved(session=session, what="the request's history and story")
        conversation = kept
        if not req.conversation:
            conversation = _own_conversation(req)
            row |= {"external_id": conversation, "story": story_key, "story_time": req.turn.story_time}
            conv_id, _ = upsert_conversations(session=session, rows=[row], tenant=tenant)[conversation]
            lock_conversation(session=session, conversation_id=conv_id)  # two retries copy once
            if not conversation_lines(session=session, conversation_id=conv_id):
                copy_lines(session=session, source_id=kept_id, target_id=conv_id, count=len(req.lines))
    return StoredInline(req.slug, version, written, story_key, len(events), conversation, added, req.ignored)


def _own_conversation(req: InlineRequest) -> str:
    """The conversation of its own a request without one answers in: a retry under the same
    idempotency key gets the same one (its name is part of the request's fingerprint) and finds its
    lines there."""
    key = req.turn.idempotency_key
    own = hashlib.sha256(key.encode()).hexdigest()[:12] if key else uuid.uuid4().hex[:12]
    return f"{req.history_key}-{own}"


def inline_histories(conversations: Sequence[str]) -> list[str]:
    """The conversations keeping the history of the named ones an inline request answered in (each
    one's name is its history's and a suffix: _own_conversation)."""
    return [name.rsplit("-", 1)[0] for name in conversations if re.fullmatch(INLINE_COPY, name)]


def _replayed(req: InlineRequest, stream: bool) -> StoredInline | None:
    """What a replay (the request's idempotency key names a turn of this same request) answers with,
    before anything is stored: storing it again would point its conversation back at its story, which a
    later request may have switched; None for a request not seen yet. IdempotencyConflict, nothing
    stored, when the key names a turn asked with another request."""
    from db.session import session_scope
    from db.turns import keyed_turn
    from db.world import get_character

    key = req.turn.idempotency_key
    if key is None:
        return None
    conversation = req.conversation or _own_conversation(req)
    turn = req.turn.model_copy(update={"conversation": conversation, "character": req.slug})
    turn = turn.streamed_by_transport(stream)
    with session_scope() as session:
        hashes = {turn.request_hash(), *turn.legacy_request_hashes()}
        if keyed_turn(session=session, tenant=DEFAULT_TENANT, key=key, request_hashes=hashes) is None:
            return None
        character = get_character(session=session, slug=req.slug)
        version = character.version if character is not None else 0
    return StoredInline(req.slug, version, False, req.story_key, 0, conversation, 0, req.ignored)


class HistoryMoved(InlineRefused):
    """The conversation's history changed between the request's two reads (an erasure of the
    conversation, or of the history it is copied from, committed between them): nothing stored, and
    the same request sent again goes through."""


def _not_its_own(conversation: str) -> InlineRefused:
    return InlineRefused(
        "request",
        f"conversation: {conversation!r} is another character's (a changed persona is a new character)",
    )


def _append_missing(
    session: Session,
    req: InlineRequest,
    conv_id: int,
    conversation: str,
    start: int,
    line_vectors: np.ndarray,
) -> int:
    """Append the history's lines the conversation does not hold yet; how many."""
    from db.history import append_lines, conversation_lines, lock_conversation

    lock_conversation(session=session, conversation_id=conv_id)
    now_held = _missing_from(req, conversation_lines(session=session, conversation_id=conv_id), conversation)
    if now_held < start:  # lines only ever grow: an erasure took them meanwhile (or a rewrite)
        raise HistoryMoved("chat_history", f"conversation {conversation!r} changed meanwhile; try again")
    added = len(req.lines) - now_held
    owner = session.get_one(Conversation, conv_id).player_id
    if added and req.turn.player_id and owner != req.turn.player_id:
        # As a history import refuses it: the lines would become that player's memory.
        whose = f"player {owner!r}'s" if owner else "an anonymous player's"
        raise InlineRefused(
            "request",
            f"player_id: conversation {conversation!r} is {whose}, not player {req.turn.player_id!r}'s",
        )
    if added:
        append_lines(
            session=session,
            conversation_id=conv_id,
            lines=req.lines[now_held:],
            vectors=line_vectors[now_held - start :],
        )
    return added


def store_and_enqueue(
    req: InlineRequest,
    *,
    send: bool,
    stream: bool = False,
    on_stored: Callable[[StoredInline], None] | None = None,
) -> tuple[StoredInline, uuid.UUID]:
    """store_request, then its turn (sent to the workers when `send`): (what was stored, the turn's id).
    `on_stored` hears what was stored before the turn is, so a caller can say so if the turn fails.

    A request that points a named conversation at a story holds the conversation's story lock until
    its turn is stored. Without it a second request could switch the story between this one's story
    write and its turn (no turn of the conversation was unanswered yet), and this turn was answered in
    the other story. A request without a story takes no lock: its turn runs in whatever story the
    conversation has then, as the README says."""
    from contextlib import nullcontext

    from db.world import idempotency_key_lock, story_switch_lock
    from services.producer import enqueue_turns, refuse_when_live_queue_full

    if send:  # before the persona, story and history are stored, not only the turn (review)
        from core.settings import settings

        refuse_when_live_queue_full({req.turn.model or settings.model})
    switching = req.conversation is not None and req.story_key is not None
    held = story_switch_lock(DEFAULT_TENANT, req.conversation or "") if switching else nullcontext()
    key = req.turn.idempotency_key
    # Two requests under one key at once: the second waits for the first's turn, then replays it or
    # is refused before storing anything (the key lock first: no other path takes both).
    keyed = idempotency_key_lock(DEFAULT_TENANT, key) if key else nullcontext()
    with keyed, held:
        stored = _replayed(req, stream) or store_request(req)
        if on_stored is not None:
            on_stored(stored)
        turn = turn_request(req, stored).streamed_by_transport(stream)
        (turn_id,) = enqueue_turns([turn], send=send)
    return stored, turn_id


def turn_request(req: InlineRequest, stored: StoredInline) -> TurnRequest:
    """The turn to run, in the stored conversation with the stored character."""
    return req.turn.model_copy(update={"conversation": stored.conversation, "character": stored.character})


def chat_response(view: TurnView, stored: StoredInline) -> dict[str, Any]:
    """The original's ChatResponse: reply {text, embedding}, usage, retrieved [{text, score,
    source}], timing (ms); mlchat's own record of the turn under "mlchat"."""
    from db.history import line_texts, reply_embedding
    from db.session import DATABASE_OUTAGES, session_scope
    from db.world import story_event_texts

    context = view.context or {}
    events, memories = context.get("events", []), context.get("memories", [])
    embedding, event_text, line_text, missing = None, {}, {}, None
    try:
        with session_scope() as session:
            embedding = reply_embedding(session=session, turn_id=view.id) if view.reply is not None else None
            event_text = story_event_texts(session=session, ids=[e["id"] for e in events])
            line_text = line_texts(session=session, ids=[m["id"] for m in memories])
    except DATABASE_OUTAGES:
        # The turn is answered: "send it again" would answer its line twice. The extras that need
        # the database (the reply's embedding, the retrieved texts) come empty, and the answer says so.
        embedding, event_text, line_text = None, {}, {}
        missing = "the database was away: the reply's embedding and the retrieved texts are left out"
    retrieved = [
        {"text": line_text.get(m["id"], ""), "score": m["score"], "source": "chat_history"} for m in memories
    ] + [{"text": event_text.get(e["id"], ""), "score": e["score"], "source": "story"} for e in events]
    reply = None if view.reply is None else {"text": view.reply, "embedding": embedding}
    if reply is not None and view.structured is not None:
        # What `params.actions` or a response_format asked for beside the text (review, stop 76:
        # an NPC's action and emotion were generated, stored, and left out of the answer).
        reply["structured"] = view.structured
    return {
        "reply": reply,
        "usage": view.usage,
        "retrieved": retrieved,
        "timing": view.timings,
        "mlchat": {
            "turn": str(view.id),
            "status": view.status.value,
            "error": view.error,
            "conversation": stored.conversation,
            "character": stored.character,
            "character_version": stored.character_version,
            "story": stored.story,
            "history_lines_imported": stored.lines_imported,
        }
        | ({"partial": missing} if missing else {})
        # what the request held that nothing read (the original's `session_id`, `chat_rag_config`, a
        # typo): said, not dropped unsaid
        | ({"ignored": list(stored.ignored)} if stored.ignored else {}),
    }
