"""The writers' desk: a run's lines for review, and the review state machine. Each change is one
conditional UPDATE of the turn's review row on the version the writer's form was drawn from:

    pick     done turn  → another candidate kept (the kept one becomes a candidate), label cleared
    edit     done turn  → the kept text replaced by the writer's, label cleared
    approve  done turn  → label approved
    reject   done turn  → label rejected, with the reason

The first change of a turn stores the reply and scores as the model kept them (turn_reviews); every
change is logged with who made it and when (turn_review_changes). A text change rewrites the turn's
reply and its conversation line (content and embedding) in the same transaction, so history,
retrieval, the API and exports all read the kept text.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import case, cast, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH, insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.facts import forget_read_facts
from db.memory_jobs import interrupt_jobs, reread_from
from db.models import (
    Character,
    Conversation,
    Message,
    ReviewLabel,
    Run,
    Turn,
    TurnReview,
    TurnReviewChange,
    TurnStatus,
)
from db.runs import RunDeleting
from db.summaries import forget_line
from scenes.speakers import NARRATOR_NAME, NARRATOR_SLUG

Bar = Literal["any", "below", "above"]
LabelFilter = Literal["any", "approved", "rejected", "unreviewed"]


class NotReviewable(ValueError):
    """The change names something the line does not have (a candidate it never had)."""


class NotAnswered(NotReviewable):
    """The turn has no kept reply to review (queued, running, failed or cancelled)."""


class StaleReview(ValueError):
    """Someone changed the reply since the writer's form was drawn."""


@dataclass(frozen=True)
class LineFilter:
    """What a run's lines are narrowed to; None / "any" means no narrowing."""

    character: str | None = None  # the character's slug
    check: str | None = None  # a gate check kind (echo, loop, persona, …): replies it flagged
    bar: Bar = "any"
    text: str | None = None  # in the player's message or the kept reply, case-insensitive
    label: LabelFilter = "any"


@dataclass(frozen=True)
class Line:
    """One line of a run as the desk shows it."""

    turn: Turn
    character_slug: str
    character_name: str
    review: TurnReview | None


def _contains(column: Any, needle: str) -> Any:
    return func.strpos(func.lower(column), func.lower(literal(needle))) > 0


# A narrator's line is the narrator's, never the conversation's lead character's.
_narrated = Turn.speaker == "narrator"
_slug = case((_narrated, literal(NARRATOR_SLUG)), else_=Character.slug)
_name = case((_narrated, literal(NARRATOR_NAME)), else_=Character.name)


def _lines() -> Any:
    # A scene step's (or group turn's) speaker is the member who answered, not the conversation's
    # own character.
    return (
        select(Turn, _slug, _name, TurnReview)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .join(Character, Character.id == func.coalesce(Turn.character_id, Conversation.character_id))
        .outerjoin(TurnReview, TurnReview.turn_id == Turn.id)
    )


def run_lines(
    *, session: Session, run_id: uuid.UUID, filters: LineFilter, limit: int, after: int = 0
) -> list[Line]:
    """The run's lines matching the filters, in input order, from the one after turn number `after`
    (a cursor, not an offset: a review moves a line out of a filter such as `unreviewed`, and an
    offset would then step over as many lines)."""
    query = _lines().where(Turn.run_id == run_id, Turn.number > after)
    below = func.coalesce(func.jsonb_array_length(Turn.quality["below_bar"]), 0)
    if filters.character:
        query = query.where(_slug == filters.character)
    if filters.check:
        query = query.where(
            func.jsonb_path_exists(
                Turn.quality,
                cast(literal("$.below_bar[*] ? (@ starts with $kind)"), JSONPATH),
                literal({"kind": f"{filters.check}:"}, JSONB),
            )
        )
    if filters.bar == "below":
        query = query.where(below > 0)
    elif filters.bar == "above":
        query = query.where(Turn.quality.is_not(None), below == 0)
    if filters.text:
        query = query.where(or_(_contains(Turn.message, filters.text), _contains(Turn.reply, filters.text)))
    if filters.label == "unreviewed":
        query = query.where(TurnReview.label.is_(None))
    elif filters.label != "any":
        query = query.where(TurnReview.label == filters.label)
    rows = session.execute(query.order_by(Turn.number).limit(limit)).tuples().all()
    return [Line(turn, slug, name, review) for turn, slug, name, review in rows]


def scene_lines(*, session: Session, scene_id: int) -> list[Line]:
    """A scene's step turns as desk lines, in step order (unanswered steps included)."""
    rows = session.execute(_lines().where(Turn.scene_id == scene_id).order_by(Turn.scene_step)).tuples().all()
    return [Line(turn, slug, name, review) for turn, slug, name, review in rows]


def run_characters(*, session: Session, run_id: uuid.UUID) -> list[tuple[str, str]]:
    """(slug, name) of the characters that answer the run's lines (the narrator's as "narrator")."""
    rows = session.execute(
        select(_slug, _name)
        .select_from(Turn)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .join(Character, Character.id == func.coalesce(Turn.character_id, Conversation.character_id))
        .where(Turn.run_id == run_id)
        .distinct()
        .order_by(_slug)
    ).tuples()
    return list(rows)


def run_labels(*, session: Session, run_id: uuid.UUID) -> dict[str, int]:
    """How many of the run's replies writers approved, rejected, edited."""
    row = session.execute(
        select(
            func.count().filter(TurnReview.label == ReviewLabel.APPROVED.value),
            func.count().filter(TurnReview.label == ReviewLabel.REJECTED.value),
            func.count().filter(TurnReview.edited),
        )
        .select_from(TurnReview)
        .join(Turn, Turn.id == TurnReview.turn_id)
        .where(Turn.run_id == run_id)
    ).one()
    return {"approved": int(row[0]), "rejected": int(row[1]), "edited": int(row[2])}


def line_run(*, session: Session, turn_id: uuid.UUID) -> Run | None:
    """The run a turn is a line of (None for a turn outside every run, or no such turn)."""
    return session.scalar(select(Run).join(Turn, Turn.run_id == Run.id).where(Turn.id == turn_id))


class RunBusy(Exception):
    """The run's row stayed locked past the wait (another change rewriting its file, its finalizer)."""


class LineBusy(RunBusy):
    """The line's row stayed locked past the wait (another change of it rewriting its batch's file)."""


def lock_line(*, session: Session, turn_id: uuid.UUID, wait_ms: int) -> None:
    """Lock a line's turn row for a desk change (before its run's, as stores lock turns then runs),
    waiting at most `wait_ms` (LineBusy after it): a second change of a line whose first rewrites a
    large batch's file held an API connection for the whole rewrite (desk review)."""
    _within(
        session, wait_ms, select(Turn.id).where(Turn.id == turn_id).with_for_update(), LineBusy(str(turn_id))
    )


def lock_line_run(*, session: Session, run_id: uuid.UUID, wait_ms: int, text: bool) -> str | None:
    """Lock the run a changed line belongs to, waiting at most `wait_ms` (RunBusy after it, the
    transaction then to be rolled back): for a `text` change FOR NO KEY UPDATE (a change and the
    batch's finalizer, or two changes' rewrites of its output file, never interleave), for a label
    FOR KEY SHARE, which waits for no rewrite but for a chunk of the run's deletion (FOR UPDATE): the
    two never interleave (the verdict would go with its line, the run counted unreviewed).
    RunDeleting once its deletion began. Its output file's id, if written."""
    locked = (
        select(Run.name, Run.output_file_id, Run.deleting_since)
        .where(Run.id == run_id)
        .with_for_update(read=not text, key_share=True)
    )
    row = _within(session, wait_ms, locked, RunBusy(str(run_id)))
    if row is None or row.deleting_since is not None:  # gone: its deletion's last chunk committed
        raise RunDeleting(row.name if row is not None else str(run_id))
    return row.output_file_id  # type: ignore[no-any-return]


def _within(session: Session, wait_ms: int, statement: Any, busy: RunBusy) -> Any:
    """statement's first row (None: none), its locks waited for `wait_ms` at most (`busy` raised
    after it)."""
    prior = session.scalar(select(func.current_setting("lock_timeout")))
    session.execute(select(func.set_config("lock_timeout", f"{wait_ms}ms", True)))
    try:
        value = session.execute(statement).first()
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise busy from None
        raise
    session.execute(select(func.set_config("lock_timeout", prior, True)))
    return value


def review_changes(*, session: Session, turn_id: uuid.UUID) -> list[TurnReviewChange]:
    """Every desk change of a turn, oldest first."""
    return list(
        session.scalars(
            select(TurnReviewChange).where(TurnReviewChange.turn_id == turn_id).order_by(TurnReviewChange.id)
        ).all()
    )


def get_review(*, session: Session, turn_id: uuid.UUID) -> TurnReview | None:
    """The turn's review row, if a writer changed anything."""
    return session.get(TurnReview, turn_id)


def _answered(session: Session, turn_id: uuid.UUID) -> Turn:
    turn = session.scalar(
        select(Turn).where(Turn.id == turn_id, Turn.status == TurnStatus.DONE).with_for_update()
    )
    if turn is None or turn.reply is None:
        raise NotAnswered("this line has no reply to review (it was not answered)")
    return turn


@dataclass(frozen=True)
class _Bumped:
    version: int  # the review's new version
    # Whether the reply went into or out of `rejected`, which memory leaves out (db/memory_lines.py):
    # what it read of the line is read again, with or without it, whatever changed the label.
    rejection_flipped: bool


def _bump(session: Session, turn: Turn, version: int, by: str, **values: Any) -> _Bumped:
    """The review row on `version` moved to the next one with `values`; StaleReview otherwise."""
    was = session.scalar(select(TurnReview.label).where(TurnReview.turn_id == turn.id))
    session.execute(
        insert(TurnReview)
        .values(turn_id=turn.id, original_reply=turn.reply, original_quality=turn.quality, version=0)
        .on_conflict_do_nothing(index_elements=[TurnReview.turn_id])
    )
    new_version = session.scalar(
        update(TurnReview)
        .where(TurnReview.turn_id == turn.id, TurnReview.version == version)
        .values(version=TurnReview.version + 1, updated_by=by, updated_at=func.now(), **values)
        .returning(TurnReview.version)
        .execution_options(synchronize_session=False)
    )
    if new_version is None:
        raise StaleReview("this reply was changed by someone else since you opened it; reload and try again")
    rejected = ReviewLabel.REJECTED.value
    return _Bumped(int(new_version), (was == rejected) != (values["label"] == rejected))


def _keep_text(
    session: Session, turn: Turn, text: str, embedding: Any, *, reread: bool, **turn_values: Any
) -> None:
    """The kept reply becomes `text`; what memory read of the line is read again when the text changed
    or `reread` (its rejection flipped)."""
    session.execute(
        update(Turn)
        .where(Turn.id == turn.id, Turn.status == TurnStatus.DONE)
        .values(reply=text, **turn_values)
        .execution_options(synchronize_session=False)
    )
    if turn.reply_message_id is not None:
        line = session.execute(
            update(Message)
            .where(Message.id == turn.reply_message_id)
            .values(content=text, embedding=embedding, embedding_next=None)  # see db/reembed.py write_next
            .returning(Message.conversation_id, Message.seq)
            .execution_options(synchronize_session=False)
        ).first()
        if line is not None and (text != turn.reply or reread):  # memory told the old text, or left it out
            _read_again(session, *line)


def _read_again(session: Session, conversation_id: int, seq: int) -> None:
    """What memory made of the line at `seq` and after is dropped, and read again: the summaries that
    cover it or come after it, the facts read from its stretch on; a job in flight loses its claim."""
    interrupt_jobs(session=session, conversation_id=conversation_id, seq=seq)
    forget_line(session=session, conversation_id=conversation_id, seq=seq)
    first = forget_read_facts(session=session, conversation_id=conversation_id, seq=seq)
    if first is not None and first < seq:  # the stretch that held the line is read whole again
        reread_from(session=session, conversation_id=conversation_id, seq=first)


def _log(session: Session, turn_id: uuid.UUID, action: str, by: str, **values: Any) -> None:
    session.add(TurnReviewChange(turn_id=turn_id, action=action, by=by, **values))
    session.flush()


def candidate_text(*, session: Session, turn_id: uuid.UUID, index: int) -> str:
    """The text of the turn's not-kept candidate at `index` (0-based); NotReviewable if none."""
    alternatives = session.scalar(select(Turn.alternatives).where(Turn.id == turn_id)) or []
    if not 0 <= index < len(alternatives):
        raise NotReviewable(f"candidate: this line has no candidate {index + 1}")
    return str(alternatives[index]["text"])


def pick_candidate(
    *, session: Session, turn_id: uuid.UUID, index: int, text: str, version: int, by: str, embedding: Any
) -> int:
    """pick: keep the candidate at `index` (whose text the writer saw as `text`) instead; the reply
    kept so far takes its place among the candidates, scores and seed swapped with it. A writer's
    edit moved there is marked `edited` and carries no seed, and the model's scores it kept (of the
    model's text), and stays edited, with those scores, when picked back. Returns the review's new
    version."""
    turn = _answered(session, turn_id)
    alternatives = list(turn.alternatives or [])
    if not 0 <= index < len(alternatives):
        raise NotReviewable(f"candidate: this line has no candidate {index + 1}")
    chosen = alternatives[index]
    if chosen["text"] != text:
        raise StaleReview("this reply was changed by someone else since you opened it; reload and try again")
    kept_edited = bool(
        session.scalar(select(TurnReview.edited).where(TurnReview.turn_id == turn.id)) or False
    )
    chosen_edited = bool(chosen.get("edited"))
    kept_quality = {k: v for k, v in (turn.quality or {}).items() if k not in ("candidates", "regenerated")}
    usage = dict(turn.usage or {})
    kept: dict[str, Any] = (
        # The model's scores go with the edit, as they stayed on the turn while it was kept: picked
        # back, it is scored as it was (an edit picked back without them was a run unscored in all);
        # and the model's generation's count and end, which its usage keeps (review: picked back
        # without them, the line said 0 completion tokens and no finish_reason).
        {
            "text": turn.reply,
            "edited": True,
            "finish_reason": usage.get("finish_reason"),
            "completion_tokens": usage.get("completion_tokens", 0),
            "quality": kept_quality,
        }
        if kept_edited
        else {
            "text": turn.reply,
            "seed": turn.params.get("seed"),
            "finish_reason": usage.get("finish_reason"),
            "completion_tokens": usage.get("completion_tokens", 0),
            "quality": kept_quality,
        }
    )
    # A structured reply's JSON goes with its text, both ways (an NPC reply's text is its `say`).
    alternatives[index] = kept if turn.structured is None else {**kept, "structured": turn.structured}
    quality = dict(chosen.get("quality") or {})
    for key in ("candidates", "regenerated"):  # the line's, not the reply's (review: a pick dropped
        if turn.quality and key in turn.quality:  # `regenerated`, and the run's count of them fell)
            quality[key] = turn.quality[key]
    prompt_tokens = usage.get("prompt_tokens", 0)
    usage.update(
        finish_reason=chosen.get("finish_reason"),
        completion_tokens=chosen.get("completion_tokens", 0),
        total_tokens=prompt_tokens + chosen.get("completion_tokens", 0),
    )
    bumped = _bump(session, turn, version, by, label=None, reason=None, edited=chosen_edited)
    _keep_text(
        session,
        turn,
        chosen["text"],
        embedding,
        reread=bumped.rejection_flipped,
        alternatives=alternatives,
        quality=quality,
        usage=usage,
        params={**turn.params, "seed": chosen.get("seed")},
        structured=chosen.get("structured"),
    )
    _log(session, turn.id, "pick", by, before=turn.reply, after=chosen["text"], candidate=index)
    return bumped.version


def edit_reply(
    *,
    session: Session,
    turn_id: uuid.UUID,
    text: str,
    version: int,
    by: str,
    embedding: Any,
    structured: Any = None,
) -> int:
    """edit: the writer's text becomes the kept reply (the label is cleared: it was for the old
    text), with `structured`, the structured reply it reads as (None: free text, or a regex or
    choice reply). Returns the review's new version."""
    turn = _answered(session, turn_id)
    bumped = _bump(session, turn, version, by, label=None, reason=None, edited=True)
    _keep_text(session, turn, text, embedding, reread=bumped.rejection_flipped, structured=structured)
    _log(session, turn.id, "edit", by, before=turn.reply, after=text)
    return bumped.version


def label_reply(
    *,
    session: Session,
    turn_id: uuid.UUID,
    label: ReviewLabel | None,
    reason: str | None,
    version: int,
    by: str,
) -> int:
    """approve / reject: the writer's verdict on the kept reply; clear (`label` None): no verdict
    again (a mis-click's label withdrawn, out of the training labels). Returns the review's new
    version."""
    turn = _answered(session, turn_id)
    bumped = _bump(session, turn, version, by, label=None if label is None else label.value, reason=reason)
    if bumped.rejection_flipped and turn.reply_message_id is not None:
        line = session.execute(
            select(Message.conversation_id, Message.seq).where(Message.id == turn.reply_message_id)
        ).first()
        if line is not None:
            _read_again(session, *line)
    action = {ReviewLabel.APPROVED: "approve", ReviewLabel.REJECTED: "reject", None: "clear"}[label]
    _log(session, turn.id, action, by, before=turn.reply, reason=reason)
    return bumped.version


@dataclass(frozen=True)
class WriterLabel:
    """A writer's verdict on a reply whose scores describe its text (not hand-edited)."""

    turn_id: uuid.UUID
    acceptable: bool
    quality: dict[str, Any]
    reply: str


def writer_labels(*, session: Session, run_id: uuid.UUID | None = None) -> list[WriterLabel]:
    """Approved and rejected replies with the gate's measures of the same text, oldest first:
    labels to calibrate the gate on. Edited replies are left out (their scores are of other text)."""
    query = (
        select(Turn.id, TurnReview.label, Turn.quality, Turn.reply)
        .join(TurnReview, TurnReview.turn_id == Turn.id)
        .where(
            TurnReview.label.is_not(None),
            TurnReview.edited.is_(False),
            Turn.quality.is_not(None),
            Turn.status == TurnStatus.DONE,
        )
        .order_by(Turn.number)
    )
    if run_id is not None:
        query = query.where(Turn.run_id == run_id)
    return [
        WriterLabel(turn_id, label == ReviewLabel.APPROVED.value, quality, reply)
        for turn_id, label, quality, reply in session.execute(query).tuples()
    ]
