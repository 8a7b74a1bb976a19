"""A run's scene lines stored: for each, a fresh group conversation, its members, the scene and its
first step's turn (unsent: the submission sends and stamps it, as it does a line's turn)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.bulk_turns import RunNotAccepting
from db.models import Run, RunStatus, Scene, Turn
from db.scenes import NewMember, NewScene, SceneConflict, create_scene
from db.world import find_characters, upsert_conversations
from scenes.spec import SceneSpec
from services.schemas import default_candidates


def scene_of(
    spec: SceneSpec, *, conversation_id: int, ids: dict[str, int], model: str, tenant: str, candidates: int
) -> NewScene:
    """The scene a validated spec describes, for a conversation and the participants' character ids."""
    params = spec.params.resolved()
    if spec.params.n is None:
        params["n"] = default_candidates(params, candidates)
    return NewScene(
        conversation_id=conversation_id,
        members=[
            NewMember(
                ids[p.character],
                position,
                p.talkativeness,
                p.muted,
                {ids[other]: affinity for other, affinity in p.moods.items()},
            )
            for position, p in enumerate(spec.participants)
        ],
        strategy=spec.strategy,
        exchanges=spec.exchanges,
        model=model,
        tenant=tenant,
        params=params,
        seed=int(params["seed"]),
        premise=spec.premise,
        rules=[r.model_dump() for r in spec.rules],
        allow_repeat=spec.allow_repeat,
        end_phrase=spec.end_phrase,
        opening=(ids[spec.opening.speaker], spec.opening.text) if spec.opening else None,
        narrator=spec.narrator_json(),
    )


def insert_run_scenes(
    *,
    session: Session,
    run_id: uuid.UUID,
    lines: Sequence[tuple[str, str, SceneSpec]],
    model: str,
    tenant: str,
    candidates: int,
) -> list[uuid.UUID]:
    """Store the scenes of (custom_id, conversation external id, spec) lines not stored yet; returns
    their first steps' turn ids (unsent). Raises RunNotAccepting once the run left validating."""
    if not lines:
        return []
    status = session.scalar(select(Run.status).where(Run.id == run_id).with_for_update(read=True))
    if status != RunStatus.VALIDATING:
        raise RunNotAccepting(f"run is {status}")
    slugs = sorted({s for _, _, spec in lines for s in spec.slugs()})
    ids = find_characters(session=session, slugs=slugs, tenant=tenant)
    for custom_id, _, spec in lines:  # a character deleted since the file was validated
        if gone := [slug for slug in spec.slugs() if slug not in ids]:
            raise SceneConflict(
                f"scene {custom_id!r}: participants: no character {gone[0]!r} (deleted since validation)"
            )
    lead = {conv: ids[spec.participants[0].character] for _, conv, spec in lines}
    made: set[str] = set()
    convs = upsert_conversations(
        session=session,
        rows=[
            {"external_id": conv, "character_id": lead[conv], "player_name": spec.player_name}
            for _, conv, spec in lines
        ],
        tenant=tenant,
        created=made,
    )
    _refuse_conversations_of_others(
        session, lines, {conv: convs[conv][0] for _, conv, _ in lines if conv not in made}
    )
    created: list[int] = []
    for custom_id, conv, spec in lines:
        scene = scene_of(
            spec, conversation_id=convs[conv][0], ids=ids, model=model, tenant=tenant, candidates=candidates
        )
        scene_id, new = create_scene(
            session=session,
            scene=NewScene(**{**scene.__dict__, "run_id": run_id, "custom_id": custom_id, "sent": False}),
        )
        if new:
            created.append(scene_id)
    return list(
        session.scalars(
            select(Turn.id).where(Turn.scene_id.in_(created), Turn.scene_step == 1).order_by(Turn.number)
        )
    )


def _refuse_conversations_of_others(
    session: Session, lines: Sequence[tuple[str, str, SceneSpec]], found: dict[str, int]
) -> None:
    """A scene line's conversation is its own, made for it by this submission's upsert (the lines of
    a scene stored already are not here: a resumed submission skips them). One `found` there, made
    by someone else (a player's conversation, a history import's, another run's plain line under
    that name, even one holding nothing yet: its lead and player are another's), is refused, never
    made a group; one holding a scene is create_scene's refusal, naming that."""
    if not found:
        return
    grouped = set(
        session.scalars(select(Scene.conversation_id).where(Scene.conversation_id.in_(list(found.values()))))
    )
    for custom_id, conv, _ in lines:
        if conv in found and found[conv] not in grouped:
            raise SceneConflict(
                f"scene {custom_id!r}: its conversation {conv!r} exists already (a player's, or another "
                "run's line); give the run another name (or the line another custom_id)"
            )


def stored_scene_ids(*, session: Session, run_id: uuid.UUID) -> set[str]:
    """The custom_ids of the run's scenes stored already (a resumed submission skips them)."""
    return {c for c in session.scalars(select(Scene.custom_id).where(Scene.run_id == run_id)) if c}
