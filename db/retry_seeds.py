"""The params a failed turn is queued again with: another seed when its failure is its seeded reply's
own (empty, or not reading as its format), which the same seed would write again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Text, and_, case, cast, func, literal
from sqlalchemy.dialects.postgresql import ARRAY

from db.models import Turn, TurnErrorCode

# Failures the reply itself made: a retry under the same seed and prompt writes the same reply.
SEEDED_FAILURES = (
    TurnErrorCode.EMPTY_REPLY,
    TurnErrorCode.INVALID_STRUCTURED_REPLY,
    TurnErrorCode.STRUCTURED_REPLY_CUT,
)
SEED_STEP = 1_000_003  # a prime: a step's seeds over retries never meet the next steps' (seed + n)


def retried_params() -> Any:
    """`Turn.params` for an UPDATE that queues failed turns again: the seed moved on by SEED_STEP
    (within 2^31) for a seeded turn that failed with one of SEEDED_FAILURES, else as they are."""
    seed = cast(Turn.params["seed"].astext, BigInteger)
    within = seed % 2**31 + SEED_STEP  # first within 2^31: a seed near 2^63 plus the step is past bigint
    moved = func.jsonb_set(Turn.params, cast(literal("{seed}"), ARRAY(Text)), func.to_jsonb(within % 2**31))
    seeded = and_(
        Turn.error_code.in_([code.value for code in SEEDED_FAILURES]),
        func.jsonb_typeof(Turn.params["seed"]) == "number",
    )
    return case((seeded, moved), else_=Turn.params)
