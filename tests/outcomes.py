"""A claimed turn's reply as a worker would store it (no vectors), for tests that store replies
themselves under a claim's token: another worker, another call."""

from __future__ import annotations

from db.turns import ClaimedTurn, TurnOutcome


def outcome_of(turn: ClaimedTurn, reply: str | None = None) -> TurnOutcome:
    return TurnOutcome(
        turn_id=turn.id,
        conversation_id=turn.conversation_id,
        user_message=turn.message,
        user_embedding=None,
        reply=reply if reply is not None else f"Answer to {turn.message}",
        reply_embedding=None,
        prompt="",
        context={},
        usage={},
        timings={},
        params=turn.params,
    )
