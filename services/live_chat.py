"""OpenAI chat completions for live turns: one request becomes one queued live turn.

`model` names the character; the conversation is the `X-Mlchat-Conversation` header, else
`metadata.conversation`, else `user`, else a new conversation for this request alone. The last
message is the player's turn; the messages before it seed a conversation that is new (as in batch
lines) and are ignored for one that has history, whose stored messages are the memory. The turn
goes through the queue like every live turn (priority, leases, exactly-once storage, the gate).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from core.settings import settings
from core.validation import first_error
from db.session import session_scope
from db.turns import IdempotencyConflict
from db.world import find_characters
from services import producer
from services.producer import TurnView
from services.runs.openai_lines import (
    ENDPOINT,
    LineOptions,
    body_field,
    message_content,
    paid_completion_tokens,
    stored_history,
    to_run_line,
)
from services.schemas import GenerationParams, Text, TurnRequest

CONVERSATION_HEADER = "X-Mlchat-Conversation"
# OpenAI fields that mean something to a chat request here but not to a batch line.
_LIVE_ONLY = ("stream", "stream_options", "user")

logger = logging.getLogger(__name__)


class ChatRejected(ValueError):
    """The request cannot be answered as asked; the message names the field. `status`: 400, 404
    for a model that names no character (`code` model_not_found, as OpenAI answers it), or 409 for
    an idempotency key already used for another request."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ChatNotSent(producer.EnqueueError):
    """The chat turn was stored (its conversation too) and could not be sent: a 503, naming the
    conversation all the same, which a player's erasure must name to reach it."""

    def __init__(self, message: str, conversation: str) -> None:
        super().__init__(message)
        self.conversation = conversation


@dataclass(frozen=True)
class ChatTurn:
    """The queued turn behind one chat completion."""

    id: uuid.UUID
    character: str
    created: int  # unix seconds, OpenAI's `created`
    stream: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    # The content is sent whole once stored (an NPC reply's JSON, as without `stream`), not as written.
    whole: bool = False
    # Its conversation's name, sent back in the X-Mlchat-Conversation header: the game's to go on
    # with, or to name in a player's erasure (a `chat-…` one it never named was out of its reach).
    conversation: str = ""


_SLUG: TypeAdapter[str] = TypeAdapter(Annotated[Text, Field(min_length=1, max_length=64)])


def _slug(value: Any, field: str) -> str:
    """`value` as a character slug to look up; ChatRejected naming `field` when it cannot be one."""
    try:
        return _SLUG.validate_python(value, strict=True)
    except ValidationError as exc:
        raise ChatRejected(first_error(exc, field)) from None


def _named(exc: ValidationError, origin: Callable[[str], str]) -> str:
    """The first error, named by the request field its model field came from (`origin` of the
    model field's first part: 'max_new_tokens' is body.max_tokens here)."""
    first = exc.errors()[0]
    head, *rest = [str(p) for p in first["loc"]] or [""]
    where = ".".join([origin(head), *rest]) if head else "body"  # a whole-model check: the body
    said = first["msg"].removeprefix("Value error, ")
    tail = where.removeprefix("body.")
    if where.startswith("body.") and said.startswith((f"{tail}:", f"{tail}.")):
        return f"body.{said}"  # the check named its field itself
    return f"{where}: {said}"


def start_chat_turn(
    body: Any,
    *,
    api_key: str,
    tenant: str,
    conversation: str | None = None,
    idempotency_key: str | None = None,
) -> ChatTurn:
    """Validate an OpenAI chat-completions body and queue its live turn; ChatRejected naming the field.
    A replay of `idempotency_key` answers with the turn it made instead of queueing another."""
    if not isinstance(body, dict):
        raise ChatRejected("body: a JSON object is expected")
    stream = body.get("stream")
    stream = False if stream is None else stream  # OpenAI's "boolean or null", null the default
    if not isinstance(stream, bool):
        raise ChatRejected("body.stream: true or false")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise ChatRejected("body.stream_options: an object, with stream true")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ChatRejected("body.stream_options.include_usage: true or false")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ChatRejected("body.metadata: an object of strings")
    metadata = dict(metadata or {})
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ChatRejected("body.user: a string")
    # A replay without a conversation must name the same one, or it would conflict with its own key.
    fresh = uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}:{idempotency_key}") if idempotency_key else uuid.uuid4()
    # Where the conversation came from, to name it in an error (the header is checked by the route).
    conversation_field = (
        CONVERSATION_HEADER + " (header)"
        if conversation
        else "body.metadata.conversation"
        if metadata.get("conversation")
        else "body.user"
    )
    named = metadata.pop("conversation", None)  # the header's, where both name one
    conversation = conversation or named or user or f"chat-{fresh}"
    line_body = {k: v for k, v in body.items() if k not in _LIVE_ONLY} | {"metadata": metadata or None}
    # Checked before the lookup: a NUL or a lone surrogate would fail in the database, not here.
    if "model" not in body:
        raise ChatRejected("body.model: required (the character's name)")
    slugs = [_slug(body["model"], "body.model")]
    if metadata.get("character") is not None:
        slugs.append(_slug(metadata["character"], "body.metadata.character"))
    with session_scope() as session:
        known = find_characters(session=session, slugs=slugs, tenant=tenant)
    if len(slugs) == 1 and slugs[0] not in known:  # OpenAI's answer, which its client raises as NotFoundError
        raise ChatRejected(
            f"body.model: the model {slugs[0]!r} does not exist (a character: GET /v1/models lists them)",
            status=404,
            code="model_not_found",
        )
    try:
        line = to_run_line(
            {"custom_id": "live", "method": "POST", "url": ENDPOINT, "body": line_body}, known, LineOptions()
        )
    except ValueError as exc:
        raise ChatRejected(str(exc)) from None
    if line.get("choices", 1) > 1:
        raise ChatRejected("body.n: a live chat completion has one choice")
    origins = {  # the turn's fields a batch line does not name (the others: body_field)
        "conversation": conversation_field,
        "character": "body.model",
        "idempotency_key": "Idempotency-Key (header)",  # only the header sets it
    }

    def origin(field: str) -> str:
        named = origins.get(field) or body_field(field, body)
        return named if named.startswith(("body", "Idempotency", CONVERSATION_HEADER)) else f"body.{field}"

    # One choice, as a live completion always is: `n: 1` (many wrappers' default) is left out, so the
    # request hashes as it did before batch lines kept it (a keyed retry across the upgrade matches).
    if line["params"].get("n") == 1:
        del line["params"]["n"]
    try:
        params = GenerationParams(**line["params"])
    except ValidationError as exc:
        raise ChatRejected(_named(exc, lambda field: body_field(f"params.{field}", body))) from None
    try:
        request = TurnRequest(
            conversation=conversation,
            character=line["character"],
            message=line["message"],
            player_name=line.get("player_name") or "",
            params=params,
            direction=line.get("direction"),
            stream=stream,
            idempotency_key=idempotency_key,
        )
        if body.get("response_format") is None:
            request.with_default_response_format()
        request.with_earlier_messages(line["history"])
        # As a run's line is refused there: a group's picker, not `model`, would choose who answers.
        request.to_one_character()
        # Streamed or not, the same question: a keyed retry of a dropped stream as a plain call gets
        # its turn, not a 409 (review); a key stored counting the flag still matches (legacy hashes).
        request = request.streamed_by_transport(stream)
    except ValidationError as exc:
        raise ChatRejected(_named(exc, origin)) from None
    history = [(h["role"], h["content"]) for h in stored_history(line)] if line["history"] else []
    producer.refuse_when_live_queue_full({request.model or settings.model})  # stored, then sent: asked first
    try:
        (stored,) = producer.submit_turns(
            [request], send=False, api_key=api_key, tenant=tenant, history=history
        )
    except producer.TurnRejected as exc:  # named as the chat request names it (not `character`)
        raise ChatRejected("; ".join(f"{origin(e.field)}: {e.reason}" for e in exc.errors)) from None
    except IdempotencyConflict as exc:
        raise ChatRejected(f"Idempotency-Key (header): {exc}", status=409) from None
    try:
        producer.send_stored([stored], lane="live")
    except producer.EnqueueError as exc:  # stored and failed unsent: the game is told where (review)
        raise ChatNotSent(str(exc), conversation) from exc
    whole = (request.params.response_format or {}).get("type") == "npc"
    return ChatTurn(
        stored.id,
        line["character"],
        int(time.time()),
        stream,
        include_usage,
        whole,
        conversation=conversation,
    )


def completion(turn: ChatTurn, view: TurnView) -> dict[str, Any]:
    """OpenAI's `chat.completion` object for a finished turn."""
    usage = view.usage or {}
    return {
        "id": f"chatcmpl-{turn.id}",
        "object": "chat.completion",
        "created": turn.created,
        "model": turn.character,
        "system_fingerprint": settings.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": message_content(view.reply, view.structured, view.params),
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": _finish_reason(usage),
            }
        ],
        "usage": _usage(usage, view.alternatives),
    }


def usage_chunk(turn: ChatTurn, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The last chunk of a stream asked with `stream_options.include_usage`: no choices, the usage."""
    return {**chunk(turn, {}), "choices": [], "usage": _usage(usage or {})}


def _usage(usage: dict[str, Any], alternatives: list[dict[str, Any]] | None = None) -> dict[str, int]:
    prompt, completion = usage.get("prompt_tokens", 0), paid_completion_tokens(usage, alternatives)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk(turn: ChatTurn, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """One OpenAI `chat.completion.chunk`: with `stream_options.include_usage`, each carries
    `"usage": null` as OpenAI's do (the last, usage_chunk, the usage)."""
    return {
        "id": f"chatcmpl-{turn.id}",
        "object": "chat.completion.chunk",
        "created": turn.created,
        "model": turn.character,
        "system_fingerprint": settings.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        **({"usage": None} if turn.include_usage else {}),
    }


def _finish_reason(usage: dict[str, Any]) -> str:
    return "length" if usage.get("finish_reason") == "length" else "stop"
