"""Bulk NPC dialogue runs: a JSONL file in, validated whole, enqueued in chunks, exported in order."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from core.settings import settings
from db.bulk_turns import StagedTurn, insert_run_turns
from db.models import Run, RunStatus, TurnStatus
from db.runs import (
    RunCounts,
    cancel_run,
    create_run,
    find_run,
    iter_run_turns,
    refresh_status,
    reset_failed,
    run_quality,
)
from db.session import session_scope
from db.world import all_character_slugs, find_conversations
from tasks.producer import send_new_turns
from tasks.schemas import GenerationParams, check_message

CHUNK = 5000  # lines per transaction and COPY


class RunLine(BaseModel):
    """One line of a run file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=200)
    message: str
    character: str | None = Field(default=None, max_length=64)
    conversation: str | None = Field(
        default=None, max_length=200, description="omit for a fresh conversation"
    )
    player_name: str = Field(default="", max_length=200)
    story: str | None = Field(default=None, max_length=100)
    story_time: int | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str


class RunValidationError(ValueError):
    """The file has bad lines; nothing was enqueued."""

    def __init__(self, errors: list[LineError]) -> None:
        self.errors = errors
        shown = "; ".join(f"line {e.line}: {e.reason}" for e in errors[:20])
        more = f" (+{len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} bad line(s): {shown}{more}")


@dataclass(frozen=True)
class SubmittedRun:
    id: uuid.UUID
    name: str
    created: bool
    enqueued: int
    skipped_lines: list[LineError]


def _parse(raw: str, line_no: int) -> RunLine:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    try:
        line = RunLine.model_validate(data)
        check_message(line.message)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "line"
        raise ValueError(f"{where}: {first['msg']}") from None
    if not line.conversation and not line.character:
        raise ValueError("a line without a conversation must name a character")
    return line


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, "\x00not-utf8"
                continue
            if text.strip():
                yield number, text


@dataclass(frozen=True)
class FileCheck:
    """The outcome of validating a whole run file."""

    digest: str  # sha256 of the file
    good: int
    errors: list[LineError]

    @property
    def bad_lines(self) -> set[int]:
        return {e.line for e in self.errors}


@dataclass
class _ConversationUse:
    first_character: str | None  # the character named by the first line that uses the conversation
    lines: list[tuple[int, str | None]] = field(default_factory=list)


def validate_file(path: Path) -> FileCheck:
    """Check every line, its character and its conversation (against the database) before any enqueue."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    with session_scope() as session:
        characters = set(all_character_slugs(session=session))
    seen: set[str] = set()
    errors: list[LineError] = []
    uses: dict[str, _ConversationUse] = {}
    for number, text in _lines(path):
        if text == "\x00not-utf8":
            errors.append(LineError(number, "not valid UTF-8"))
            continue
        try:
            line = _parse(text, number)
        except ValueError as exc:
            errors.append(LineError(number, str(exc)))
            continue
        if line.custom_id in seen:
            errors.append(LineError(number, f"duplicate custom_id {line.custom_id!r}"))
            continue
        if line.character and line.character not in characters:
            errors.append(LineError(number, f"unknown character {line.character!r}"))
            continue
        seen.add(line.custom_id)
        if line.conversation:
            use = uses.setdefault(line.conversation, _ConversationUse(line.character))
            use.lines.append((number, line.character))
    conversation_errors = _conversation_errors(uses)
    errors.extend(conversation_errors)
    return FileCheck(
        digest.hexdigest(), len(seen) - len(conversation_errors), sorted(errors, key=lambda e: e.line)
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
                reason = f"unknown conversation {name!r}; its first line must name a character"
                errors.append(LineError(number, reason))
            elif character and character != owner:
                reason = f"conversation {name!r} belongs to character {owner!r}, not {character!r}"
                errors.append(LineError(number, reason))
    return errors


def submit_run(path: Path, *, name: str | None = None, skip_bad_lines: bool = False) -> SubmittedRun:
    """Validate the whole file, then enqueue it on the bulk lane; the same name and file twice is a no-op."""
    name = name or path.stem
    check = validate_file(path)
    with session_scope() as session:
        run, created = create_run(
            session=session, name=name, model=settings.model, file_hash=check.digest, total=check.good
        )
        run_id = run.id
        if not created:
            return SubmittedRun(run_id, name, False, 0, check.errors if skip_bad_lines else [])
        if check.errors and not skip_bad_lines:
            run.status = RunStatus.FAILED
            run.error = str(RunValidationError(check.errors))
    if check.errors and not skip_bad_lines:
        raise RunValidationError(check.errors)

    enqueued = 0
    bad = check.bad_lines
    good_lines = ((text, RunLine.model_validate_json(text)) for n, text in _lines(path) if n not in bad)
    # Three stages overlap: this thread parses chunk N+2 while one thread writes chunk N+1 (COPY and
    # insert; PostgreSQL works meanwhile) and another sends chunk N's messages. At most one chunk
    # waits at each stage, so memory stays bounded whatever the file's size.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-writer") as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-sender") as sender,
    ):
        write: Future[list[uuid.UUID]] | None = None
        send: Future[None] | None = None
        for chunk in chain(iter(lambda: list(islice(good_lines, CHUNK)), []), [None]):
            staged = [_staged_turn(text, line, name, run_id) for text, line in chunk or []]
            if write is not None:
                new_ids = write.result()
                if send is not None:
                    send.result()
                send = sender.submit(send_new_turns, {settings.model: new_ids}, lane="bulk")
            write = writer.submit(_insert_chunk, run_id, staged) if staged else None
            enqueued += len(staged)
        if send is not None:
            send.result()
    with session_scope() as session:
        queued = session.get(Run, run_id)
        assert queued is not None
        queued.status = RunStatus.QUEUED
    return SubmittedRun(run_id, name, True, enqueued, check.errors)


def _insert_chunk(run_id: uuid.UUID, staged: list[StagedTurn]) -> list[uuid.UUID]:
    with session_scope() as session:
        return insert_run_turns(session=session, run_id=run_id, turns=staged)


def _staged_turn(raw: str, line: RunLine, run_name: str, run_id: uuid.UUID) -> StagedTurn:
    return StagedTurn(
        idempotency_key=f"run:{run_id}:{line.custom_id}",
        request_hash=hashlib.sha256(raw.strip().encode()).hexdigest(),  # the line as submitted
        conversation=line.conversation or f"run:{run_name}:{line.custom_id}",
        character=line.character,
        player_name=line.player_name,
        story=line.story,
        story_time=line.story_time,
        message=line.message,
        model=settings.model,
        params=line.params.resolved(),
        custom_id=line.custom_id,
    )


def _require_run(session: Session, ref: str) -> Run:
    run = find_run(session=session, ref=ref)
    if run is None:
        raise KeyError(f"no run {ref!r}")
    return run


@dataclass(frozen=True)
class RunState:
    id: uuid.UUID
    name: str
    status: RunStatus
    counts: RunCounts
    error: str | None
    quality: dict[str, Any]


def run_state(ref: str) -> RunState:
    """The run's status (advanced from its turns), request_counts and reply-quality summary."""
    with session_scope() as session:
        run = _require_run(session, ref)
        counts = refresh_status(session=session, run=run)
        quality = run_quality(session=session, run_id=run.id)
        return RunState(run.id, run.name, run.status, counts, run.error, quality)


def cancel(ref: str) -> int:
    """Cancel a run's queued turns; finished results are kept."""
    with session_scope() as session:
        run = _require_run(session, ref)
        n = cancel_run(session=session, run=run)
        refresh_status(session=session, run=run)
        return n


def retry_failed(ref: str) -> int:
    """Send a run's failed turns again with fresh attempts."""
    from tasks.generate import dispatch

    with session_scope() as session:
        run = _require_run(session, ref)
        ids, model = reset_failed(session=session, run=run), run.model
    dispatch(ids, model=model, lane="bulk")
    return len(ids)


def export_run(ref: str, out_dir: Path) -> tuple[Path, Path, int, int]:
    """Write <name>.results.jsonl (input order, keyed by custom_id) and <name>.errors.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with session_scope() as session:
        run = _require_run(session, ref)
        results_path = out_dir / f"{run.name}.results.jsonl"
        errors_path = out_dir / f"{run.name}.errors.jsonl"
        n_ok = n_err = 0
        with results_path.open("w", encoding="utf-8") as ok, errors_path.open("w", encoding="utf-8") as bad:
            for turn in iter_run_turns(session=session, run_id=run.id):
                record: dict[str, Any] = {
                    "custom_id": turn.custom_id,
                    "turn_id": str(turn.id),
                    "status": turn.status.value,
                }
                if turn.status == TurnStatus.DONE:
                    record |= {
                        "reply": turn.reply,
                        "usage": turn.usage,
                        "seed": turn.params.get("seed"),
                        "timings": turn.timings,
                        "quality": turn.quality,
                        "state": turn.state,
                    }
                    ok.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n_ok += 1
                elif turn.status in (TurnStatus.FAILED, TurnStatus.CANCELLED):
                    bad.write(json.dumps(record | {"error": turn.error}, ensure_ascii=False) + "\n")
                    n_err += 1
    return results_path, errors_path, n_ok, n_err
