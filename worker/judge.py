"""After generation: each reply's mood update and quality scores, and (optionally) one regeneration
of replies below the quality bar. Everything here works from vectors the batch already embedded."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from core.settings import settings
from db.models import Character
from db.retrieval import TurnContext
from db.turns import ClaimedTurn
from roleplay.mood import Mood, MoodClassifier, MoodUpdate
from roleplay.quality import persona_text, score
from worker import engine as engine_module
from worker.embedder import embed
from worker.engine import Generation, GenerationRequest


@dataclass(frozen=True)
class Verdict:
    mood: MoodUpdate | None  # None for narrator turns: the narrator has no mood
    quality: dict[str, Any]


Judged = tuple[ClaimedTurn, Generation, Any, Verdict]


@cache
def mood_classifier() -> MoodClassifier:
    return MoodClassifier(embed)


# {character id: (version, persona vector)}: a re-imported character is embedded again.
_persona_vectors: dict[int, tuple[int, np.ndarray]] = {}


def _persona_vector(character: Character) -> np.ndarray:
    cached = _persona_vectors.get(character.id)
    if cached is None or cached[0] != character.version:
        text = persona_text(character.description, character.personality, character.example_dialogues)
        cached = (character.version, embed([text or character.name])[0])
        _persona_vectors[character.id] = cached
    return cached[1]


def _judge(turn: ClaimedTurn, gen: Generation, reply_vec: Any, message_vec: Any, ctx: TurnContext) -> Verdict:
    own_role = "narrator" if turn.speaker == "narrator" else "assistant"
    quality = score(
        reply=gen.text,
        message=turn.message,
        reply_vec=reply_vec,
        persona_vec=_persona_vector(turn.character),
        own_recent_lines=[line.content for line in ctx.recent if line.role == own_role],
    )
    verdict = quality.as_json()
    verdict["below_bar"] = quality.below(settings.quality_min_persona, settings.quality_max_repetition)
    mood = None
    if turn.speaker != "narrator":
        mood = mood_classifier().update(Mood(turn.emotion, turn.affinity), message_vec, reply_vec)
    return Verdict(mood, verdict)


def judge_replies(
    answered: Sequence[tuple[ClaimedTurn, Generation]],
    reply_vectors: Any,
    message_vectors: dict[uuid.UUID, Any],
    contexts: dict[uuid.UUID, TurnContext],
) -> list[Judged]:
    return [
        (turn, gen, vec, _judge(turn, gen, vec, message_vectors[turn.id], contexts[turn.id]))
        for (turn, gen), vec in zip(answered, reply_vectors, strict=True)
    ]


def next_seed(request: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(request, seed=request.seed + 1)


def regenerate_weak(
    judged: list[Judged],
    requests: dict[uuid.UUID, GenerationRequest],
    message_vectors: dict[uuid.UUID, Any],
    contexts: dict[uuid.UUID, TurnContext],
) -> list[Judged]:
    """Generate once more, with the next seed, every reply below the bar (one engine call for all of
    them); keep whichever of the two is below the bar for fewer reasons, preferring the first on a tie."""
    weak = [i for i, (_, _, _, v) in enumerate(judged) if v.quality["below_bar"]]
    if not weak:
        return judged
    retry = [next_seed(requests[judged[i][0].id]) for i in weak]
    results = engine_module.generate(retry)
    fresh = [(i, r) for i, r in zip(weak, results, strict=True) if isinstance(r, Generation) and r.text]
    vectors: Any = embed([r.text for _, r in fresh]) if fresh else []
    out = list(judged)
    for (i, gen), vec in zip(fresh, vectors, strict=True):
        turn, _, _, first = judged[i]
        second = _judge(turn, gen, vec, message_vectors[turn.id], contexts[turn.id])
        keep_second = len(second.quality["below_bar"]) < len(first.quality["below_bar"])
        chosen = second if keep_second else first
        record = {
            **chosen.quality,
            "regenerated": {
                "first": first.quality,
                "second": second.quality,
                "kept": "second" if keep_second else "first",
                "second_seed": next_seed(requests[turn.id]).seed,
            },
        }
        out[i] = (
            (turn, gen, vec, Verdict(second.mood, record))
            if keep_second
            else (turn, judged[i][1], judged[i][2], Verdict(first.mood, record))
        )
    return out
