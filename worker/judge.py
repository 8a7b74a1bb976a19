"""After generation: each reply's mood update and quality scores, and (optionally) one regeneration
of replies below the quality bar. Everything here works from vectors the batch already embedded."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from core.settings import settings
from core.versioned_cache import VersionedCache
from db.models import Character
from db.retrieval import TurnContext
from db.turns import ClaimedTurn
from roleplay.mood import (
    Mood,
    MoodClassifier,
    MoodUpdate,
    chosen_emotion,
    player_silent,
    toward_member,
)
from roleplay.quality import Bar, persona_text, score
from structured.kinds import DATA_REPLIES
from worker import engine as engine_module
from worker.embedder import embed
from worker.engine import EngineDead, Generation, GenerationRequest
from worker.prompt import BuiltPrompt
from worker.structured import BadStructuredReply, read_reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    mood: MoodUpdate | None  # None for narrator turns: the narrator has no mood
    quality: dict[str, Any]
    seed: int | None = None  # the seed of the kept reply
    alternatives: list[dict[str, Any]] = field(default_factory=list)  # the candidates not kept


Judged = tuple[ClaimedTurn, Generation, Any, Verdict]


@cache
def mood_classifier() -> MoodClassifier:
    return MoodClassifier(embed)


# Persona vectors by character id, per version (a re-imported character is embedded again).
_persona_vectors: VersionedCache[np.ndarray] = VersionedCache(kept=10_000)


def _persona_vector(character: Character) -> np.ndarray:
    def make() -> np.ndarray:
        text = persona_text(character.description, character.personality, character.example_dialogues)
        return embed([text or character.name])[0]

    return _persona_vectors.get(character.id, character.cache_stamp, make)


def gate() -> Bar:
    """The quality bar from settings."""
    return Bar(
        min_persona=settings.quality_min_persona,
        max_repetition=settings.quality_max_repetition,
        echo_span_words=settings.quality_echo_span_words,
        echo_share=settings.quality_echo_share,
        loop_sentence_repeats=settings.quality_loop_sentence_repeats,
        instruction_span_units=settings.quality_instruction_span_units,
    )


def _own_lines(turn: ClaimedTurn, ctx: TurnContext, own_role: str) -> list[str]:
    """The speaker's own recent lines. In a group every member's line is an assistant line: only the
    speaking member's count as it repeating itself, not another member's words it picks up."""
    mine = turn.character.id if turn.group is not None and own_role == "assistant" else None
    return [
        line.content
        for line in ctx.recent
        if line.role == own_role and (mine is None or line.speaker_id == mine)
    ]


def _judge(
    turn: ClaimedTurn,
    gen: Generation,
    reply_vec: Any,
    message_vec: Any,
    ctx: TurnContext,
    prompt: BuiltPrompt,
    seed: int | None = None,
) -> Verdict:
    own_role = "narrator" if turn.speaker == "narrator" else "assistant"
    bar = gate()
    quality = score(
        reply=gen.text,
        message=turn.message,
        reply_vec=reply_vec,
        persona_vec=_persona_vector(turn.character),
        own_recent_lines=_own_lines(turn, ctx, own_role),
        finish_reason=gen.finish_reason,
        echo_sources=prompt.echo_sources,
        speaker=turn.speaker,
        char_name=turn.character.name,
        user_name=turn.player_name,
        bar=bar,
    )
    verdict = quality.as_json()
    # A json_schema, json_object, regex or choice reply is data, not a line of the character: its
    # scores are recorded, but the gate's text checks do not hold it and it does not move the mood.
    data_reply = (turn.params.get("response_format") or {}).get("type") in DATA_REPLIES
    verdict["below_bar"] = [] if data_reply else quality.below(bar)
    mood = None
    if turn.speaker != "narrator" and not data_reply:
        mood = mood_classifier().update(Mood(turn.emotion, turn.affinity), message_vec, reply_vec)
        if turn.answers is not None:  # another member spoke the line: the regard toward them moves
            other_id, other_name = turn.answers
            mood = toward_member(
                mood, character_id=other_id, name=other_name, regard=turn.regard.get(other_id, 0)
            )
        elif not turn.player_spoke:
            mood = player_silent(mood)
        if gen.emotion is not None:  # an NPC reply names its emotion: the model's choice moves the mood
            mood = chosen_emotion(mood, gen.emotion)
    return Verdict(mood, verdict, seed)


def rank(verdict: Verdict) -> tuple[int, float]:
    """Better first: fewer reasons below the bar, then closer to the persona, then less looping."""
    q = verdict.quality
    return (len(q["below_bar"]), -(q["persona"] - q["self_repetition"]))


Candidate = tuple[int, Generation]  # (seed, generation)


def judge_candidates(
    answered: Sequence[tuple[ClaimedTurn, list[Candidate]]],
    reply_vectors: Any,
    message_vectors: dict[uuid.UUID, Any],
    contexts: dict[uuid.UUID, TurnContext],
    prompts: dict[uuid.UUID, BuiltPrompt],
) -> list[Judged]:
    """Judge every candidate of every turn and keep each turn's best (see `rank`); the others are
    recorded as alternatives with their text, seed and scores. `reply_vectors` are the candidates'
    in order."""
    vectors = iter(reply_vectors)
    out: list[Judged] = []
    for turn, made in answered:
        judged = [
            (
                gen,
                vec,
                _judge(turn, gen, vec, message_vectors[turn.id], contexts[turn.id], prompts[turn.id], seed),
            )
            for (seed, gen), vec in zip(made, vectors, strict=False)
        ]
        best = min(range(len(judged)), key=lambda i: rank(judged[i][2]))
        gen, vec, verdict = judged[best]
        alternatives = [_alternative(g, v) for i, (g, _, v) in enumerate(judged) if i != best]
        quality = {**verdict.quality, "candidates": len(made)}
        out.append((turn, gen, vec, Verdict(verdict.mood, quality, verdict.seed, alternatives)))
    return out


def _greedy(request: GenerationRequest) -> bool:
    return request.temperature < 1e-5 or request.controls.get("top_k") == 1


def regenerate_weak(
    judged: list[Judged],
    requests: dict[uuid.UUID, GenerationRequest],
    message_vectors: dict[uuid.UUID, Any],
    contexts: dict[uuid.UUID, TurnContext],
    prompts: dict[uuid.UUID, BuiltPrompt],
    deadline: float | None = None,
    futures_of: dict[uuid.UUID, list[Any]] | None = None,
) -> list[Judged]:
    """Generate once more, with the seed after the turn's candidates', every reply still below the
    bar (one engine call for all of them); keep whichever of the two is below the bar for fewer
    reasons, preferring the first on a tie. A second reply still generating at `deadline` (the
    claim's hold, time.monotonic()) is cancelled, and a regeneration that raises keeps the first
    replies: the second look never costs the ones in hand (a dead engine still ends the batch).
    Each second request's future joins its turn's in `futures_of` (the batch's report.futures), so an
    engine death blames it and a hand-back cancels it, as for the first ones."""
    # Greedy sampling draws the same reply for every seed: a second one would be paid for and lose the
    # tie (review), as a greedy line is given one candidate (services/schemas.py::default_candidates).
    weak = [
        i
        for i, (turn, _, _, v) in enumerate(judged)
        if v.quality["below_bar"] and not _greedy(requests[turn.id])
    ]
    # Their adapters touched, those still in hand only (vLLM may have evicted one since the batch
    # loaded it: a request naming an evicted adapter reloads it inside an engine step, where a
    # failure kills the engine); a turn whose adapter is not in hand keeps its first reply.
    try:
        loaded = _loaded({requests[judged[i][0].id].adapter for i in weak} - {None})
    except EngineDead:
        raise
    except Exception:  # the second look never costs the replies in hand
        logger.warning("loading the weak replies' adapters failed; the first replies stand", exc_info=True)
        return judged
    weak = [i for i in weak if requests[judged[i][0].id].adapter in loaded | {None}]
    if not weak:
        return judged
    retry = [_next_seed(requests[judged[i][0].id], judged[i][0]) for i in weak]

    def track(futures: Sequence[Any]) -> None:
        if futures_of is not None:
            for i, future in zip(weak, futures, strict=True):
                futures_of.setdefault(judged[i][0].id, []).append(future)

    try:
        made = engine_module.generate(retry, deadline=deadline, on_submit=track)
        results = [_read(q, r) for q, r in zip(retry, made, strict=True)]
        fresh = [
            (i, r, q)
            for i, r, q in zip(weak, results, retry, strict=True)
            if isinstance(r, Generation) and r.text
        ]
        vectors: Any = embed([r.text for _, r, _ in fresh]) if fresh else []
    except EngineDead:
        raise
    except Exception:
        logger.warning(
            "regenerating %d weak replies failed; the first replies stand", len(weak), exc_info=True
        )
        return judged
    out = list(judged)
    for (i, gen, request), vec in zip(fresh, vectors, strict=True):
        turn, _, _, first = judged[i]
        try:
            second = _judge(
                turn, gen, vec, message_vectors[turn.id], contexts[turn.id], prompts[turn.id], request.seed
            )
        except Exception as exc:  # the first reply stands, judged; the second look is extra
            logger.warning("turn %s: judging its regenerated reply failed", turn.id, exc_info=True)
            failed = {"error": f"{type(exc).__name__}: {exc}", "second_seed": request.seed}
            out[i] = (
                turn,
                judged[i][1],
                judged[i][2],
                dataclasses.replace(first, quality={**first.quality, "regenerated": failed}),
            )
            continue
        keep_second = len(second.quality["below_bar"]) < len(first.quality["below_bar"])
        chosen = second if keep_second else first
        record = {
            **chosen.quality,
            "candidates": first.quality.get("candidates", 1),
            "regenerated": {
                "first": first.quality,
                "second": second.quality,
                "kept": "second" if keep_second else "first",
                "second_seed": request.seed,
            },
        }
        first_gen, first_vec = judged[i][1], judged[i][2]
        not_kept = (first_gen, first) if keep_second else (gen, second)
        alternatives = [*first.alternatives, _alternative(*not_kept)]
        if keep_second:
            out[i] = (turn, gen, vec, Verdict(second.mood, record, request.seed, alternatives))
        else:
            out[i] = (turn, first_gen, first_vec, Verdict(first.mood, record, first.seed, alternatives))
    return out


def _loaded(adapters: set[Any]) -> set[Any]:
    """The adapters in hand, touched (vLLM evicts the least recently used first): one this worker no
    longer counts as loaded is not loaded anew here (a load waits up to minutes, past the claim's
    hold), and its turns keep their first replies; EngineDead passed on."""
    loaded = set()
    for adapter in adapters:
        if not engine_module.adapter_in_hand(adapter):
            logger.info("no second try for the weak replies of %s: its adapter is not in hand", adapter.name)
            continue
        try:
            engine_module.load_adapter(adapter)
        except EngineDead:
            raise
        except Exception as exc:
            logger.warning("no second try for the weak replies of %s: %s", adapter.name, exc)
            continue
        loaded.add(adapter)
    return loaded


def _read(request: GenerationRequest, result: Generation | Exception) -> Generation | Exception:
    """A regenerated reply as the turn would keep it (a structured one that does not read is dropped)."""
    if not isinstance(result, Generation) or not result.text:
        return result
    try:
        return read_reply(request.reply_shape, result)
    except BadStructuredReply as exc:
        return exc
    except Exception as exc:  # as keep_candidates: one reply that cannot be read is dropped alone
        logger.warning("a regenerated structured reply could not be read", exc_info=True)
        return exc


def _alternative(gen: Generation, verdict: Verdict) -> dict[str, Any]:
    """A candidate that was not kept, as stored: what a writer (or an OpenAI choice) needs of it."""
    kept = {
        "text": gen.text,
        "seed": verdict.seed,
        "finish_reason": gen.finish_reason,
        "completion_tokens": gen.completion_tokens,
        "quality": verdict.quality,
    }
    return kept if gen.structured is None else {**kept, "structured": gen.structured}


def _next_seed(request: GenerationRequest, turn: ClaimedTurn) -> GenerationRequest:
    """The seed after the turn's n candidates' seeds."""
    return dataclasses.replace(request, seed=request.seed + turn.params.get("n", 1))
