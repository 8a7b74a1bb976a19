"""Typed SQLAlchemy 2 models: characters, conversations (and their members), messages, story events,
turns, runs, scenes, reviews."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship

from core.settings import settings

EMBEDDING_DIM = settings.embedding_dim

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    NARRATOR = "narrator"
    SYSTEM = "system"


class TurnStatus(enum.StrEnum):
    """queued → running → done | failed (and back to queued while attempts remain); queued → cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TURN_UNFINISHED = (TurnStatus.QUEUED, TurnStatus.RUNNING)
TURN_FINISHED = (TurnStatus.DONE, TurnStatus.FAILED, TurnStatus.CANCELLED)


class TurnErrorCode(enum.StrEnum):
    """Why a turn failed, for machines (the error text is for people)."""

    # never sent (or sent unkeyed in a call whose other messages were not): a keyed replay sends it again
    BROKER_UNREACHABLE = "broker_unreachable"
    PROMPT_TOO_LONG = "prompt_too_long"
    EMPTY_REPLY = "empty_reply"
    ENGINE_ERROR = "engine_error"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    ENGINE_CRASH_LOOP = "engine_crash_loop"  # inside the engine at MLCHAT_MAX_ENGINE_DEATHS deaths
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # the character's LoRA does not load in the worker
    # A stage of the turn's own work raised (retried on its own attempts first):
    PROMPT_ERROR = "prompt_error"  # building its prompt (a malformed character, a refusing template)
    ADAPTER_ERROR = "adapter_error"  # naming its character's LoRA adapter to the engine
    INVALID_PARAMS = "invalid_params"  # vLLM refused its sampling parameters
    JUDGE_ERROR = "judge_error"  # scoring its reply or updating the mood
    # A structured reply that did not close before max_tokens (raise the reply's token limit), or, which
    # guided decoding rules out, one that does not parse or match its schema: never stored as valid.
    STRUCTURED_REPLY_CUT = "structured_reply_cut"
    INVALID_STRUCTURED_REPLY = "invalid_structured_reply"
    EXPIRED = "expired"  # cancelled unstarted when its run's completion window closed
    # Waited past MLCHAT_ORDER_WAIT_LIMIT_S for an earlier turn of its conversation (the error names it).
    BLOCKED_BY_EARLIER_TURN = "blocked_by_earlier_turn"
    # A live turn of a model no worker served for MLCHAT_UNSERVED_MODEL_FAIL_S (the sweep fails it).
    MODEL_UNAVAILABLE = "model_unavailable"


class RunStatus(enum.StrEnum):
    """validating → queued → in_progress → completed (through finalizing when the run writes output
    files); any live state → cancelling → cancelled; past its completion window → expired;
    validating → failed (bad file, or a submission that died: resubmitting resumes it)."""

    VALIDATING = "validating"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FINALIZING = "finalizing"
    EXPIRED = "expired"


RUN_LIVE = (RunStatus.VALIDATING, RunStatus.QUEUED, RunStatus.IN_PROGRESS)
RUN_FINISHED = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.EXPIRED)


class Character(Base):
    """A persona the model speaks as."""

    __tablename__ = "characters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    language: Mapped[str] = mapped_column(String(16), default="en")
    description: Mapped[str] = mapped_column(Text, default="")
    personality: Mapped[str] = mapped_column(Text, default="")
    scenario: Mapped[str] = mapped_column(Text, default="")
    speech_style: Mapped[str] = mapped_column(Text, default="")
    example_dialogues: Mapped[list[Any]] = mapped_column(default=list)
    first_message: Mapped[str] = mapped_column(Text, default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    # A LoRA adapter for this character's voice (`mlchat lora register`): its folder and version.
    lora_path: Mapped[str | None] = mapped_column(Text)
    lora_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The tenant whose dialogue trained it, whose turns alone it answers (None: every tenant's).
    lora_tenant: Mapped[str | None] = mapped_column(String(64))
    # The model it was trained on, whose turns alone it answers (None: every model's; migration 0055).
    lora_model: Mapped[str | None] = mapped_column(String(64))
    post_history_instructions: Mapped[str] = mapped_column(Text, default="")
    # An imported character card exactly as given (json, not jsonb: key order and every unknown field
    # survive, so export gives the card back); None for characters defined in data/.
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The lorebook (World Info) in mlchat's form (worker/lorebook.py), from the card or data/.
    lorebook: Mapped[dict[str, Any] | None] = mapped_column()
    # Bumped by every upsert: workers key their per-character caches (lore, persona vector) on it.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    @property
    def cache_stamp(self) -> tuple[int, datetime | None]:
        """What a process's per-character caches are keyed on beside the id: its version, and when
        it was written (review: a restore from a backup winds ids and versions back, and a process
        running through it served another character's lore, actions and persona under the same id
        and version)."""
        return (self.version, self.updated_at)


class Conversation(Base):
    """One player's thread with one character, keyed by the game's own id within its tenant."""

    __tablename__ = "conversations"
    __table_args__ = (
        CheckConstraint("affinity BETWEEN -100 AND 100", name="affinity_bounded"),
        UniqueConstraint("tenant", "external_id", name="uq_conversations_tenant_external_id"),
        # An erasure's look for a player's conversations (db/erasure.py; migration 0045).
        Index("ix_conversations_tenant_player", "tenant", "player_id"),
        # The original shape's copies of a history, made for one request, by age: the sweep's
        # retention (db/retention.py; migration 0049).
        Index(
            "ix_conversations_request_copies",
            "created_at",
            postgresql_where="external_id ~ '^inline-[0-9a-f]{32}-[0-9a-f]{12}$'",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # The API key's tenant that started it ('' for the CLI and the Python API): ids are per tenant.
    tenant: Mapped[str] = mapped_column(String(64), default="", server_default="")
    external_id: Mapped[str] = mapped_column(String(200))
    player_id: Mapped[str] = mapped_column(String(200), default="")
    player_name: Mapped[str] = mapped_column(String(200), default="")
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id"))
    story: Mapped[str | None] = mapped_column(String(100))
    story_time: Mapped[int | None] = mapped_column(Integer)
    # The character's current mood and its regard for the player, updated with each reply.
    emotion: Mapped[str] = mapped_column(String(16), default="neutral", server_default="neutral")
    affinity: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    character: Mapped[Character] = relationship(lazy="joined")


class Message(Base):
    """A line in a conversation, embedded for retrieval."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
        # A turn stores at most one user line and one reply: the exactly-once guarantee.
        Index(
            "uq_messages_turn_role", "turn_id", "role", unique=True, postgresql_where="turn_id IS NOT NULL"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[Role] = mapped_column(_enum(Role, "message_role"))
    content: Mapped[str] = mapped_column(Text)
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM))
    # `mlchat reembed`'s vector from the new embedder, swapped in with every other row's at once.
    embedding_next: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM), deferred=True)
    turn_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("turns.id", ondelete="SET NULL"))
    # Who said it in a group conversation (None: the player, or the conversation's one character).
    # The name is kept as spoken: a transcript survives the character's later rename or deletion.
    speaker_id: Mapped[int | None] = mapped_column(ForeignKey("characters.id", ondelete="SET NULL"))
    speaker_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ConversationMember(Base):
    """A character taking part in a group conversation (a scene), in its speaking position."""

    __tablename__ = "conversation_members"
    __table_args__ = (
        CheckConstraint("talkativeness >= 0 AND talkativeness <= 1", name="talkativeness_bounded"),
        CheckConstraint("affinity BETWEEN -100 AND 100", name="affinity_bounded"),
    )

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    # A deleted character leaves its scenes (the member row goes); its spoken lines keep its name.
    character_id: Mapped[int] = mapped_column(
        ForeignKey("characters.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer)
    talkativeness: Mapped[float] = mapped_column(Float, default=0.5, server_default="0.5")
    muted: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # This member's own mood and regard for the player (the conversation's columns are the lead's).
    emotion: Mapped[str] = mapped_column(String(16), default="neutral", server_default="neutral")
    affinity: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Its affinity toward each other member: {str(character id): affinity}; absent means 0.
    regard: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")

    character: Mapped[Character] = relationship(lazy="joined")


class SceneStatus(enum.StrEnum):
    """open → ended (its exchanges done, or its stop condition met) | failed (a step failed) |
    cancelled (its run was cancelled or expired)."""

    OPEN = "open"
    ENDED = "ended"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Scene(Base):
    """A group conversation that advances step by step: each step one turn of the speaker the
    strategy picks, created when the previous step is stored (db/scenes.py)."""

    __tablename__ = "scenes"
    __table_args__ = (
        UniqueConstraint("run_id", "custom_id", name="uq_scenes_run_id_custom_id"),
        CheckConstraint("steps_done >= 0 AND steps_done <= exchanges", name="steps_bounded"),
        # A run's scenes in custom_id order (db/scenes.py run_scenes; migration 0036).
        Index("ix_scenes_run_custom_id_order", "run_id", text("coalesce(custom_id, '')"), "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), unique=True
    )
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    custom_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[SceneStatus] = mapped_column(_enum(SceneStatus, "scene_status"), default=SceneStatus.OPEN)
    strategy: Mapped[str] = mapped_column(String(16))  # fixed, natural, rules (scenes/speakers.py)
    rules: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    allow_repeat: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    exchanges: Mapped[int] = mapped_column(Integer)  # the steps it runs to (a live scene's grow)
    steps_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    end_phrase: Mapped[str | None] = mapped_column(Text)  # a reply holding it ends the scene
    premise: Mapped[str] = mapped_column(Text, default="", server_default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    # The narrator as a participant: {"position", "talkativeness", "instructions"}; None: no narrator.
    narrator: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    seed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    lane: Mapped[str] = mapped_column(String(8), default="bulk", server_default="bulk")
    model: Mapped[str] = mapped_column(String(64))
    ended_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StoryEvent(Base):
    """An event of a story/world, retrieved by similarity up to the conversation's story time.

    Hash-partitioned by story (migration 0014): the HNSW index is one small graph per partition, so a
    story's search does not wade through other stories' events. The key holds the partition column.
    """

    __tablename__ = "story_events"
    __table_args__ = (
        UniqueConstraint("story", "ordinal", name="uq_story_events_story_ordinal"),
        Index(
            "ix_story_events_embedding_hnsw",
            "embedding",
            postgresql_using="hnsw",
            postgresql_with={"m": 16, "ef_construction": 64},
            postgresql_ops={"embedding": "vector_cosine_ops"},
        ),
        {"postgresql_partition_by": "HASH (story)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    story: Mapped[str] = mapped_column(String(100), primary_key=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    scene: Mapped[str] = mapped_column(String(200), default="")
    time: Mapped[int] = mapped_column(Integer, default=0)
    text: Mapped[str] = mapped_column(Text)
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM))
    embedding_next: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM), deferred=True)


class Run(Base):
    """A bulk generation run (many turns from a file)."""

    __tablename__ = "runs"
    __table_args__ = (
        # Housekeeping's looks by status (due to expire, finalizing, submissions due): runs are kept for good.
        Index("ix_runs_status_expires_at", "status", "expires_at"),
        # A tenant's runs newest first (the desk, GET /v1/batches), read backwards (migration 0036).
        Index("ix_runs_tenant_created_at", "tenant", "created_at", "id"),
        # Those whose deletion past retention began, which each sweep finishes first (migration 0050).
        Index("ix_runs_deleting_since", "deleting_since", postgresql_where="deleting_since IS NOT NULL"),
        Index("ix_runs_created_at", "created_at", "id"),  # an admin's, every tenant's
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), default=RunStatus.QUEUED)
    model: Mapped[str] = mapped_column(String(64))
    file_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")
    total: Mapped[int] = mapped_column(Integer, default=0)  # lines the run will hold (the file's good lines)
    error: Mapped[str | None] = mapped_column(Text)
    # Why a failed run failed: `invalid_request` (its file) or `server_error` (the server gave up).
    error_code: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Tries of a batch's submission so far, and when the next one is due after a transient error.
    submission_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    submission_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Well-formed requests refused by policy ([{line, custom_id, message, param}]): each answered
    # in the error file; deferred, since a large file's list is only read when writing that file.
    refused: Mapped[list[Any] | None] = mapped_column(JSONB(none_as_null=True), deferred=True)
    # What the run's file holds and allows: native or openai lines; LineOptions as JSON.
    input_format: Mapped[str] = mapped_column(String(16), default="native", server_default="native")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    # OpenAI batch fields (runs created over HTTP; CLI runs may set metadata and a window too).
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB(none_as_null=True))
    # [{line, message}] of a refused file; SQL NULL otherwise (None is not stored as JSON null).
    line_errors: Mapped[list[Any] | None] = mapped_column(JSONB(none_as_null=True))
    completion_window: Mapped[str | None] = mapped_column(String(16))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_reason: Mapped[str | None] = mapped_column(String(16))  # "expired" when the window closed it
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    # The output and error files expire this long after they are written (None: kept until deleted).
    output_expires_after_s: Mapped[int | None] = mapped_column(Integer)
    api_key: Mapped[str | None] = mapped_column(String(64))  # the HTTP key that created it (its id)
    tenant: Mapped[str] = mapped_column(String(64), default="", server_default="")  # its lines' conversations
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The first of its finalizing's failures in a row (migration 0046): past a limit, it fails.
    finalize_failed_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A batch's reservation in its key's files quota while it has not ended (migration 0048); None:
    # one created before, reserving its input file's size.
    reserved_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_error: Mapped[str | None] = mapped_column(Text)
    # When a callback its tries did not deliver is due again (None: delivered, refused, never tried).
    callback_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its deletion past retention began (migration 0050): nothing changes it from then on.
    deleting_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StoredFile(Base):
    """A file uploaded for a batch, or a batch's output or error file (its bytes live on disk)."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_expires_at", "expires_at", postgresql_where="expires_at IS NOT NULL"),
        # A key's files in order, and its quota's sum of their bytes (migration 0053).
        Index(
            "ix_files_owner_created", "api_key", "created_at", "id", postgresql_include=["bytes", "tenant"]
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))  # batch, batch_output, batch_error
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)  # under settings.files_dir
    api_key: Mapped[str | None] = mapped_column(String(64))
    # The owner's tenant (with the key's name: a name may pass to another tenant's key over time);
    # None for a file no run named before migration 0025: its key's name's alone.
    tenant: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # then deleted


class Turn(Base):
    """The job: one player message to answer. This row, not the queue, is the source of truth."""

    __tablename__ = "turns"
    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_turns_tenant_idempotency_key"),
        # A run's turns by status, in id order within each: the pin of advance_runs starts at a random id.
        Index("ix_turns_run_status_id", "run_id", "status", "id"),
        # The sweeper's scan: only unfinished turns, a small share of the table.
        Index("ix_turns_unfinished", "number", postgresql_where="status IN ('queued', 'running')"),
        # A claim's look for an earlier unfinished turn of the conversation (db/turns.py: the status
        # values are written into its SQL, so that a prepared statement's plan can use this too).
        Index(
            "ix_turns_conversation_unfinished",
            "conversation_id",
            "number",
            postgresql_where="status IN ('queued', 'running')",
        ),
        # A run's turns in input order, a chunk at a time (exports, a batch's output, the desk).
        Index("ix_turns_run_id_number", "run_id", "number", postgresql_where="run_id IS NOT NULL"),
        # A conversation's turns, by number: its newest one's model (memory jobs; migration 0047).
        Index("ix_turns_conversation_number", "conversation_id", "number"),
        # A deleted line's turn, set free (ON DELETE SET NULL: an erasure deletes a player's lines, one
        # lookup each; migration 0045).
        Index("ix_turns_user_message_id", "user_message_id", postgresql_where="user_message_id IS NOT NULL"),
        # Live turns queued, by model and age: the sweep's look for a model no worker serves
        # (services/sweeper.py::fail_unserved_live_turns; migration 0051).
        Index(
            "ix_turns_live_queued",
            "model",
            "created_at",
            postgresql_where="status = 'queued' AND run_id IS NULL",
        ),
        # A model's stranded live turns, oldest first, past any bulk backlog (services/sweeper.py::
        # resend_stranded; migration 0052).
        Index(
            "ix_turns_live_unfinished",
            "model",
            "number",
            postgresql_where="status IN ('queued', 'running') AND run_id IS NULL",
        ),
        # Live turns still holding their prompt, oldest finished first: the sweep's retention
        # (db/retention.py::forget_prompts; migration 0049).
        Index(
            "ix_turns_prompt_kept", "finished_at", postgresql_where="run_id IS NULL AND prompt IS NOT NULL"
        ),
        # Housekeeping's look for turn callbacks never attempted (db/callbacks.py claim_lost_callbacks).
        Index(
            "ix_turns_callback_unattempted",
            "finished_at",
            postgresql_where=(
                "callback_url IS NOT NULL AND callback_delivered_at IS NULL AND callback_retry_at IS NULL"
            ),
        ),
        # Housekeeping's look for callbacks due again: the few a burst of tries did not deliver.
        Index(
            "ix_turns_callback_retry_at",
            "callback_retry_at",
            postgresql_where="callback_retry_at IS NOT NULL",
        ),
        # A scene's step is one turn, ever: the exactly-once guarantee of scene runs.
        Index(
            "uq_turns_scene_step",
            "scene_id",
            "scene_step",
            unique=True,
            postgresql_where="scene_id IS NOT NULL",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # Insertion order: a conversation's turns are answered in this order.
    number: Mapped[int] = mapped_column(BigInteger, Identity(), unique=True)
    # Idempotency keys are per tenant: another tenant's key of the same text is another turn.
    tenant: Mapped[str] = mapped_column(String(64), default="", server_default="")
    idempotency_key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    custom_id: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)
    # Who answers: the conversation's character, or the story's narrator (third person).
    speaker: Mapped[str] = mapped_column(String(16), default="character", server_default="character")
    # In a group conversation, the member who answers (None: the conversation's own character).
    character_id: Mapped[int | None] = mapped_column(ForeignKey("characters.id"))
    # A scene's step this turn is (its message is empty: no player line).
    scene_id: Mapped[int | None] = mapped_column(ForeignKey("scenes.id", ondelete="CASCADE"))
    scene_step: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[TurnStatus] = mapped_column(_enum(TurnStatus, "turn_status"), default=TurnStatus.QUEUED)
    model: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prompt: Mapped[str | None] = mapped_column(Text)
    context: Mapped[dict[str, Any] | None] = mapped_column()
    user_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL", use_alter=True)
    )
    reply_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL", use_alter=True), unique=True
    )
    reply: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict[str, Any] | None] = mapped_column()
    timings: Mapped[dict[str, Any] | None] = mapped_column()
    state: Mapped[dict[str, Any] | None] = mapped_column()  # emotion and affinity, before and after
    quality: Mapped[dict[str, Any] | None] = mapped_column()  # the reply's quality scores
    # Best of n: the candidates not kept, each {text, seed, finish_reason, quality}.
    alternatives: Mapped[list[Any] | None] = mapped_column(JSONB(none_as_null=True))
    adapter: Mapped[str | None] = mapped_column(String(100))  # "<slug>@v<version>" of the LoRA that answered
    # A structured reply, parsed: the JSON value of a json_schema/json_object turn, or an NPC reply
    # {"say", "emotion", "action"} (whose `say` is `reply`). None for free text.
    structured: Mapped[Any] = mapped_column(JSONB(none_as_null=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(32))  # a TurnErrorCode
    api_key: Mapped[str | None] = mapped_column(String(64))  # the HTTP key that enqueued it (its id)
    # Per-turn completion callback (POST /v1/turns callback_url) and its delivery, as runs keep theirs.
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_error: Mapped[str | None] = mapped_column(Text)
    # When a callback its tries did not deliver is due again (None: delivered, refused, never tried).
    callback_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Its latest claim's rank in its stream, raised at every claim past the attempts (which go back on a
    # refund), never back: a later claim of the turn always outranks an earlier one.
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Engine deaths this turn was inside the engine for, apart from attempts (those are refunded).
    engine_deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Deaths it was inside the engine for without being a suspect (it had started decoding while
    # another request joined): a request that kills the engine mid-reply is blamed only once it runs
    # alone, which these send it to after a few (worker/pipeline.py DEATHS_SEEN_ALONE).
    engine_deaths_seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Hand-backs for a lost database connection; the first MLCHAT_MAX_OUTAGE_REFUNDS of them cost no
    # attempt (migration 0028). A retry of a run's failed turns starts them afresh.
    outage_refunds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The lease: the worker whose claim token this is owns the running turn until lease_until.
    claim_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a queue message for this turn was last sent (None: a run's line not sent yet); also set
    # when a running turn is re-sent after its lease expired.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Waiting for an earlier turn of its conversation: since when, and how many looks so far (the
    # re-send countdown backs off with it). Cleared when the turn is claimed.
    deferred_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deferrals: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # When its sender last put it in line: the insert, moved by each fresh start (a retry of failed
    # lines, a failed unsent turn sent again, a scene's step started over), kept by a hand-back.
    # NULL on rows older than migration 0054: those count from created_at.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who answers, by slug: a group's member, else the conversation's own character; None when the
    # narrator does. Read where a view of the turn is made (db/turns.py get_turn undefers it).
    character_slug: Mapped[str | None] = column_property(
        select(Character.slug)
        .select_from(Conversation)
        .join(Character, Character.id == func.coalesce(character_id, Conversation.character_id))
        .where(Conversation.id == conversation_id, speaker != "narrator")
        .scalar_subquery(),
        deferred=True,
    )


class ReviewLabel(enum.StrEnum):
    """A writer's verdict on a kept reply (the writers' desk); it replaces the gate's where it exists."""

    APPROVED = "approved"
    REJECTED = "rejected"


class TurnReview(Base):
    """A reply's review on the writers' desk: its label, and the reply as the model first kept it."""

    __tablename__ = "turn_reviews"
    __table_args__ = (CheckConstraint("label IN ('approved', 'rejected')", name="label_known"),)

    turn_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True)
    original_reply: Mapped[str] = mapped_column(Text)
    original_quality: Mapped[dict[str, Any] | None] = mapped_column()
    # None until a writer approves or rejects; cleared when the kept text changes afterwards.
    label: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    # The kept text was written by hand: the turn's quality scores are of the model's text, not this.
    edited: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # Bumped by every change: a form names the version it was drawn from (a stale one is refused).
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TurnReviewChange(Base):
    """One change made on the writers' desk: what it was, the text before and after, who and when."""

    __tablename__ = "turn_review_changes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    turn_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))  # pick, edit, approve, reject, clear
    before: Mapped[str | None] = mapped_column(Text)
    after: Mapped[str | None] = mapped_column(Text)
    candidate: Mapped[int | None] = mapped_column(Integer)  # pick: the candidate's position
    reason: Mapped[str | None] = mapped_column(Text)
    by: Mapped[str] = mapped_column(String(64))  # the API key's id
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FactKind(enum.StrEnum):
    """What a fact is about: the player, the world, or another NPC."""

    PLAYER = "player"
    WORLD = "world"
    NPC = "npc"


class FactScope(enum.StrEnum):
    """Which NPCs may know a fact (always within its tenant)."""

    CONVERSATION = "conversation"  # scope_ref: the conversation's id; that NPC, with that player
    MET = "met"  # every NPC in a conversation with the fact's player
    STORY = "story"  # scope_ref: a story (a location or faction): every NPC in a conversation of it
    WORLD = "world"  # every NPC


class Fact(Base):
    """A short statement an NPC may know; history is kept (a contradicted fact is superseded)."""

    __tablename__ = "facts"
    __table_args__ = (
        CheckConstraint("importance BETWEEN 0 AND 1", name="importance_bounded"),
        Index("ix_facts_tenant_player", "tenant", "player_id"),
        # The fact a deleted one superseded, set free (ON DELETE SET NULL; migration 0045).
        Index("ix_facts_superseded_by", "superseded_by", postgresql_where="superseded_by IS NOT NULL"),
        # What an NPC may know: an index scan per scope over current facts (db/facts.py).
        Index(
            "ix_facts_current_scope",
            "tenant",
            "scope",
            "scope_ref",
            postgresql_where=text("superseded_by IS NULL"),
        ),
        Index(
            "ix_facts_current_met",
            "tenant",
            "player_id",
            postgresql_where=text("superseded_by IS NULL AND scope = 'met'"),
        ),
        # A writer's edit of a line drops the facts read from it and after it (db/facts.py forget_read_facts).
        Index(
            "ix_facts_read_from_lines",
            "source_conversation_id",
            "source_last_seq",
            postgresql_where=text("source_conversation_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="", server_default="")
    player_id: Mapped[str] = mapped_column(String(200), default="", server_default="")
    kind: Mapped[FactKind] = mapped_column(_enum(FactKind, "fact_kind"))
    subject: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(64))  # "game", or "turn:<uuid>" when extracted
    # An extracted fact's lines: the conversation and the stretch of its lines (seq) it was read from.
    source_conversation_id: Mapped[int | None] = mapped_column(BigInteger)
    source_first_seq: Mapped[int | None] = mapped_column(Integer)
    source_last_seq: Mapped[int | None] = mapped_column(Integer)
    importance: Mapped[float] = mapped_column(Float, default=0.5)
    scope: Mapped[FactScope] = mapped_column(_enum(FactScope, "fact_scope"))
    scope_ref: Mapped[str] = mapped_column(String(200), default="", server_default="")
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM))
    embedding_next: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM), deferred=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("facts.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FactMove(Base):
    """Gossip: a fact moved from one scope to another, and who told it."""

    __tablename__ = "fact_moves"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id", ondelete="CASCADE"), index=True)
    from_scope: Mapped[str] = mapped_column(String(16))
    from_ref: Mapped[str] = mapped_column(String(200))
    to_scope: Mapped[str] = mapped_column(String(16))
    to_ref: Mapped[str] = mapped_column(String(200))
    told_by: Mapped[str] = mapped_column(String(64), default="", server_default="")  # a character slug
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Summary(Base):
    """A summary of a conversation's lines first_seq..last_seq; level 0 summarises lines, level n+1
    merges summaries of level n (merged_into points up). The prompt uses those not merged."""

    __tablename__ = "summaries"
    __table_args__ = (
        UniqueConstraint("conversation_id", "level", "first_seq", "last_seq", name="uq_summaries_range"),
        # The summaries a prompt shows (not merged into another), in order (migration 0034).
        Index(
            "ix_summaries_unmerged", "conversation_id", "first_seq", postgresql_where="merged_into IS NULL"
        ),
        # The summaries a deleted one had merged, set free (ON DELETE SET NULL; migration 0045).
        Index("ix_summaries_merged_into", "merged_into", postgresql_where="merged_into IS NOT NULL"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    level: Mapped[int] = mapped_column(Integer, default=0)
    first_seq: Mapped[int] = mapped_column(Integer)
    last_seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    merged_into: Mapped[int | None] = mapped_column(ForeignKey("summaries.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MemoryJob(Base):
    """At most one memory job of each kind per conversation in flight: the claim (token and lease)
    and, for extraction, how far the conversation's lines have been read."""

    __tablename__ = "memory_jobs"
    __table_args__ = (
        # The sweep's look for jobs whose message went missing (db/memory_jobs.py take_back_stalled).
        Index("ix_memory_jobs_queued_until", "queued_until", postgresql_where="queued_until IS NOT NULL"),
        Index("ix_memory_jobs_claimed_lease", "lease_until", postgresql_where="token IS NOT NULL"),
    )

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # "summary" or "extract"
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done_through: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A message for this job is on the queue (not yet run) until then: no second one is sent.
    queued_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Engine deaths with this job's request inside, since its last stored step (migration 0026): as
    # a suspect (joining the engine), and present but no suspect (decoding already; migration 0033).
    engine_deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    engine_deaths_seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Steps that raised since its last stored one (migration 0040), the last one's error, and when it
    # may run again (a backoff); at MLCHAT_MEMORY_JOB_MAX_FAILURES it is given up until retried.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    retry_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # How far extraction had read when a line it had read was edited (migration 0041): due, whatever
    # its unread lines, until it has read that far again.
    reread_through: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Steps a database outage or a deadlock failed since its last stored one (migration 0044): sent
    # again uncounted, up to MLCHAT_MAX_OUTAGE_REFUNDS in a row.
    outage_retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class VectorSpace(Base):
    """The embedder every stored vector comes from (one row; `mlchat reembed` changes it at its swap):
    its name and its weights' fingerprint (its vector of a fixed probe text; NULL until a process of
    that name loads it), and its version, bumped when either changes. A trigger stores as NULL a vector
    written by a process of another embedder name (migration 0020) or whose weights were checked
    against another version (0024)."""

    __tablename__ = "vector_space"
    __table_args__ = (CheckConstraint("id", name="one_row"),)

    id: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    embedder: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[list[float] | None] = mapped_column(Vector())
    version: Mapped[int] = mapped_column(
        BigInteger, server_default=text("nextval('vector_space_version_seq')")
    )
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ReembedProgress(Base):
    """How far `mlchat reembed` got in each table with which embedder, by name and weights'
    fingerprint (so a new run of the same embedder resumes, and any other starts over)."""

    __tablename__ = "reembed_progress"

    table_name: Mapped[str] = mapped_column(String(32), primary_key=True)
    embedder: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[list[float] | None] = mapped_column(Vector())
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class WriteKey(Base):
    """An idempotency key of a write that is not a turn (a player's facts, a story's event): its
    request's fingerprint and the ids it stored, so a retry after a lost answer returns those rows
    instead of storing them again."""

    __tablename__ = "write_keys"
    # The oldest first, for the pruning of keys past MLCHAT_WRITE_KEY_TTL_S (migration 0043).
    __table_args__ = (Index("ix_write_keys_created_at", "created_at"),)

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    ids: Mapped[list[int]] = mapped_column(JSONB, default=list, server_default=text("'[]'"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeskSignOut(Base):
    """A desk session its writer signed out of: its cookie's signature until the cookie's expiry, so
    a copy of the cookie no longer opens the desk."""

    __tablename__ = "desk_sign_outs"

    session_mac: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class FileTombstone(Base):
    """A deleted file's place in the files list (its id, owner and creation time), kept a week: a
    page that starts past it still finds where."""

    __tablename__ = "file_tombstones"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key: Mapped[str | None] = mapped_column(String(64))
    tenant: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
