"""Export a run: <name>.results.jsonl (input order, keyed by custom_id) and <name>.errors.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from db.models import TurnStatus
from db.runs import iter_run_turns
from db.session import session_scope
from services.runs.control import require_run


def export_run(ref: str, out_dir: Path) -> tuple[Path, Path, int, int]:
    """Write <name>.results.jsonl (input order, keyed by custom_id) and <name>.errors.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with session_scope() as session:
        run = require_run(session, ref)
        results_path = out_dir / f"{run.name}.results.jsonl"
        errors_path = out_dir / f"{run.name}.errors.jsonl"
        n_ok = n_err = 0
        with results_path.open("w", encoding="utf-8") as ok, errors_path.open("w", encoding="utf-8") as bad:
            for turn in iter_run_turns(session=session, run_id=run.id):
                record: dict[str, Any] = {
                    "custom_id": turn.custom_id,
                    "turn_id": str(turn.id),
                    "status": turn.status.value,
                }
                if turn.status == TurnStatus.DONE:
                    record |= {
                        "reply": turn.reply,
                        "usage": turn.usage,
                        "seed": turn.params.get("seed"),
                        "timings": turn.timings,
                        "quality": turn.quality,
                        "state": turn.state,
                    }
                    ok.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n_ok += 1
                elif turn.status in (TurnStatus.FAILED, TurnStatus.CANCELLED):
                    bad.write(json.dumps(record | {"error": turn.error}, ensure_ascii=False) + "\n")
                    n_err += 1
    return results_path, errors_path, n_ok, n_err
