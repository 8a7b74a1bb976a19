"""Benchmark: structured replies (guided decoding) on the bundled model, through the real pipeline
(worker/inline.py: claim, retrieve, prompt, engine, read the reply, gate, store), in one process:

1. validity: sample lines answered with an action declaration (give_item, attack, follow, open_shop):
   the share whose stored reply parses and validates against its schema (a failed turn counts as
   invalid), and the action and emotion distributions;
2. cost: the same turns with the action schema ÷ without (`cost_ratio`), and a half-structured,
   half-free batch ÷ all free (`mixed_ratio`), wall time each, with the tokens generated;
3. the grammar: xgrammar's compile time for the action schema with the model's tokenizer, first and
   again (vLLM's xgrammar backend keeps compiled grammars in the compiler's cache, keyed by schema).
"""

from __future__ import annotations

import os
from pathlib import Path

if __name__ == "__main__":
    # Run on its own: the benchmark's state (bench.py's), set before core.settings reads it.
    os.environ.setdefault(
        "MLCHAT_STATE_DIR", str(Path(__file__).resolve().parent.parent / ".mlchat" / "bench")
    )

import json
import time
import uuid
from collections import Counter
from typing import Any

from scripts.bench_generation import sample_requests

ACTIONS = [
    {"name": "give_item", "description": "Hand the player an item.", "args": {"item": {"type": "string"}}},
    {"name": "attack", "description": "Draw steel on someone.", "args": {"target": {"type": "string"}}},
    {"name": "follow", "description": "Go along with someone.", "args": {"target": {"type": "string"}}},
    {"name": "open_shop", "description": "Show the player what is for sale."},
]
MAX_NEW_TOKENS = 48


def _requests(n: int, tag: str, structured: Any, offset: int = 0) -> list[dict[str, Any]]:
    """n sample turns; `structured(i)` says whether turn i carries the action declaration."""
    requests = sample_requests(n, f"{tag}-{uuid.uuid4().hex[:6]}", MAX_NEW_TOKENS, offset)
    for i, r in enumerate(requests):
        if structured(i):
            r["params"] = r["params"] | {"actions": ACTIONS}
    return requests


def _answer(requests: list[dict[str, Any]]) -> tuple[list[Any], float]:
    from worker.inline import answer_now

    started = time.perf_counter()
    views = answer_now(requests)
    return views, time.perf_counter() - started


def _character(slug: str) -> Any:
    """The stored character of that slug (a turn's view names its character by slug)."""
    from db.session import session_scope
    from db.world import get_character

    with session_scope() as session:
        character = get_character(session=session, slug=slug)
        if character is not None:
            session.expunge(character)
        return character


def validity(lines: int) -> dict[str, Any]:
    """The share of action-declaring turns whose stored reply parses and validates."""
    from jsonschema import Draft202012Validator

    from worker.structured import npc_shape, say_chars, tokens_per_char

    views, seconds = _answer(_requests(lines, "structured-valid", lambda i: True))
    actions: Counter[str] = Counter()
    emotions: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    valid = 0
    for view in views:
        if view.structured is None:
            codes[view.error_code or str(view.status)] += 1
            continue
        max_new = view.params["max_new_tokens"]
        per_char = tokens_per_char(_character(view.character))  # the shape the worker generated with
        shape = npc_shape(
            json.dumps(view.params["actions"], sort_keys=True), say_chars(max_new, per_char), per_char
        )
        if not list(Draft202012Validator(shape.schema).iter_errors(view.structured)):
            valid += 1 if view.reply == view.structured["say"] else 0
        action = view.structured["action"]
        actions["null" if action is None else action["name"]] += 1
        emotions[view.structured["emotion"]] += 1
    return {
        "lines": lines,
        "valid_share": round(valid / max(lines, 1), 4),
        "failed": dict(codes),
        "actions": dict(actions.most_common()),
        "emotions": dict(emotions.most_common()),
        "seconds": round(seconds, 1),
    }


def _tokens(views: list[Any]) -> int:
    return sum((v.usage or {}).get("completion_tokens", 0) for v in views)


def cost(turns: int) -> dict[str, Any]:
    """The same turns with the action schema ÷ without, and half and half ÷ without (wall time)."""
    _answer(_requests(8, "structured-warm", lambda i: i % 2 == 0))  # the grammar compiled, caches warm
    free, free_s = _answer(_requests(turns, "structured-free", lambda i: False))
    schema, schema_s = _answer(_requests(turns, "structured-all", lambda i: True))
    mixed, mixed_s = _answer(_requests(turns, "structured-mixed", lambda i: i % 2 == 0))
    free_tokens, schema_tokens, mixed_tokens = _tokens(free), _tokens(schema), _tokens(mixed)
    return {
        "turns": turns,
        "max_new_tokens": MAX_NEW_TOKENS,
        "seconds": {"free": round(free_s, 2), "schema": round(schema_s, 2), "mixed": round(mixed_s, 2)},
        "completion_tokens": {"free": free_tokens, "schema": schema_tokens, "mixed": mixed_tokens},
        "cost_ratio": round(schema_s / free_s, 3),
        "mixed_ratio": round(mixed_s / free_s, 3),
        # Per generated token: the NPC reply's length differs from free text's (JSON keys, a closed say).
        "cost_ratio_per_token": round((schema_s / max(schema_tokens, 1)) / (free_s / max(free_tokens, 1)), 3),
    }


def grammar_compile() -> dict[str, Any]:
    """xgrammar's compile time for the action schema with this model's tokenizer, first and again."""
    import xgrammar

    from roleplay.actions import Action, reply_schema
    from worker.engine import get_engine
    from worker.structured import say_chars

    loaded = get_engine()
    info = xgrammar.TokenizerInfo.from_huggingface(loaded.tokenizer)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
    actions = [Action.model_validate(a) for a in ACTIONS]
    schema = json.dumps(reply_schema(actions, say_chars(MAX_NEW_TOKENS)), sort_keys=True)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        compiler.compile_json_schema(schema, any_whitespace=False)
        times.append((time.perf_counter() - started) * 1000)
    return {
        "compile_ms_first": round(times[0], 2),
        "compile_ms_again": round(times[1], 3),
        "cached_per_schema": times[1] < times[0] / 10,
        "schema_bytes": len(schema),
    }


def measure_structured(lines: int = 500, turns: int = 256) -> dict[str, Any]:
    """Validity over `lines` action-declaring turns, then the cost figures over `turns`."""
    return {
        "validity": validity(lines),
        "cost": cost(turns),
        "grammar": grammar_compile(),
    }


if __name__ == "__main__":
    from core.logging import configure_logging
    from db.migrate import upgrade
    from scripts.seed import seed_world

    configure_logging("WARNING")
    upgrade()
    seed_world()
    print(json.dumps(measure_structured(32, 16), indent=2))
