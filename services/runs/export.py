"""Export a run's replies and errors, in input order and keyed by custom_id, in one of two shapes:

- native: `{"custom_id", "turn_id", "status", "reply", "usage", "seed", "timings", "quality", "state"}`;
- openai: the OpenAI Batch API's output lines, `{"id", "custom_id", "response": {"status_code",
  "request_id", "body": chat.completion}, "error"}`, and its error lines with `response: null`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session

from db.models import Run, Turn, TurnStatus
from db.runs import iter_run_turns
from db.session import session_scope
from services.runs.control import require_run

ExportFormat = Literal["native", "openai"]

# OpenAI's error codes for requests a batch never ran.
_OPENAI_CODES = {"expired": "batch_expired"}


def export_run(
    ref: str, out_dir: Path, fmt: ExportFormat = "native", *, alternatives: bool = False
) -> tuple[Path, Path, int, int]:
    """Write <name>.results.jsonl and <name>.errors.jsonl into out_dir; (paths, results, errors).
    `alternatives`: native lines also carry the candidates that were not kept (best of n)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with session_scope() as session:
        run = require_run(session, ref)
        results_path = out_dir / f"{run.name}.results.jsonl"
        errors_path = out_dir / f"{run.name}.errors.jsonl"
        n_ok, n_err = write_outputs(session, run, results_path, errors_path, fmt, alternatives=alternatives)
    return results_path, errors_path, n_ok, n_err


def write_outputs(
    session: Session,
    run: Run,
    results_path: Path,
    errors_path: Path,
    fmt: ExportFormat,
    *,
    alternatives: bool = False,
) -> tuple[int, int]:
    """Stream the run's finished turns into the two files; (results written, errors written)."""
    ok_line, error_line = _FORMATS[fmt]
    if alternatives and fmt == "native":
        ok_line = _native_with_alternatives
    n_ok = n_err = 0
    with results_path.open("w", encoding="utf-8") as ok, errors_path.open("w", encoding="utf-8") as bad:
        for turn in iter_run_turns(session=session, run_id=run.id):
            if turn.status == TurnStatus.DONE:
                ok.write(json.dumps(ok_line(turn, run), ensure_ascii=False) + "\n")
                n_ok += 1
            elif turn.status in (TurnStatus.FAILED, TurnStatus.CANCELLED):
                bad.write(json.dumps(error_line(turn, run), ensure_ascii=False) + "\n")
                n_err += 1
    return n_ok, n_err


def _native_base(turn: Turn) -> dict[str, Any]:
    return {"custom_id": turn.custom_id, "turn_id": str(turn.id), "status": turn.status.value}


def _native_ok(turn: Turn, run: Run) -> dict[str, Any]:
    return _native_base(turn) | {
        "reply": turn.reply,
        "usage": turn.usage,
        "seed": turn.params.get("seed"),
        "timings": turn.timings,
        "quality": turn.quality,
        "state": turn.state,
        "adapter": turn.adapter,
    }


def _native_with_alternatives(turn: Turn, run: Run) -> dict[str, Any]:
    return _native_ok(turn, run) | {"alternatives": turn.alternatives or []}


def _native_error(turn: Turn, run: Run) -> dict[str, Any]:
    return _native_base(turn) | {"error": turn.error}


def _openai_ok(turn: Turn, run: Run) -> dict[str, Any]:
    usage = turn.usage or {}
    created = turn.finished_at or run.created_at
    # A line that asked for n choices gets every candidate, the kept (best) one first.
    others = (turn.alternatives or [])[: max(int(turn.params.get("choices", 1)) - 1, 0)]
    choices = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": turn.reply, "refusal": None},
            "logprobs": None,
            "finish_reason": usage.get("finish_reason") or "stop",
        }
    ] + [
        {
            "index": i,
            "message": {"role": "assistant", "content": alt["text"], "refusal": None},
            "logprobs": None,
            "finish_reason": alt.get("finish_reason") or "stop",
        }
        for i, alt in enumerate(others, start=1)
    ]
    completion = usage.get("completion_tokens", 0) + sum(a.get("completion_tokens", 0) for a in others)
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
            "timings": turn.timings,
        },
    }
    return {
        "id": f"batch_req_{turn.id.hex}",
        "custom_id": turn.custom_id,
        "response": {"status_code": 200, "request_id": str(turn.id), "body": body},
        "error": None,
    }


def _openai_error(turn: Turn, run: Run) -> dict[str, Any]:
    if turn.status == TurnStatus.CANCELLED:
        code = _OPENAI_CODES.get(turn.error_code or "", "batch_cancelled")
        message = turn.error or "the batch was cancelled before this request started"
    else:
        code, message = turn.error_code or "server_error", turn.error or "the request failed"
    return {
        "id": f"batch_req_{turn.id.hex}",
        "custom_id": turn.custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


_FORMATS: dict[str, tuple[Callable[[Turn, Run], dict[str, Any]], Callable[[Turn, Run], dict[str, Any]]]] = {
    "native": (_native_ok, _native_error),
    "openai": (_openai_ok, _openai_error),
}
