"""The context manifest: every prompt token assigned to the piece its text starts in, so the
sections sum to the prompt's token count exactly; then what each lore entry, event, memory,
summary, fact and history line cost, and why it is there."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from db.retrieval import EventHit, HistoryLine
from roleplay.lorebook import Activation, FiredEntry
from roleplay.mood import Mood
from worker.prompt.layout import Piece

LORE_FAILED_SHOWN = 50


def _sweep(offsets: list[int | None], spans: list[tuple[int, int, int]], per_piece: list[int]) -> int:
    """Assign tokens to spans one by one (starts in any order); returns the template's count."""
    template = 0
    span_i = 0
    for start in offsets:
        if start is None:
            template += 1
            continue
        while span_i < len(spans) and spans[span_i][1] <= start:
            span_i += 1
        if span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1]:
            per_piece[spans[span_i][2]] += 1
        else:
            template += 1
    return template


def account(
    text: str,
    ids: list[int],
    offsets: list[int | None],
    pieces: list[Piece],
    budget: int,
    lore: Activation | None,
    mood: Mood | None,
    events: list[EventHit],
    memories: list[HistoryLine],
    summaries: list[Any] = (),  # type: ignore[assignment]
    facts: list[Any] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Every prompt token assigned to the piece whose text it starts in; the rest is "template"
    (role markers, headers' separators, BOS). Per-section counts therefore sum to prompt_tokens."""
    spans: list[tuple[int, int, int]] = []  # (start, end, piece index)
    cursor = 0
    for index, (_, _, piece_text) in enumerate(pieces):
        if not piece_text:
            continue
        at = text.find(piece_text, cursor)
        if at >= 0:
            spans.append((at, at + len(piece_text), index))
            cursor = at + len(piece_text)
            continue
        # A piece a format renders out of the layout's order (a chat template folding a system
        # message it refuses into another) is found where it is.
        at = text.find(piece_text)
        end = at + len(piece_text)
        if at >= 0 and not any(s < end and at < e for s, e, _ in spans):
            spans.append((at, end, index))
    spans.sort()
    per_piece = [0] * len(pieces)
    starts = [start for start in offsets if start is not None]
    if starts == sorted(starts):  # as a tokenizer gives them: count each span's tokens by bisection
        for begin, end, index in spans:
            per_piece[index] += bisect_left(starts, end) - bisect_left(starts, begin)
        template = len(offsets) - sum(per_piece)
    else:
        template = _sweep(offsets, spans, per_piece)
    sections: dict[str, int] = {}
    items: dict[tuple[str, Any], int] = {}
    for (section, item_id, _), n in zip(pieces, per_piece, strict=True):
        sections[section] = sections.get(section, 0) + n
        if item_id is not None:
            items[(section, item_id)] = items.get((section, item_id), 0) + n
    sections["template"] = template
    fired: list[FiredEntry] = lore.kept if lore else []
    return {
        "budget_tokens": budget,
        "prompt_tokens": len(ids),
        "sections": sections,
        "persona_tokens": sum(
            sections.get(s, 0) for s in ("system_prompt", "character_sheet", "example_dialogue")
        ),
        "lore": [
            {
                "id": f.entry.id,
                "name": f.entry.name,
                "reason": f.reason,
                "position": f.entry.position,
                "tokens": items.get(("lore", f.entry.id), 0),
            }
            | ({"ignored_decorators": f.entry.ignored_decorators} if f.entry.ignored_decorators else {})
            for f in fired
        ],
        # Entries that could not be evaluated (a regex key ran out of time): left out, this turn only.
        # The first LORE_FAILED_SHOWN; a book whose time ran out may fail thousands.
        "lore_failed": [
            {"id": entry.id, "name": entry.name, "reason": reason}
            for entry, reason in (lore.failed[:LORE_FAILED_SHOWN] if lore else [])
        ],
        "lore_failed_count": len(lore.failed) if lore else 0,
        "state": {"emotion": mood.emotion, "affinity": mood.affinity} if mood else None,
        "events": [
            {"id": e.id, "score": round(e.score, 4), "tokens": items.get(("events", e.id), 0)} for e in events
        ],
        "memories": [
            {"id": m.id, "score": round(m.score or 0.0, 4), "tokens": items.get(("memories", m.id), 0)}
            for m in memories
        ],
        "history": [
            {"id": item_id, "tokens": n} for (section, item_id), n in items.items() if section == "history"
        ],
        # NPC memory: which lines each summary stands for, and why each fact is here.
        "summary": [
            {
                "id": s.id,
                "level": s.level,
                "first_seq": s.first_seq,
                "last_seq": s.last_seq,
                "tokens": items.get(("summary", s.id), 0),
            }
            for s in summaries
        ],
        "facts": [
            {
                "id": f.id,
                "kind": f.kind,
                "subject": f.subject,
                "source": f.source,
                "scope": f.scope,
                "score": round(f.score, 4),
                "relevance": round(f.relevance, 4),
                "recency": round(f.recency, 4),
                "importance": round(f.importance, 4),
                "tokens": items.get(("facts", f.id), 0),
            }
            for f in facts
        ],
    }
