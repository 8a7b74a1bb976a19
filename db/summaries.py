"""Rolling summaries of a conversation's lines beyond the recent window, and the memory-job claim.

A memory job of a kind ("summary", "extract") is claimed per conversation under a token and a lease
(one row per conversation and kind: at most one in flight). A summary is stored only while its
job's claim holds, and at most once per range (a unique constraint), so a job that died and ran
again stores one summary, and a worker whose lease lapsed stores nothing.

Level 0 summarises lines; when `fanout` summaries of one level are not merged yet, the oldest of
them are merged into one of the next level (the hierarchy). The prompt shows those not merged.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.settings import PROMPT_ITEM_OVERHEAD_TOKENS
from db.memory_jobs import SUMMARY, holds_job
from db.memory_lines import MEMORY_MAY_READ_SQL, memory_may_read
from db.models import Message, Role, Summary

# Tokens are estimated from characters where no tokenizer is at hand (scheduling, in SQL).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class SummaryWork:
    """One summary to write: of lines (level 0) or of `parts`, summaries of level - 1."""

    conversation_id: int
    level: int
    first_seq: int
    last_seq: int
    # (role, content, speaker: a group member's name, else None), oldest first; `seqs` theirs
    lines: list[tuple[str, str, str | None]] = field(default_factory=list)
    parts: list[tuple[int, str]] = field(default_factory=list)  # (summary id, text), oldest first
    seqs: list[int] = field(default_factory=list)  # each line's seq, or each part's last seq

    def first_lines(self, n: int) -> SummaryWork:
        """The same work over its first `n` lines only (those its request has room for)."""
        if n >= len(self.lines) or not self.seqs:
            return self
        return replace(self, last_seq=self.seqs[n - 1], lines=self.lines[:n], seqs=self.seqs[:n])

    def first_parts(self, n: int) -> SummaryWork:
        """The same merge of its first `n` parts only (the others wait for the next merge)."""
        if n >= len(self.parts) or not self.seqs:
            return self
        return replace(self, last_seq=self.seqs[n - 1], parts=self.parts[:n], seqs=self.seqs[:n])


@dataclass(frozen=True)
class SummaryLine:
    """A summary as the prompt shows it."""

    id: int
    level: int
    first_seq: int
    last_seq: int
    text: str


LINES_A_READ = 64  # the unsummarised lines next_summary_work reads at a time


def next_summary_work(
    *,
    session: Session,
    conversation_id: int,
    recent_n: int,
    threshold_tokens: int,
    chunk_tokens: int,
    fanout: int,
    budget_tokens: int | None = None,
) -> SummaryWork | None:
    """The next summary the conversation needs: a merge when `fanout` summaries of a level wait, or
    of the two oldest (whatever their levels) when the summaries not merged would pass
    `budget_tokens` (the prompt's room for them: it shows the oldest and the newest first, and the
    ones between fell out of every prompt as a long conversation's count of them grew, the middle of
    the conversation in no prompt; review), else the oldest unsummarised lines beyond the recent
    window once they pass `threshold_tokens` (at most `chunk_tokens` of them); None when nothing is
    due."""
    open_ = session.execute(
        select(Summary.id, Summary.level, Summary.first_seq, Summary.last_seq, Summary.text)
        .where(Summary.conversation_id == conversation_id, Summary.merged_into.is_(None))
        .order_by(Summary.level, Summary.first_seq)
    ).all()
    by_level: dict[int, list[Any]] = {}
    for row in open_:
        by_level.setdefault(row.level, []).append(row)
    for level in sorted(by_level):
        rows = by_level[level]
        if len(rows) >= fanout:
            parts = rows[:fanout]
            return SummaryWork(
                conversation_id,
                level + 1,
                parts[0].first_seq,
                parts[-1].last_seq,
                parts=[(r.id, r.text) for r in parts],
                seqs=[r.last_seq for r in parts],
            )
    in_order = sorted(open_, key=lambda r: r.first_seq)
    if budget_tokens is not None and len(in_order) >= 2:
        cost = sum(len(r.text) // CHARS_PER_TOKEN + PROMPT_ITEM_OVERHEAD_TOKENS for r in in_order)
        if cost > budget_tokens:
            first, second = in_order[0], in_order[1]
            return SummaryWork(
                conversation_id,
                max(first.level, second.level) + 1,
                first.first_seq,
                second.last_seq,
                parts=[(first.id, first.text), (second.id, second.text)],
                seqs=[first.last_seq, second.last_seq],
            )
    covered = session.scalar(
        select(Summary.last_seq)
        .where(Summary.conversation_id == conversation_id, Summary.merged_into.is_(None))
        .order_by(Summary.last_seq.desc())
        .limit(1)
    )
    last_seq = session.scalar(
        select(Message.seq)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .limit(1)
    )
    if last_seq is None:
        return None
    # Read a page at a time, only as far as the threshold and one chunk need: a backlog of thousands
    # of lines (an imported log, summaries switched on late) is never read whole at each step.
    needed = max(threshold_tokens, chunk_tokens) * CHARS_PER_TOKEN
    lines: list[Any] = []
    chars, after = 0, covered or 0
    while chars < needed:
        page = session.execute(
            select(Message.seq, Message.role, Message.content, Message.speaker_name)
            .where(
                Message.conversation_id == conversation_id,
                Message.seq > after,
                Message.seq <= last_seq - recent_n,
                memory_may_read(),
            )
            .order_by(Message.seq)
            .limit(LINES_A_READ)
        ).all()
        if not page:
            break
        lines += page
        chars += sum(len(r.content) for r in page)
        after = page[-1].seq
    if not lines or chars < threshold_tokens * CHARS_PER_TOKEN:
        return None
    taken: list[Any] = []
    chars = 0
    for line in lines:
        if taken and chars + len(line.content) > chunk_tokens * CHARS_PER_TOKEN:
            break
        taken.append(line)
        chars += len(line.content)
    return SummaryWork(
        conversation_id,
        0,
        taken[0].seq,
        taken[-1].seq,
        lines=[(Role(r.role).value, r.content, r.speaker_name) for r in taken],
        seqs=[r.seq for r in taken],
    )


def store_summary(*, session: Session, work: SummaryWork, text_: str, token: uuid.UUID) -> int | None:
    """Store the summary if this claim still holds its job; its id, or None if the claim lapsed or
    the range was stored already. Merged parts point to it."""
    if not holds_job(session=session, conversation_id=work.conversation_id, kind=SUMMARY, token=token):
        return None
    new_id = session.execute(
        insert(Summary)
        .values(
            conversation_id=work.conversation_id,
            level=work.level,
            first_seq=work.first_seq,
            last_seq=work.last_seq,
            text=text_,
        )
        .on_conflict_do_nothing(constraint="uq_summaries_range")
        .returning(Summary.id)
    ).scalar()
    if new_id is not None and work.parts:
        session.execute(
            update(Summary)
            .where(Summary.id.in_([pid for pid, _ in work.parts]), Summary.merged_into.is_(None))
            .values(merged_into=new_id)
        )
    return new_id


def forget_line(*, session: Session, conversation_id: int, seq: int) -> int:
    """Drop the summaries that cover this line or come after it (its text changed: they told the old
    text, or were summarised after it), so that summarising resumes below the line: those wholly
    before it stand again (merged_into is set NULL by its foreign key). How many were dropped. The
    caller takes the conversation's memory jobs back first (db/memory_jobs.py interrupt_jobs), so a
    job in flight stores nothing of the old text, and the locks follow the store's order."""
    result = session.execute(
        delete(Summary).where(Summary.conversation_id == conversation_id, Summary.last_seq >= seq)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def summaries_for(*, session: Session, conversation_ids: Sequence[int]) -> dict[int, list[SummaryLine]]:
    """Each conversation's summaries not merged into another, oldest first."""
    out: dict[int, list[SummaryLine]] = {c: [] for c in conversation_ids}
    if not conversation_ids:
        return out
    rows = session.execute(
        select(
            Summary.conversation_id,
            Summary.id,
            Summary.level,
            Summary.first_seq,
            Summary.last_seq,
            Summary.text,
        )
        .where(Summary.conversation_id.in_(list(conversation_ids)), Summary.merged_into.is_(None))
        .order_by(Summary.conversation_id, Summary.first_seq)
    ).all()
    for row in rows:
        out[row.conversation_id].append(SummaryLine(row.id, row.level, row.first_seq, row.last_seq, row.text))
    return out


_DUE_SQL = text(
    f"""
SELECT c.id
FROM unnest(CAST(:conv AS bigint[])) AS c(id)
CROSS JOIN LATERAL (
    -- the newest covered line is an unmerged summary's (the one it was merged up into covers it too)
    SELECT COALESCE(max(last_seq), 0) AS covered FROM summaries s
    WHERE s.conversation_id = c.id AND s.merged_into IS NULL
) s
CROSS JOIN LATERAL (
    SELECT COALESCE(max(seq), 0) AS last FROM messages m WHERE m.conversation_id = c.id
) l
WHERE NOT EXISTS (
    SELECT 1 FROM memory_jobs j
    WHERE j.conversation_id = c.id AND j.kind = 'summary' AND j.lease_until >= now()
) AND (
    -- a running total, stopped at the first line that reaches the threshold: never the whole backlog
    EXISTS (
        SELECT 1 FROM (
            SELECT sum(length(content)) OVER (ORDER BY seq) AS upto FROM messages m
            WHERE m.conversation_id = c.id AND m.seq > s.covered AND m.seq <= l.last - :recent_n
              AND {MEMORY_MAY_READ_SQL}  -- as next_summary_work reads: rejected replies due nothing
        ) t WHERE t.upto >= :chars
    )
    OR EXISTS (
        SELECT 1 FROM summaries s2 WHERE s2.conversation_id = c.id AND s2.merged_into IS NULL
        GROUP BY s2.level HAVING count(*) >= :fanout
    )
    -- past the prompt's room for them: the two oldest are merged (next_summary_work's budget_tokens)
    OR (CAST(:room AS int) IS NOT NULL AND EXISTS (
        SELECT 1 FROM summaries s3 WHERE s3.conversation_id = c.id AND s3.merged_into IS NULL
        HAVING count(*) >= 2 AND sum(length(s3.text) / {CHARS_PER_TOKEN} + {PROMPT_ITEM_OVERHEAD_TOKENS})
            > CAST(:room AS int)
    ))
)
"""  # noqa: S608 (a constant of db/memory_lines.py, no input)
)


def conversations_due(
    *,
    session: Session,
    conversation_ids: Sequence[int],
    recent_n: int,
    threshold_tokens: int,
    fanout: int,
    budget_tokens: int | None = None,
) -> list[int]:
    """The conversations whose summary job is due and not in flight (`budget_tokens`: as for
    next_summary_work, a merge of the two oldest is due past it: review, none was scheduled, and a
    conversation gone quiet kept its middle out of the prompt)."""
    if not conversation_ids:
        return []
    return list(
        session.scalars(
            _DUE_SQL,
            {
                "conv": sorted(set(conversation_ids)),
                "recent_n": recent_n,
                "chars": threshold_tokens * CHARS_PER_TOKEN,
                "fanout": fanout,
                "room": budget_tokens,
            },
        )
    )
