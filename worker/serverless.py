"""A RunPod-serverless-style entry point over the same pipeline, for deployments without a queue.

`handler(event)` takes `{"input": {...one turn...}}` or `{"input": {"turns": [...]}}` (the fields of
`TurnRequest`) and returns the answered turns; or the original service's event, `{"input": {"persona",
"chat_history", "story", "message", ...}}` (services/original_request.py), answered with the original's
ChatResponse. The model loads once per container, on the first call.
Run it with the `runpod` package installed (`python -m worker.serverless`), or locally without it:
`python -m worker.serverless '{"input": {"conversation": "c1", "character": "elara", "message": "Hi"}}'`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from core.settings import settings
from core.validation import error_line
from db.session import DATABASE_OUTAGES
from db.turns import IdempotencyConflict
from db.vector_space import EmbedderMismatch, SpaceMoved
from services.producer import EnqueueError
from services.schemas import MAX_TURNS_PER_REQUEST, TurnRequest
from structured.spec import GrammarBusy, build_budget
from worker.engine import BadEngineSetting, EngineDead

logger = logging.getLogger(__name__)

# Answered as {"error": ...}: bad input, or a deployment whose embedder is not the stored vectors'.
_REFUSED = (ValidationError, IdempotencyConflict, EmbedderMismatch, ValueError)
# Answered as {"error": ..., "retry": true}: the database or the broker away for now, or the grammar
# builders busy.
_TRANSIENT: tuple[type[Exception], ...] = (EnqueueError, GrammarBusy, *DATABASE_OUTAGES)


def handler(event: dict[str, Any]) -> dict[str, Any]:
    """Answer the event's turns; bad input comes back as {"error": ...}, never as an exception."""
    from worker.inline import answer_stored, store_for_call

    payload = event.get("input") if isinstance(event, dict) else None
    if not isinstance(payload, dict):
        return {"error": 'the event must be {"input": {...turn...}} or {"input": {"turns": [...]}}'}
    if "persona" in payload:
        return _answer_original(payload)
    many = "turns" in payload
    requests = payload.get("turns", [payload])
    if not isinstance(requests, list) or not requests:
        return {"error": '"turns" must be a non-empty list'}
    if len(requests) > MAX_TURNS_PER_REQUEST:
        return {"error": f'"turns": {len(requests)} items; the limit is {MAX_TURNS_PER_REQUEST} a request'}
    parsed, errors = [], []
    with build_budget():  # as a `:batch` over HTTP: the event's new formats, all together
        for i, item in enumerate(requests):
            try:
                parsed.append(request := TurnRequest.model_validate(item))
            except ValidationError as exc:
                errors.append(_named(exc, f"turns[{i}]" if many else ""))
                continue
            except GrammarBusy as exc:
                return _try_again(exc)
            # What this handler cannot do for a turn, refused naming the item, never dropped: a callback
            # (nothing here would deliver it), another model (these weights would answer it) and a
            # stream (published for no reader, and never regenerated; review, stop 76, both).
            cannot = (
                (
                    "callback_url",
                    request.callback_url is not None,
                    "it answers in its reply and sends no callback",
                ),
                ("model", request.model not in (None, settings.model), f"it answers {settings.model!r} only"),
                ("stream", bool(request.stream), "it answers in its reply and streams nothing"),
            )
            errors += [
                error_line(f"turns[{i}].{field}" if many else field, f"the serverless handler: {why}")
                for field, refused, why in cannot
                if refused
            ]
    if errors:
        return {"error": "; ".join(errors)}
    ids: list[Any] = []
    try:
        ids = store_for_call(parsed)
        views = answer_stored(ids)
    except EngineDead as exc:
        return _engine_died(exc)
    except _REFUSED as exc:
        return {"error": _named(exc) if isinstance(exc, ValidationError) else str(exc)}
    except _TRANSIENT as exc:
        answer = _try_again(exc) | {"turns": _as_they_stand(ids)}
        if any(turn["status"] == "done" for turn in answer["turns"]):
            answer["error"] += ANSWERED_ALREADY
        return answer
    answer = {"turns": _shown(views)} | _not_all_answered(views)
    return answer if many else answer | _failed_for_good(views, answer)


def _failed_for_good(views: list[Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A one-turn event's turn failed for good (prompt_too_long, say): a top-level error and its
    code, as RunPod fails a job on a top-level error alone (review: the job read COMPLETED with no
    reply); {} otherwise, or when the answer says an error already. An event of several turns
    keeps its answered ones: each failure is in its own turn."""
    if len(views) != 1 or views[0].status.value != "failed" or "error" in answer:
        return {}
    return {"error": views[0].error, "error_code": views[0].error_code}


def _not_all_answered(views: list[Any]) -> dict[str, Any]:
    """The error and retry flag of an answer with turns the call returned unanswered (an adapter that
    may load later, a wait on another call's turn that ran out): {} when every turn is answered or
    failed for good. Without them the platform takes the event for done (RunPod fails a job only on
    a top-level error)."""
    from worker.inline import NOT_ANSWERED, unanswered, unanswered_reason

    left = unanswered(views)
    # Held by another call's live claim (a concurrent call on the conversation took it as its earlier
    # turn): that call answers it, so no resend is asked for, but the answer says so (review: it
    # looked answered, and an unkeyed one's reply reached no caller).
    held = [view for view in views if view.status.value == "running"]
    if not left and not held:
        return {}
    said = []
    if left:
        why = unanswered_reason(left[0]).removeprefix(NOT_ANSWERED)
        answered = any(view.status.value == "done" for view in views)
        said.append(
            f"{len(left)} turn(s) not answered in this call ({why}); send the event again (a turn with "
            "an idempotency key is answered by the replay)" + (ANSWERED_ALREADY if answered else "")
        )
    if held:
        said.append(
            f"{len(held)} turn(s) still being answered by another call of their conversation (one with "
            "an idempotency key: the event sent again returns it answered; one without: sending it again "
            "would answer its line twice)"
        )
    return {"error": "; ".join(said)} | ({"retry": True} if left else {})


ANSWERED_ALREADY = " (its lines answered already are `done` in `turns`: leave them out)"


def _shown(views: list[Any]) -> list[dict[str, Any]]:
    """Turns as an answer shows them (without their prompts)."""
    return [view.model_dump(mode="json", exclude={"prompt"}) for view in views]


def _as_they_stand(ids: list[Any]) -> list[dict[str, Any]]:
    """The call's turns as they stand after it stopped part-way (those answered are `done`: sending
    their lines again without idempotency keys would answer them twice); [] if they cannot be read
    (the database away), as after an engine death."""
    from worker.inline import views_of

    try:
        return _shown(views_of(ids))
    except Exception:  # the answer says "send it again" whatever stops this read
        logger.warning("could not read the stopped call's turns", exc_info=True)
        return []


def _named(exc: ValidationError, where: str = "") -> str:
    """A validation error as lines naming each field, without pydantic's echo of the input."""
    places = [(".".join([where, *map(str, e["loc"])]).strip(".") or "input", e["msg"]) for e in exc.errors()]
    return "; ".join(error_line(place, msg) for place, msg in places)


def _try_again(exc: Exception) -> dict[str, Any]:
    """The database or broker away: the same event may be sent again (lines answered already, if
    any, come back in `turns` as `done`: leave those out, or send them with idempotency keys)."""
    return {"error": f"temporarily unavailable ({type(exc).__name__}); send the event again", "retry": True}


def _engine_died(exc: EngineDead) -> dict[str, Any]:
    """The engine died under the event (worker/inline.py, EngineDiedUnderCall: its unanswered turns
    under an idempotency key queued again for the replay, the others cancelled); `turns` as they
    stand. RunPod's `refresh_worker` replaces this worker with a fresh one (and so a fresh engine)."""
    from worker.inline import EngineDiedUnderCall

    answer: dict[str, Any] = {
        "error": f"{exc}; send the event again: its unanswered turns with an idempotency key are answered"
        " by the replay, those without one were cancelled",
        "retry": True,
        "refresh_worker": True,
    }
    if isinstance(exc, EngineDiedUnderCall):
        answer["turns"] = _shown(exc.views)
    return answer


def _answer_original(payload: dict[str, Any]) -> dict[str, Any]:
    """The original service's inline shape: persona, history and story stored (a replay stores
    nothing new), then the turn answered; {"error": ...} names the part and field of bad input."""
    from db.world import StoryBusy
    from services.original_request import HistoryMoved, chat_response, read_request, store_and_enqueue
    from worker.inline import answer_stored

    stored, turn_id = None, None
    try:
        request = read_request(payload, models=[settings.model])  # this worker answers it itself
        stored, turn_id = store_and_enqueue(request, send=False)
        views = answer_stored([turn_id])
        if len(views) != 1:  # the turn was removed before it could be read back
            return {"error": "the turn ran but could not be read back; send the request again"}
        answer = chat_response(views[0], stored) | _not_all_answered(views)
        return answer | _failed_for_good(views, answer)  # as the original raised
    # Another's story switch, a re-embed's swap, an erasure between the history's reads: nothing stored.
    except (StoryBusy, SpaceMoved, HistoryMoved) as exc:
        return {"error": str(exc), "retry": True}
    except EngineDead as exc:
        return _engine_died(exc)
    except _REFUSED as exc:
        return {"error": _named(exc) if isinstance(exc, ValidationError) else str(exc)}
    except _TRANSIENT as exc:
        # The turn may be answered already (the outage came after it): "send it again" would then
        # answer its line twice. Read once more; answered, it is returned.
        if stored is not None and turn_id is not None:
            from worker.inline import views_of

            try:
                answered = [view for view in views_of([turn_id]) if view.status.value == "done"]
            except Exception:  # still away: the answer says which turn to read
                logger.warning("could not read the answered turn %s again", turn_id, exc_info=True)
                answered = []
            if answered:
                return chat_response(answered[0], stored)
            return _try_again(exc) | {"turn": str(turn_id)}
        return _try_again(exc)


def main() -> None:
    """Serve with runpod when it is installed; otherwise answer one event given as an argument."""
    from core.logging import configure_logging
    from db.migrate import upgrade

    configure_logging()
    _migrated(upgrade)
    try:
        import runpod  # type: ignore[import-not-found]
    except ImportError:  # one event: read before the engine loads (a bad one waits for no model)
        if len(sys.argv) > 1:
            text = sys.argv[1]
        else:
            try:
                text = sys.stdin.buffer.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                print(f"serverless: the event is not UTF-8 text (byte {exc.start})", file=sys.stderr)
                raise SystemExit(2) from None
        raise SystemExit(answer_local(text, before=_load_engine)) from None
    _load_engine()
    runpod.serverless.start({"handler": handler})


def _migrated(upgrade: Callable[[], None]) -> None:
    """The schema brought up to date; a database away is one line naming its setting, for the
    platform to start the worker again (a psycopg traceback named a socket, not DATABASE_URL)."""
    from db.session import database_away

    try:
        upgrade()
    except Exception as exc:
        away = database_away(exc)
        if away is None:
            raise
        raise SystemExit(f"serverless: {away}") from None


def _load_engine() -> None:
    """Load the engine before taking events: one that cannot load (a GPU too small for the context,
    weights missing) stops this worker with one line, for its platform to replace, instead of
    answering each event as if its input were wrong, charging its turns, and loading again. The
    embedder too: one that cannot load here would be answered to each event as a refusal."""
    from worker.embedder import get_embedder
    from worker.pipeline import get_prompt_builder

    for what, load in (("embedder", get_embedder), ("engine", get_prompt_builder)):
        try:
            load()
        except Exception as exc:
            # A refusal of the embedder's setting is its one line; any other failure keeps its traceback.
            one_line = isinstance(exc, (EmbedderMismatch, BadEngineSetting))
            logger.error("the %s failed to load", what, exc_info=not one_line)
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise SystemExit(f"serverless: the {what} failed to load ({why})") from None


def answer_local(text: str, *, before: Callable[[], None] | None = None) -> int:
    """Answer one event given as JSON text (local mode): the answer on stdout; the exit status 0 when
    it was answered, 1 when the answer is an error, 2 when the event is not JSON (one line on stderr).
    `before`: called once the event reads as JSON (the engine's load)."""
    try:
        event = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a number too long, nested too deep
        print(f"serverless: the event is not JSON ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return 2
    if before is not None:
        before()
    answer = handler(event)
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    main()
