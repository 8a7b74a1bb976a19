"""Scene runs against the engine (`make bench`, section `scenes`).

Two- and three-character scenes of `exchanges` steps each are submitted as one run and answered by
an in-process worker. Each scene is a chain (a step is created when the one before is stored), so
what is measured is whether the chains keep the engine fed:

1. engine busy share over the scene run (from its first submission to its last stored step);
2. wall time of the scene run ÷ wall time of the same number of independent single turns, each
   the same speaker answering the line its step answered, with the same token budget and seed, all
   enqueued at once on the bulk lane (no chain at all). Completion lengths differ a little between
   the two, so the ratio per completion token is given too.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.settings import settings
from db.models import Character, Run, RunStatus, Scene, Turn, TurnStatus
from db.scenes import scene_transcript
from db.session import session_scope
from scripts.bench_engine import _idle_engine, in_process_worker
from scripts.bench_generation import _wait_finished

CASTS = (("elara", "luffy"), ("elara", "luffy", "haneul"), ("haneul", "elara"))
PREMISES = (
    "Closing time at the Gilded Stag; the last two guests will not leave.",
    "A rainy night at the city gate; a merchant wants in after curfew.",
    "Two old friends meet by chance at the harbour market.",
)


def _scene_file(scenes: int, exchanges: int, max_new_tokens: int, tag: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="mlchat-bench-scenes-")) / f"scenes-{tag}.jsonl"
    lines = [
        {
            "custom_id": f"scene-{i:05d}",
            "scene": {
                "participants": list(CASTS[i % len(CASTS)]),
                "premise": PREMISES[i % len(PREMISES)],
                "opening": {"speaker": CASTS[i % len(CASTS)][0], "text": "So. Here we are again."},
                "exchanges": exchanges,
                "params": {"max_new_tokens": max_new_tokens, "seed": i},
            },
        }
        for i in range(scenes)
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _timed(loop: Any, start: float, t0_wall: float, finished: list[Any]) -> dict[str, Any]:
    """Wall time to the last finished turn, and the engine's busy share over it."""
    end = start + (max(finished).timestamp() - t0_wall)
    busy_after, gaps = loop.busy.snapshot()
    wall = end - start
    window = [(max(a, start), min(b, end)) for a, b in gaps if b > start and a < end]
    idle = sorted((round((b - a) * 1000, 1) for a, b in window), reverse=True)
    return {
        "wall_s": wall,
        "busy_after": busy_after,
        "idle_gaps": len(idle),
        "largest_idle_gaps_ms": idle[:5],
    }


def _scene_run(loop: Any, loaded: Any, scenes: int, exchanges: int, max_new_tokens: int, tag: str) -> dict:
    from services.runs import submit_run

    path = _scene_file(scenes, exchanges, max_new_tokens, tag)
    _idle_engine(loop, loaded.llm)
    busy_before, _ = loop.busy.snapshot()
    start, t0_wall = time.perf_counter(), time.time()
    submitted = submit_run(path, name=f"bench-scenes-{tag}")
    deadline = time.monotonic() + 7200
    while time.monotonic() < deadline:
        with session_scope() as session:
            status = session.scalar(select(Run.status).where(Run.id == submitted.id))
        if status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            break
        time.sleep(0.5)
    with session_scope() as session:
        rows = session.execute(
            select(Turn.finished_at, Turn.usage, Turn.status).where(Turn.run_id == submitted.id)
        ).all()
    done = [r for r in rows if r.status == TurnStatus.DONE]
    if len(done) != scenes * exchanges:
        raise RuntimeError(f"only {len(done)} of {scenes * exchanges} scene steps were answered")
    while loop.inside():
        time.sleep(0.05)
    timed = _timed(loop, start, t0_wall, [r.finished_at for r in done])
    busy = min(timed.pop("busy_after") - busy_before, timed["wall_s"])
    return timed | {
        "run_id": submitted.id,
        "busy_share": busy / timed["wall_s"],
        "completion_tokens": sum(r.usage["completion_tokens"] for r in done),
        "mean_prompt_tokens": statistics.mean(r.usage["prompt_tokens"] for r in done),
    }


def _single_requests(run_id: uuid.UUID, tag: str, max_new_tokens: int) -> list[dict[str, Any]]:
    """Each scene step as an independent turn: its speaker answering the line before it."""
    requests = []
    with session_scope() as session:
        for scene in session.scalars(select(Scene).where(Scene.run_id == run_id).order_by(Scene.id)):
            lines = scene_transcript(session=session, scene_id=scene.id)
            steps = session.execute(
                select(Turn.scene_step, Character.slug, Turn.params)
                .join(Character, Character.id == Turn.character_id)
                .where(Turn.scene_id == scene.id)
            ).all()
            for step, slug, params in steps:
                before = next(x for x in reversed(lines) if x.step is None or x.step < step)
                requests.append(
                    {
                        "conversation": f"bench-single-{tag}-{scene.id}-{step}",
                        "character": slug,
                        "message": before.text or "...",
                        "params": {
                            "max_new_tokens": max_new_tokens,
                            "seed": params["seed"],
                            "n": params["n"],
                        },
                    }
                )
    return requests


def _singles(loop: Any, loaded: Any, requests: list[dict[str, Any]]) -> dict[str, Any]:
    from services.producer import enqueue_turns

    _idle_engine(loop, loaded.llm)
    busy_before, _ = loop.busy.snapshot()
    start, t0_wall = time.perf_counter(), time.time()
    ids = enqueue_turns(requests, lane="bulk")
    rows = _wait_finished(ids, timeout=7200)
    finished = [r.finished_at for r in rows if r.status == TurnStatus.DONE]
    if len(finished) != len(ids):
        raise RuntimeError(f"only {len(finished)} of {len(ids)} single turns were answered")
    while loop.inside():
        time.sleep(0.05)
    timed = _timed(loop, start, t0_wall, finished)
    busy = min(timed.pop("busy_after") - busy_before, timed["wall_s"])
    with session_scope() as session:
        usage = session.scalars(select(Turn.usage).where(Turn.id.in_(ids))).all()
    return timed | {
        "busy_share": busy / timed["wall_s"],
        "completion_tokens": sum(u["completion_tokens"] for u in usage),
    }


def measure_scenes(scenes: int = 240, exchanges: int = 6, max_new_tokens: int = 32) -> dict[str, Any]:
    """Run a scene run and its independent-turn baseline; return the figures."""
    tag = uuid.uuid4().hex[:6]
    with in_process_worker() as (loaded, loop):
        _scene_run(loop, loaded, 4, 2, max_new_tokens, tag + "w")  # untimed: first shapes pay once
        run = _scene_run(loop, loaded, scenes, exchanges, max_new_tokens, tag)
        single = _singles(loop, loaded, _single_requests(run["run_id"], tag, max_new_tokens))
    ratio = run["wall_s"] / single["wall_s"]
    per_token = (run["wall_s"] / run["completion_tokens"]) / (single["wall_s"] / single["completion_tokens"])
    return {
        "model": settings.model,
        "scenes": scenes,
        "exchanges": exchanges,
        "steps": scenes * exchanges,
        "casts": ["+".join(c) for c in CASTS],
        "max_new_tokens": max_new_tokens,
        "mean_prompt_tokens": round(run["mean_prompt_tokens"], 1),
        "busy_share": {
            "value": round(run["busy_share"], 4),
            "target": 0.95,
            "wall_s": round(run["wall_s"], 1),
            "idle_gaps": run["idle_gaps"],
            "largest_idle_gaps_ms": run["largest_idle_gaps_ms"],
        },
        "vs_independent_turns": {
            "scene_run_s": round(run["wall_s"], 1),
            "independent_turns_s": round(single["wall_s"], 1),
            "ratio": round(ratio, 3),
            "ratio_per_completion_token": round(per_token, 3),
            "target": 1.15,
            "completion_tokens": {
                "scenes": run["completion_tokens"],
                "independent": single["completion_tokens"],
            },
            "independent_busy_share": round(single["busy_share"], 4),
        },
    }
