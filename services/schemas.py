"""Validated request shapes shared by the Python API, the CLI and the worker."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from core.settings import TENANT_NAME, settings
from roleplay.actions import check_actions
from services.callbacks import callback_refusal
from structured.kinds import DATA_REPLIES
from structured.spec import check_response_format, shown_params

# PostgreSQL `integer` columns: a value outside this range would fail the insert, not the validation.
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1


def storable_text(value: str) -> str:
    """Refuse what PostgreSQL text cannot hold (a NUL) or UTF-8 cannot encode (a lone surrogate)."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return value


def text_fault(value: str, limit: int, *, empty_ok: bool = False) -> str | None:
    """Why a text the CLI passes as typed would not be stored (storable_text, `limit` characters,
    empty unless `empty_ok`); None for a good one."""
    try:
        storable_text(value)
    except ValueError as exc:
        return str(exc)
    if len(value) > limit:
        return f"{len(value)} characters; the limit is {limit}"
    return None if value or empty_ok else "empty"


def owner_fault(tenant: str, player: str) -> tuple[str, str] | None:
    """(field, reason) for a player or a tenant the API's path and keys would refuse, None for a
    good pair: the CLI passes them as typed."""
    for field, value, limit in (("player", player, 200), ("tenant", tenant, 64)):
        fault = text_fault(value, limit, empty_ok=True)
        if fault is not None:
            return field, fault
    if not TENANT_NAME.fullmatch(tenant):
        return "tenant", "may hold only letters, digits, '.', '_' and '-'"
    if not player:
        return "player", "empty"
    return None


# Turns in one request (POST /v1/turns:batch, a serverless event's `turns`).
MAX_TURNS_PER_REQUEST = 1000

# An earlier line of a conversation given with a request or imported (a run line's history, a live
# chat's earlier messages, a history import): each later prompt cleans and tokenizes it again.
HISTORY_LINE_CHARS = 20_000

# A text field that is safe to store: every untrusted string field of a request uses it.
Text = Annotated[str, AfterValidator(storable_text)]


def utf8_header_value(value: object) -> object:
    """A header value as its sender wrote it: the server decodes header bytes as Latin-1, so a UTF-8
    value ("민수-npc1") arrives as mojibake, 11 characters for 7, and would name another conversation
    than the same id in a body. Bytes that are not UTF-8 stay as Latin-1 read them."""
    if not isinstance(value, str) or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # a character past Latin-1 (not from the wire), or Latin-1 text itself
        return value


# A header's text: decoded as UTF-8 first, so its length counts characters, as a body field's does.
HeaderText = Annotated[str, BeforeValidator(utf8_header_value), AfterValidator(storable_text)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank")
    return value


# Text that must say something: only spaces and line breaks would reach a prompt as an empty line.
FilledText = Annotated[str, AfterValidator(storable_text), AfterValidator(_not_blank)]
Int4 = Annotated[int, Field(ge=INT4_MIN, le=INT4_MAX)]


# Sampling controls passed to vLLM's SamplingParams under the same names.
SAMPLING_CONTROLS = ("repetition_penalty", "frequency_penalty", "presence_penalty", "min_p", "top_k")


_NEUTRAL_PENALTIES = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def default_candidates(params: dict[str, Any], candidates: int) -> int:
    """The candidates a bulk line that set no `n` is given, its params resolved: the run's best of
    `candidates`, or one where no pick can be made (review, stop 76: each was paid for all the
    same). Greedy sampling (temperature 0, top_k 1) draws the same reply for every seed, and a data
    reply (JSON, a pattern, a choice) is held by none of the gate's text checks."""
    greedy = params["temperature"] < 1e-5 or params.get("top_k") == 1
    data = (params.get("response_format") or {}).get("type") in DATA_REPLIES
    return 1 if greedy or data else candidates


class GenerationParams(BaseModel):
    """Per-turn sampling overrides; anything unset takes the configured default."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[Annotated[Text, Field(min_length=1, max_length=64)]] | None = Field(default=None, max_length=8)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    min_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=INT4_MAX)
    # Best of n: candidates generated (seeds seed, seed+1, …), the one the quality gate ranks first kept.
    n: int | None = Field(default=None, ge=1, le=8)
    # A structured reply (structured/spec.py): JSON schema, JSON object, regex, choice or npc; "text"
    # also turns off the character's declared actions for this turn.
    response_format: dict[str, Any] | None = None
    # NPC actions for this turn (roleplay/actions.py), in place of the character's declared ones.
    actions: list[dict[str, Any]] | None = None

    @field_validator("response_format")
    @classmethod
    def _format_enforceable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_response_format(value)

    @field_validator("actions")
    @classmethod
    def _actions_declared_well(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is None:
            return None
        return [a.model_dump(exclude_defaults=True) for a in check_actions(value, "actions")]

    @model_validator(mode="after")
    def _one_reply_shape(self) -> GenerationParams:
        if self.actions is not None and (self.response_format or {"type": "npc"})["type"] != "npc":
            raise ValueError("actions: a turn with actions has the NPC reply shape; drop response_format")
        kind = (self.response_format or {"type": "text"})["type"]
        if self.stop and kind in ("regex", "choice"):
            # The grammar ends the reply where its format does; a stop string could only cut it short,
            # which fails the turn every time (a choice's own "."). A JSON-shaped turn's stop strings
            # are dropped at the worker instead (OpenAI takes `stop` beside a JSON format).
            raise ValueError(f"stop: a {kind} reply ends with its grammar; a stop string could only cut it")
        return self

    @field_validator("max_new_tokens")
    @classmethod
    def _within_limit(cls, value: int | None) -> int | None:
        if value is not None and value > settings.max_new_tokens_limit:
            # The field is named by where it came in (`params.max_new_tokens`, an OpenAI line's
            # `body.max_completion_tokens`): not this model's name for it (review).
            raise ValueError(
                f"must be at most {settings.max_new_tokens_limit} tokens (MLCHAT_MAX_NEW_TOKENS_LIMIT)"
            )
        return value

    def resolved(self) -> dict[str, Any]:
        """Defaults filled in and a seed drawn when none was given, so every turn can be reproduced."""
        return dict(
            temperature=settings.temperature if self.temperature is None else self.temperature,
            top_p=settings.top_p if self.top_p is None else self.top_p,
            max_new_tokens=self.max_new_tokens or settings.max_new_tokens,
            seed=secrets.randbelow(2**31) if self.seed is None else self.seed,
            stop=self.stop or [],
            n=self.n or 1,
            **{
                name: self._default_control(name) if getattr(self, name) is None else getattr(self, name)
                for name in SAMPLING_CONTROLS
            },
            **self._shape(),
        )

    def _default_control(self, name: str) -> Any:
        """The deployment's default for a sampling control the turn left unset; neutral penalties for
        a data reply (review, stop 76: the penalty tuned on free text's loops pushed down, among the
        tokens a grammar allows, a JSON array's repeated values and a code's repeated digits)."""
        data = (self.response_format or {}).get("type") in DATA_REPLIES
        if data and name in _NEUTRAL_PENALTIES:
            return _NEUTRAL_PENALTIES[name]
        return getattr(settings, name)

    def _shape(self) -> dict[str, Any]:
        """The reply shape keys, only when set (turns stored before them keep their params)."""
        shape: dict[str, Any] = {}
        if self.response_format is not None:
            shape["response_format"] = self.response_format
        if self.actions is not None:
            shape["actions"] = self.actions
        return shape


# Unicode category Cc (C0 and C1 controls, DEL) except tab and newline.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_message(text: str) -> str:
    """Reject what no character should be asked to answer: empty, oversized, or control characters.
    A line ending of carriage returns (a Windows text box's CRLF, a lone CR) is a line break."""
    if not isinstance(text, str):
        raise ValueError("message must be a string")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("message is not valid UTF-8 text") from None
    if not text.strip():
        raise ValueError("message is empty")
    if len(text) > settings.max_message_chars:
        raise ValueError(f"message has {len(text)} characters; the limit is {settings.max_message_chars}")
    bad = set(_CONTROL_CHARS.findall(text))
    if bad:
        raise ValueError(
            f"message contains control characters: {', '.join(f'U+{ord(c):04X}' for c in sorted(bad))}"
        )
    return text


# The keys mlchat gives turns itself: scene steps' (db/scenes.py), run lines' and the digest a long
# one becomes (services/runs/submit.py). A client's key never takes one: a batch id shows its run's
# id, and a turn posted under a line's key before the line is stored would drop that line.
SYSTEM_KEY = re.compile(r"scene:|run:|auto:|sha256:[0-9a-f]{64}\Z")


def check_idempotency_key(value: str | None) -> str | None:
    """A client's idempotency key (body field or header): never one of mlchat's own."""
    if value is not None and SYSTEM_KEY.match(value):
        raise ValueError(
            "keys starting with 'scene:', 'run:' or 'auto:', and 'sha256:' digests, are mlchat's own"
        )
    return value


class TurnRequest(BaseModel):
    """One chat turn from a producer: a player's message to a conversation's character."""

    model_config = ConfigDict(extra="forbid")

    conversation: Text = Field(min_length=1, max_length=200, description="the game's conversation id")
    message: str
    character: Text | None = Field(
        default=None, max_length=64, description="needed to start a new conversation"
    )
    player_id: Text = Field(default="", max_length=200)
    player_name: Text = Field(default="", max_length=200)
    story: Text | None = Field(default=None, max_length=100)
    story_time: Int4 | None = None
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=200)
    model: Text | None = Field(default=None, max_length=64)
    params: GenerationParams = Field(default_factory=GenerationParams)
    speaker: Literal["character", "narrator"] = Field(
        default="character", description="who answers: the character, or the story's narrator"
    )
    speaker_character: Text | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="in a group conversation, the member who answers (default: the group's strategy)",
    )
    direction: Text | None = Field(
        default=None,
        min_length=1,
        max_length=20_000,
        description="a direction for the scene, placed after the character's own system prompt",
    )
    stream: bool = Field(
        default=False, description="publish the reply as it is written (GET /v1/turns/{id}/stream)"
    )
    callback_url: Text | None = Field(
        default=None, max_length=2000, description="POSTed the turn, signed, once it is done or failed"
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_may_be_sent(cls, value: str | None) -> str | None:
        # No DNS lookup here: the API validates bodies on its event loop (the host is looked up by
        # services/producer.py, in the request's thread).
        refused = callback_refusal(value, resolve=False) if value is not None else None
        if refused is not None:
            raise ValueError(refused)
        return value

    @model_validator(mode="after")
    def _narrator_does_not_act(self) -> TurnRequest:
        if self.speaker == "narrator" and self.params.actions is not None:
            raise ValueError("params.actions: the narrator does not act; actions are for the character")
        fmt = self.params.response_format
        if self.speaker == "narrator" and fmt is not None and fmt.get("type") != "text":
            # npc would be answered as free text (the narrator has no NPC shape), not as asked; a data
            # reply (json_schema, json_object, regex, choice) would be stored as a line of narration,
            # as a scene's narrator refuses it (scenes/spec.py).
            kind = fmt.get("type")
            raise ValueError(
                f"params.response_format: the narrator speaks free text; {kind} is for the character"
            )
        return self

    @model_validator(mode="after")
    def _streams_one_candidate(self) -> TurnRequest:
        if self.stream and (self.params.n or 1) > 1:
            raise ValueError("stream: a streamed turn generates one candidate; leave params.n at 1")
        return self

    @field_validator("idempotency_key")
    @classmethod
    def _key_is_not_the_systems(cls, value: str | None) -> str | None:
        return check_idempotency_key(value)

    @field_validator("message")
    @classmethod
    def _message_is_answerable(cls, value: str) -> str:
        return check_message(value)

    # An OpenAI request that asked for no response_format gets {"type": "text"} (services/runs/
    # openai_lines.py); it is hashed as absent, as it was before that default, so a retry still matches.
    _default_response_format: bool = PrivateAttr(default=False)

    # The original request shape's stream flag is the CLI's transport (it streams what it sends to the
    # workers itself), not part of what was asked: a replay with --inline is the same request.
    _stream_is_transport: bool = PrivateAttr(default=False)

    def streamed_by_transport(self, stream: bool) -> TurnRequest:
        """A copy with `stream` set as the caller's transport, left out of request_hash."""
        copy = self.model_copy(update={"stream": stream})
        copy._stream_is_transport = True
        return copy

    def legacy_request_hashes(self) -> tuple[str, ...]:
        """The fingerprints earlier releases stored for this same request: one that counted the
        transport's stream flag when it was set, and, for the original request shape, one that did not
        count its history and story yet (stop 66): a retry across the upgrade is still the same
        request. Empty when neither applies."""
        variants = [self]
        if self._earlier_counted_since_upgrade and self._earlier is not None:
            uncounted = self.model_copy()
            uncounted._earlier = None
            variants.append(uncounted)
        hashes = []
        for variant in variants:
            if variant is not self:
                hashes.append(variant.request_hash())
            if variant._stream_is_transport:
                counted = variant.model_copy(update={"stream": True})  # that release counted it only when set
                counted._stream_is_transport = False
                hashes.append(counted.request_hash())
        return tuple(dict.fromkeys(hashes))

    # A request that speaks to its conversation's one character (a chat completion names it as `model`):
    # refused in a group conversation, whose picker would choose another member to answer it.
    _one_character: bool = PrivateAttr(default=False)

    def to_one_character(self) -> TurnRequest:
        """Mark the request as speaking to the conversation's one character (no group's member)."""
        self._one_character = True
        return self

    @property
    def one_character(self) -> bool:
        return self._one_character

    def with_default_response_format(self) -> TurnRequest:
        """Mark params.response_format as the OpenAI path's default, left out of request_hash."""
        self._default_response_format = True
        return self

    # A chat completion's earlier messages (they seed its conversation): part of what was asked, so a
    # key reused with other earlier messages is a conflict, not a replay that seeds them; counted only
    # when there are some, so fingerprints stored before they counted still match.
    _earlier: str | None = PrivateAttr(default=None)
    # Counted since stop 66 only (the original request shape's history and story): a turn stored
    # before that has a fingerprint without them (legacy_request_hashes).
    _earlier_counted_since_upgrade: bool = PrivateAttr(default=False)

    def with_earlier_messages(
        self, history: list[dict[str, str]], *, new_to_the_hash: bool = False
    ) -> TurnRequest:
        """Count these earlier messages in request_hash (none: nothing changes). `new_to_the_hash`: a
        release before this one did not count them for this kind of request."""
        if history:
            self._earlier = hashlib.sha256(json.dumps(history, ensure_ascii=False).encode()).hexdigest()
            self._earlier_counted_since_upgrade = new_to_the_hash
        return self

    def request_hash(self) -> str:
        """Fingerprint of what was asked, to tell a retried call from a reused key."""
        # `speaker` counts only when set, so fingerprints stored before it existed still match.
        skip = {"idempotency_key"} | ({"speaker"} if self.speaker == "character" else set())
        skip |= {name for name in ("stream", "callback_url") if not getattr(self, name)}
        skip |= {"stream"} if self._stream_is_transport else set()
        skip |= {"speaker_character"} if self.speaker_character is None else set()
        body = self.model_dump(exclude=skip, mode="json")
        body["params"] = shown_params(body["params"])  # a schema's key order never counted
        # The reply shape counts only when set, so fingerprints stored before it existed still match.
        for name in ("response_format", "actions"):
            if body["params"].get(name) is None:
                body["params"].pop(name, None)
        if self._default_response_format:
            body["params"].pop("response_format", None)
        if self._earlier is not None:
            body["earlier_messages"] = self._earlier
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class StoryEventIn(BaseModel):
    """An event of a story, as the game sends it (POST /v1/stories/{story}/events)."""

    model_config = ConfigDict(extra="forbid")

    text: Text = Field(min_length=1, max_length=4000)
    scene: Text = Field(default="", max_length=200)
    time: Int4 | None = None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        return value


class StoryEvent(StoryEventIn):
    """A story event with the story it belongs to."""

    story: Text = Field(min_length=1, max_length=100)
