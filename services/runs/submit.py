"""Submit a run: validate the whole file, then store and send it in chunks, resumably.

Submission is idempotent by line. Each line's turn has the idempotency key `run:<run id>:<custom id>`,
so storing a line twice is a no-op, and each stored turn records when its message went out
(`dispatched_at`). Resubmitting the same file (or `mlchat run resume`) therefore stores only the
lines that never landed and sends only the turns that never went out, whether the first try
raised, was killed, or lost its broker. A cancel that lands mid-way stops the submission at the
next chunk; nothing ever moves a cancelled run back to `queued`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any

from core.settings import DEFAULT_TENANT, settings
from db.bulk_turns import RunNotAccepting, StagedTurn, insert_run_turns, stored_custom_ids
from db.models import Run, RunStatus
from db.runs import (
    RunConflict,
    cancel_run,
    create_run,
    fail_submission,
    finish_submission,
    is_http_batch,
    refuse_deleting,
    resume_submission,
    run_options,
    run_status,
    run_tenant,
    submission_lock,
    unsent_turns,
)
from db.session import session_scope
from db.turns import mark_dispatched
from scenes.spec import SceneSpec
from services.files import submission_reservation
from services.runs.line_keys import KEY_CHARS, line_conversation, line_key
from services.runs.openai_lines import LineOptions
from services.runs.scene_lines import insert_run_scenes, stored_scene_ids
from services.runs.validate import (
    FileCheck,
    LineError,
    RunLine,
    RunValidationError,
    SubmissionRefused,
    good_lines,
    iter_lines,
    parse_again,
    validate_file,
)
from services.schemas import default_candidates, storable_text

logger = logging.getLogger(__name__)

CHUNK = 5000  # lines per transaction and COPY
SCENE_CHUNK = 500  # scene lines per transaction (each is a few rows)

__all__ = ["CHUNK", "RunBusy", "RunConflict", "SubmissionFailed", "SubmittedRun", "submit_run"]


class RunBusy(RuntimeError):
    """Another process is submitting a run of that name right now (or housekeeping is closing it)."""


# Housekeeping holds a run's submission lock for a moment (it fails an abandoned submission, or
# finishes a cancel): a submission or resume that meets it waits that out rather than being refused.
BUSY_WAIT_S = 3.0


class SubmissionFailed(RuntimeError):
    """Storing or sending stopped part-way; the run is `failed` (or, with `retry_later`, still
    `validating`) and resubmitting the file resumes it."""


@dataclass(frozen=True)
class SubmittedRun:
    id: uuid.UUID
    name: str
    created: bool
    stored: int  # lines stored by this call
    sent: int  # turns sent by this call
    skipped_lines: list[LineError]
    status: RunStatus
    refused: list[dict[str, Any]] = field(default_factory=list)  # lines refused by policy (their records)
    lines_to_answer: int | None = None  # the file's lines neither skipped nor refused (None: not read)

    @property
    def enqueued(self) -> int:
        return self.sent


Progress = Callable[[int, int], None]  # (lines stored so far, turns sent so far)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An error as one short line (a database error's own message, not the statement it failed in)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 1] + "…"


def check_run_name(name: str, *, existing: bool = False) -> str:
    """A run name is stored in runs.name (varchar 200) and keys every fresh conversation of the run.
    `existing`: a run of that name is there already (made before `:` was refused: it may be resumed)."""
    try:
        storable_text(name)
    except ValueError as exc:  # a name taken from a file's name may hold what no text can (--name sets it)
        raise SubmissionRefused(f"run name: {exc} (set one with --name)") from None
    if not name.strip():
        raise SubmissionRefused("run name: must not be empty")
    if len(name) > KEY_CHARS:
        raise SubmissionRefused(f"run name: {len(name)} characters; the limit is {KEY_CHARS}")
    if "/" in name or "\\" in name or name in (".", ".."):  # it names the export's files
        raise SubmissionRefused(f"run name: {name!r} must not hold '/' or '\\', nor be '.' or '..'")
    if ":" in name and not existing:  # `run:<name>:<custom_id>` names a fresh conversation: one name, one run
        raise SubmissionRefused(f"run name: {name!r} must not hold ':'")
    return name


def submit_run(
    path: Path,
    *,
    name: str | None = None,
    skip_bad_lines: bool = False,
    progress: Progress | None = None,
    options: LineOptions | None = None,
    fields: dict[str, Any] | None = None,
    retry_later: bool = False,
    lock_held: bool = False,
    file_is_ours: bool = False,
) -> SubmittedRun:
    """Validate the whole file, then store and send it on the bulk lane.

    A new name creates the run. The same name and file again resumes a submission that failed or
    died, and is a no-op for one that finished. Raises RunValidationError (nothing stored), RunBusy,
    RunConflict, or SubmissionFailed (the run is `failed`; resubmit to resume). `options` say what
    the file's lines may do (a run holding turns keeps the ones they were stored under; one that
    stored nothing yet takes these, or keeps its own when None); `fields` are the
    run's other columns (metadata, window, files), set when it is created. `retry_later`: a
    submission that stops leaves the run `validating` for its caller to try again (a batch's).
    `lock_held`: the caller holds the run's submission lock already (a batch counts its try there).
    `file_is_ours`: the file is one the service stored and never writes again (a batch's input);
    any other is read from a private copy, so lines changed after validation are never stored.
    """
    name = check_run_name(path.stem if name is None else name, existing=True)  # all but ':' first
    with nullcontext(path) if file_is_ours else _private_copy(path) as held:
        return _submit(held, name, skip_bad_lines, progress, options, fields, retry_later, lock_held)


class NotARegularFile(ValueError):
    """A run file that is a device or a pipe: refused (the CLI's exit 2)."""


def regular_file(path: Path, found: os.stat_result | None = None) -> os.stat_result:
    """The file's status (`found`, when the caller read it from its open file); NotARegularFile for
    a device or a pipe (a run file is read several times: one never ends, the other reads once)."""
    found = path.stat() if found is None else found
    if not stat.S_ISREG(found.st_mode):
        raise NotARegularFile(f"{path}: not a regular file")
    return found


@contextmanager
def _private_copy(path: Path) -> Iterator[Path]:
    """A copy of the file no one else writes, under the same name (its stem names a run): the file
    is read several times (its format, its validation, its storing), and a line edited between
    those readings would be stored unchecked."""
    # One open file, checked and copied: a name swapped for a device between a check by name and the
    # copy is not copied; at most the size checked is copied, and a file still growing (being
    # written) is refused rather than copied for as long as it grows. Opened without blocking: a
    # pipe with no writer would hold the open for ever, before its check could refuse it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        found = regular_file(path, os.fstat(fd))
        os.set_blocking(fd, True)
        source = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with source:
        size = found.st_size
        folder = Path(tempfile.gettempdir())
        if shutil.disk_usage(folder).free < size + (64 << 20):
            raise ValueError(
                f"{path}: no room for its copy in {folder} ({size:,} bytes and 64 MB to spare);"
                " point TMPDIR at a folder with room"
            )
        with tempfile.TemporaryDirectory(prefix="mlchat-submit-") as private:
            copy = Path(private) / path.name
            with copy.open("wb") as target:
                left = size
                while left and (chunk := source.read(min(left, 1 << 20))):
                    target.write(chunk)
                    left -= len(chunk)
            if source.read(1) or os.fstat(source.fileno()).st_size != size:
                raise ValueError(f"{path}: the file changed while it was read; submit it once it is written")
            yield copy


def _submit(
    path: Path,
    name: str,
    skip_bad_lines: bool,
    progress: Progress | None,
    options: LineOptions | None,
    fields: dict[str, Any] | None,
    retry_later: bool,
    lock_held: bool,
) -> SubmittedRun:
    if ":" in name and _run_tenant(name) is None:
        check_run_name(name)  # a new run: refused
    with nullcontext(True) if lock_held else submission_lock(name, wait_s=BUSY_WAIT_S) as got:
        if not got:
            raise RunBusy(
                f"run {name!r} is busy: another process is submitting it, or housekeeping is closing it;"
                " try again shortly"
            )
        if not retry_later:
            _refuse_a_batch(name)
        kept, kept_skip, resumed = _stored_options(name)
        # A run holding turns keeps the options they were stored under; one that stored nothing yet (its
        # validation failed, say) takes the caller's, as its error asked. --skip-bad-lines is kept for
        # a resume: resumed without it (`mlchat run resume`, or the file sent again as the failure
        # says), a run submitted with it failed on the very lines it had skipped, its first chunk
        # interrupted too (CLI review); not for a run that ended (an empty one taking a new file).
        options = (kept if resumed else options or kept) or LineOptions()
        if retry_later:  # a batch's try: its output file names no speaker (scenes review)
            options = replace(options, scenes=False)
        skip_bad_lines = skip_bad_lines or kept_skip
        tenant = _tenant_of(name, (fields or {}).get("tenant"))
        check = validate_file(path, options, tenant=tenant, every_error=skip_bad_lines, run_name=name)
        with session_scope() as session:
            run, created = create_run(
                session=session,
                name=name,
                model=settings.model,
                file_hash=check.digest,
                total=check.good,
                fields=(fields or {})
                | {
                    "input_format": check.reader.format,
                    "options": options.stored() | {SKIP_BAD_LINES: skip_bad_lines},
                },
            )
            run_id, model, status = run.id, run.model, run.status
            if status not in (RunStatus.VALIDATING, RunStatus.FAILED):  # submitted already: nothing to do
                return SubmittedRun(run_id, name, False, 0, 0, [], status)
            over_quota = (
                submission_reservation(
                    session,
                    run_id,
                    path.stat().st_size,
                    check.good + len(check.refused) + check.error_count,
                    check.replies,
                )
                if run.input_file_id is not None and not (check.errors and not skip_bad_lines)
                else None
            )
            if over_quota is not None:  # a batch whose lines write more than its key has room for
                fail_submission(
                    session=session,
                    run_id=run_id,
                    error=over_quota,
                    error_code="invalid_request",
                    line_errors=[{"line": None, "message": over_quota}],
                    final=True,
                )
            elif check.errors and not skip_bad_lines:
                if status == RunStatus.FAILED:  # failed before: the error it keeps is this file's now
                    resume_submission(session=session, run_id=run_id)  # (CLI review: the old one stayed)
                fail_submission(
                    session=session,
                    run_id=run_id,
                    error=str(RunValidationError(check.errors, check.error_count)),
                    error_code="invalid_request",
                    line_errors=[{"line": e.line, "message": e.reason} for e in check.errors],
                    final=retry_later,  # a batch's try: no resume follows, what an earlier try stored stops
                )
            else:
                resume_submission(
                    session=session,
                    run_id=run_id,
                    total=check.good,
                    input_format=check.reader.format,
                    refused=[r.record() for r in check.refused],
                )
            # its deletion past retention begun since create_run looked: nothing of this is kept
            refuse_deleting(session=session, run_id=run_id, name=name)
        if check.errors and not skip_bad_lines:
            raise RunValidationError(check.errors, check.error_count)
        if over_quota is not None:
            raise RunValidationError([])  # failed, with its reason recorded: its caller calls back
        counts = [0, 0]  # (lines stored, turns sent), as they go: a cancel mid-way says what was done
        try:
            _store_and_send(
                counts, path, check, name, run_id, model, progress, tenant, send_while_storing=not retry_later
            )
        except RunNotAccepting:  # cancelled mid-way: the cancel below finishes what it started
            pass  # (CLI review: what this call had stored and sent was said as 0 and 0)
        except Exception as exc:
            reason = one_line(exc)
            if not retry_later:
                with session_scope() as session:
                    fail_submission(
                        session=session,
                        run_id=run_id,
                        error=f"submission stopped: {reason}; resubmit the same file "
                        f"(or `mlchat run resume {name} FILE`) to store and send the rest",
                        error_code="server_error",
                    )
            raise SubmissionFailed(
                f"run {name!r}: submission stopped ({reason}); resubmit to resume"
            ) from exc
        stored, sent = counts
        with session_scope() as session:
            status = finish_submission(session=session, run_id=run_id)
            if status == RunStatus.FAILED:  # failed under it (housekeeping found it abandoned, say)
                error = session.get(Run, run_id).error  # type: ignore[union-attr]
        if status == RunStatus.FAILED and not retry_later:  # CLI review: taken for a cancel, exit 0
            # (a batch's try: whoever failed it told its client)
            raise SubmissionFailed(f"run {name!r} failed during its submission: {error}")
        if status == RunStatus.CANCELLING:  # turns stored after the cancel landed are cancelled too
            # In a transaction of its own: the one above locked the run, and a cancel locks turns
            # before their run (as every claim finishing one does): together they could deadlock.
            with session_scope() as session:
                status = cancel_run(session=session, run_id=run_id).after
        refused = [r.record() for r in check.refused]
        return SubmittedRun(run_id, name, created, stored, sent, check.errors, status, refused, check.good)


SKIP_BAD_LINES = "skip_bad_lines"  # kept with the run's line options: whether its bad lines were skipped


def _refuse_a_batch(name: str) -> None:
    """SubmissionRefused for a batch of the HTTP API: the service submits its file and owns its
    status (`mlchat run resume` brought a failed one, whose client was told so, back to life; `run
    submit` of another file replaced the file its input_file_id names; either, on one waiting for its
    retry, sent lines before the whole file was stored)."""
    with session_scope() as session:
        batch = is_http_batch(session=session, name=name)
    if batch:
        raise SubmissionRefused(
            f"run {name!r} is a batch of the HTTP API (/v1/batches): the service submits it, never "
            "`mlchat run submit` or `run resume`; create a new batch, or submit the file as a run of "
            "another name"
        )


def _stored_options(name: str) -> tuple[LineOptions | None, bool, bool]:
    """The line options a run of that name was submitted with, whether its bad lines are still
    skipped (they were, and it holds turns or its submission stopped part-way: a resume), and whether
    it holds turns."""
    with session_scope() as session:
        stored, holds_turns, stopped = run_options(session=session, name=name)
    if stored is None:
        return None, False, holds_turns
    skipped = bool(stored.pop(SKIP_BAD_LINES, False)) and (holds_turns or stopped)
    return LineOptions.of_stored(stored), skipped, holds_turns


def _run_tenant(name: str) -> str | None:
    """The tenant of the run of that name (a batch's is its key's); None when there is no such run."""
    with session_scope() as session:
        return run_tenant(session=session, name=name)


def _stored_tenant(name: str) -> str:
    """The tenant of the run of that name; the default one for a new CLI run."""
    tenant = _run_tenant(name)
    return DEFAULT_TENANT if tenant is None else tenant


def _tenant_of(name: str, asked: str | None) -> str:
    """The tenant the run of that name is stored in: its own, or `asked` (`mlchat run submit
    --tenant`, whose writers' review keys see it on the desk) for a new one, else the default one;
    RunConflict when the run is another tenant's."""
    stored = _run_tenant(name)
    if asked is not None and stored is not None and stored != asked:
        raise RunConflict(f"run {name!r} is tenant {stored!r}'s, not {asked!r}'s: give the run another name")
    return stored if stored is not None else asked or DEFAULT_TENANT


def _store_and_send(
    counts: list[int],
    path: Path,
    check: FileCheck,
    name: str,
    run_id: uuid.UUID,
    model: str,
    progress: Progress | None,
    tenant: str,
    *,
    send_while_storing: bool = True,
) -> None:
    """Store the lines not stored yet and send every turn not sent yet, counting (lines stored, turns
    sent) into `counts` as it goes (a cancel met part-way leaves what was done there).

    Three stages overlap: this thread parses chunk N+2 while one thread stores chunk N+1 (COPY and
    insert; PostgreSQL works meanwhile) and another sends chunk N's messages. At most one chunk waits
    at each stage, so memory stays bounded whatever the file's size. Turns stored by an earlier try
    but never sent go out first, in input order.

    Without `send_while_storing` (a batch, which is not resumed: a submission that gives up fails
    it, and a failed batch writes no output), nothing is sent until every line is stored, so no
    line is answered for a batch whose submission then fails.
    """
    with session_scope() as session:
        already = stored_custom_ids(session=session, run_id=run_id)
        already |= stored_scene_ids(session=session, run_id=run_id)

    def send(ids: list[uuid.UUID]) -> None:
        _send(ids, model)
        counts[1] += len(ids)
        if progress:
            progress(counts[0], counts[1])

    for leftovers in _unsent(run_id) if send_while_storing else ():
        send(leftovers)
    candidates = check.reader.options.candidates or settings.run_candidates
    scene_lines: set[int] = set()  # their numbers only: a file of many long scenes is never held whole

    def staged() -> Iterator[StagedTurn]:
        for number, text, line in good_lines(path, check):
            if line.custom_id in already:
                continue
            if line.scene is not None:  # stored after the lines, in chunks of their own
                scene_lines.add(number)
                continue
            staged_turn = _staged_turn(text, line, name, run_id, model, candidates)
            known = staged_turn.conversation in check.known_conversations
            yield replace(staged_turn, known=known, line=number)

    def scene_chunks() -> Iterator[list[tuple[str, str, SceneSpec]]]:
        """The scene lines not stored yet, read again from the file (those lines alone) a chunk at
        a time."""
        lines = (
            (line.custom_id, line_conversation(name, line.custom_id), line.scene)
            for number, text in iter_lines(path)
            if number in scene_lines and isinstance(text, str)
            for line in [parse_again(check, text)]
            if line.scene is not None
        )
        return iter(lambda: list(islice(lines, SCENE_CHUNK)), [])

    lines = staged()
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-writer") as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-sender") as sender,
    ):
        write: Future[list[uuid.UUID]] | None = None
        sending: Future[None] | None = None
        for chunk in chain(_chunks(lines), [None]):
            if write is not None:
                new_ids = write.result()
                counts[0] += len(new_ids)
                if sending is not None:
                    sending.result()
                if send_while_storing:
                    sending = sender.submit(send, new_ids)
                elif progress:
                    progress(counts[0], counts[1])
            write = writer.submit(_insert_chunk, run_id, chunk, tenant) if chunk else None
        if sending is not None:
            sending.result()
    for chunk_of_scenes in scene_chunks() if scene_lines else ():
        with session_scope() as session:
            first_steps = insert_run_scenes(
                session=session,
                run_id=run_id,
                lines=chunk_of_scenes,
                model=model,
                tenant=tenant,
                candidates=candidates,
            )
        counts[0] += len(first_steps)
        if send_while_storing:
            send(first_steps)
    for leftovers in () if send_while_storing else _unsent(run_id):
        send(leftovers)


def _chunks(lines: Iterator[StagedTurn]) -> Iterator[list[StagedTurn]]:
    return iter(lambda: list(islice(lines, CHUNK)), [])


def _unsent(run_id: uuid.UUID) -> Iterator[list[uuid.UUID]]:
    """The run's turns not sent yet, a chunk at a time in input order, each read once."""
    after = 0
    while True:
        with session_scope() as session:
            if run_status(session=session, run_id=run_id) != RunStatus.VALIDATING:
                raise RunNotAccepting("the run left validating")
            rows = unsent_turns(session=session, run_id=run_id, limit=CHUNK, after=after)
        if not rows:
            return
        after = rows[-1][1]
        yield [turn_id for turn_id, _ in rows]


def _insert_chunk(run_id: uuid.UUID, staged: list[StagedTurn], tenant: str) -> list[uuid.UUID]:
    with session_scope() as session:
        return insert_run_turns(session=session, run_id=run_id, turns=staged, tenant=tenant)


def _send(ids: list[uuid.UUID], model: str) -> None:
    """Send a chunk's messages, then record them sent. A crash in between sends them again on resume:
    a duplicate message costs one claim that finds the turn taken, never a second generation. A
    worker may claim the message before the stamp: the claim's order check treats a line not yet
    stamped as possibly sent while its run has not failed (db/turns.py, _blocks_later_turns)."""
    from tasks.generate import dispatch  # imports the Celery app (and the broker URL) only when sending

    if not ids:
        return
    dispatch(ids, model=model, lane="bulk")
    with session_scope() as session:
        mark_dispatched(session=session, turn_ids=ids)


def _staged_turn(
    raw: str, line: RunLine, run_name: str, run_id: uuid.UUID, model: str, candidates: int
) -> StagedTurn:
    params = line.params.resolved()
    if line.params.n is None:  # but never fewer than the choices the line returns
        params["n"] = max(default_candidates(params, candidates), line.choices or 1)
    if line.system_prompt is not None:
        params["system_prompt"] = line.system_prompt
    if line.direction is not None:
        params["direction"] = line.direction
    if line.choices is not None:
        params["choices"] = line.choices
    return StagedTurn(
        idempotency_key=line_key(f"run:{run_id}", line.custom_id),
        request_hash=hashlib.sha256(raw.strip().encode()).hexdigest(),  # the line as submitted
        conversation=line.conversation or line_conversation(run_name, line.custom_id),
        character=line.character,
        player_name=line.player_name,
        story=line.story,
        story_time=line.story_time,
        message=line.message,
        model=model,
        params=params,
        custom_id=line.custom_id,
        history=tuple((h.role, h.content) for h in line.history),
    )
