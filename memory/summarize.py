"""The summary job of one conversation: claim it, write the next summary that is due (lines beyond
the recent window, then merges up the hierarchy), give it back; one summary per message, so a job
holds a worker thread for one generation (the task sends the next step). Each summary is stored in its own
transaction, only while the claim holds, and once per range (db/summaries.py)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from core.settings import settings
from db.memory_jobs import (
    MEMORY_JOB_DEATHS,
    SUMMARY,
    claim_job,
    clear_engine_deaths,
    death_record,
)
from db.scenes import members_of
from db.session import again_on_conflict, session_scope
from db.summaries import SummaryWork, next_summary_work, store_summary
from db.world import conversation_for_memory
from memory.claim import claiming, keeping, released
from memory.prompts import Speakers, dialogue, loaded_builder, speakers
from memory.summary_room import summaries_room

logger = logging.getLogger(__name__)

SUMMARY_INSTRUCTIONS = (
    "You keep the memory of a conversation between {user} (the player) and {char}. Summarise the "
    "text below in a few sentences, in the third person. Keep every name, place, promise, debt, "
    "secret and anything {user} told about themselves or their family; leave out small talk."
)
MERGE_INSTRUCTIONS = (
    "You keep the memory of a conversation between {user} (the player) and {char}. The text below is "
    "summaries of consecutive parts of it. Merge them into one shorter summary in the third person, "
    "keeping every name, place, promise, debt and secret."
)

# (system, user, max_tokens, alone) -> the model's text; the engine by default, any callable in a
# script. `alone`: in an otherwise empty engine (the job's request was inside one that died).
Generate = Callable[[str, str, int, bool], str]


def _engine_generate(system: str, user: str, max_tokens: int, alone: bool) -> str:
    from memory.generate import generate_text

    return generate_text(system, user, max_tokens=max_tokens, alone=alone)


def _no_answer(system: str, user: str, max_tokens: int, alone: bool) -> str:
    return ""  # the empty answer's stand-in is stored: the lines' own text, cut


def summary_prompt(work: SummaryWork, who: Speakers) -> tuple[str, str]:
    """(system, user) of the request that writes this summary; every line and name cleaned."""
    if work.parts:
        body = "\n\n".join(who.clean(text) for _, text in work.parts)
        return MERGE_INSTRUCTIONS.format(char=who.others, user=who.user), body
    return SUMMARY_INSTRUCTIONS.format(char=who.others, user=who.user), dialogue(work.lines, who)


# What an empty answer's stand-in keeps: about the tokens a summary may have (~4 characters a token).
CHARS_PER_TOKEN = 4


def stand_in_summary(work: SummaryWork, who: Speakers, chars: int) -> str:
    """What an empty answer's summary keeps, on one line within `chars`: each merged part's opening
    (an even share each: every part is marked merged), or the lines' opening."""
    if work.parts:
        share = max(1, chars // len(work.parts) - 1)
        return " ".join(_one_line(who.clean(text))[:share] for _, text in work.parts)
    return _one_line(dialogue(work.lines, who))[:chars]


def _one_line(text: str) -> str:
    return " / ".join(part.strip() for part in text.splitlines() if part.strip())


def fitted(work: SummaryWork, who: Speakers, builder: Any | None) -> SummaryWork:
    """The work over as many of its lines (at least one), or of the parts it merges (at least two),
    as its request has room for beside the answer: the range stored is the range read (the request's
    own cut, memory/generate.py, would drop the last lines or the newest part unread while the
    summary claimed them, and marked that part merged). Chunks are sized by characters, and a line's
    label or a script of many tokens a character does not count there; parts are as long as their
    model wrote them. Without the model's builder (no engine loaded) the work is kept whole."""
    if builder is None:
        return work
    from memory.generate import request_ids

    budget = builder.max_model_len - settings.memory_summary_max_tokens

    def fits(part: SummaryWork) -> bool:
        return len(request_ids(builder, *summary_prompt(part, who))[0]) <= budget

    cut, count, least = (
        (work.first_parts, len(work.parts), 2) if work.parts else (work.first_lines, len(work.lines), 1)
    )
    if fits(work):
        return work
    low, high = least, count - 1  # the most that fit lie in [low, high] (or `least` fits not even)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(cut(mid)):
            low = mid
        else:
            high = mid - 1
    work = cut(min(low, count))
    if work.parts and not fits(work):  # even two parts are too long: each keeps an even share
        return _shared(work, fits)
    return work  # one line too long for the request: the request's own cut takes its end


def _shared(work: SummaryWork, fits: Callable[[SummaryWork], bool]) -> SummaryWork:
    """The merge with each part cut to the longest even length (characters) its request fits: every
    part it marks merged is read, in part."""
    low, high = 1, max(len(text) for _, text in work.parts)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(replace(work, parts=[(i, text[:mid]) for i, text in work.parts])):
            low = mid
        else:
            high = mid - 1
    return replace(work, parts=[(i, text[:low]) for i, text in work.parts])


def run_summary_job(conversation_id: int, *, generate: Generate | None = None, max_steps: int = 1) -> int:
    """Write up to `max_steps` of the conversation's due summaries; how many were stored (0 when
    another worker holds the job, its conversation is gone, or nothing is due)."""
    on_engine = generate is None  # this worker's engine generates: its builder cleans the request
    generate = generate or _engine_generate
    mine = uuid.uuid4()
    with claiming(mine), session_scope() as session:
        token = claim_job(
            session=session,
            conversation_id=conversation_id,
            kind=SUMMARY,
            lease_s=settings.memory_job_lease_s,
            token=mine,
        )
        conversation = conversation_for_memory(session=session, conversation_id=conversation_id)
        names = (conversation.character.name, conversation.player_name) if conversation else ("", "")
        members = [m.name for m in members_of(session=session, conversation_id=conversation_id)]
        blind, alone = death_record(session=session, conversation_id=conversation_id, kind=SUMMARY)
    if token is None:
        return 0
    if blind >= MEMORY_JOB_DEATHS:  # inside engines that died, once alone too: the stand-in, once
        logger.warning(
            "conversation %s summarised without the model: its request was inside an engine that died",
            conversation_id,
        )
        generate = _no_answer
        max_steps = 1
        on_engine = False
    stored = 0
    with released(conversation_id, SUMMARY, token), keeping(conversation_id, SUMMARY, token):
        builder = loaded_builder(generating=on_engine)  # inside: an engine that fails to load releases
        who = speakers(builder, *names, members)
        for _ in range(max_steps):
            with session_scope() as session:
                work = next_summary_work(
                    session=session,
                    conversation_id=conversation_id,
                    recent_n=settings.recent_history,
                    threshold_tokens=settings.memory_summary_threshold_tokens,
                    chunk_tokens=settings.memory_summary_chunk_tokens,
                    fanout=settings.memory_summary_fanout,
                    budget_tokens=summaries_room(),
                )
            if work is None:
                break
            work = fitted(work, who, builder)
            system, body = summary_prompt(work, who)
            text = generate(system, body, settings.memory_summary_max_tokens, alone)
            if not text:
                # Seeded and greedy-ish, the same request would answer empty again, and a merge due
                # comes before any new lines: the text it was to summarise is kept instead, cut.
                logger.warning(
                    "empty summary for conversation %s lines %s-%s: its text kept, cut",
                    conversation_id,
                    work.first_seq,
                    work.last_seq,
                )
                text = stand_in_summary(work, who, settings.memory_summary_max_tokens * CHARS_PER_TOKEN)
            if not again_on_conflict(partial(_store, work, text, token), what="a summary's store"):
                break  # the claim lapsed (another worker has it) or the range is stored
            stored += 1
    return stored


def _store(work: SummaryWork, text: str, token: uuid.UUID) -> bool:
    """Store one summary under the job's claim, a transaction of its own (run again after a deadlock:
    a generation is not thrown away for one); False when the claim lapsed or the range is stored."""
    with session_scope() as session:
        if store_summary(session=session, work=work, text_=text, token=token) is None:
            return False
        clear_engine_deaths(session=session, conversation_id=work.conversation_id, kind=SUMMARY)
    return True
