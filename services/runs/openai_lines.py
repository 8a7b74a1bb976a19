"""OpenAI Batch API input lines, mapped onto run lines.

Each line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}` where
the body is a chat-completions request. The character comes from `body.model` when it names one,
else from `body.metadata.character`, else from the run's default. The last message is the player's
turn; the user and assistant messages before it seed a fresh conversation's history. Whatever
mlchat cannot honour is refused, naming the field, never dropped in silence: a line that is not a
well-formed request (its envelope: custom_id, method, url, body) fails the whole file, as OpenAI
does; a well-formed request refused by mlchat's policy is a `RequestRefused`, answered alone in
the error file while the other lines run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.validation import error_line
from db.models import TurnErrorCode
from services.schemas import HISTORY_LINE_CHARS, Text, check_message, storable_text

ENDPOINT = "/v1/chat/completions"
MAX_CHOICES = 8  # GenerationParams.n's limit

# Turn failures that were the request's fault: 400 in the batch error file and on a chat completion
# alike; every other failure is the server's.
REQUEST_FAULTS = frozenset(
    {
        TurnErrorCode.PROMPT_TOO_LONG.value,
        TurnErrorCode.STRUCTURED_REPLY_CUT.value,  # the request's max_tokens is too small for its reply
        # Parameters the engine refused, a grammar of the request's it could not build (twice), or the
        # request's own shape or sampling parameters that could not be read: the same each time.
        TurnErrorCode.INVALID_PARAMS.value,
        "invalid_request",
    }
)


def failure_status(error_code: str | None, server_status: int) -> int:
    """The HTTP status of a failed turn: 400 when the request was at fault, else server_status."""
    return 400 if error_code in REQUEST_FAULTS else server_status


# Body fields that ask for something a batch here cannot give: refused when set to anything but an
# "off" value (absent and null are off too; wrappers send the empty and zero ones as defaults).
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "stream": ((False,), "streaming is not available in a batch"),
    "logprobs": ((False,), "log probabilities are not returned"),
    "top_logprobs": ((0,), "log probabilities are not returned"),
    "tools": (([],), "tool calls are not supported"),
    "tool_choice": (("none",), "tool calls are not supported"),
    "functions": (([],), "function calls are not supported"),
    "function_call": (("none",), "function calls are not supported"),
    "parallel_tool_calls": ((False, True), "tool calls are not supported"),  # moot with no tools
    "logit_bias": (({},), "logit bias is not supported"),
    "audio": ((), "only text replies"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
}


def _is_off(value: Any, offs: tuple[Any, ...]) -> bool:
    """Whether a body field's value is one of its off values (of the same JSON type: 0 is not false)."""
    return value is None or any(type(value) is type(off) and value == off for off in offs)


# Accepted and without effect here (who the end user is, storage, cache and tier hints of OpenAI's
# service, the length hint of its reasoning models).
IGNORED = (
    "user",
    "safety_identifier",
    "store",
    "service_tier",
    "stream_options",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "prompt_cache_retention",
)

# Our field name in a GenerationParams error → the body field the user wrote.
_PARAM_FIELDS = {"max_new_tokens": ("max_completion_tokens", "max_tokens")}  # the newer name first


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


def _nothing(what: str) -> Any:
    """A field of an assistant message that a reply sent back carries empty (the `openai` client
    sends a response's message as it came): accepted when empty, refused naming it when it holds
    something."""

    def check(value: Any) -> Any:
        if value:
            raise ValueError(f"{what} are not supported")
        return None

    return AfterValidator(check)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: Text | list[_TextPart] | None = None
    name: Text | None = Field(default=None, max_length=64)
    # What an assistant reply of OpenAI's shape carries besides its content (this service's own
    # replies have `refusal: null`): read as nothing.
    refusal: Text | None = None
    annotations: list[Any] | None = None
    tool_calls: Annotated[list[Any] | None, _nothing("tool calls")] = None
    function_call: Annotated[Any, _nothing("function calls")] = None
    audio: Annotated[Any, _nothing("audio replies")] = None

    @model_validator(mode="before")
    @classmethod
    def _a_role_of_the_dialogue(cls, data: Any) -> Any:
        """A tool or function message is refused for its role (by _messages), not for the fields that
        come with it (`tool_call_id`: "Extra inputs are not permitted")."""
        role = data.get("role") if isinstance(data, dict) else None
        if isinstance(role, str) and role not in ("system", "developer", "user", "assistant"):
            return {"role": role}
        return data

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or self.refusal or ""  # a refusal sent back: what the model said


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=64)
    messages: list[_Message] = Field(min_length=1, max_length=201)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    metadata: dict[Text, Text] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: Text = Field(min_length=1, max_length=200)
    method: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineOptions:
    """What a run allows of its OpenAI lines."""

    default_character: str | None = None
    allow_system_prompt: bool = False  # a system message replaces the character's own system prompt
    candidates: int | None = None  # best of n for lines that do not set params.n (None: the setting)
    # Scene lines taken: not in an OpenAI batch, whose output file has no room for a scene's speakers
    # and opening, nor a line for the scene's own custom_id (scenes review). Not stored with the run:
    # a batch's submission says it again at each try (a release before it read the stored options
    # as its own and refused a key it did not know).
    scenes: bool = True

    def stored(self) -> dict[str, Any]:
        """The options as a run stores them."""
        return {k: v for k, v in asdict(self).items() if k != "scenes"}

    @classmethod
    def of_stored(cls, stored: dict[str, Any]) -> LineOptions:
        """Options a run stored, any key this release does not know (a later one's) left aside."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})


class RequestRefused(ValueError):
    """A well-formed request that mlchat refuses by its own policy: a per-request error, not a bad
    file."""

    def __init__(self, custom_id: str, message: str) -> None:
        self.custom_id = custom_id
        super().__init__(message)


def is_openai_line(data: Any) -> bool:
    """Whether a parsed line has the OpenAI batch shape (the file's format follows its first line)."""
    return isinstance(data, dict) and bool({"method", "url", "body"} & data.keys())


def _branch_tag(part: int | str) -> bool:
    """Whether a path segment is pydantic's name for a union's branch (`function-after[…]`,
    `list[_TextPart]`), not a field or key (`a[b]` is a key)."""
    return (
        isinstance(part, str)
        and re.fullmatch(r"(function-(after|before|wrap|plain)|list|dict)\[.*\]", part) is not None
    )


def _first_error(exc: ValidationError, prefix: str) -> str:
    errors = exc.errors()
    first = errors[0]
    loc, msg = first["loc"], first["msg"]
    # A union's branches each failed (content: a string or text parts): a tag at a place where
    # another error has another tag (a key shaped like one, `list[x]`, has no sibling).
    union = next(
        (
            i
            for i, part in enumerate(loc)
            if _branch_tag(part)
            and any(
                e["loc"][:i] == loc[:i]
                and len(e["loc"]) > i
                and e["loc"][i] != part
                and _branch_tag(e["loc"][i])
                for e in errors
            )
        ),
        None,
    )
    if union is not None:
        # pydantic names each branch by a tag in the path and says the first one's error first (the
        # string's, for a list): the error of the branch of the value's own kind is the one to say.
        head, value = loc[:union], first["input"]
        kind = "list[" if isinstance(value, list) else "dict[" if isinstance(value, dict) else None
        branch = [
            e for e in errors if e["loc"][:union] == head and str(e["loc"][union]).startswith(kind or "-")
        ]
        if branch:
            loc, msg = branch[0]["loc"], branch[0]["msg"]
        elif not isinstance(value, str):
            msg = "must be a string or a list of text parts" if head[-1:] == ("content",) else msg
        loc = loc[:union] + loc[union + 1 :]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return error_line(f"{prefix}{where}" if where else prefix.rstrip("."), msg)


def to_run_line(data: dict[str, Any], characters: Collection[str], options: LineOptions) -> dict[str, Any]:
    """The native run line (a dict for RunLine) an OpenAI batch line asks for; ValueError naming the
    field at fault."""
    try:
        line = _Line.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_first_error(exc, "")) from None
    if line.method.upper() != "POST":
        raise ValueError(f"method: {line.method!r}; only POST is supported")
    if line.url != ENDPOINT:
        raise ValueError(f"url: {line.url!r}; only {ENDPOINT} is supported")
    try:
        return _request(line, characters, options)
    except ValueError as exc:
        raise RequestRefused(line.custom_id, str(exc)) from None


def _request(line: _Line, characters: Collection[str], options: LineOptions) -> dict[str, Any]:
    for name, (offs, why) in _UNSUPPORTED.items():
        if not _is_off(line.body.get(name), offs):
            raise ValueError(f"body.{name}: {why}")
    body_dict = {k: v for k, v in line.body.items() if k not in IGNORED and k not in _UNSUPPORTED}
    try:
        body = _Body.model_validate(body_dict)
    except ValidationError as exc:
        raise ValueError(_first_error(exc, "body.")) from None
    if body.response_format is not None and body.response_format.get("type") in ("regex", "choice"):
        raise ValueError(
            "body.response_format.type: OpenAI's are text, json_object and json_schema (and mlchat's npc)"
        )
    if "conversation" in (body.metadata or {}):  # the live endpoint's: here it would be dropped unsaid
        raise ValueError(
            "body.metadata.conversation: a batch line is answered in a conversation of its own (a native"
            " line's `conversation` continues one)"
        )
    if body.modalities not in (None, ["text"]):
        raise ValueError("body.modalities: only text replies are supported")
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise ValueError(f"body.n: {body.n}; between 1 and {MAX_CHOICES} choices per request")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ValueError("body.max_tokens: give max_tokens or max_completion_tokens, not both")

    character = _character(body, characters, options)
    message, history, system, player_name = _messages(body.messages, character, options)
    params: dict[str, Any] = {
        "max_new_tokens": body.max_tokens
        if body.max_completion_tokens is None
        else body.max_completion_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
    }
    if body.n is not None:  # n candidates (best of n), every one returned as a choice; n: 1 is one
        params["n"] = body.n
    # Checked as the run line's params (structured/spec.py). An OpenAI client that did not ask for
    # JSON reads `content` as text: without a response_format the turn is free text even for a
    # character with declared actions; `{"type": "npc"}` asks for the NPC shape.
    params["response_format"] = {"type": "text"} if body.response_format is None else body.response_format
    run_line: dict[str, Any] = {
        "custom_id": line.custom_id,
        "character": character,
        "message": message,
        "history": history,
        "params": {k: v for k, v in params.items() if v is not None},
    }
    if system is not None:  # the persona's replacement where the run allows it, else the scene's direction
        run_line["system_prompt" if options.allow_system_prompt else "direction"] = system
    if player_name is not None:
        run_line["player_name"] = player_name
    if body.n is not None and body.n > 1:
        run_line["choices"] = body.n
    return run_line


def paid_completion_tokens(usage: dict[str, Any], alternatives: list[dict[str, Any]] | None) -> int:
    """An answer's `usage.completion_tokens`: every candidate generated is paid for, returned or not
    (best of n costs n, a regeneration too), those dropped as empty or unreadable among them
    (`generated_completion_tokens`; a turn stored before it was recorded: the reply and the
    alternatives)."""
    kept = usage.get("completion_tokens", 0) + sum(a.get("completion_tokens", 0) for a in alternatives or [])
    return max(kept, usage.get("generated_completion_tokens", 0))


def message_content(reply: str | None, structured: Any, params: dict[str, Any]) -> str | None:
    """An answer's `message.content`: the reply; for an NPC reply (`response_format` npc, or none on
    a turn stored before OpenAI lines said text), the whole of it as JSON, so that the action and
    emotion reach the caller."""
    if structured is not None and (params.get("response_format") or {"type": "npc"})["type"] == "npc":
        return json.dumps(structured, ensure_ascii=False)
    return reply


def body_field(run_line_field: str, body: Mapping[str, Any]) -> str:
    """The field of `body` a RunLine field of its mapped line came from (to name it in errors)."""
    head, _, rest = run_line_field.partition(".")
    if head == "params":
        names = _PARAM_FIELDS.get(rest, (rest,))
        return "body." + next((name for name in names if body.get(name) is not None), names[0])
    if head == "message":
        return "body.messages[-1].content"
    if head in ("history", "direction", "system_prompt", "player_name"):  # read from the messages
        return "body.messages"
    return head


def _character(body: _Body, characters: Collection[str], options: LineOptions) -> str:
    if body.model in characters:
        return body.model
    named = (body.metadata or {}).get("character")
    if named is not None:
        if named not in characters:
            raise ValueError(f"body.metadata.character: unknown character {named!r}")
        return named
    if options.default_character:
        return options.default_character
    raise ValueError(
        f"body.model: {body.model!r} is not a character here, and neither body.metadata.character "
        "nor the run's default character names one"
    )


def _messages(
    messages: list[_Message], character: str, options: LineOptions
) -> tuple[str, list[dict[str, str]], str | None, str | None]:
    """(the player's message, the history before it, the system and developer messages' text, the
    player's name from a user message's `name`)."""
    history: list[dict[str, str]] = []
    system: list[str] = []
    player_name = None
    for i, msg in enumerate(messages):
        where = f"body.messages[{i}]"
        if msg.name is not None:
            if msg.role != "user":
                raise ValueError(f"{where}.name: only a user message may name its speaker (the player)")
            player_name = msg.name
        if msg.role in ("system", "developer"):
            if history:
                raise ValueError(f"{where}: a {msg.role} message must come before the conversation")
            system.append(msg.text())
        elif msg.role in ("user", "assistant"):
            text = msg.text()
            if not text.strip():
                raise ValueError(f"{where}.content: empty")
            if len(text) > HISTORY_LINE_CHARS:  # the last one is the message: its own limit is lower
                limit = HISTORY_LINE_CHARS
                raise ValueError(f"{where}.content: {len(text)} characters; the limit is {limit}")
            history.append({"role": msg.role, "content": text})
        else:  # not a string of the dialogue's roles: refused by _Message already
            raise ValueError(f"{where}.role: {msg.role!r}; only system, developer, user and assistant")
    if not history or history[-1]["role"] != "user":
        raise ValueError("body.messages: the last message must be the player's (role 'user')")
    message = history.pop()["content"]
    try:
        check_message(message)
    except ValueError as exc:
        raise ValueError(f"body.messages[{len(messages) - 1}].content: {exc}") from None
    return message, history, "\n\n".join(system) if system else None, player_name


def stored_history(line: dict[str, Any]) -> list[dict[str, str]]:
    """A run line's history (to_run_line's) as it is stored: for a line asking for the NPC shape, an
    assistant message that is an NPC reply as mlchat answers one ({"say", "emotion", "action"}, sent
    back as OpenAI clients do) is kept as its `say`, as mlchat keeps its own NPC lines (review, stop
    76: the JSON was the character's line in every later prompt, summary and repetition check). The
    line's fingerprint is over the messages as sent."""
    if ((line.get("params") or {}).get("response_format") or {}).get("type") != "npc":
        return list(line["history"])
    return [h | {"content": _said(h["content"])} if h["role"] == "assistant" else h for h in line["history"]]


def _said(text: str) -> str:
    """An NPC reply's `say` when `text` is one in JSON, else `text` as it is."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        reply = json.loads(text)
    except (ValueError, RecursionError):
        return text
    said = reply.get("say") if isinstance(reply, dict) else None
    if not isinstance(said, str) or not said.strip():
        return text
    try:  # JSON's escapes decode to what the text as sent could not hold (a NUL, a lone surrogate)
        return storable_text(said)
    except ValueError:
        return text
