"""Bulk NPC dialogue runs: a JSONL file in, validated whole, enqueued in chunks, exported in order."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from core.settings import settings
from db.models import Run, RunStatus, TurnStatus
from db.runs import (
    RunCounts,
    cancel_run,
    create_run,
    find_run,
    iter_run_turns,
    refresh_status,
    reset_failed,
)
from db.session import session_scope
from tasks.producer import enqueue_turns
from tasks.schemas import GenerationParams, TurnRequest, check_message

CHUNK = 1000


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


def validate_file(path: Path) -> tuple[str, int, list[LineError], set[int]]:
    """Check every line; returns (sha256 of the file, good line count, errors, bad line numbers)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    seen: set[str] = set()
    errors: list[LineError] = []
    good = 0
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
        seen.add(line.custom_id)
        good += 1
    return digest.hexdigest(), good, errors, {e.line for e in errors}


def submit_run(path: Path, *, name: str | None = None, skip_bad_lines: bool = False) -> SubmittedRun:
    """Validate the whole file, then enqueue it on the bulk lane; the same name and file twice is a no-op."""
    name = name or path.stem
    digest, good, errors, bad = validate_file(path)
    with session_scope() as session:
        run, created = create_run(
            session=session, name=name, model=settings.model, file_hash=digest, total=good
        )
        run_id = run.id
        if not created:
            return SubmittedRun(run_id, name, False, 0, errors if skip_bad_lines else [])
        if errors and not skip_bad_lines:
            run.status = RunStatus.FAILED
            run.error = str(RunValidationError(errors))
    if errors and not skip_bad_lines:
        raise RunValidationError(errors)

    enqueued = 0
    good_lines = (_parse(text, n) for n, text in _lines(path) if n not in bad)
    while chunk := list(islice(good_lines, CHUNK)):
        requests = [_turn_request(line, name, run_id) for line in chunk]
        enqueue_turns(requests, lane="bulk", run_id=run_id, custom_ids=[line.custom_id for line in chunk])
        enqueued += len(chunk)
    with session_scope() as session:
        queued = session.get(Run, run_id)
        assert queued is not None
        queued.status = RunStatus.QUEUED
    return SubmittedRun(run_id, name, True, enqueued, errors)


def _turn_request(line: RunLine, run_name: str, run_id: uuid.UUID) -> TurnRequest:
    return TurnRequest(
        conversation=line.conversation or f"run:{run_name}:{line.custom_id}",
        character=line.character,
        message=line.message,
        player_name=line.player_name,
        story=line.story,
        story_time=line.story_time,
        idempotency_key=f"run:{run_id}:{line.custom_id}",
        params=line.params,
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


def run_state(ref: str) -> RunState:
    """The run's status (advanced from its turns) and request_counts."""
    with session_scope() as session:
        run = _require_run(session, ref)
        counts = refresh_status(session=session, run=run)
        return RunState(run.id, run.name, run.status, counts, run.error)


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
                    }
                    ok.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n_ok += 1
                elif turn.status in (TurnStatus.FAILED, TurnStatus.CANCELLED):
                    bad.write(json.dumps(record | {"error": turn.error}, ensure_ascii=False) + "\n")
                    n_err += 1
    return results_path, errors_path, n_ok, n_err
