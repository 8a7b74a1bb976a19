"""The scene state machine, and every query on scenes and group members. Each transition is a
conditional UPDATE on the scene row, taken under its row lock:

    create   → open (members, the opening line and step 1's turn in the same transaction)
    step     open, step n stored      → steps_done = n, and step n+1's turn created (queued), or
                                        → ended (its exchanges done, or the reply holds its end phrase,
                                          or fewer than one member may speak)
    fail     open, its step's turn failed or was cancelled → failed | cancelled (the run's cancel)
    cancel   open (its run cancelled or expired)           → cancelled; finished steps are kept
    extend   open or ended live scene  → exchanges + n (a live scene asked to go on)
    stop     open live scene           → exchanges = steps done + 1 (the unfinished step is the last),
                                         or ended at once with none unfinished (the game's stop)
    reopen   failed, its failed step requeued (a run's failed turns retried) → open

A step's turn is created only by the transaction that stores the previous step (or the scene's
creation), and (scene_id, scene_step) is unique: every step exists once, whoever retries what. The
hook runs inside every transition that finishes turns (db/runs.py, advance_runs_of_turns), before
the run is advanced, so a run never completes between a step and the next. Locks are taken turns →
runs → scenes, the order a cancel takes them in.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    exists,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, lazyload

from db.history import lock_conversation
from db.models import (
    TURN_UNFINISHED,
    Character,
    Conversation,
    ConversationMember,
    Message,
    Role,
    Run,
    RunStatus,
    Scene,
    SceneStatus,
    Turn,
    TurnErrorCode,
    TurnStatus,
)
from db.retry_seeds import retried_params
from scenes.speakers import NARRATOR_ID, Member, Rule, next_speaker, with_narrator

# A run in one of these stops its scenes; any other (a failed submission too: it is resumed) lets them go on.
RUN_STOPPED = (RunStatus.CANCELLING, RunStatus.CANCELLED, RunStatus.EXPIRED)


def run_stopped() -> ColumnElement[bool]:
    """The run (a `Run` row of the query) stops its scenes: stopping or stopped, or a batch whose
    submission failed (no resume follows, and it writes no output)."""
    return or_(
        Run.status.in_(RUN_STOPPED), and_(Run.status == RunStatus.FAILED, Run.input_file_id.is_not(None))
    )


# Where the session keeps the steps created in its transaction, for the caller to send after commit.
NEW_STEPS_KEY = "mlchat.scene_steps"


class SceneConflict(ValueError):
    """A scene whose conversation already holds another scene."""


@dataclass(frozen=True)
class NewStep:
    """A scene step's turn created in this transaction: send it on `lane` once committed."""

    turn_id: uuid.UUID
    model: str
    lane: str


@dataclass(frozen=True)
class GroupView:
    """What a group turn's prompt needs about its conversation: the premise and who is present."""

    premise: str
    names: tuple[str, ...]  # every member's name, in speaking position (the speaker's own included)
    ids: tuple[int, ...]  # their character ids, in the same order (names may repeat; ids do not)
    narrator: bool = False  # the narrator is a participant (its lines come in under "Narrator")
    narrator_instructions: str = ""  # the narrator's own direction for the scene


@dataclass(frozen=True)
class NewMember:
    character_id: int
    position: int
    talkativeness: float = 0.5
    muted: bool = False
    regard: dict[int, int] = field(default_factory=dict)  # initial affinity toward other members


@dataclass(frozen=True)
class NewScene:
    """A validated scene ready to store."""

    conversation_id: int
    members: list[NewMember]
    strategy: str
    exchanges: int
    model: str
    tenant: str
    params: dict[str, Any]
    seed: int
    premise: str = ""
    rules: list[dict[str, str]] = field(default_factory=list)
    allow_repeat: bool = False
    end_phrase: str | None = None
    lane: str = "bulk"
    run_id: uuid.UUID | None = None
    custom_id: str | None = None
    opening: tuple[int, str] | None = None  # (speaker's character id, text)
    narrator: dict[str, Any] | None = None  # the narrator as a participant (SceneSpec.narrator_json)
    sent: bool = True  # step 1 is sent right after the commit (a run's submission sends its own)
    api_key: str | None = None


def pop_new_steps(session: Session) -> list[NewStep]:
    """The steps this transaction created (to send once it commits), forgotten by the session."""
    return list(session.info.pop(NEW_STEPS_KEY, []))


def create_scene(*, session: Session, scene: NewScene) -> tuple[int, bool]:
    """create: the scene, its members, its opening line and step 1's turn; (scene id, created).

    A run's scene of a custom_id that exists already is left as it is (a resumed submission)."""
    values = dict(
        conversation_id=scene.conversation_id,
        run_id=scene.run_id,
        custom_id=scene.custom_id,
        status=SceneStatus.OPEN,
        strategy=scene.strategy,
        rules=scene.rules,
        allow_repeat=scene.allow_repeat,
        exchanges=scene.exchanges,
        end_phrase=scene.end_phrase,
        premise=scene.premise,
        params=scene.params,
        seed=scene.seed,
        lane=scene.lane,
        model=scene.model,
        narrator=scene.narrator,
    )
    scene_id = session.scalar(insert(Scene).values(**values).on_conflict_do_nothing().returning(Scene.id))
    if scene_id is None:
        existing = session.scalar(
            select(Scene.id).where(
                (Scene.run_id == scene.run_id) & (Scene.custom_id == scene.custom_id)
                if scene.run_id is not None
                else Scene.conversation_id == scene.conversation_id
            )
        )
        if existing is None:  # the conversation holds a scene of its own (a live one, another run's)
            raise SceneConflict(
                f"scene {scene.custom_id or ''!r}: its conversation already holds another scene; "
                "give the run another name (or the line another custom_id)"
            )
        return int(existing), False
    session.execute(
        insert(ConversationMember),
        [
            dict(
                conversation_id=scene.conversation_id,
                character_id=m.character_id,
                position=m.position,
                talkativeness=m.talkativeness,
                muted=m.muted,
                regard={str(k): v for k, v in m.regard.items()},
            )
            for m in scene.members
        ],
    )
    if scene.opening is not None:
        speaker_id, text = scene.opening
        name = session.scalar(select(Character.name).where(Character.id == speaker_id))
        seq = session.scalar(
            select(func.coalesce(func.max(Message.seq), 0)).where(
                Message.conversation_id == scene.conversation_id
            )
        )
        session.add(
            Message(
                conversation_id=scene.conversation_id,
                seq=int(seq or 0) + 1,
                role=Role.ASSISTANT,
                content=text,
                speaker_id=speaker_id,
                speaker_name=name,
            )
        )
        session.flush()
    row = session.get_one(Scene, scene_id)
    if scene.exchanges > 0:  # a group the player talks to may start with none
        _create_step(session, row, 1, tenant=scene.tenant, sent=scene.sent, api_key=scene.api_key)
    return int(scene_id), True


def scene_conversations(*, session: Session, conversation_ids: Sequence[int]) -> set[int]:
    """Which of these conversations hold a scene (a run's, or a live group)."""
    if not conversation_ids:
        return set()
    holding = select(Scene.conversation_id).where(Scene.conversation_id.in_(list(conversation_ids)))
    return set(session.scalars(holding))


def members_of(*, session: Session, conversation_id: int) -> list[Member]:
    """The conversation's members as the speaker picker sees them, in speaking position."""
    rows = session.execute(
        select(ConversationMember, Character.slug, Character.name)
        .join(Character, Character.id == ConversationMember.character_id)
        .where(ConversationMember.conversation_id == conversation_id)
        .order_by(ConversationMember.position)
        # the slug and name are joined above; the member's own eager character would bring its card
        # and lorebook (megabytes, maybe) for every member at every line
        .options(lazyload(ConversationMember.character))
    ).all()
    return [
        Member(m.character_id, slug, name, m.position, m.talkativeness, m.muted) for m, slug, name in rows
    ]


def _last_line(session: Session, conversation_id: int) -> tuple[int | None, str]:
    """(speaker's character id, text) of the conversation's newest line; a player's line has no id,
    the narrator's is NARRATOR_ID."""
    row = session.execute(
        select(Message.speaker_id, Message.role, Message.content)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .limit(1)
    ).first()
    if row is None:
        return None, ""
    speaker_id, role, content = row
    if role == Role.NARRATOR:
        return NARRATOR_ID, content
    return (speaker_id if role != Role.USER else None), content


def pick_speaker(
    *, session: Session, scene: Scene, step: int, message: str | None = None, after: int | None = None
) -> Member | None:
    """The member who speaks at `step`: by the scene's strategy over its stored lines (and a player's
    `message` about to be stored, whose mentions come first in natural order, answering `after`, the
    member picked for an earlier line of the same call, when there is one). The narrator, when a
    participant, is picked for steps only: a player's line is answered by a member (or by the
    narrator when the turn names it)."""
    members = members_of(session=session, conversation_id=scene.conversation_id)
    if scene.narrator is not None and message is None:
        members = with_narrator(members, scene.narrator["position"], scene.narrator["talkativeness"])
    last_speaker, last_text = _last_line(session, scene.conversation_id)
    if message is not None:
        last_text = message
        last_speaker = (  # the player's line answers the member who spoke last
            after
            if after is not None
            else session.scalar(
                select(Turn.character_id)
                .where(
                    Turn.conversation_id == scene.conversation_id,
                    Turn.character_id.is_not(None),
                    # a member whose turn failed or was cancelled did not speak (a failed step sent
                    # again after this line picks its speaker again: _requeue_step)
                    Turn.status.not_in([TurnStatus.FAILED, TurnStatus.CANCELLED]),
                )
                .order_by(Turn.number.desc())
                .limit(1)
            )
        )
    else:
        # A turn not answered yet (a player's line queued, say) speaks before this step: it runs after
        # that turn, so whoever answers that turn is the one the step follows (its text unknown yet).
        waiting = session.execute(
            select(Turn.character_id, Turn.speaker)
            .where(Turn.conversation_id == scene.conversation_id, Turn.status.in_(TURN_UNFINISHED))
            .order_by(Turn.number.desc())
            .limit(1)
        ).first()
        if waiting is not None:
            last_speaker = NARRATOR_ID if waiting.speaker == "narrator" else waiting.character_id
            last_text = ""
    return next_speaker(
        strategy=scene.strategy,  # type: ignore[arg-type]
        members=members,
        last_speaker=last_speaker,
        last_text=last_text,
        step=step,
        seed=scene.seed,
        rules=[Rule(r["speaker"], r["after"]) for r in scene.rules],
        allow_repeat=scene.allow_repeat,
        answering_player=message is not None,
    )


def speaker_for_player(
    *,
    session: Session,
    conversation_id: int,
    message: str,
    slug: str | None,
    pick: bool = True,
    earlier: Sequence[int | None] = (),
) -> int | None:
    """The member who answers a player's line: `slug` if named (an unmuted member), else the group's
    strategy (mentions in the line first, in natural order); None for a one-character conversation.
    ValueError naming `speaker_character` when the named speaker cannot answer, or `conversation`
    when the group is a run's scene (the run's steps alone speak in it). `pick=False`: no member
    answers (the narrator does), only the checks are made. `earlier`: who answers the lines of the
    same call before this one, not stored yet (None: the narrator), which the round goes on from."""
    scene = session.scalars(select(Scene).where(Scene.conversation_id == conversation_id)).one_or_none()
    if scene is None:
        if slug is not None:
            raise ValueError("speaker_character: this conversation has one character; name none")
        return None
    if scene.run_id is not None:
        raise ValueError("conversation: this group belongs to a run's scene; a player cannot speak in it")
    if slug is None and not pick:  # the narrator speaks, no member
        return None
    if slug is not None:
        member = next(
            (m for m in members_of(session=session, conversation_id=conversation_id) if m.slug == slug), None
        )
        if member is None:
            raise ValueError(f"speaker_character: {slug!r} is not a member of this group")
        if member.muted:
            raise ValueError(f"speaker_character: {slug!r} is muted in this group")
        return member.character_id
    spoken = session.scalar(select(func.count()).where(Turn.conversation_id == conversation_id)) or 0
    picked = pick_speaker(
        session=session,
        scene=scene,
        step=int(spoken) + len(earlier) + 1,
        message=message,
        after=next((m for m in reversed(earlier) if m is not None), None),
    )
    if picked is None:
        raise ValueError("speaker_character: every member of this group is muted")
    return picked.character_id


def _create_step(
    session: Session, scene: Scene, step: int, *, tenant: str, sent: bool, api_key: str | None = None
) -> uuid.UUID | None:
    """Insert step `step`'s turn for the speaker the strategy picks; None if nobody may speak or the
    step exists already."""
    speaker = pick_speaker(session=session, scene=scene, step=step)
    if speaker is None:
        return None
    key = f"scene:{scene.id}:{step}"
    params = {**scene.params, "seed": (scene.seed + step) % 2**31}
    narrator = speaker.character_id == NARRATOR_ID
    if narrator and scene.narrator and scene.narrator.get("instructions"):
        params["direction"] = scene.narrator["instructions"]
    custom_id = f"{scene.custom_id}#{step}" if scene.custom_id is not None else None
    turn_id = session.scalar(
        insert(Turn)
        .values(
            id=uuid.uuid4(),
            tenant=tenant,
            idempotency_key=key,
            request_hash=_step_hash(key, speaker.character_id),
            conversation_id=scene.conversation_id,
            run_id=scene.run_id,
            custom_id=custom_id,
            message="",
            speaker="narrator" if narrator else "character",
            character_id=None if narrator else speaker.character_id,  # the narrator speaks over the lead
            scene_id=scene.id,
            scene_step=step,
            status=TurnStatus.QUEUED,
            model=scene.model,
            params=params,
            attempts=0,
            api_key=api_key,
            dispatched_at=None,  # stamped once its message is out; until then the sweeper's to find
        )
        # Only the step's own index: a clash on the idempotency key is an error, never a skipped step.
        .on_conflict_do_nothing(
            index_elements=["scene_id", "scene_step"], index_where=Turn.scene_id.is_not(None)
        )
        .returning(Turn.id)
    )
    if turn_id is not None and sent:
        session.info.setdefault(NEW_STEPS_KEY, []).append(NewStep(turn_id, scene.model, scene.lane))
    return turn_id


# A live group the game stopped (stop_scene): while its last line is written, and once it ended.
STOPPING = "stopped by the game; the line being written is its last"
STOPPED = "stopped by the game"


def _close(session: Session, scene_id: int, status: SceneStatus, reason: str) -> None:
    session.execute(
        update(Scene)
        .where(Scene.id == scene_id, Scene.status == SceneStatus.OPEN)
        .values(status=status, ended_reason=reason[:2000], finished_at=func.now())
    )


def advance_scenes_of_turns(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """step / fail: move the scenes of these just-finished turns on, in the caller's transaction;
    returns the runs whose rows it locked (the run advance must not pin their turns: db/runs.py).

    A stored step counts and creates the next (unless the scene is done or its run is cancelling,
    cancelled or expired); a failed or cancelled step ends its scene so. Scenes are locked in id order.
    The new steps are kept in the session for the caller to send after commit (NEW_STEPS_KEY)."""
    if not turn_ids:
        return []
    finished = session.execute(
        select(Turn.scene_id, Turn.scene_step, Turn.status, Turn.reply, Turn.error, Turn.tenant, Turn.api_key)
        .where(Turn.id.in_(list(turn_ids)), Turn.scene_id.is_not(None))
        .order_by(Turn.scene_id)
    ).all()
    if not finished:
        return []
    # The runs first (turns → runs → scenes, as a cancel takes them): a next step's insert takes a
    # key-share lock on its run, which two stores advancing the run after it would each wait on.
    scene_ids = {row[0] for row in finished}
    runs = select(Scene.run_id).where(Scene.id.in_(scene_ids), Scene.run_id.is_not(None))
    locked_runs = list(
        session.scalars(select(Run.id).where(Run.id.in_(runs)).order_by(Run.id).with_for_update()).all()
    )
    scenes = {
        s.id: s
        for s in session.scalars(
            select(Scene)
            .where(Scene.id.in_(scene_ids))
            .order_by(Scene.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    for scene_id, step, status, reply, error, tenant, api_key in finished:
        scene = scenes[scene_id]  # type: ignore[index]
        if (
            scene.status == SceneStatus.CANCELLED
            and status == TurnStatus.DONE
            and step == scene.steps_done + 1
        ):
            # Claimed as a run's cancel closed the scene (it saw the step queued): a step generated
            # is kept, so it is counted; nothing follows it.
            session.execute(
                update(Scene)
                .where(
                    Scene.id == scene.id, Scene.status == SceneStatus.CANCELLED, Scene.steps_done == step - 1
                )
                .values(steps_done=step)
            )
            continue
        if scene.status != SceneStatus.OPEN or step != scene.steps_done + 1:
            continue  # a scene closed already, or a step seen before
        stopping = scene.ended_reason == STOPPING  # its end is the game's stop, whatever ends it now
        if status == TurnStatus.CANCELLED:
            _close(
                session,
                scene.id,
                SceneStatus.CANCELLED,
                STOPPED if stopping else f"step {step} was cancelled",
            )
            continue
        if status == TurnStatus.FAILED:
            _close(session, scene.id, SceneStatus.FAILED, f"step {step} failed: {error or 'no reason'}")
            continue
        if status != TurnStatus.DONE:
            continue
        scene.steps_done = step
        session.execute(update(Scene).where(Scene.id == scene.id).values(steps_done=step))
        # A run whose submitter died is `failed` but resumable: its scenes go on; a cancel stops them,
        # and a batch whose submission failed for good.
        stopped = scene.run_id is not None and session.scalar(
            select(run_stopped()).where(Run.id == scene.run_id)
        )
        if scene.end_phrase and reply and scene.end_phrase.lower() in reply.lower():
            _close(session, scene.id, SceneStatus.ENDED, f"step {step} said the end phrase")
        elif step >= scene.exchanges:
            _close(
                session,
                scene.id,
                SceneStatus.ENDED,
                STOPPED if stopping else f"all {scene.exchanges} exchanges done",
            )
        elif stopped:
            _close(session, scene.id, SceneStatus.CANCELLED, "the run was cancelled or its batch failed")
        elif _create_step(session, scene, step + 1, tenant=tenant, sent=True, api_key=api_key) is None:
            _close(session, scene.id, SceneStatus.ENDED, "no member may speak")
    return locked_runs


def cancel_open_scenes(*, session: Session, run_id: uuid.UUID, reason: str) -> int:
    """cancel: the run's open scenes whose current step is not running; returns how many. A step
    running now finishes and is kept; its scene is then closed by the step transition."""
    running = select(Turn.scene_id).where(
        Turn.run_id == run_id, Turn.status == TurnStatus.RUNNING, Turn.scene_id.is_not(None)
    )
    result = session.execute(
        update(Scene)
        .where(Scene.run_id == run_id, Scene.status == SceneStatus.OPEN, Scene.id.not_in(running))
        .values(status=SceneStatus.CANCELLED, ended_reason=reason, finished_at=func.now())
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def reopen_failed_scenes(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> int:
    """reopen: the failed scenes whose failed step is among these turns, just requeued → open."""
    steps = select(Turn.scene_id).where(
        Turn.id.in_(list(turn_ids)), Turn.scene_id == Scene.id, Turn.scene_step == Scene.steps_done + 1
    )
    result = session.execute(
        update(Scene)
        .where(Scene.status == SceneStatus.FAILED, steps.exists())
        .values(status=SceneStatus.OPEN, ended_reason=None, finished_at=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# A step whose message never reached the broker (db/turns.py fail_unsent).
_NEVER_SENT = (Turn.status == TurnStatus.FAILED) & (Turn.error_code == TurnErrorCode.BROKER_UNREACHABLE.value)


def replay_unsent_step(*, session: Session, conversation_id: int) -> tuple[list[NewStep], list[NewStep]]:
    """replay: a replayed call's scene step whose message never went. One failed for that
    (broker_unreachable) is queued again, its scene reopened, to be sent as new (the first list: sent,
    or failed again); one still queued and never recorded sent, to be sent once more with nothing
    failed if the broker is away (the second: the worker that created it may be sending it now). The
    scene row is locked first, as extend does (after its conversation's, as extend's)."""
    lock_conversation(session=session, conversation_id=conversation_id)
    scene = session.scalars(
        select(Scene).where(Scene.conversation_id == conversation_id).with_for_update()
    ).one_or_none()
    if scene is None:
        return [], []
    step = scene.steps_done + 1
    revived = _requeue_step(session, scene, step, _NEVER_SENT)
    if revived is not None:
        reopen_failed_scenes(session=session, turn_ids=[revived])  # if that failure closed it
        return [NewStep(revived, scene.model, scene.lane)], []
    waiting = session.scalar(
        select(Turn.id).where(
            Turn.scene_id == scene.id,
            Turn.scene_step == step,
            Turn.status == TurnStatus.QUEUED,
            Turn.dispatched_at.is_(None),
        )
    )
    return [], [] if waiting is None else [NewStep(waiting, scene.model, scene.lane)]


def _requeue_step(session: Session, scene: Scene, step: int, which: ColumnElement[bool]) -> uuid.UUID | None:
    """The scene's step `step`, if `which` holds for it, queued again to be sent (its attempts and
    refunds back; engine deaths stay: a step that kills the engine is still stopped). A turn of the
    conversation stored after it (a player's line to the group while the step was failed) moves it
    to the end of the conversation's order: answered after that turn, with it in its history, never
    beside it (a turn waits only for those numbered before it)."""
    failed = session.scalar(
        select(Turn.number).where(Turn.scene_id == scene.id, Turn.scene_step == step, which)
    )
    if failed is None:
        return None
    # Decided once, by this read: a turn stored after it from here on is answered after it, as its
    # speaker was picked before that turn.
    overtaken = bool(
        session.scalar(
            select(exists().where(Turn.conversation_id == scene.conversation_id, Turn.number > failed))
        )
    )
    # Overtaken, it follows whoever answers the turns stored after it: its speaker is picked again
    # (kept, it could repeat the member who answered the player's line meanwhile); with nobody left
    # who may speak, it keeps its own.
    speaker = pick_speaker(session=session, scene=scene, step=step) if overtaken else None
    renumbered = func.nextval(func.pg_get_serial_sequence("turns", "number")) if overtaken else Turn.number
    revived = session.scalar(
        update(Turn)
        .where(Turn.scene_id == scene.id, Turn.scene_step == step, which)
        .values(
            number=renumbered,
            params=retried_params(),
            status=TurnStatus.QUEUED,
            error=None,
            error_code=None,
            timings=None,
            finished_at=None,
            queued_at=func.now(),
            dispatched_at=None,  # stamped once its message is out; until then the sweeper's to find
            attempts=0,
            outage_refunds=0,
            # a fresh start, as a run's retried line: no wait counted from before, no claim's token
            # (a stale claimant's hand-back after its engine died finds it by that token)
            deferred_since=None,
            deferrals=0,
            claim_token=None,
        )
        .returning(Turn.id)
    )
    if revived is not None and speaker is not None:
        _speak_as(session, scene, session.get_one(Turn, revived, populate_existing=True), speaker)
    return revived


def _speak_as(session: Session, scene: Scene, turn: Turn, speaker: Member) -> None:
    """The step's turn answered by `speaker`, as _create_step would have made it."""
    narrator = speaker.character_id == NARRATOR_ID
    params = {k: v for k, v in turn.params.items() if k != "direction"}
    if narrator and scene.narrator and scene.narrator.get("instructions"):
        params["direction"] = scene.narrator["instructions"]
    turn.speaker = "narrator" if narrator else "character"
    turn.character_id = None if narrator else speaker.character_id
    turn.request_hash = _step_hash(turn.idempotency_key, speaker.character_id)
    turn.params = params
    session.flush()


def _step_hash(key: str, speaker_id: int) -> str:
    return hashlib.sha256(json.dumps([key, speaker_id]).encode()).hexdigest()


class SceneClosed(ValueError):
    """A run's scene that failed or was cancelled: it cannot go on (the message names its status)."""


class SceneNotFound(LookupError):
    """No group conversation of that name (for that tenant): the message names it."""


def _locked_scene(session: Session, conversation_id: int) -> Scene:
    """The conversation's scene, its row locked after the conversation's (the order a player's line
    and a step's store take them); SceneNotFound if it holds none (erased meanwhile)."""
    lock_conversation(session=session, conversation_id=conversation_id)
    scene = session.scalars(
        select(Scene).where(Scene.conversation_id == conversation_id).with_for_update()
    ).one_or_none()
    if scene is None:
        raise SceneNotFound(f"no group conversation of id {conversation_id}")
    return scene


def extend_scene(
    *, session: Session, conversation_id: int, exchanges: int, api_key: str | None = None
) -> tuple[Scene, list[NewStep]]:
    """extend: a live scene goes on for `exchanges` more steps (reopened if it ended, failed or was
    cancelled: the game asks it to go on); step n+1's turn is created now unless one is open, or sent
    again if it failed or was cancelled (with its attempts back: one empty reply, or a worker lost
    three times, would otherwise close the game's group for good). SceneNotFound if the conversation
    holds no scene (erased meanwhile); SceneClosed for a run's scene that failed or was cancelled
    (the run's to retry).
    The conversation's row is locked first, as a player's line and a step's store lock it (before
    the scene's, as the store's order is): a step requeued or created here is numbered and its
    speaker picked seeing a line committed just before, never beside it (scenes review)."""
    scene = _locked_scene(session, conversation_id)
    closed = scene.status in (SceneStatus.FAILED, SceneStatus.CANCELLED)
    if closed and scene.run_id is not None:
        raise SceneClosed(f"status: the scene is {scene.status} ({scene.ended_reason}); start a new group")
    crashed = session.scalar(
        select(Turn.id).where(
            Turn.scene_id == scene.id,
            Turn.scene_step == scene.steps_done + 1,
            Turn.error_code == TurnErrorCode.ENGINE_CRASH_LOOP.value,
        )
    )
    if closed and crashed is not None:  # sent again, it would kill one more engine
        raise SceneClosed(
            f"status: the scene is {scene.status} ({scene.ended_reason}); its step was inside the engine "
            "at each of its deaths and is not sent again"
        )
    voices = (scene.narrator is not None) + (
        session.scalar(
            select(func.count()).where(
                ConversationMember.conversation_id == conversation_id, ~ConversationMember.muted
            )
        )
        or 0
    )
    if voices == 1 and exchanges > 1:  # lines with no player line between them: it would talk to itself
        raise SceneClosed(
            "exchanges: only one voice is left in the group (its other members are muted or gone); ask "
            "for 1 exchange at a time"
        )
    pending = session.scalar(
        select(func.count()).where(Turn.scene_id == scene.id, Turn.status.in_(TURN_UNFINISHED))
    )
    # At least `exchanges` more steps than it has stored (a step sent but not stored is one of them);
    # never fewer than an open scene owes already (another call's `:continue`, or the scene's own
    # start): a call retried before the next step is stored asks for nothing twice, the step that
    # call itself sent included.
    owed = scene.exchanges if scene.status == SceneStatus.OPEN else scene.steps_done
    scene.exchanges = max(owed, scene.steps_done + exchanges)
    scene.status = SceneStatus.OPEN
    scene.ended_reason = None
    scene.finished_at = None
    session.flush()
    if not pending:
        step = scene.steps_done + 1
        # The step's message never reached the broker, or the step closed the scene: it goes out again.
        ended_it = Turn.status.in_([TurnStatus.FAILED, TurnStatus.CANCELLED]) if closed else false()
        unsent = _requeue_step(session, scene, step, or_(_NEVER_SENT, ended_it))
        if unsent is not None:
            session.info.setdefault(NEW_STEPS_KEY, []).append(NewStep(unsent, scene.model, scene.lane))
        else:
            tenant = (
                session.scalar(select(Conversation.tenant).where(Conversation.id == conversation_id)) or ""
            )
            created = _create_step(session, scene, step, tenant=tenant, sent=True, api_key=api_key)
            if created is None and not session.scalar(
                select(exists().where(Turn.scene_id == scene.id, Turn.scene_step == step))
            ):  # nobody may speak (every member left): open, it would owe lines no step ever writes
                raise SceneClosed("status: no member of the group may speak; start a new group")
    return scene, pop_new_steps(session)


def stop_scene(*, session: Session, conversation_id: int) -> tuple[Scene, uuid.UUID | None]:
    """stop: a live scene owes no line past those stored: the step being written, if one is, is its
    last (kept once stored, the scene then ended as its exchanges are done); with none unfinished it
    ends now ("stopped"). Returns the scene and its step still queued, for the caller to cancel in a
    transaction of its own (a turn is locked before its scene, as the store locks them: review of
    cancellation, a group's chatter could not be stopped). SceneNotFound if the conversation holds
    no scene; SceneClosed for a run's scene (its run's cancel stops it). Locked as extend locks."""
    scene = _locked_scene(session, conversation_id)
    if scene.run_id is not None:
        raise SceneClosed("the scene is a run's: cancel the run to stop it")
    if scene.status != SceneStatus.OPEN:
        return scene, None
    unfinished = session.execute(
        select(Turn.id, Turn.status).where(Turn.scene_id == scene.id, Turn.status.in_(TURN_UNFINISHED))
    ).first()
    scene.exchanges = scene.steps_done + (unfinished is not None)  # the unfinished step is the last
    if unfinished is None:
        _close(session, scene.id, SceneStatus.ENDED, STOPPED)
    else:  # read by the close its last step brings (a `:continue` clears it)
        scene.ended_reason = STOPPING
    session.flush()
    session.refresh(scene)
    if unfinished is None or TurnStatus(unfinished.status) != TurnStatus.QUEUED:
        return scene, None
    return scene, unfinished.id


class StopOvertaken(RuntimeError):
    """A `:continue` asked the stopped scene for more before its queued step was cancelled."""


def cancel_stopped_step(*, session: Session, turn_id: uuid.UUID, scene_id: int, owed: int) -> list[uuid.UUID]:
    """stop's second part: cancel the stopped scene's queued step (the turn locked first, then its
    scene, as the store locks them); StopOvertaken, for the caller to roll back, when the scene no
    longer owes what the stop left it (`owed` exchanges) or no longer carries its mark: a `:continue`
    since asked for more, which wins (review; one of a single exchange leaves the count as it was)."""
    from db.turns import cancel_turns  # db/turns reaches this module through the runs' advance

    cancelled = cancel_turns(session=session, turn_ids=[turn_id])
    now = session.execute(
        select(Scene.exchanges, Scene.ended_reason).where(Scene.id == scene_id).with_for_update()
    ).one()
    # The cancel closes the scene, the stop's mark read as its reason (STOPPED); one that a
    # `:continue` cleared gives another.
    if now.exchanges != owed or now.ended_reason not in (STOPPING, STOPPED):
        raise StopOvertaken(f"scene {scene_id}: asked for more since it was stopped")
    return cancelled


def group_views(*, session: Session, conversation_ids: Sequence[int]) -> dict[int, GroupView]:
    """The group conversations among these (those holding a scene): their premise and members."""
    if not conversation_ids:
        return {}
    query = select(Scene.conversation_id, Scene.premise, Scene.narrator).where(
        Scene.conversation_id.in_(list(conversation_ids))
    )
    scenes = {conv_id: (premise, narrator) for conv_id, premise, narrator in session.execute(query).tuples()}
    premises = {conv_id: premise for conv_id, (premise, _) in scenes.items()}
    members: dict[int, list[tuple[int, str]]] = {c: [] for c in premises}
    for conv_id, char_id, name in session.execute(
        select(ConversationMember.conversation_id, Character.id, Character.name)
        .join(Character, Character.id == ConversationMember.character_id)
        .where(ConversationMember.conversation_id.in_(list(premises)))
        .order_by(ConversationMember.conversation_id, ConversationMember.position)
    ).tuples():
        members[conv_id].append((char_id, name))
    return {
        c: GroupView(
            premises[c],
            tuple(n for _, n in m),
            tuple(i for i, _ in m),
            scenes[c][1] is not None,
            (scenes[c][1] or {}).get("instructions", ""),
        )
        for c, m in members.items()
    }


@dataclass(frozen=True)
class TranscriptLine:
    """One line of a scene as a writer reads it."""

    seq: int
    step: int | None  # None: the opening line, or a player's line
    speaker: str
    text: str
    emotion: str | None
    turn_id: uuid.UUID | None


SEQ_MAX = 2**31 - 1  # messages.seq is an integer


def scene_transcript(
    *, session: Session, scene_id: int, after: int = 0, limit: int | None = None
) -> list[TranscriptLine]:
    """The scene's stored lines in order, each with its speaker, step, emotion and turn: those after
    line `after` (a seq), at most `limit`."""
    conv_id = session.scalar(select(Scene.conversation_id).where(Scene.id == scene_id))
    rows = session.execute(
        select(
            Message.seq,
            Message.role,
            Message.speaker_name,
            Message.content,
            Turn.id,
            Turn.scene_step,
            Turn.state,
        )
        .outerjoin(Turn, Turn.id == Message.turn_id)
        # A cursor past any line number (a 32-bit column) finds none, not PostgreSQL's out-of-range error.
        .where(Message.conversation_id == conv_id, Message.seq > min(after, SEQ_MAX))
        .order_by(Message.seq)
        .limit(limit)
    ).all()
    player = session.scalar(select(Conversation.player_name).where(Conversation.id == conv_id)) or "Player"
    out = []
    for seq, role, speaker_name, content, turn_id, step, state in rows:
        is_reply = role != Role.USER
        speaker = speaker_name or (
            player if role == Role.USER else "Narrator" if role == Role.NARRATOR else "?"
        )
        emotion = (state or {}).get("after", {}).get("emotion") if is_reply and state else None
        out.append(TranscriptLine(seq, step if is_reply else None, speaker, content, emotion, turn_id))
    return out


def last_lines_after(*, session: Session, conversation_id: int, n: int) -> int:
    """The cursor before the conversation's last `n` lines (0 if it has no more than `n`)."""
    before = session.scalar(
        select(Message.seq)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .offset(n)
        .limit(1)
    )
    return int(before or 0)


def run_scenes(
    *,
    session: Session,
    run_id: uuid.UUID,
    limit: int | None = None,
    after: tuple[str, int] | None = None,
) -> list[Scene]:
    """The run's scenes in custom_id order (past the scene `after` names by its (custom_id, id);
    at most `limit`)."""
    # A NULL would compare as neither before nor after; written as the index's expression (0036),
    # the empty string inline, so the planner matches it.
    name = func.coalesce(Scene.custom_id, literal_column("''"))
    query = select(Scene).where(Scene.run_id == run_id).order_by(name, Scene.id)
    if after is not None:
        query = query.where(tuple_(name, Scene.id) > tuple_(literal(after[0]), literal(after[1])))
    return list(session.scalars(query.limit(limit)))
