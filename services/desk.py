"""The writers' desk: what its pages show and the changes writers make, for one API key.

A `review` key sees and corrects the runs of its own tenant; an `admin` key every run, and also a
turn's prompt manifest. Anything another tenant owns is "not found", so ids reveal nothing. Every
form value is checked here with a message naming the field; nothing is stored unless all pass.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import literal, select, tuple_
from sqlalchemy.orm import Session, load_only

from core.settings import settings
from db import desk_sessions, reviews
from db.memory_jobs import keeps_memory
from db.models import (
    RUN_FINISHED,
    Character,
    Conversation,
    ReviewLabel,
    Run,
    RunStatus,
    Scene,
    Turn,
    TurnReview,
    TurnReviewChange,
)
from db.reviews import LineFilter, NotAnswered, NotReviewable, RunBusy, StaleReview
from db.runs import RunDeleting, run_counts
from db.scenes import TranscriptLine, group_views, run_scenes, scene_transcript
from db.session import session_scope
from db.vector_space import SpaceMoved, refuse_if_moved
from roleplay.quality import CHECK_KINDS
from scenes.speakers import NARRATOR_NAME, NARRATOR_SLUG
from services.batches import rewrite_output_file
from services.runs.quality_summary import quality_summary
from worker.engine_loop import Generation
from worker.prompt.formats import FORMATS, escape_bracket_markers, escape_name_markers, escaped_label
from worker.prompt.sanitize import CONTROLS, Sanitizer
from worker.structured import BadStructuredReply, read_reply, reading_shape, say_chars, tokens_per_char

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
REASON_MAX_CHARS = 500
# How long a text change waits for another's rewrite of its batch's output file (or the finalizer's
# writing it): a rewrite of a large batch takes seconds, and every writer waiting holds a connection.
RUN_LOCK_WAIT_MS = 5000
# Rewrites of finished batches' output files this process makes at once: each holds one of the
# API's pooled connections for as long as a large batch's file takes (minutes), and any more wait
# for nothing but are refused, "send it again" (review, stop 76: ten changes to ten of one tenant's
# large batches held the whole pool, and every other tenant's requests timed out on it).
REWRITES_AT_ONCE = 2
_rewrites = threading.BoundedSemaphore(REWRITES_AT_ONCE)
TEXT_FILTER_MAX_CHARS = 200
CHECKS = CHECK_KINDS  # the gate's checks a run's lines can be filtered by
_SLUG = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Reviewer:
    """Who is at the desk: the API key's id (recorded on changes), its tenant, and whether it is admin."""

    key_id: str
    tenant: str
    admin: bool


class DeskError(Exception):
    """A refusal shown to the writer: an HTTP status and one line naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> DeskError:
    return DeskError(400, message)


# --- form values -------------------------------------------------------------------------------


def as_written(value: str, *, trim: bool = True) -> str:
    """Text as a writer's form keeps it: line ends as LF, and trimmed unless `trim` is False (a
    regex reply's pattern may ask for its spaces and line ends)."""
    text = value.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip() if trim else text


def free_text(
    name: str, value: str | None, *, max_chars: int, required: bool = True, trim: bool = True
) -> str | None:
    """A writer's text, as_written; refused when empty (if required), too long, or holding control
    characters (the first named, where it is). Angle brackets are text ("<sigh>", "x<y"): every page
    escapes them."""
    text = as_written(value or "", trim=trim)
    if not text:
        if required:
            raise _bad(f"{name}: it is empty; write something")
        return None
    if len(text) > max_chars:
        raise _bad(f"{name}: {len(text)} characters; the limit is {max_chars}")
    if found := CONTROLS.search(text):
        raise _bad(
            f"{name}: control characters are not allowed (U+{ord(found.group()):04X} at character "
            f"{found.start() + 1}); remove it"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{name}: not valid Unicode text") from None
    return text


class _AnyModelsMarkers:
    """What Sanitizer reads of a tokenizer: the special-token markers of the model families mlchat
    serves, for a host without the line's own model (stricter: `<s>` is refused for every model)."""

    all_special_tokens = ["<|", "|>", "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]"]


# Sanitisers by model: a model's own, kept; any model's markers in its place, until when (monotonic):
# the tokenizer is looked for again then (a file being written, a cache being filled).
_sanitizers: dict[str, tuple[Sanitizer, float | None]] = {}
_SANITIZER_LOADING = threading.Lock()
FALLBACK_KEPT_S = 300.0


def _sanitizer(model: str) -> Sanitizer:
    """The prompt sanitiser of the line's model, as its worker builds it; any model's markers when
    this host has not got that model's tokenizer (an API host without the weights)."""
    kept = _kept_sanitizer(model)
    if kept is not None:
        return kept
    with _SANITIZER_LOADING:  # concurrent first edits wait for one tokenizer load, not one each
        kept = _kept_sanitizer(model)
        return kept if kept is not None else _load_sanitizer(model)


def _kept_sanitizer(model: str) -> Sanitizer | None:
    kept = _sanitizers.get(model)
    return kept[0] if kept is not None and (kept[1] is None or kept[1] > time.monotonic()) else None


def _load_sanitizer(model: str) -> Sanitizer:
    from worker.model_cache import load_tokenizer

    try:
        sanitizer, until = Sanitizer(load_tokenizer(settings, model)), None
    except Exception:
        logger.warning(
            "no tokenizer of %s on this host: the desk's edit check refuses every model's special-token "
            "markers instead of its own",
            model,
            exc_info=True,
        )
        sanitizer, until = Sanitizer(_AnyModelsMarkers()), time.monotonic() + FALLBACK_KEPT_S
    _sanitizers[model] = (sanitizer, until)
    return sanitizer


def prompt_text(
    name: str,
    text: str,
    *,
    model: str,
    character: str,
    player: str = "User",
    members: Sequence[str] = (),
) -> str:
    """A writer's reply, which later prompts bring back as history: refused when `model`'s prompt
    sanitiser would change it (the model's special tokens, any prompt format's role markers such as
    `### User:`, a line opening as the prompt's own bracketed markers such as `[Narrator]`, or a line
    opening with a speaker's name and a colon: the character's, the player's, or in a group any
    member's or the narrator's), so what is stored is what the model will read."""
    sanitizer = _sanitizer(model)
    cleaned = sanitizer.scrub(text)
    labels = sanitizer.speaker_labels(character, player)
    names = [sanitizer.label(n, "Someone") for n in members]
    for prompt_format in FORMATS.values():
        # The speakers' labels as worker/prompt/packing.py makes them for this format.
        char, user = (escaped_label(prompt_format, label) for label in labels)
        cleaned = prompt_format.escape(cleaned, char, user)
        if members:  # as packing escapes a group's lines
            cleaned = escape_name_markers(cleaned, [char, user, *names])
    cleaned = escape_bracket_markers(cleaned)  # the prompt's own "[Narrator] …" and "[Scene direction]"
    if cleaned != text:
        raise _bad(
            f"{name}: it holds a special token or a role marker (like <|im_end|>, '### User:' or "
            "'[Narrator]') that would be broken in prompts; write it without"
        )
    return text


def whole_number(name: str, value: str | None, *, low: int, high: int) -> int:
    """An integer form value within [low, high]."""
    raw = (value or "").strip()
    if not raw:
        raise _bad(f"{name}: it is empty")
    if len(raw) > 12 or not raw.isascii() or not raw.isdigit():
        raise _bad(f"{name}: {raw[:20]!r} is not a whole number")
    number = int(raw)
    if not low <= number <= high:
        raise _bad(f"{name}: {number} is out of range ({low}–{high})")
    return number


def object_id(name: str, value: str) -> uuid.UUID:
    """A run's or a line's id; a malformed one is simply not found."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise DeskError(404, f"{name}: no such {name}") from None


def line_filter(
    character: str | None, check: str | None, bar: str | None, text: str | None, label: str | None
) -> LineFilter:
    """The run page's filters from its query string."""
    character = (character or "").strip() or None
    if character is not None and not _SLUG.match(character):
        raise _bad("character: not a character's id (letters, digits, . _ -, at most 64)")
    check = (check or "").strip() or None
    if check is not None and check not in CHECKS:
        raise _bad(f"check: must be one of {', '.join(CHECKS)}")
    bar = (bar or "any").strip()
    if bar not in ("any", "below", "above"):
        raise _bad("bar: must be any, below or above")
    label = (label or "any").strip()
    if label not in ("any", "approved", "rejected", "unreviewed"):
        raise _bad("label: must be any, approved, rejected or unreviewed")
    words = (text or "").strip() or None
    if words is not None:
        if len(words) > TEXT_FILTER_MAX_CHARS:
            raise _bad(f"text: {len(words)} characters; the limit is {TEXT_FILTER_MAX_CHARS}")
        if CONTROLS.search(words):
            raise _bad("text: control characters are not allowed")
    return LineFilter(character, check, bar, words, label)  # type: ignore[arg-type]


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRow:
    """A run or batch as the list shows it."""

    id: uuid.UUID
    name: str
    kind: str  # "batch" (OpenAI batch over HTTP) or "run" (CLI)
    status: str
    created_at: datetime
    total: int
    counts: dict[str, int]
    progress: int  # percent of lines finished
    below_bar: dict[str, int]  # check → replies it flagged
    scored: int
    labels: dict[str, int]
    live: bool


@dataclass(frozen=True)
class SceneRow:
    """A run's scene as the run page lists it."""

    id: int
    custom_id: str | None
    status: str
    ended_reason: str | None
    steps_done: int
    exchanges: int
    participants: list[str]  # the members' names, in speaking position


@dataclass(frozen=True)
class RunPage:
    run: RunRow
    lines: list[reviews.Line]
    characters: list[tuple[str, str]]
    filters: LineFilter
    after: int  # the lines shown follow this turn number (0: from the first)
    more: bool  # lines match past the last one shown: the next page is after its number
    scenes: list[SceneRow] = field(default_factory=list)
    more_scenes: bool = False  # scenes follow the last one shown: their page starts past its id


@dataclass(frozen=True)
class SceneLine:
    """One line of a scene's transcript; `line` is its step's turn (None: the opening or a player's line)."""

    text: TranscriptLine
    line: reviews.Line | None


@dataclass(frozen=True)
class ScenePage:
    scene: SceneRow
    run: Run
    premise: str
    lines: list[SceneLine]


@dataclass(frozen=True)
class LinePage:
    line: reviews.Line
    run: Run
    changes: list[TurnReviewChange] = field(default_factory=list)


def sign_out(session_mac: str, expires: int) -> None:
    """End a desk session: its cookie, wherever a copy of it is, no longer opens the desk."""
    with session_scope() as session:
        desk_sessions.sign_out(
            session=session, session_mac=session_mac, expires_at=datetime.fromtimestamp(expires, UTC)
        )


def signed_out(session_mac: str) -> bool:
    """Whether the desk session was ended by signing out."""
    with session_scope() as session:
        return desk_sessions.signed_out(session=session, session_mac=session_mac)


def _visible_runs(who: Reviewer) -> Any:
    query = select(Run)
    return query if who.admin else query.where(Run.tenant == who.tenant)


def _row(session: Session, run: Run) -> RunRow:
    counts = run_counts(session=session, run_id=run.id, unsent=False)  # from the index alone
    # cancelling and finalizing move on their own too; so does a run its submission failed, while the
    # turns it sent are answered (bulk runs review: its row stopped following them; those it never
    # sent wait for a resume, read from the rows of such a run alone)
    live = run.status not in RUN_FINISHED or (
        run.status == RunStatus.FAILED
        and counts.total > counts.finished
        and run_counts(session=session, run_id=run.id).underway > 0
    )
    quality = quality_summary(session=session, run_id=run.id, live=live)
    # Its requests refused by policy are its too, answered failed in its error file, as the API counts
    # a batch's (review of the numbers users read: the desk's total left them out).
    total = counts.requests(run.total)
    return RunRow(
        id=run.id,
        name=run.name,
        kind="batch" if run.input_file_id else "run",
        status=run.status.value,
        created_at=run.created_at,
        total=total,
        counts={
            "queued": counts.queued,
            "running": counts.running,
            "completed": counts.completed,
            "failed": counts.failed,
            "cancelled": counts.cancelled,
            "refused": counts.refused,
        },
        # 199 of 200 is 99%, not 100 (review)
        progress=100 * (counts.finished + counts.refused) // total if total else 0,
        below_bar=dict(quality.get("below_bar_reasons") or {}),
        scored=int(quality.get("scored", 0)),
        labels=reviews.run_labels(session=session, run_id=run.id),
        live=live,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class RunsAt:
    """A place in the runs list: a run's (created_at, id), which a page starts past. Written into the
    page's links as `<microseconds since 1970>.<id hex>`, so a run deleted since still marks it."""

    created_at: datetime
    id: uuid.UUID

    @classmethod
    def of(cls, row: RunRow) -> RunsAt:
        return cls(row.created_at, row.id)

    def token(self) -> str:
        return f"{(self.created_at - _EPOCH) // timedelta(microseconds=1)}.{self.id.hex}"

    @classmethod
    def parse(cls, name: str, value: str) -> RunsAt:
        """A place from a link's parameter `name`; a 400 naming it when it is not one."""
        micros, _, hexed = value.strip().partition(".")
        try:
            if not (micros.isascii() and micros.isdigit() and len(micros) <= 17 and len(hexed) == 32):
                raise ValueError(value)
            return cls(_EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hexed))
        except (ValueError, OverflowError):
            raise _bad(f"{name}: not a place in the runs list; open the list again") from None


@dataclass(frozen=True)
class RunsPage:
    """A page of the runs list, newest first, and where the pages on either side of it start."""

    rows: list[RunRow]
    older_than: RunsAt | None  # older runs follow: their page starts past this one's last row
    newer_than: RunsAt | None  # newer runs precede: their page ends before this one's first row


def list_runs(who: Reviewer, older_than: RunsAt | None = None, newer_than: RunsAt | None = None) -> RunsPage:
    """A page of the caller's runs and batches, newest first: the newest, those older than a place
    or those newer than one. Paged by position, not offset, so a run started while a writer pages
    neither repeats a row on the next page nor hides one."""
    order = (Run.created_at, Run.id)  # ix_runs_tenant_created_at, ix_runs_created_at
    with session_scope() as session:
        if newer_than is not None:
            newest = session.scalars(
                _visible_runs(who)
                .where(tuple_(*order) > tuple_(literal(newer_than.created_at), literal(newer_than.id)))
                .order_by(*(c.asc() for c in order))
                .limit(PAGE_SIZE + 1)
            ).all()
            if len(newest) > PAGE_SIZE:  # not the newest page yet
                rows = [_row(session, run) for run in reversed(newest[:PAGE_SIZE])]
                return RunsPage(rows, RunsAt.of(rows[-1]), RunsAt.of(rows[0]))
            older_than = None  # the newest page is a whole one
        query = _visible_runs(who).order_by(*(c.desc() for c in order)).limit(PAGE_SIZE + 1)
        if older_than is not None:
            query = query.where(
                tuple_(*order) < tuple_(literal(older_than.created_at), literal(older_than.id))
            )
        runs = session.scalars(query).all()
        rows = [_row(session, run) for run in runs[:PAGE_SIZE]]
        older = RunsAt.of(rows[-1]) if len(runs) > PAGE_SIZE else None
        newer = (RunsAt.of(rows[0]) if rows else older_than) if older_than is not None else None
        return RunsPage(rows, older, newer)


def _run(session: Session, who: Reviewer, run_id: uuid.UUID) -> Run:
    run = session.scalar(_visible_runs(who).where(Run.id == run_id))
    if run is None:
        raise DeskError(404, "run: no such run")
    return run


def run_summary(who: Reviewer, run_id: uuid.UUID) -> RunRow:
    """One run's row (the run page's live header)."""
    with session_scope() as session:
        return _row(session, _run(session, who, run_id))


def run_page(
    who: Reviewer, run_id: uuid.UUID, filters: LineFilter, after: int = 0, scenes_after: int | None = None
) -> RunPage:
    """A run, one page of its lines (filtered, from the one after turn number `after`), and one page
    of its scenes (in custom_id order, from the one after the scene `scenes_after`)."""
    with session_scope() as session:
        run = _run(session, who, run_id)
        lines = reviews.run_lines(
            session=session, run_id=run.id, filters=filters, limit=PAGE_SIZE + 1, after=after
        )
        session.expunge_all()
        past = None
        if scenes_after is not None:
            past = session.execute(
                select(Scene.custom_id, Scene.id).where(Scene.id == scenes_after, Scene.run_id == run.id)
            ).first()
            if past is None:
                raise _bad("scenes_after: no such scene of this run")
        scenes = run_scenes(
            session=session,
            run_id=run.id,
            after=(past[0] or "", past[1]) if past is not None else None,
            limit=PAGE_SIZE + 1,
        )
        return RunPage(
            run=_row(session, run),
            lines=lines[:PAGE_SIZE],
            characters=reviews.run_characters(session=session, run_id=run.id),
            filters=filters,
            after=after,
            more=len(lines) > PAGE_SIZE,
            scenes=_scene_rows(session, scenes[:PAGE_SIZE]),
            more_scenes=len(scenes) > PAGE_SIZE,
        )


def _scene_rows(session: Session, scenes: list[Scene]) -> list[SceneRow]:
    """The scenes' rows, their members read in one query."""
    groups = group_views(session=session, conversation_ids=[s.conversation_id for s in scenes])
    return [
        SceneRow(
            id=scene.id,
            custom_id=scene.custom_id,
            status=scene.status.value,
            ended_reason=scene.ended_reason,
            steps_done=scene.steps_done,
            exchanges=scene.exchanges,
            participants=[*(g.names if (g := groups.get(scene.conversation_id)) else ())]
            + ([NARRATOR_NAME] if scene.narrator else []),
        )
        for scene in scenes
    ]


def scene_id(value: str) -> int:
    """A scene's id from a path; a malformed one is simply not found."""
    raw = value.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise DeskError(404, "scene: no such scene")
    return int(raw)


def scene_page(who: Reviewer, scene_id: int) -> ScenePage:
    """A run's scene: its transcript in order, each step a line with the run page's controls."""
    with session_scope() as session:
        found = session.execute(
            select(Scene, Run).join(Run, Run.id == Scene.run_id).where(Scene.id == scene_id)
        ).first()
        if found is None or not (who.admin or found[1].tenant == who.tenant):
            raise DeskError(404, "scene: no such scene")
        scene, run = found
        steps = {line.turn.id: line for line in reviews.scene_lines(session=session, scene_id=scene.id)}
        transcript = scene_transcript(session=session, scene_id=scene.id)
        (row,) = _scene_rows(session, [scene])
        session.expunge_all()
        return ScenePage(
            scene=row,
            run=run,
            premise=scene.premise,
            lines=[SceneLine(t, steps.get(t.turn_id) if t.turn_id else None) for t in transcript],
        )


def _own_line(session: Session, who: Reviewer, turn_id: uuid.UUID) -> Run:
    run = reviews.line_run(session=session, turn_id=turn_id)
    if run is None or not (who.admin or run.tenant == who.tenant):
        raise DeskError(404, "line: no such line")
    return run


def _line_turn(session: Session, turn_id: uuid.UUID) -> Turn:
    """The line's turn, read again after _own_line: deleted meanwhile (retention, an erasure), the
    line is gone (review: an AssertionError, a 500)."""
    turn = session.get(Turn, turn_id)
    if turn is None:
        raise DeskError(404, "line: no such line")
    return turn


def line_page(who: Reviewer, turn_id: uuid.UUID) -> LinePage:
    """One line with its candidates and its change history."""
    with session_scope() as session:
        run = _own_line(session, who, turn_id)
        turn = _line_turn(session, turn_id)
        review = reviews.get_review(session=session, turn_id=turn_id)
        slug, name, _ = _speaker(session, turn)
        changes = reviews.review_changes(session=session, turn_id=turn_id)
        session.expunge_all()
        return LinePage(reviews.Line(turn, slug, name, review), run, changes)


def _speaker(session: Session, turn: Turn) -> tuple[str, str, Character | None]:
    """The line's speaker: (slug, name, its character row; None for the narrator)."""
    if turn.speaker == "narrator":  # never the conversation's lead character
        return NARRATOR_SLUG, NARRATOR_NAME, None
    # The columns its name and its language are read from, not its card and lorebook (megabytes).
    columns = select(Character).options(
        load_only(
            Character.slug,
            Character.name,
            Character.version,
            Character.language,
            Character.description,
            Character.personality,
            Character.scenario,
        )
    )
    if turn.character_id is not None:  # a scene step or group turn: the member who answered
        character = session.scalars(columns.where(Character.id == turn.character_id)).one_or_none()
    else:
        character = session.scalars(
            columns.join(Conversation, Conversation.character_id == Character.id).where(
                Conversation.id == turn.conversation_id
            )
        ).one_or_none()
    if character is None:  # its conversation erased (or retention's) since the line was read: gone
        raise DeskError(404, "line: no such line")
    return character.slug, character.name, character


def manifest(who: Reviewer, turn_id: uuid.UUID) -> tuple[Turn, dict[str, Any]]:
    """A turn's prompt and its context manifest (admin keys only)."""
    if not who.admin:
        raise DeskError(403, "the prompt view needs an admin key")
    with session_scope() as session:
        turn = session.get(Turn, turn_id)
        if turn is None:
            raise DeskError(404, "line: no such line")
        session.expunge(turn)
        return turn, dict(turn.context or {})


# --- changes -----------------------------------------------------------------------------------


def _change(
    who: Reviewer, turn_id: uuid.UUID, apply: Any, *, text: bool = False, memory: bool = False
) -> int:
    """Apply one change in one transaction; a `text` change of a finished batch's line also
    rewrites the batch's output file, so its download carries the kept text. A `text` or `memory`
    change (a label: memory leaves rejected replies out) has the line's memory jobs sent after."""
    try:
        with session_scope() as session:
            run_id = _own_line(session, who, turn_id).id
            # first, as every writer of turns and runs; a bounded wait, as the run's below
            reviews.lock_line(session=session, turn_id=turn_id, wait_ms=RUN_LOCK_WAIT_MS)
            # Only a text change rewrites the batch's file, under the run's lock (a change and the
            # finalizer, or two rewrites, never interleave), taken before the change's other rows (its
            # line, memory jobs, facts), which nobody waits for meanwhile; a label takes it FOR KEY
            # SHARE (it waits for no rewrite and no finalizer, only for a chunk of the run's
            # deletion), each a bounded time: each waiting writer holds an API connection.
            output_file_id = reviews.lock_line_run(
                session=session, run_id=run_id, wait_ms=RUN_LOCK_WAIT_MS, text=text
            )
            if not text:
                output_file_id = None
            version = int(apply(session))
            if text:  # the new text's vector, embedded before: stored NULL if a re-embed swapped since
                refuse_if_moved(session=session, what="reply")
            if output_file_id is not None:
                if not _rewrites.acquire(blocking=False):  # given back at once: the transaction ends
                    raise DeskError(
                        503,
                        "line: this server is rewriting as many batches' files as it may at once;"
                        " send this one again",
                    )
                try:
                    rewrite_output_file(session, run_id, output_file_id)
                finally:
                    _rewrites.release()
            remembering = _remembering(session, turn_id) if text or memory else None
        if remembering is not None:
            # The change dropped what memory held of the old text: summarise and read it again now,
            # not at the conversation's next reply (which may never come).
            from memory.schedule import schedule_memory

            schedule_memory([remembering])
        return version
    except NotAnswered as exc:
        raise DeskError(409, str(exc)) from None
    except RunDeleting as exc:
        raise DeskError(409, f"line: {exc}") from None
    except NotReviewable as exc:
        raise _bad(str(exc)) from None
    except StaleReview as exc:
        raise DeskError(409, str(exc)) from None
    except SpaceMoved as exc:
        raise DeskError(503, str(exc)) from None
    except RunBusy:  # the line's or its run's row (LineBusy is one)
        busy = (
            "the batch's output file is being rewritten by another change"
            if text
            else "the line or its run is busy"
        )
        raise DeskError(503, f"line: {busy}; send this one again") from None


def _remembering(session: Session, turn_id: uuid.UUID) -> int | None:
    """The line's conversation if it keeps a memory (a live conversation a run's line named), else
    None: a batch run's own conversations get no summaries or facts."""
    conversation_id = session.get_one(Turn, turn_id).conversation_id
    return conversation_id if keeps_memory(session=session, conversation_id=conversation_id) else None


def _embed(text: str) -> Any:
    from worker.embedder import embed

    return list(embed([text])[0])


def pick(who: Reviewer, turn_id: uuid.UUID, candidate: str | None, version: str | None) -> int:
    """Keep another candidate (1-based, as the page numbers them). Returns the new version."""
    index = whole_number("candidate", candidate, low=1, high=1000) - 1
    expected = whole_number("version", version, low=0, high=2**31 - 1)
    with session_scope() as session:
        _own_line(session, who, turn_id)
        try:
            text = reviews.candidate_text(session=session, turn_id=turn_id, index=index)
        except NotReviewable as exc:
            raise _bad(str(exc)) from None
    vector = _embed(text)
    return _change(
        who,
        turn_id,
        lambda s: reviews.pick_candidate(
            session=s,
            turn_id=turn_id,
            index=index,
            text=text,
            version=expected,
            by=who.key_id,
            embedding=vector,
        ),
        text=True,
    )


def edit(who: Reviewer, turn_id: uuid.UUID, text: str | None, version: str | None) -> int:
    """Replace the kept reply with the writer's text. Returns the new version."""
    expected = whole_number("version", version, low=0, high=2**31 - 1)
    with session_scope() as session:
        _own_line(session, who, turn_id)
        turn = _line_turn(session, turn_id)
        # A model's reply may be longer than a player's message may: its typo is fixed in place.
        limit = max(settings.max_message_chars, len(turn.reply or ""))
        shape = reading_shape(turn.params)
        trim = shape is None or shape.kind != "regex"  # a regex reply keeps the edges its pattern asks for
        reply = free_text("reply", text, max_chars=limit, trim=trim) or ""
        if reply == as_written(
            turn.reply or "", trim=trim
        ):  # saved as it was: no edit; label and scores stay
            raise _bad("reply: it is the kept reply unchanged; nothing to save")
        _, character, speaking = _speaker(session, turn)
        player = session.scalar(
            select(Conversation.player_name).where(Conversation.id == turn.conversation_id)
        )
        group = group_views(session=session, conversation_ids=[turn.conversation_id]).get(
            turn.conversation_id
        )
        members = [*group.names, *([NARRATOR_NAME] if group.narrator else [])] if group else []
        structured = edited_structured(turn, reply, tokens_per_char(speaking))
    prompt_text(
        "reply", reply, model=turn.model, character=character, player=player or "User", members=members
    )
    vector = _embed(reply)
    return _change(
        who,
        turn_id,
        lambda s: reviews.edit_reply(
            session=s,
            turn_id=turn_id,
            text=reply,
            version=expected,
            by=who.key_id,
            embedding=vector,
            structured=structured,
        ),
        text=True,
    )


def edited_structured(turn: Turn, text: str, per_char: int = 1) -> Any:
    """The structured reply a writer's text for this turn reads as, checked as the engine's reply
    would be (refused naming `reply` when it does not read): a data reply's (json_schema,
    json_object) parsed JSON, or None for a regex or choice reply that matches; an NPC reply's JSON
    with the text as its `say`; None for free text."""
    shape = reading_shape(turn.params)
    if shape is not None:
        try:
            structured = read_reply(shape, Generation(text, 0, 0, "stop")).structured
        except BadStructuredReply as exc:
            raise _bad(f"reply: this line is a {shape.kind} reply, and {exc}") from None
        if shape.kind in ("json_schema", "json_object"):
            # The engine's raw control characters are escaped where they stand (a grammar writes no
            # whitespace between tokens); a writer's line break may sit between them, so an edit is
            # held to strict JSON, as its clients parse the content (review).
            try:
                json.loads(text)
            except ValueError as exc:
                raise _bad(
                    f"reply: this line is a {shape.kind} reply, and it is not strict JSON ({exc}); write a "
                    "line break or a tab inside a string as \\n or \\t"
                ) from None
        return structured
    if turn.structured is None:
        return None
    limit = say_chars(int(turn.params["max_new_tokens"]), per_char)  # the speaker's, as its schema's
    if len(text) > limit:  # the NPC schema's maxLength for `say`
        raise _bad(f"reply: {len(text)} characters; this NPC reply's spoken line holds at most {limit}")
    return {**turn.structured, "say": text}


def label(who: Reviewer, turn_id: uuid.UUID, verdict: str, reason: str | None, version: str | None) -> int:
    """Approve, reject with a reason (required), or clear the verdict given. Returns the new version."""
    if verdict not in ("approve", "reject", "clear"):
        raise _bad("verdict: must be approve, reject or clear")
    rejected = verdict == "reject"
    why = (
        free_text("reason", reason, max_chars=REASON_MAX_CHARS, required=rejected)
        if verdict != "clear"
        else None
    )
    expected = whole_number("version", version, low=0, high=2**31 - 1)
    chosen = {"approve": ReviewLabel.APPROVED, "reject": ReviewLabel.REJECTED}.get(verdict)
    return _change(
        who,
        turn_id,
        lambda s: reviews.label_reply(
            session=s, turn_id=turn_id, label=chosen, reason=why, version=expected, by=who.key_id
        ),
        memory=True,
    )


def review_record(who: Reviewer, turn_id: uuid.UUID) -> dict[str, Any]:
    """The line's review as JSON: label, reason, the original text, every change."""
    with session_scope() as session:
        _own_line(session, who, turn_id)
        review: TurnReview | None = reviews.get_review(session=session, turn_id=turn_id)
        turn = _line_turn(session, turn_id)
        return {
            "turn_id": str(turn_id),
            "reply": turn.reply,
            "label": review.label if review else None,
            "reason": review.reason if review else None,
            "edited": review.edited if review else False,
            "original_reply": review.original_reply if review else turn.reply,
            "version": review.version if review else 0,
            "changes": [
                {
                    "action": c.action,
                    "before": c.before,
                    "after": c.after,
                    "candidate": None if c.candidate is None else c.candidate + 1,
                    "reason": c.reason,
                    "by": c.by,
                    "at": c.at.isoformat(),
                }
                for c in reviews.review_changes(session=session, turn_id=turn_id)
            ],
        }
