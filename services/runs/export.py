"""Export a run's replies and errors, in input order and keyed by custom_id, in one of two shapes:

- native: `{"custom_id", "turn_id", "status", "reply", "usage", "seed", "timings", "quality", "state"}`,
  and `structured` for a structured reply (an NPC reply's say, emotion and action);
- openai: the OpenAI Batch API's output lines, `{"id", "custom_id", "response": {"status_code",
  "request_id", "body": chat.completion}, "error": null}`; a request that ran (or was refused) and
  failed has `response: {"status_code": 4xx/5xx, "body": {"error": {...}}}` as OpenAI writes it, and
  only a request that never ran (cancelled, expired) has `response: null` and `error`.

Well-formed requests refused by policy at submission are not turns: they are the run's `refused`
list, written to the error file after the turns.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session

from core.json_lines import json_line
from core.whole_files import replaced_whole
from db.models import Run, RunStatus, Turn, TurnErrorCode, TurnStatus
from db.runs import iter_run_turns, run_custom_ids, run_refusals
from db.session import given_or_own, session_scope
from services.producer import tenant_timings
from services.runs.control import export_stem, require_whole_run, still_whole
from services.runs.openai_lines import failure_status, message_content, paid_completion_tokens

ExportFormat = Literal["native", "openai"]

# OpenAI's error codes for requests a batch never ran.
_OPENAI_CODES = {"expired": "batch_expired"}


def export_run(
    ref: str, out_dir: Path, fmt: ExportFormat = "native", *, alternatives: bool = False
) -> tuple[Path, Path, int, int]:
    """Write <name>.results.jsonl and <name>.errors.jsonl into out_dir; (paths, results, errors).
    `alternatives`: native lines also carry the candidates that were not kept (best of n). Each chunk
    of turns is read in a transaction of its own, and the two files are put in place whole at the end
    (an export that stops leaves the earlier one as it was)."""
    with session_scope() as session:
        run = require_whole_run(session, ref)
        session.expunge(run)
    out_dir.mkdir(parents=True, exist_ok=True)  # once the run is found: a mistyped name leaves no folder
    results_path = out_dir / f"{export_stem(run.name)}.results.jsonl"
    errors_path = out_dir / f"{export_stem(run.name)}.errors.jsonl"
    with replaced_whole(results_path, errors_path) as (results_part, errors_part):
        n_ok, n_err = write_outputs(None, run, results_part, errors_part, fmt, alternatives=alternatives)
        still_whole(run)
    return results_path, errors_path, n_ok, n_err


def write_outputs(
    session: Session | None,
    run: Run,
    results_path: Path,
    errors_path: Path,
    fmt: ExportFormat,
    *,
    alternatives: bool = False,
) -> tuple[int, int]:
    """Stream the run's finished turns into the two files; (results written, errors written).
    `session` None: each read in a transaction of its own."""
    ok_line, error_line = _FORMATS[fmt]
    if alternatives and fmt == "native":
        ok_line = _native_with_alternatives
    n_ok = n_err = 0
    with results_path.open("w", encoding="utf-8") as ok, errors_path.open("w", encoding="utf-8") as bad:
        for turn in iter_run_turns(session=session, run_id=run.id):
            if turn.status == TurnStatus.DONE:
                ok.write(json_line(ok_line(turn, run)))
                n_ok += 1
            elif turn.status in (TurnStatus.FAILED, TurnStatus.CANCELLED):
                bad.write(json_line(error_line(turn, run)))
                n_err += 1
        refused_line = _openai_refused if fmt == "openai" else _native_refused
        with given_or_own(session) as reading:
            refusals = run_refusals(session=reading, run_id=run.id)
        for refusal in refusals:
            bad.write(json_line(refused_line(refusal, run)))
            n_err += 1
    return n_ok, n_err


def write_never_stored(
    session: Session, run_id: uuid.UUID, *, expired: bool, input_path: Path, errors_path: Path
) -> int:
    """Append to a batch's error file a line for each request of its input file that it neither
    stored nor refused (it expired or was cancelled before its submission reached that line, or
    before it began): OpenAI's `batch_expired` or `batch_cancelled`, `response: null`; how many. A
    line that is not a JSON object with a string custom_id names no request and is left out."""
    from services.runs.scene_lines import stored_scene_ids
    from services.runs.validate import iter_lines

    seen = run_custom_ids(session=session, run_id=run_id) | stored_scene_ids(session=session, run_id=run_id)
    seen |= {r["custom_id"] for r in run_refusals(session=session, run_id=run_id)}
    error = {
        "code": "batch_expired" if expired else "batch_cancelled",
        "message": "the batch expired before this request was sent"
        if expired
        else "the batch was cancelled before this request was sent",
    }
    written = 0
    with errors_path.open("a", encoding="utf-8") as bad:
        for number, text in iter_lines(input_path):
            try:
                custom_id = json.loads(text).get("custom_id") if isinstance(text, str) else None
            except (ValueError, RecursionError, AttributeError):  # not JSON, or not an object
                continue
            if not isinstance(custom_id, str) or custom_id in seen:
                continue
            seen.add(custom_id)
            line = {"id": f"batch_req_{run_id.hex}-{number}", "custom_id": custom_id, "response": None}
            bad.write(json_line(line | {"error": error}))
            written += 1
    return written


def _native_refused(refusal: dict[str, Any], run: Run) -> dict[str, Any]:
    return {
        "custom_id": refusal["custom_id"],
        "turn_id": None,
        "status": "refused",
        "line": refusal["line"],
        "error": refusal["message"],
        "error_code": "invalid_request",
        "param": refusal.get("param"),
    }


def _openai_refused(refusal: dict[str, Any], run: Run) -> dict[str, Any]:
    request_id = f"{run.id.hex}-{refusal['line']}"
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": refusal["custom_id"],
        "response": _error_response(400, request_id, "invalid_request", refusal["message"], refusal["param"]),
        "error": None,
    }


def _error_response(
    status: int, request_id: str, code: str, message: str, param: str | None
) -> dict[str, Any]:
    kind = "invalid_request_error" if status == 400 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return {"status_code": status, "request_id": request_id, "body": {"error": error}}


def _native_base(turn: Turn) -> dict[str, Any]:
    return {"custom_id": turn.custom_id, "turn_id": str(turn.id), "status": turn.status.value}


def _native_ok(turn: Turn, run: Run) -> dict[str, Any]:
    return (
        _native_base(turn)
        | {
            "reply": turn.reply,
            "usage": turn.usage,
            "seed": turn.params.get("seed"),
            "timings": tenant_timings(turn.timings),
            "quality": turn.quality,
            "state": turn.state,
            "adapter": turn.adapter,
        }
        | ({"structured": turn.structured} if turn.structured is not None else {})
    )


def _native_with_alternatives(turn: Turn, run: Run) -> dict[str, Any]:
    return _native_ok(turn, run) | {"alternatives": turn.alternatives or []}


def _native_error(turn: Turn, run: Run) -> dict[str, Any]:
    # The code for machines beside the text for people, as GET /v1/turns gives them (review, stop 75:
    # a program told prompt_too_long from engine_error only by parsing English); null when cancelled.
    return _native_base(turn) | {"error": turn.error, "error_code": turn.error_code}


def _openai_ok(turn: Turn, run: Run) -> dict[str, Any]:
    usage = turn.usage or {}
    created = turn.finished_at or run.created_at
    # A line that asked for n choices gets every candidate, the kept (best) one first.
    others = (turn.alternatives or [])[: max(int(turn.params.get("choices", 1)) - 1, 0)]
    choices = [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": message_content(turn.reply, turn.structured, turn.params),
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": usage.get("finish_reason") or "stop",
        }
    ] + [
        {
            "index": i,
            "message": {
                "role": "assistant",
                "content": message_content(alt["text"], alt.get("structured"), turn.params),
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": alt.get("finish_reason") or "stop",
        }
        for i, alt in enumerate(others, start=1)
    ]
    completion = paid_completion_tokens(usage, turn.alternatives)
    body = {
        "id": f"chatcmpl-{turn.id.hex}",
        "object": "chat.completion",
        "created": int(created.timestamp()),
        "model": run.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": completion,
            "total_tokens": usage.get("prompt_tokens", 0) + completion,
        },
        "system_fingerprint": None,
        # What OpenAI's shape has no place for: the seed that reproduces the reply, its scores, timings.
        "mlchat": {
            "turn_id": str(turn.id),
            "seed": turn.params.get("seed"),
            "quality": turn.quality,
            "timings": tenant_timings(turn.timings),
        },
    }
    return {
        "id": f"batch_req_{turn.id.hex}",
        "custom_id": turn.custom_id,
        "response": {"status_code": 200, "request_id": str(turn.id), "body": body},
        "error": None,
    }


def _openai_error(turn: Turn, run: Run) -> dict[str, Any]:
    line = {"id": f"batch_req_{turn.id.hex}", "custom_id": turn.custom_id}
    if turn.status == TurnStatus.CANCELLED:  # never ran
        if turn_cancelled_alone(turn, run):
            # This request alone (DELETE /v1/turns/{id}), before the batch ended if it did: not its end.
            code, message = "request_cancelled", "this request was cancelled before it was answered"
        else:
            code = _OPENAI_CODES.get(turn.error_code or "", "batch_cancelled")
            message = turn.error or "the batch was cancelled before this request started"
        return line | {"response": None, "error": {"code": code, "message": message}}
    code, message = turn.error_code or "server_error", turn.error or "the request failed"
    status = failure_status(code, 500)
    return line | {"response": _error_response(status, str(turn.id), code, message, None), "error": None}


def cancelled_alone(run: Run) -> bool:
    """Whether the run's cancelled requests were each cancelled alone: it was neither cancelled nor
    expired, nor failed (whose leftovers its cancel ends)."""
    return run.cancel_reason is None and run.status != RunStatus.FAILED


def turn_cancelled_alone(turn: Turn, run: Run) -> bool:
    """Whether this cancelled request was cancelled alone: its run was not stopped, or it was
    cancelled before the run's cancel or expiry began (or before its failure), whose own statement
    stamps the turns it ends with the very time it stamps the run (review, stop 76: a request
    cancelled alone in a batch that later expired was written as the batch's `batch_cancelled`)."""
    if turn.error_code == TurnErrorCode.EXPIRED:
        return False
    if cancelled_alone(run):
        return True
    stopped = run.cancelling_at if run.cancel_reason is not None else run.finished_at
    return stopped is not None and turn.finished_at is not None and turn.finished_at < stopped


_FORMATS: dict[str, tuple[Callable[[Turn, Run], dict[str, Any]], Callable[[Turn, Run], dict[str, Any]]]] = {
    "native": (_native_ok, _native_error),
    "openai": (_openai_ok, _openai_error),
}
