"""The facts an NPC may know come through migration 0021's partial indexes, a scope at a time: a turn
reads its own scopes' facts, not every current fact of its tenant (3,004 rows read before)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import text

from db.facts import _VISIBLE_FACTS_SQL, facts_for_turns
from db.session import session_scope
from db.vectors import send_vectors_binary
from db.world import find_characters, upsert_conversations
from worker.embedder import embed

pytestmark = pytest.mark.usefixtures("world")

OTHERS = 3000  # current facts of the same tenant that this conversation may not know


def _facts_rows_read(plan: dict) -> int:
    """Rows the plan's scans of `facts` returned or filtered away, over all their loops."""
    read, nodes = 0, [plan]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node.get("Relation Name") == "facts":
            loops = node.get("Actual Loops", 0)
            read += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
    return int(read)


@pytest.fixture
def tenant() -> Iterator[str]:
    """A tenant of its own, its facts deleted afterwards (a later re-embed would embed them all)."""
    name = f"scale-{uuid.uuid4().hex[:6]}"
    yield name
    with session_scope() as s:
        s.execute(text("DELETE FROM facts WHERE tenant = :t"), {"t": name})


def test_a_turn_reads_its_scopes_facts_not_the_tenants(tenant: str) -> None:
    with session_scope() as s:
        char_id = find_characters(session=s, slugs=["elara"])["elara"]
        row = {"external_id": "c", "player_id": "p1", "player_name": "Rowan", "character_id": char_id}
        conv = upsert_conversations(session=s, rows=[row], tenant=tenant)["c"][0]
        s.execute(text("UPDATE conversations SET story = 'vale' WHERE id = :id"), {"id": conv})
        mine = [
            ("world", "", ""),
            ("conversation", str(conv), ""),
            ("met", "", "p1"),
            ("story", "vale", ""),
        ]
        for n, (scope, ref, player) in enumerate(mine):
            s.execute(
                text(
                    "INSERT INTO facts (tenant, player_id, kind, subject, text, source, importance, scope,"
                    " scope_ref) VALUES (:t, :p, 'player', 'Rowan', :txt, 'game', 0.5, :scope, :ref)"
                ),
                {"t": tenant, "p": player, "txt": f"visible {n}", "scope": scope, "ref": ref},
            )
        s.execute(  # other players' conversations and met facts, another story's
            text(
                "INSERT INTO facts (tenant, player_id, kind, subject, text, source, importance, scope,"
                " scope_ref) SELECT :t, 'p' || (g % 500 + 2), 'player', 'someone', 'hidden ' || g,"
                " 'game', 0.5,"
                " (ARRAY['conversation','met','story'])[g % 3 + 1],"
                " CASE g % 3 WHEN 0 THEN (g + 100000000)::text WHEN 1 THEN '' ELSE 'moor' END"
                " FROM generate_series(1, :n) g"
            ),
            {"t": tenant, "n": OTHERS},
        )
        s.execute(text("ANALYZE facts"))
    vector = embed(["What do you know about me?"])[0]
    with session_scope() as s:
        (hits,) = facts_for_turns(
            session=s, conversation_ids=[conv], vectors=[vector], k=10, half_life_s=3600
        )
        assert sorted(h.text for h in hits) == ["visible 0", "visible 1", "visible 2", "visible 3"]
        send_vectors_binary(s)
        plan = s.execute(
            text(f"EXPLAIN (ANALYZE, FORMAT JSON) {_VISIBLE_FACTS_SQL.text}"),
            {
                "idx": [0],
                "conv": [conv],
                "vec": [np.asarray(vector, dtype=np.float32)],
                "pool": 64,
                "half_life": 86400.0,
            },
        ).scalar_one()[0]["Plan"]
    assert 4 <= _facts_rows_read(plan) <= 20  # the visible four; without the indexes all 3,004
