"""Validate a whole run file before anything is stored: each line's shape, its character and its
conversation (against the database), and everything that would make the insert fail later (text
PostgreSQL cannot hold, numbers outside their columns, over-long derived keys). In an OpenAI file,
a well-formed request that breaks mlchat's own rules is refused alone (`FileCheck.refused`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.settings import DEFAULT_TENANT, settings
from core.text import printable
from core.validation import error_line
from db.runs import conversations_of_others
from db.scenes import scene_conversations
from db.session import session_scope
from db.world import all_character_slugs, character_names, find_conversations
from scenes.spec import SceneSpec, name_clash
from services.runs.line_keys import line_conversation
from services.runs.openai_lines import (
    LineOptions,
    RequestRefused,
    body_field,
    is_openai_line,
    stored_history,
    to_run_line,
)
from services.schemas import HISTORY_LINE_CHARS, GenerationParams, Int4, Text, check_message
from structured.spec import passed_already

FileFormat = Literal["native", "openai"]

_BOM = b"\xef\xbb\xbf"


CUSTOM_ID_MAX = 200  # turns.custom_id's length


class HistoryLine(BaseModel):
    """An earlier line of a fresh conversation, seeded before the turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: Text = Field(min_length=1, max_length=HISTORY_LINE_CHARS)


class RunLine(BaseModel):
    """One line of a run file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: Text = Field(min_length=1, max_length=CUSTOM_ID_MAX)
    message: str = ""  # required, except on a scene line
    character: Text | None = Field(default=None, max_length=64)
    conversation: Text | None = Field(
        default=None, max_length=200, description="omit for a fresh conversation"
    )
    player_name: Text = Field(default="", max_length=200)
    story: Text | None = Field(default=None, max_length=100)
    story_time: Int4 | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)
    history: list[HistoryLine] = Field(default_factory=list, max_length=200)
    # OpenAI's `n`: this many candidates are returned as choices (best first), not only the kept one.
    choices: int | None = Field(default=None, ge=1, le=8)
    # Replaces the character's own system prompt; only in runs that allow it.
    system_prompt: Text | None = Field(default=None, min_length=1, max_length=20_000)
    # The line's direction for the scene (an OpenAI line's system message by default): placed after
    # the character's own system prompt, which stays.
    direction: Text | None = Field(default=None, min_length=1, max_length=20_000)
    # A scene instead of a message: characters talking among themselves, step by step (scenes/).
    scene: SceneSpec | None = None


# The fields a scene line does not take (they would be dropped without a word), and why.
_NOT_ON_A_SCENE_LINE = {
    "params": "a scene line takes its sampling in scene.params",
    "player_name": "a scene line takes it in scene.player_name",
    "direction": "a scene line takes its direction in scene.premise",
    "story": "a scene line takes no story",
    "story_time": "a scene line takes no story",
    "choices": "a scene line takes no choices",
    "system_prompt": "a scene line takes no system prompt; its characters keep their own",
}

# How much of a line's error is kept: a message may quote the line's own values (a method, a key).
REASON_CHARS = 500


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str

    def __post_init__(self) -> None:
        # Stored in runs.error and runs.line_errors: a NUL or a lone surrogate quoted from the line
        # would fail that write, and the whole submission with it.
        object.__setattr__(self, "reason", printable(self.reason, REASON_CHARS))


class SubmissionRefused(ValueError):
    """A run's name, file or options refused before anything is stored."""


class EmptyFile(ValueError):
    """The file holds no requests (empty, or blank lines only): OpenAI's `empty_file`."""


class RunValidationError(ValueError):
    """The file has bad lines; nothing was stored or sent. `count`: how many, when `errors` names
    only the first of them."""

    def __init__(self, errors: list[LineError], count: int | None = None) -> None:
        self.errors = errors
        self.count = count = len(errors) if count is None else count
        shown = "; ".join(f"line {e.line}: {e.reason}" for e in errors[:20])
        more = f" (+{count - 20} more)" if count > 20 else ""
        super().__init__(f"{count} bad line(s): {shown}{more}")


@dataclass(frozen=True)
class Refusal:
    """A well-formed request of the file refused by policy: answered in the error file, alone."""

    line: int
    custom_id: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", printable(self.message, REASON_CHARS))

    def record(self) -> dict[str, Any]:
        """As the run stores it (runs.refused): the param is the field the message starts with."""
        param = param_of(self.message)
        return {"line": self.line, "custom_id": self.custom_id, "message": self.message, "param": param}


# A message that starts by naming a field ("body.temperature: ...", "messages[2].role: ..."); one of
# the file's own ("not valid JSON: ...") names none.
_PARAM = re.compile(r"([A-Za-z_$][\w$]*(?:\[\d+\]|\.[A-Za-z_$][\w$]*)*): ")


def param_of(message: str) -> str | None:
    """The field an error message names first (OpenAI's `param`, named as OpenAI names it: an
    OpenAI line's `body.max_tokens` is `max_tokens`, as the live route's error says), or None."""
    found = _PARAM.match(message)
    return found[1].removeprefix("body.") if found else None


@dataclass(frozen=True)
class FileCheck:
    """The outcome of validating a whole run file."""

    digest: str  # sha256 of the file
    good: int
    errors: list[LineError]  # the first MAX_ERRORS_NAMED, in line order (all, if asked for)
    reader: LineReader
    refused: list[Refusal] = field(default_factory=list)
    error_count: int = 0  # every bad line, named or not
    # Replies the lines write to an output file at most: each line's choices (OpenAI's `n`), a scene
    # line's exchanges; what a batch reserves of its key's files quota is counted from it.
    replies: int = 0
    # The conversations the lines name that existed when the file was validated: one gone by the time
    # its line is stored (an erasure, a run's retention) is never made again by that line.
    known_conversations: frozenset[str] = frozenset()

    @property
    def bad_lines(self) -> set[int]:
        """Lines not stored as turns: bad ones, and refused requests."""
        return {e.line for e in self.errors} | {r.line for r in self.refused}


@dataclass(frozen=True)
class LineReader:
    """Parses a file's lines into RunLines, in the file's format and under the run's options."""

    format: FileFormat = "native"
    characters: Collection[str] = ()
    options: LineOptions = LineOptions()

    def parse(self, text: str) -> RunLine:
        """One line as a RunLine; ValueError naming the field at fault."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # too deep, or a number too long to read
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ValueError(f"not JSON that can be read ({reason})") from None
        if not isinstance(data, dict):
            raise ValueError("each line must be a JSON object")
        name: Any = str
        if self.format == "openai":
            body: dict[str, Any] = data["body"] if isinstance(data.get("body"), dict) else {}
            data = to_run_line(data, self.characters, self.options)
            data["history"] = stored_history(data)

            def name(field: str) -> str:
                return body_field(field, body)

        try:
            line = RunLine.model_validate(data)
            if line.scene is None:  # its message as stored: a CRLF a line break (review)
                line = line.model_copy(update={"message": check_message(line.message)})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            error = error_line(name(where), first["msg"])
            raise self._refused(data, error) from None
        except ValueError as exc:
            raise self._refused(data, f"{name('message')}: {exc}") from None
        if line.choices is not None:
            # A line's candidates (submit.py): its params.n, else the run's, else the setting's.
            n = line.params.n or self.options.candidates or settings.run_candidates
            if line.choices > n:
                raise ValueError(
                    f"choices: {line.choices} asked for, but the line generates only {n} candidates"
                )
        if line.scene is not None:
            if not self.options.scenes:
                raise ValueError(
                    "scene: a batch takes no scene lines (its output file names no speaker); submit a"
                    " scene run with `mlchat run submit`, its transcript exported with `mlchat run export`"
                )
            extra = [f for f in ("message", "character", "conversation", "history") if getattr(line, f)]
            if extra:
                raise ValueError(f"{extra[0]}: a scene line names its characters in scene.participants")
            ignored = [  # set to something other than its default (a writer that writes every key)
                f
                for f in _NOT_ON_A_SCENE_LINE
                if f in line.model_fields_set
                and getattr(line, f) != RunLine.model_fields[f].get_default(call_default_factory=True)
            ]
            if ignored:
                raise ValueError(f"{ignored[0]}: {_NOT_ON_A_SCENE_LINE[ignored[0]]}")
            # Each step's turn is named custom_id#step, in a column of CUSTOM_ID_MAX characters.
            room = CUSTOM_ID_MAX - len(f"#{line.scene.exchanges}")
            if len(line.custom_id) > room:
                raise ValueError(
                    f"custom_id: at most {room} characters on a scene line of {line.scene.exchanges} "
                    f"exchanges (each step is named custom_id#step, at most {CUSTOM_ID_MAX} characters)"
                )
            return line
        if not line.conversation and not line.character:
            raise ValueError("a line without a conversation must name a character")
        if line.history and line.conversation:
            raise ValueError("history: seeds only a fresh conversation; omit conversation")
        if line.system_prompt is not None and not self.options.allow_system_prompt:
            raise ValueError("system_prompt: this run does not allow a system prompt of its own")
        return line

    def _refused(self, data: dict[str, Any], message: str) -> ValueError:
        """An OpenAI line that mapped is a well-formed request: what its fields break is its own."""
        return RequestRefused(data["custom_id"], message) if self.format == "openai" else ValueError(message)


def parse_line(text: str) -> RunLine:
    """One native-format line as a RunLine; ValueError naming the field at fault."""
    return LineReader().parse(text)


def detect_format(path: Path) -> FileFormat:
    """The file's format, from its first line that says: an OpenAI batch line carries method, url or
    body, a native line a field of its own. A line that says neither (`{}`, `null`, a bare custom_id,
    not JSON) decides nothing: read as the file's format, it is named bad on its own, where deciding
    by it blamed every good line after it for the wrong fields."""
    for _, text in iter_lines(path):
        if isinstance(text, str):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):  # not JSON, or not JSON that can be read
                continue
            if is_openai_line(data):
                return "openai"
            if isinstance(data, dict) and data.keys() & _NATIVE_ONLY:
                return "native"
    return "native"


_NATIVE_ONLY = frozenset(RunLine.model_fields) - {"custom_id"}


class BadEncoding(ValueError):
    """A line that is not UTF-8, or longer than MLCHAT_RUN_LINE_MAX_BYTES (not read)."""


def _raw_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The file's lines as bytes, each read at most `limit` bytes (and its line end) at a time: None
    for a longer one, whose rest is read past, never held."""
    while raw := handle.readline(limit + 2):  # room for "\r\n" after `limit` bytes
        if len(raw.rstrip(b"\r\n")) <= limit and (len(raw) <= limit or raw.endswith(b"\n")):
            yield raw
            continue
        while not raw.endswith(b"\n") and (raw := handle.readline(1 << 20)):
            pass
        yield None


def iter_lines(path: Path) -> Iterator[tuple[int, str | BadEncoding]]:
    """(line number, text) for every non-blank line; a BadEncoding in place of text that is not UTF-8
    or is longer than MLCHAT_RUN_LINE_MAX_BYTES. A UTF-8 byte-order mark at the start of the file is
    skipped."""
    limit = settings.run_line_max_bytes
    with path.open("rb") as handle:
        for number, raw in enumerate(_raw_lines(handle, limit), start=1):
            if raw is None:
                yield (
                    number,
                    BadEncoding(f"longer than MLCHAT_RUN_LINE_MAX_BYTES ({limit:,} bytes); not read"),
                )
                continue
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


def good_lines(path: Path, check: FileCheck) -> Iterator[tuple[int, str, RunLine]]:
    """The file's lines that passed validation, parsed again (validation keeps nothing in memory)."""
    bad = check.bad_lines
    for number, text in iter_lines(path):
        if number not in bad and isinstance(text, str):
            yield number, text, parse_again(check, text)


def parse_again(check: FileCheck, text: str) -> RunLine:
    """A line validation passed, parsed again as it was then: its formats' grammars are not built
    again (structured/spec.py passed_already)."""
    with passed_already():
        return check.reader.parse(text)


def file_digest(path: Path) -> str:
    return file_digest_and_lines(path)[0]


def file_digest_and_lines(path: Path) -> tuple[str, int]:
    """The file's sha256 and its lines (a last one without its newline counts), in one read."""
    digest, lines, last = hashlib.sha256(), 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return digest.hexdigest(), lines + (last != b"\n")


@dataclass
class _ConversationUse:
    first_character: str | None  # the character named by the first line that uses the conversation
    lines: list[tuple[int, str | None]] = field(default_factory=list)


# Bad lines named (in order of the file), the rest only counted: a file of millions of bad lines
# must not hold them all in memory. A run stores the first 1,000 of them (db/runs.py).
MAX_ERRORS_NAMED = 1000
# Lines refused by policy answer one by one in the run's error file and are stored with the run;
# past this many, a refused line is a bad line (millions of refusals are a mistake of the whole file).
MAX_REFUSED = 10_000


def validate_file(
    path: Path,
    options: LineOptions | None = None,
    *,
    tenant: str = DEFAULT_TENANT,
    every_error: bool = False,
    run_name: str | None = None,
) -> FileCheck:
    """Check every line, its character and its conversation (the tenant's, in the database) before any
    insert. The first MAX_ERRORS_NAMED bad lines are named, the rest counted (`every_error`: all are
    named, for a submission that skips them)."""
    options = options or LineOptions()
    with session_scope() as session:
        characters = set(all_character_slugs(session=session, tenant=tenant))
    if options.default_character is not None and options.default_character not in characters:
        raise SubmissionRefused(f"default character: unknown character {options.default_character!r}")
    reader = LineReader(detect_format(path), characters, options)
    known_names: dict[str, str] = {}

    def _names(slugs: list[str]) -> dict[str, str]:
        missing = [s for s in slugs if s not in known_names]
        if missing:
            with session_scope() as session:
                known_names.update(character_names(session=session, slugs=missing))
        return known_names

    seen: set[str] = set()
    errors: list[LineError] = []
    error_count = 0
    refused: list[Refusal] = []
    uses: dict[str, _ConversationUse] = {}
    scenes: dict[str, tuple[int, int]] = {}  # a scene line's custom_id: (its line, its exchanges)
    # Lines named like a scene's step, `<scene>#<k>`: (line, custom_id, scene, k).
    step_named: list[tuple[int, str, str, int]] = []
    fresh: list[tuple[int, str]] = []  # (line, custom_id) of lines the run makes a conversation for

    def bad(number: int, reason: str) -> None:
        nonlocal error_count
        error_count += 1
        if every_error or len(errors) < MAX_ERRORS_NAMED:
            errors.append(LineError(number, reason))

    lines_read = replies = 0
    for number, text in iter_lines(path):
        lines_read += 1
        if isinstance(text, BadEncoding):
            bad(number, str(text))
            continue
        try:
            line = reader.parse(text)
        except RequestRefused as exc:
            if exc.custom_id in seen:
                bad(number, f"duplicate custom_id {exc.custom_id!r}")
            elif len(refused) >= MAX_REFUSED:
                bad(number, f"{exc} (more than {MAX_REFUSED} lines of the file are refused)")
            else:
                seen.add(exc.custom_id)
                refused.append(Refusal(number, exc.custom_id, str(exc)))
            continue
        except ValueError as exc:
            bad(number, str(exc))
            continue
        if line.custom_id in seen:
            bad(number, f"duplicate custom_id {line.custom_id!r}")
            continue
        if line.character and line.character not in characters:
            bad(number, f"character: unknown character {line.character!r}")
            continue
        unknown = [
            (i, p.character)
            for i, p in enumerate(line.scene.participants if line.scene else [])
            if p.character not in characters
        ]
        if unknown:
            i, slug = unknown[0]
            bad(number, f"scene.participants.{i}.character: unknown character {slug!r}")
            continue
        clash = name_clash(line.scene, _names(line.scene.slugs())) if line.scene else None
        if clash is not None:
            bad(number, f"scene.{clash}")
            continue
        seen.add(line.custom_id)
        replies += line.scene.exchanges if line.scene is not None else (line.choices or 1)
        if line.scene is not None:
            scenes[line.custom_id] = (number, line.scene.exchanges)
        if (step := _STEP_NAME.fullmatch(line.custom_id)) is not None:  # a plain or a scene line
            step_named.append((number, line.custom_id, step[1], int(step[2])))
        if line.conversation:
            use = uses.setdefault(line.conversation, _ConversationUse(line.character))
            use.lines.append((number, line.character))
        elif run_name:
            fresh.append((number, line.custom_id))
    if not lines_read:  # a run or batch of nothing would complete at once, having done nothing
        raise EmptyFile("input file: it holds no requests (it is empty, or only blank lines)")
    # A scene's step k is stored as `<custom_id>#k`: another line of that name would share it.
    step_errors = [
        LineError(
            number, f"custom_id: {cid!r} is the name of step {k} of the scene on line {scenes[base][0]}"
        )
        for number, cid, base, k in step_named
        if base in scenes and 1 <= k <= scenes[base][1]
    ]
    # Before the conversations are checked: a refused line that starts a conversation starts none,
    # so the lines after it in that conversation are named too (with --skip-bad-lines they named a
    # conversation nothing made, and the whole submission failed naming no line).
    refused_lines = {e.line for e in step_errors}
    for use in uses.values():
        use.lines = [(number, character) for number, character in use.lines if number not in refused_lines]
        use.first_character = use.lines[0][1] if use.lines else None
    # A line naming the conversation the run stores one of its scene lines under would be answered
    # in that scene (by whoever the group's step picks, the scene landing on a 1:1 conversation), and
    # the run could not be resubmitted: the conversation would hold a scene.
    own_scenes = {line_conversation(run_name, cid): cid for cid in scenes} if run_name else {}
    scene_errors = [
        LineError(number, f"conversation: {name!r} is where this run's scene line {own_scenes[name]!r} goes")
        for name, use in uses.items()
        if name in own_scenes
        for number, _ in use.lines
    ]
    for name in own_scenes:
        uses.pop(name, None)
    known: set[str] = set()
    conversation_errors = step_errors + scene_errors + _conversation_errors(uses, tenant, known)
    if run_name:
        fresh = [(number, cid) for number, cid in fresh if number not in refused_lines]
        conversation_errors += _fresh_conversations_taken(fresh, run_name, tenant)
    error_count += len(conversation_errors)
    errors.extend(conversation_errors)  # a list of the file's size already, cut below
    named = sorted(errors, key=lambda e: e.line)
    return FileCheck(
        file_digest(path),
        len(seen) - len(conversation_errors) - len(refused),
        named if every_error else named[:MAX_ERRORS_NAMED],
        reader,
        refused,
        error_count,
        replies,
        frozenset(known),
    )


_STEP_NAME = re.compile(r"(.+)#([1-9][0-9]{0,5})")


def _fresh_conversations_taken(fresh: list[tuple[int, str]], run_name: str, tenant: str) -> list[LineError]:
    """Lines naming no conversation whose own (`run:<name>:<custom_id>`) exists already and is not
    this run's: a player's, a history import's, another run's line that named it. Joined, the line
    was answered by that conversation's character, in its history (the line's own dropped); a scene
    line's failed the whole submission after its plain lines were sent."""
    errors: list[LineError] = []
    with session_scope() as session:
        for start in range(0, len(fresh), 10_000):
            chunk = {
                line_conversation(run_name, cid): number for number, cid in fresh[start : start + 10_000]
            }
            taken = conversations_of_others(
                session=session, tenant=tenant, external_ids=list(chunk), run_name=run_name
            )
            errors += [
                LineError(
                    chunk[name],
                    f"custom_id: its conversation {name!r} exists already (a player's, or another run's "
                    "line named it); give the run another name, or the line another custom_id",
                )
                for name in sorted(taken, key=chunk.__getitem__)
            ]
    return errors


def _conversation_errors(uses: dict[str, _ConversationUse], tenant: str, known: set[str]) -> list[LineError]:
    """Lines whose conversation is unknown to the tenant and not started in the file, belongs to
    another character, or holds a scene (a run's scene or a live group: its speakers are the
    scene's, and a line there would speak in another run's scene, or past the group's strategy).
    The names found are added to `known`."""
    existing: dict[str, tuple[int, str]] = {}
    in_scenes: set[int] = set()
    names = list(uses)
    with session_scope() as session:
        for start in range(0, len(names), 10_000):
            chunk = names[start : start + 10_000]
            found = find_conversations(session=session, external_ids=chunk, tenant=tenant)
            existing |= found
            known.update(found)
            ids = [conv_id for conv_id, _ in found.values()]
            in_scenes |= scene_conversations(session=session, conversation_ids=ids)
    errors = []
    for name, use in uses.items():
        owner = existing[name][1] if name in existing else use.first_character
        for number, character in use.lines:
            if name in existing and existing[name][0] in in_scenes:
                reason = f"conversation: {name!r} holds a scene; a run's line cannot speak in it"
                errors.append(LineError(number, reason))
            elif owner is None:
                reason = f"conversation: unknown conversation {name!r}; its first line must name a character"
                errors.append(LineError(number, reason))
            elif character and character != owner:
                reason = f"conversation: {name!r} belongs to character {owner!r}, not {character!r}"
                errors.append(LineError(number, reason))
    return errors
