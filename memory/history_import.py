"""`mlchat history import`: existing chat logs into a conversation, so summaries, extraction and
retrieval have the past. Three shapes: SillyTavern's chat JSONL (a header line, then one message a
line), OpenAI messages (a JSON array, or {"messages": [...]}), and the original service's history
JSON (a list of {role, content}, or {"chat_history"|"history": [...]}).

Every line is checked before anything is stored: a malformed log is refused with the line (JSONL)
or the item (JSON) and the field, and nothing of it is stored. The lines are embedded in batches and
appended in one transaction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from sqlalchemy.orm import Session

from core.halving import most_passing
from core.settings import TENANT_NAME, settings
from core.text import printable
from db.models import Conversation, Role
from db.vector_space import refuse_if_moved
from services.schemas import HISTORY_LINE_CHARS, storable_text

HistoryFormat = Literal["sillytavern", "openai", "original"]
EMBED_CHUNK = 256


def embed_texts(texts: list[str]) -> Any:
    """The texts' vectors (an array, one row a text), embedded EMBED_CHUNK at a time."""
    import numpy as np

    from core.settings import settings
    from worker.embedder import embed  # the embedder loads on first use, in the calling process

    if not texts:
        return np.zeros((0, settings.embedding_dim), dtype=np.float32)
    return np.concatenate([embed(texts[i : i + EMBED_CHUNK]) for i in range(0, len(texts), EMBED_CHUNK)])


class HistoryRefused(ValueError):
    """A malformed chat log; the message names the line or item and the field."""


@dataclass(frozen=True)
class ParsedHistory:
    lines: list[tuple[Role, str]]
    user_name: str | None = None
    skipped: int = 0  # system, developer and tool lines, tool-call-only and empty messages
    items: tuple[str, ...] = ()  # each line's item, as a refusal names it (`chat_history[4]`)


class Imported(NamedTuple):
    """An import's answer: the conversation's id, and the seqs of the lines stored (last < first:
    none, the conversation held the log already); `skipped`: messages that are no line of the
    dialogue (system, developer and tool messages, tool calls, empty ones)."""

    conversation_id: int
    first: int
    last: int
    skipped: int


NAME_MAX = 200  # conversations.player_name, external_id and player_id
TENANT_MAX = 64  # conversations.tenant
_SKIPPED_ROLES = ("system", "developer", "tool", "function")
_ROLES = {
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
    "character": Role.ASSISTANT,
    "narrator": Role.NARRATOR,
}


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise HistoryRefused(f"{where}: must be a string, got {type(value).__name__}")
    if len(value) > HISTORY_LINE_CHARS:
        raise HistoryRefused(f"{where}: {len(value)} characters; the limit is {HISTORY_LINE_CHARS}")
    try:
        return storable_text(value)
    except ValueError as exc:
        raise HistoryRefused(f"{where}: {exc}") from None


def _json(text: str, where: str) -> Any:
    """Decoded JSON; HistoryRefused naming the line for what json cannot read (too deep, a number
    too long) as for what is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HistoryRefused(f"{where or f'line {exc.lineno}'}: not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HistoryRefused(f"{where or 'line 1'}: not JSON that can be read ({reason})") from None


_MESSAGE_KEYS = {"mes", "is_user", "name", "send_date", "is_system", "swipes"}


def parse_sillytavern(raw: str) -> ParsedHistory:
    """SillyTavern chat JSONL: a header ({user_name, character_name, ...}) then {name, is_user, mes}."""
    lines: list[tuple[Role, str]] = []
    user_name, skipped, first = None, 0, True
    speaker: str | None = None  # the character's name: the header's, else its first line's
    # Only "\n" ends a line: JSON.stringify writes U+2028, U+2029 and U+0085 raw inside strings, and
    # str.splitlines() would break a message there.
    for number, line in enumerate(raw.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():  # blank lines (leading ones too) are not lines of the chat
            continue
        item = _json(line, f"line {number}")
        if not isinstance(item, dict):
            hint = (
                "; a list of messages is --format openai or original"
                if first and line.lstrip()[:1] == "["
                else ""
            )
            raise HistoryRefused(f"line {number}: must be a JSON object (a SillyTavern chat line){hint}")
        # The header has no message keys: a first line with one (is_user, name) but no `mes` is a
        # malformed message, not a header to skip.
        header, first = first and not (_MESSAGE_KEYS & item.keys()), False
        if header and any(isinstance(item.get(key), list) for key in ORIGINAL_KEYS):
            raise HistoryRefused(
                f"line {number}: a document of messages, not a SillyTavern chat; pass --format openai "
                "(or original)"
            )
        if header:
            name = item.get("user_name")
            if isinstance(name, str) and len(name) > NAME_MAX:
                raise HistoryRefused(f"line {number}: user_name: longer than {NAME_MAX} characters")
            user_name = _text(name, f"line {number}: user_name") if isinstance(name, str) and name else None
            named = item.get("character_name")
            # A group chat's header names no character ("unused"): its first character line does.
            speaker = named if isinstance(named, str) and named and named != "unused" else None
            continue
        if "mes" not in item:
            raise HistoryRefused(f"line {number}: mes: missing")
        text = _text(item["mes"], f"line {number}: mes")
        is_user = item.get("is_user", False)
        if not isinstance(is_user, bool):
            raise HistoryRefused(f"line {number}: is_user: must be true or false")
        if item.get("is_system") is True or not text.strip():
            skipped += 1
            continue
        extra = item.get("extra")
        # SillyTavern's narrator lines (/sys, /nar) are neither the player's nor the character's.
        narrator = not is_user and isinstance(extra, dict) and extra.get("type") == "narrator"
        name = item.get("name")
        if not is_user and not narrator and isinstance(name, str) and name:
            # A group chat's members each speak under their own name: read as the one character's,
            # one member's lines would be summarised and remembered as another's.
            if speaker is not None and name != speaker:
                raise HistoryRefused(
                    f"line {number}: name: {printable(name, 60)!r} is not the log's character "
                    f"({printable(speaker, 60)!r}); a log of several characters (a group chat, a character "
                    "renamed mid-chat) cannot be imported as one character's"
                )
            speaker = name
        lines.append((Role.NARRATOR if narrator else Role.USER if is_user else Role.ASSISTANT, text))
    return ParsedHistory(lines, user_name, skipped)


def _messages(items: Any, name: str, max_items: int | None = None) -> ParsedHistory:
    if not isinstance(items, list):
        raise HistoryRefused(f"{name}: must be a list of messages")
    if max_items is not None and len(items) > max_items:
        raise HistoryRefused(f"{name}: more than {max_items} messages")
    lines: list[tuple[Role, str]] = []
    skipped = 0
    user_name: str | None = None
    speaker: str | None = None  # the assistant's `name`, where the log gives one
    kept_items: list[str] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise HistoryRefused(f"{where}: must be an object with role and content")
        role = item.get("role")
        if not isinstance(role, str):
            raise HistoryRefused(f"{where}.role: must be one of {', '.join([*_ROLES, *_SKIPPED_ROLES])}")
        # Not lines of the dialogue: instructions, tool calls and their results (OpenAI logs).
        if role in _SKIPPED_ROLES:
            skipped += 1
            continue
        if role not in _ROLES:
            raise HistoryRefused(
                f"{where}.role: must be one of {', '.join([*_ROLES, *_SKIPPED_ROLES])} (got {role!r})"
            )
        content = item.get("content")
        called_tools = bool(item.get("tool_calls") or item.get("function_call"))
        if content is None and isinstance(item.get("refusal"), str):  # what the model said, refusing
            content = item["refusal"]
        if content is None and not called_tools:
            raise HistoryRefused(f"{where}.content: {'null' if 'content' in item else 'missing'}")
        if content is None:  # an assistant message that only called tools (content null or left out)
            skipped += 1
            continue
        if isinstance(content, list):  # OpenAI content parts: the text parts, joined
            content = "\n".join(_part_texts(content, f"{where}.content"))
        text = _text(content, f"{where}.content")
        if not text.strip():
            skipped += 1
            continue
        said_by = item.get("name")
        if isinstance(said_by, str) and said_by:
            if len(said_by) > NAME_MAX:
                raise HistoryRefused(f"{where}.name: longer than {NAME_MAX} characters")
            said_by = _text(said_by, f"{where}.name")
            if _ROLES[role] == Role.USER:
                user_name = user_name or said_by
            elif _ROLES[role] == Role.ASSISTANT and speaker is None:
                speaker = said_by
            elif (
                _ROLES[role] == Role.ASSISTANT and speaker is not None and said_by != speaker
            ):  # as a group chat
                raise HistoryRefused(
                    f"{where}.name: {printable(said_by, 60)!r} is not the log's character "
                    f"({printable(speaker, 60)!r}); a log of several characters cannot be imported as "
                    "one character's"
                )
        lines.append((_ROLES[role], text))
        kept_items.append(where)
    return ParsedHistory(lines, user_name, skipped, tuple(kept_items))


# OpenAI content parts holding text (Chat Completions' and the Responses API's), and those that hold
# none the dialogue could keep (an image, a sound, a file): left out of the line.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
_OTHER_PARTS = ("image_url", "input_image", "input_audio", "file", "input_file")


def _part_texts(parts: list[Any], where: str) -> list[str]:
    """The text of a message's content parts, each checked; HistoryRefused naming the part."""
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise HistoryRefused(f"{at}: must be an object with type and text")
        kind = part.get("type")
        if kind in _OTHER_PARTS:
            continue
        if kind not in _TEXT_PARTS:
            known = ", ".join([*_TEXT_PARTS, *_OTHER_PARTS])
            shown = f" (got {printable(kind, 40)!r})" if isinstance(kind, str) else ""
            raise HistoryRefused(f"{at}.type: must be one of {known}{shown}")
        key = _TEXT_PARTS[kind]
        if not isinstance(part.get(key), str):
            raise HistoryRefused(f"{at}.{key}: must be a string")
        texts.append(_text(part[key], f"{at}.{key}"))
    return texts


def parse_json_messages(raw: str, keys: tuple[str, ...]) -> ParsedHistory:
    """A JSON list of {role, content}, bare or under one of `keys`."""
    doc = _json(raw, "")
    if isinstance(doc, dict):
        key = next((k for k in keys if k in doc), None)
        if key is None:
            raise HistoryRefused(f"{keys[0]}: missing (the list of messages)")
        return _messages(doc[key], key)
    return _messages(doc, "messages")


ORIGINAL_KEYS = ("chat_history", "history", "messages")
ORIGINAL_MAX_ITEMS = 10_000  # one inline request's history, as its story's events


def parse_original_history(doc: Any, name: str = "chat_history") -> ParsedHistory:
    """The original service's history already decoded (a list of {role, content}, bare or under one
    of ORIGINAL_KEYS); items are named `name[i]`. An empty history is no lines, not an error."""
    if isinstance(doc, dict):
        key = next((k for k in ORIGINAL_KEYS if k in doc), None)
        if key is None:
            raise HistoryRefused(f"{name}: missing the list of messages (chat_history)")
        return _messages(doc[key], f"{name}.{key}" if name != key else name, ORIGINAL_MAX_ITEMS)
    return _messages(doc, name, ORIGINAL_MAX_ITEMS)


def parse_history(raw: str, fmt: HistoryFormat) -> ParsedHistory:
    """The log's lines, checked; raises HistoryRefused naming the line or item and the field."""
    raw = raw.removeprefix("\ufeff")  # a byte order mark, as editors on Windows save UTF-8
    if fmt == "sillytavern":
        parsed = parse_sillytavern(raw)
    elif fmt == "openai":
        parsed = parse_json_messages(raw, ("messages",))
    else:
        parsed = parse_json_messages(raw, ORIGINAL_KEYS)
    if not parsed.lines:
        raise HistoryRefused("the log holds no user or assistant lines")
    limit = settings.history_max_lines
    if len(parsed.lines) > limit:  # each is embedded, and all are stored in one transaction
        raise HistoryRefused(
            f"the log holds {len(parsed.lines):,} lines, more than MLCHAT_HISTORY_MAX_LINES ({limit:,}); "
            "import it in parts, oldest first"
        )
    return parsed


def already_held(log: list[tuple[Role, str]], held: list[tuple[Role, str]]) -> bool:
    """Whether the conversation holds the whole log as a run of its lines (imported before, live
    turns since or not). A log only partly held is another log: matching a few lines at its start
    would drop lines of a new log that happens to begin as the conversation ends."""
    return bool(log) and held_start(log, held) == len(log)


def _line_key(line: tuple[Role, str]) -> bytes:
    # A narrator line is matched as a character's: SillyTavern's narrator lines were imported as the
    # character's before they were read as the narrator's, and such a log sent again is held.
    role = Role.ASSISTANT if line[0] == Role.NARRATOR else line[0]
    return hashlib.blake2b(f"{role.value}\x00{line[1]}".encode(), digest_size=8).digest()


def held_start(log: list[tuple[Role, str]], held: list[tuple[Role, str]]) -> int:
    """How many of the log's first lines the conversation holds as a run of its lines (the whole
    log's count: all of it)."""
    keys, stored = [_line_key(line) for line in log], b"".join(map(_line_key, held))

    def holds(count: int) -> bool:
        wanted = b"".join(keys[:count])
        at = stored.find(wanted)
        while at != -1 and at % 8:  # a match that straddles two lines' keys is none
            at = stored.find(wanted, at + 1)
        return at != -1

    return most_passing(0, len(keys), holds)  # a run of the first k lines holds the first k - 1 too


# A log whose first lines (this many at least, the rest not) are a run of the conversation's is a
# grown export of one imported before: appended whole, those lines were stored twice (summarised and
# read for facts twice, retrieved in pairs). Fewer may be a new log that begins as an old one did (a
# greeting and its answer).
GROWN_LOG_LINES = 3


def _refuse_a_grown_log(log: list[tuple[Role, str]], held: list[tuple[Role, str]], conversation: str) -> None:
    start = held_start(log, held)
    if GROWN_LOG_LINES <= start < len(log):
        raise HistoryRefused(
            f"conversation: {conversation!r} holds the log's first {start} lines already (an earlier "
            f"import of it?); import a log of the lines after them ({start + 1}-{len(log)}) alone"
        )


def _refuse_another_players(session: Session, conv_id: int, conversation: str, player_id: str) -> None:
    """HistoryRefused when the import names a player and the conversation is another's: its lines
    would become that player's memory (summaries, extracted facts stored under their id)."""
    owner = session.get_one(Conversation, conv_id).player_id
    if player_id and owner != player_id:
        whose = f"player {owner!r}'s" if owner else "an anonymous player's"
        raise HistoryRefused(f"conversation: {conversation!r} is {whose}, not player {player_id!r}'s")


def _refuse_a_scene(session: Session, conv_id: int, conversation: str) -> None:
    """HistoryRefused when the conversation holds a scene (a run's or a live group's): its lines name
    their speakers, which a log's lines do not (they would read "?" in its transcript, "Someone" in
    prompts)."""
    from db.scenes import scene_conversations

    if scene_conversations(session=session, conversation_ids=[conv_id]):
        raise HistoryRefused(
            f"conversation: {conversation!r} holds a scene; a chat log cannot be added to it"
        )


def import_history(
    raw: str,
    fmt: HistoryFormat,
    *,
    conversation: str,
    character: str,
    player_id: str = "",
    player_name: str | None = None,
    tenant: str = "",
) -> Imported:
    """Parse, embed and append a chat log to the tenant's conversation (made if new); last < first
    when the conversation holds the log already (a log imported twice is stored once). Nothing is
    stored if any line is malformed."""
    from db.history import append_lines, conversation_lines, lock_conversation
    from db.session import session_scope
    from db.world import find_characters, find_conversations, upsert_conversations

    if not conversation:
        raise HistoryRefused("conversation: it is empty")
    if len(tenant) > TENANT_MAX:
        raise HistoryRefused(f"tenant: longer than {TENANT_MAX} characters")
    if not TENANT_NAME.fullmatch(tenant):
        raise HistoryRefused("tenant: may hold only letters, digits, '.', '_' and '-'")
    for field, value in (
        ("conversation", conversation),
        ("player_id", player_id),
        ("player_name", player_name),
        ("tenant", tenant),
    ):
        if value is not None and len(value) > NAME_MAX:
            raise HistoryRefused(f"{field}: longer than {NAME_MAX} characters")
        if value is not None:
            _text(value, field)
    parsed = parse_history(raw, fmt)
    held_already: int | None = None
    # Refused or held already: nothing to embed (a long log takes the embedder minutes). Each is
    # checked again below, as the rows may change meanwhile.
    with session_scope() as session:
        if character not in find_characters(session=session, slugs=[character], tenant=tenant):
            raise HistoryRefused(f"character: no character {character!r}")
        known = find_conversations(session=session, external_ids=[conversation], tenant=tenant)
        if conversation in known and known[conversation][1] != character:
            raise HistoryRefused(f"conversation: {conversation!r} is another character's")
        if conversation in known:
            _refuse_another_players(session, known[conversation][0], conversation, player_id)
            _refuse_a_scene(session, known[conversation][0], conversation)
            held = conversation_lines(session=session, conversation_id=known[conversation][0])
            if already_held(parsed.lines, held):
                held_already = known[conversation][0]
            else:
                _refuse_a_grown_log(parsed.lines, held, conversation)
    # The memory jobs are sent once the transactions are over: the conversation's lock (below) is not
    # held while the broker is asked.
    if held_already is not None:
        return _memory_scheduled(Imported(held_already, 1, 0, parsed.skipped))
    vectors = embed_texts([t for _, t in parsed.lines])
    with session_scope() as session:
        found = find_characters(session=session, slugs=[character], tenant=tenant)
        if character not in found:
            raise HistoryRefused(f"character: no character {character!r}")
        row = {
            "external_id": conversation,
            "player_id": player_id,
            "player_name": player_name or parsed.user_name or "",
            "character_id": found[character],
        }
        conv_id, char_id = upsert_conversations(session=session, rows=[row], tenant=tenant)[conversation]
        if char_id != found[character]:
            raise HistoryRefused(f"conversation: {conversation!r} is another character's")
        _refuse_another_players(session, conv_id, conversation, player_id)
        lock_conversation(session=session, conversation_id=conv_id)  # held lines read and appended as one
        _refuse_a_scene(session, conv_id, conversation)  # under the lock: a group made meanwhile is seen
        first, last = 1, 0
        held = conversation_lines(session=session, conversation_id=conv_id)
        if not already_held(parsed.lines, held):
            _refuse_a_grown_log(parsed.lines, held, conversation)
            first, last = append_lines(
                session=session, conversation_id=conv_id, lines=parsed.lines, vectors=vectors
            )
            refuse_if_moved(session=session, what="the log")
    return _memory_scheduled(Imported(conv_id, first, last, parsed.skipped))


def _memory_scheduled(imported: Imported) -> Imported:
    """The import's answer, once the conversation's due memory jobs (summaries, facts) are sent to
    the bulk lane: built now, not when the player next speaks (that turn would be answered without
    them). A log imported again, held already, sends them too: its first import's send may have
    failed (the broker away), and importing it again is what its operator does."""
    from memory.schedule import schedule_memory

    schedule_memory([imported.conversation_id])
    return imported
