"""A run's answered lines built straight through db/ (no engine): what the desk's tests review."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from db.runs import create_run, finish_submission
from db.session import session_scope
from db.turns import TurnOutcome, claim_turns, store_replies
from db.world import upsert_character
from services.producer import submit_turns

VEC = list(np.full(384, 0.05, dtype=np.float32))


def quality(persona: float, *reasons: str) -> dict[str, Any]:
    """A stored verdict as the worker writes it, with these below-bar reasons."""
    return {
        "persona": persona,
        "repetition": 0.0,
        "self_repetition": 0.0,
        "language_match": True,
        "message_script": "Latin",
        "reply_script": "Latin",
        "echo": None,
        "truncated": False,
        "role_break": None,
        "sentence_repeats": 1,
        "instruction_echo": None,
        "below_bar": list(reasons),
    }


@dataclass(frozen=True)
class Spec:
    """One line: the player's message, the kept reply and its verdict, the other candidates."""

    message: str
    reply: str
    verdict: dict[str, Any]
    candidates: tuple[tuple[str, dict[str, Any]], ...] = ()
    character: str = "elara"
    prompt: str = "<|im_start|>system\nYou are Elara.<|im_end|>"
    context: dict[str, Any] | None = None


def character(slug: str, name: str, description: str = "A test character.") -> None:
    """A character for desk tests (the name and card fields as given, markup included)."""
    with session_scope() as s:
        upsert_character(session=s, slug=slug, fields={"name": name, "description": description})


def queue_run(
    tenant: str, specs: list[Spec], name: str | None = None, *, batch_key: str | None = None
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A submitted run of `tenant` whose lines (custom ids line-1, line-2, …) are queued, not yet
    answered; with `batch_key` (an API key's id) an OpenAI batch of that key."""
    name = name or f"desk-{uuid.uuid4().hex[:10]}"
    with session_scope() as s:
        run, _ = create_run(
            session=s,
            name=name,
            model="smollm2-135m",
            file_hash=uuid.uuid4().hex,
            total=len(specs),
            fields={"tenant": tenant}
            | ({"input_file_id": f"file-{uuid.uuid4().hex}", "api_key": batch_key} if batch_key else {}),
        )
        run_id = run.id
    requests = [
        {
            "conversation": f"desk-{uuid.uuid4().hex[:10]}",
            "character": spec.character,
            "message": spec.message,
        }
        for spec in specs
    ]
    stored = submit_turns(
        requests,
        send=False,
        lane="bulk",
        run_id=run_id,
        custom_ids=[f"line-{i}" for i in range(1, len(specs) + 1)],
        tenant=tenant,
    )
    ids = [t.id for t in stored]
    with session_scope() as s:
        finish_submission(session=s, run_id=run_id)
    return run_id, ids


def build_run(
    tenant: str, specs: list[Spec], name: str | None = None, *, batch_key: str | None = None
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A finished run of `tenant` holding these answered lines (custom ids line-1, line-2, …); with
    `batch_key` (an API key's id) an OpenAI batch of that key, left finalizing (its files unwritten)."""
    run_id, ids = queue_run(tenant, specs, name, batch_key=batch_key)
    answer(ids, specs)
    return run_id, ids


def answer(ids: list[uuid.UUID], specs: list[Spec]) -> None:
    """Store the specs' replies for these queued lines, as a worker would."""
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=ids, lease_s=60, max_attempts=3)
        by_id = {t.id: t for t in claim.claimed}
        outcomes = [
            TurnOutcome(
                turn_id=turn_id,
                conversation_id=by_id[turn_id].conversation_id,
                user_message=spec.message,
                user_embedding=VEC,
                reply=spec.reply,
                reply_embedding=VEC,
                prompt=spec.prompt,
                context=spec.context or {},
                usage={
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "total_tokens": 15,
                    "finish_reason": "stop",
                },
                timings={},
                params={**by_id[turn_id].params, "seed": 100},
                state={
                    "before": {"emotion": "neutral", "affinity": 0},
                    "after": {"emotion": "joy", "affinity": 3},
                },
                quality={**spec.verdict, "candidates": 1 + len(spec.candidates)},
                alternatives=[
                    {
                        "text": text,
                        "seed": 101 + i,
                        "finish_reason": "stop",
                        "completion_tokens": 7,
                        "quality": q,
                    }
                    for i, (text, q) in enumerate(spec.candidates)
                ]
                or None,
            )
            for turn_id, spec in zip(ids, specs, strict=True)
        ]
        assert len(store_replies(session=s, token=claim.token, outcomes=outcomes)) == len(specs)


def build_scene_run(
    tenant: str, participants: list[str], replies: list[str], *, scenes: int = 1
) -> tuple[uuid.UUID, int, list[uuid.UUID]]:
    """A run of `tenant` holding `scenes` scenes (custom ids "scene-1", …) of these participants'
    slugs, the first one's steps answered with `replies` in order, as a worker would; (run id, the
    first scene's id, its step turn ids)."""
    from sqlalchemy import select

    from db.models import Scene, Turn, TurnStatus
    from db.scenes import pop_new_steps
    from scenes.spec import SceneSpec
    from services.runs.scene_lines import insert_run_scenes

    with session_scope() as s:
        run, _ = create_run(
            session=s,
            name=f"desk-scenes-{uuid.uuid4().hex[:8]}",
            model="smollm2-135m",
            file_hash=uuid.uuid4().hex,
            total=scenes,
            fields={"tenant": tenant},
        )
        run_id = run.id
        spec = SceneSpec.model_validate(
            {"participants": participants, "premise": "Rain on the gate.", "exchanges": len(replies)}
        )
        insert_run_scenes(
            session=s,
            run_id=run_id,
            lines=[(f"scene-{i + 1}", f"desk-scene-{uuid.uuid4().hex}", spec) for i in range(scenes)],
            model="smollm2-135m",
            tenant=tenant,
            candidates=1,
        )
    with session_scope() as s:
        finish_submission(session=s, run_id=run_id)
        scene_id = int(s.scalar(select(Scene.id).where(Scene.run_id == run_id, Scene.custom_id == "scene-1")))
    steps = []
    for reply in replies:
        with session_scope() as s:
            step = s.scalar(
                select(Turn.id).where(Turn.scene_id == scene_id, Turn.status == TurnStatus.QUEUED)
            )
            claim = claim_turns(session=s, turn_ids=[step], lease_s=60, max_attempts=3)
            turn = claim.claimed[0]
            outcome = TurnOutcome(
                turn_id=turn.id,
                conversation_id=turn.conversation_id,
                user_message=turn.message,
                user_embedding=None,
                reply=reply,
                reply_embedding=VEC,
                prompt="",
                context={},
                usage={
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "total_tokens": 15,
                    "finish_reason": "stop",
                },
                timings={},
                params={**turn.params, "seed": 100},
                state={
                    "before": {"emotion": "neutral", "affinity": 0},
                    "after": {"emotion": "joy", "affinity": 2},
                },
                quality={**quality(0.4), "candidates": 1},
                speaker_id=turn.character.id,
                speaker_name=turn.character.name,
            )
            assert store_replies(session=s, token=claim.token, outcomes=[outcome]) == [turn.id]
            pop_new_steps(s)
            steps.append(turn.id)
    return run_id, scene_id, steps
