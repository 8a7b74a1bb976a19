"""Validate a whole run file before anything is stored: each line's shape, its character and its
conversation (against the database), and everything that would make the insert fail later (text
PostgreSQL cannot hold, numbers outside their columns, over-long derived keys)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from db.session import session_scope
from db.world import all_character_slugs, find_conversations
from services.schemas import GenerationParams, Int4, Text, check_message

_BOM = b"\xef\xbb\xbf"


class RunLine(BaseModel):
    """One line of a run file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: Text = Field(min_length=1, max_length=200)
    message: str
    character: Text | None = Field(default=None, max_length=64)
    conversation: Text | None = Field(
        default=None, max_length=200, description="omit for a fresh conversation"
    )
    player_name: Text = Field(default="", max_length=200)
    story: Text | None = Field(default=None, max_length=100)
    story_time: Int4 | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str


class RunValidationError(ValueError):
    """The file has bad lines; nothing was stored or sent."""

    def __init__(self, errors: list[LineError]) -> None:
        self.errors = errors
        shown = "; ".join(f"line {e.line}: {e.reason}" for e in errors[:20])
        more = f" (+{len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} bad line(s): {shown}{more}")


@dataclass(frozen=True)
class FileCheck:
    """The outcome of validating a whole run file."""

    digest: str  # sha256 of the file
    good: int
    errors: list[LineError]

    @property
    def bad_lines(self) -> set[int]:
        return {e.line for e in self.errors}


def parse_line(text: str) -> RunLine:
    """One line as a RunLine; ValueError naming the field at fault."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    try:
        line = RunLine.model_validate(data)
        check_message(line.message)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "line"
        raise ValueError(f"{where}: {first['msg']}") from None
    except ValueError as exc:
        raise ValueError(f"message: {exc}") from None
    if not line.conversation and not line.character:
        raise ValueError("a line without a conversation must name a character")
    return line


class BadEncoding(ValueError):
    """A line that is not UTF-8."""


def iter_lines(path: Path) -> Iterator[tuple[int, str | BadEncoding]]:
    """(line number, text) for every non-blank line; a BadEncoding in place of text that is not UTF-8.
    A UTF-8 byte-order mark at the start of the file is skipped."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    number,
                    BadEncoding(
                        f"not valid UTF-8 (byte {exc.start} of the line: {raw[exc.start : exc.start + 1]!r})"
                    ),
                )
                continue
            if text.strip():
                yield number, text


def good_lines(path: Path, bad: set[int]) -> Iterator[tuple[int, str, RunLine]]:
    """The file's lines that passed validation, parsed again (validation keeps nothing in memory)."""
    for number, text in iter_lines(path):
        if number not in bad and isinstance(text, str):
            yield number, text, RunLine.model_validate_json(text)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _ConversationUse:
    first_character: str | None  # the character named by the first line that uses the conversation
    lines: list[tuple[int, str | None]] = field(default_factory=list)


def validate_file(path: Path) -> FileCheck:
    """Check every line, its character and its conversation (against the database) before any insert."""
    with session_scope() as session:
        characters = set(all_character_slugs(session=session))
    seen: set[str] = set()
    errors: list[LineError] = []
    uses: dict[str, _ConversationUse] = {}
    for number, text in iter_lines(path):
        if isinstance(text, BadEncoding):
            errors.append(LineError(number, str(text)))
            continue
        try:
            line = parse_line(text)
        except ValueError as exc:
            errors.append(LineError(number, str(exc)))
            continue
        if line.custom_id in seen:
            errors.append(LineError(number, f"duplicate custom_id {line.custom_id!r}"))
            continue
        if line.character and line.character not in characters:
            errors.append(LineError(number, f"character: unknown character {line.character!r}"))
            continue
        seen.add(line.custom_id)
        if line.conversation:
            use = uses.setdefault(line.conversation, _ConversationUse(line.character))
            use.lines.append((number, line.character))
    conversation_errors = _conversation_errors(uses)
    errors.extend(conversation_errors)
    return FileCheck(
        file_digest(path), len(seen) - len(conversation_errors), sorted(errors, key=lambda e: e.line)
    )


def _conversation_errors(uses: dict[str, _ConversationUse]) -> list[LineError]:
    """Lines whose conversation is unknown and not started in the file, or belongs to another character."""
    existing: dict[str, tuple[int, str]] = {}
    names = list(uses)
    with session_scope() as session:
        for start in range(0, len(names), 10_000):
            existing |= find_conversations(session=session, external_ids=names[start : start + 10_000])
    errors = []
    for name, use in uses.items():
        owner = existing[name][1] if name in existing else use.first_character
        for number, character in use.lines:
            if owner is None:
                reason = f"conversation: unknown conversation {name!r}; its first line must name a character"
                errors.append(LineError(number, reason))
            elif character and character != owner:
                reason = f"conversation: {name!r} belongs to character {owner!r}, not {character!r}"
                errors.append(LineError(number, reason))
    return errors
