"""The fact-extraction job of one conversation: the lines extraction has not read go to the model
under a JSON schema (guided decoding); each fact it names is embedded, dropped as a duplicate of a
current fact of this conversation's scope and the same subject, stored as superseding a close one
(the old is kept as history; a game-written fact is never superseded), or stored as new. Facts heard
in a conversation are that conversation's (scope "conversation") until gossip moves them."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import regex
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from sqlalchemy import func, select

from core.halving import most_passing
from core.settings import EXTRACT_MAX_TOKENS, settings
from core.text import speaker_key, storable_output
from db.facts import NewFact, add_facts, closest_fact, embedded_text, known_elsewhere, supersede
from db.memory_jobs import (
    EXTRACT,
    MEMORY_JOB_DEATHS,
    advance_extract,
    claim_job,
    clear_engine_deaths,
    death_record,
    extracted_through,
)
from db.memory_lines import memory_may_read
from db.models import Conversation, Fact, FactKind, FactScope, Message
from db.scenes import members_of
from db.session import again_on_conflict, session_scope
from db.vector_space import EmbedderMismatch, same_space
from db.world import conversation_for_memory
from memory.claim import claiming, keeping, released
from memory.prompts import Line, Speakers, dialogue, loaded_builder, speakers
from worker.embedder import embed

logger = logging.getLogger(__name__)


def _storable(value: Any) -> Any:
    """A fact's text as it can be stored, before it is checked (an escaped NUL or lone surrogate in
    the answer would fail the store, and the same answer would come back for the same lines every
    time; pydantic refuses a lone surrogate outright). A text of NUL alone is then empty: that fact
    is dropped (parse_facts), and the answer's others are kept."""
    return storable_output(value) if isinstance(value, str) else value


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("blank")
    return text


MAX_FACTS = 4  # an answer's facts: it reads a short stretch of lines at a time


# Bounded so that the longest answer the schema allows fits EXTRACT_MAX_TOKENS: guided decoding
# keeps the answer inside the schema, but a reply cut at max_tokens is still unfinished JSON.
class ExtractedFact(BaseModel):
    subject: Annotated[
        str, BeforeValidator(_storable), Field(min_length=1, max_length=40), AfterValidator(_not_blank)
    ]
    kind: Literal["player", "world", "npc"]
    text: Annotated[
        str, BeforeValidator(_storable), Field(min_length=1, max_length=120), AfterValidator(_not_blank)
    ]
    importance: int = Field(ge=1, le=10)


class Extracted(BaseModel):
    facts: list[ExtractedFact] = Field(max_length=MAX_FACTS)


class _Answer(BaseModel):
    """An answer read fact by fact: a fact outside the schema (blank once made storable) is dropped
    alone, and the answer's other facts are kept."""

    facts: list[Any] = Field(max_length=MAX_FACTS)


# Lines read per answer: an answer names at most 4 facts, so it reads a short stretch at a time.
EXTRACT_LINES = 24


FACTS_SCHEMA: dict[str, Any] = Extracted.model_json_schema()

EXTRACT_INSTRUCTIONS = (
    "Read the conversation between {user} (the player) and {char}. List the lasting facts it "
    "reveals: about {user} (kind player), about the world (kind world), about another character "
    "(kind npc). Each fact is one short sentence with its subject (a name) and an importance from 1 "
    "(trivia) to 10 (life and death). Answer with JSON only; no facts: an empty list."
)

# (system, user, max_tokens, schema, alone) -> the model's JSON text; `alone`: in an otherwise empty
# engine (the job's request was inside one that died).
GenerateJson = Callable[[str, str, int, dict[str, Any], bool], str]


def _engine_generate(system: str, user: str, max_tokens: int, schema: dict[str, Any], alone: bool) -> str:
    from memory.generate import generate_text

    return generate_text(system, user, max_tokens=max_tokens, json_schema=schema, alone=alone)


def extract_prompt(lines: Sequence[Line], who: Speakers) -> tuple[str, str]:
    """(system, user) of the request that reads these lines (memory/prompts.py); all cleaned."""
    return EXTRACT_INSTRUCTIONS.format(char=who.others, user=who.user), dialogue(lines, who)


def _line(row: Any) -> Line:
    """A message row as a dialogue line: a group member's under their own name."""
    return (str(row.role), row.content, getattr(row, "speaker_name", None))


def lines_that_fit(lines: Sequence[Any], who: Speakers, builder: Any | None) -> list[Any]:
    """The first of these lines (at least one) whose request leaves room for the answer: the lines
    read are the lines recorded as read, and the request's cut (memory/generate.py) would drop the
    last ones unread. Without the model's builder (no engine loaded) every line is kept."""
    if builder is None:
        return list(lines)
    from memory.generate import request_ids

    budget = builder.max_model_len - EXTRACT_MAX_TOKENS

    def fits(count: int) -> bool:
        return len(request_ids(builder, *extract_prompt([_line(r) for r in lines[:count]], who))[0]) <= budget

    if fits(len(lines)):
        return list(lines)
    # The most that fit lie in [low, high]: found by halving (one line at a time, 24 long lines meant
    # 23 renderings and tokenizations of the whole request per step), at least one line kept.
    return list(lines[: most_passing(1, len(lines) - 1, fits)])


def parse_facts(raw: str) -> list[ExtractedFact] | None:
    """The facts of the model's answer, less any fact outside the schema (logged); None (logged)
    when the answer as a whole is not the schema's JSON."""
    try:
        # strict=False: a string with a length bound takes raw control characters in the grammar
        # (structured/json_text.py), which a strict reader refused, losing the facts for good
        items = _Answer.model_validate(json.loads(raw, strict=False)).facts
    except (ValueError, ValidationError, RecursionError) as exc:
        cut = None if isinstance(exc, ValidationError) else _finished_before_the_cut(raw)
        if not cut:  # not the schema's JSON, or cut before its first fact: an answer outside it
            logger.warning("fact extraction answered outside its schema: %s", _said(exc))
            return None
        logger.info("fact extraction: an unfinished answer; its %d whole facts kept", len(cut))
        items = cut
    facts = []
    for i, item in enumerate(items):
        try:
            facts.append(ExtractedFact.model_validate(item))
        except ValidationError as exc:
            logger.warning("fact extraction: facts[%d] dropped: %s", i, _said(exc))
    return facts


def _said(exc: BaseException) -> str:
    """What went wrong with an answer, for the log, without the answer's own text: pydantic quotes
    the value it refused, a fact about the player (review: kept in worker logs past an erasure)."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)
        )[:200]
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at character {exc.pos})"
    return type(exc).__name__


_FACTS_OPEN = re.compile(r'\s*\{\s*"facts"\s*:\s*\[')


def _finished_before_the_cut(raw: str) -> list[Any] | None:
    """The facts an answer cut at max_tokens had written whole (guided decoding keeps it the schema's
    JSON up to the cut): a script of many tokens a character, Korean say, runs a long answer past the
    bound, and its first facts are as good as an uncut answer's. None when it is not such an answer."""
    opened = _FACTS_OPEN.match(raw)
    if opened is None:
        return None
    decoder, pos = json.JSONDecoder(strict=False), opened.end()
    items: list[Any] = []
    while len(items) < MAX_FACTS:
        while pos < len(raw) and raw[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(raw, pos)
        except (ValueError, RecursionError):
            break
        items.append(item)
    return items


def _words(text: str) -> str:
    """A fact's words as a duplicate is told: any case and spacing, punctuation left out."""
    return " ".join(regex.findall(r"\w+", speaker_key(text)))


def player_names(player_name: str, player_label: str, speakers: Sequence[str]) -> list[str]:
    """The names the player goes by in a conversation: as stored, and as the request showed it;
    never a character's among `speakers` (a player named as the character is shown as "Elara
    (player)", and a fact about "Elara" is the character's; in a group, any member's)."""
    taken = {speaker_key(name) for name in speakers}
    return [
        n for n in dict.fromkeys((player_name, player_label)) if n.strip() and speaker_key(n) not in taken
    ]


def as_stored(
    facts: Sequence[ExtractedFact], *, player_id: str, names: Sequence[str]
) -> list[tuple[str, str]]:
    """Each fact's (subject, text) as stored. The player is one subject however named: the game's
    fact about the player, written with no subject, is stored under their id, and the model names
    them as the dialogue did. A fact whose subject is one of the player's `names` is stored as the
    game's is (embedded, compared and shown alike): else dialogue restating the game's fact added a
    copy of it, and a changed one never replaced the old."""
    keys = {speaker_key(n) for n in names}
    return [
        (
            player_id if player_id and speaker_key(f.subject.strip()) in keys else f.subject.strip(),
            f.text.strip(),
        )
        for f in facts
    ]


def fact_vectors(stored: Sequence[tuple[str, str]], *, player_id: str) -> dict[tuple[str, str], Any]:
    """The vectors of facts as stored (as_stored), by (subject, text)."""
    vectors = embed([embedded_text(subject=s, text=t, player_id=player_id) for s, t in stored])
    return dict(zip(stored, vectors, strict=True))


def store_extracted(
    *,
    session: Any,
    conversation: Conversation,
    facts: list[ExtractedFact],
    source: str,
    lines: tuple[int, int],
    names: Sequence[str] | None = None,
    vectors: dict[tuple[str, str], Any] | None = None,
) -> dict[str, int]:
    """Deduplicate, supersede or add each fact; counts of each outcome. `lines`: the first and last
    line (seq) of the conversation they were read from (an edit of one drops them again).
    `names`: the player's names (player_names) as the caller read them with the lines (as the request
    showed them too, a group's members taken out; none given: the stored name). `vectors`:
    the facts' (fact_vectors), embedded before the caller's transaction; any fact not in them (none
    given) is embedded here."""
    counts = {"added": 0, "duplicate": 0, "superseded": 0}
    if not facts:
        return counts
    _refuse_another_space(session)
    player = conversation.player_id
    if names is None:
        names = player_names(conversation.player_name, "", [conversation.character.name])
    stored = as_stored(facts, player_id=player, names=names)
    given = vectors or {}
    missing = [pair for pair in stored if pair not in given]
    known = given | (fact_vectors(missing, player_id=player) if missing else {})
    in_order = [known[pair] for pair in stored]
    replaces: list[tuple[int, int]] = []  # (old fact, new fact): applied in old id order, after the adds
    # Facts of one answer are read from the same lines: one never replaces another ("a sister called
    # Mira" and "a brother called Tom" are close enough for this embedder to be taken for a change),
    # nor a stored fact another of them says again; one said twice in it is a duplicate by its words.
    added_here: set[int] = set()
    confirmed: set[int] = set()  # stored facts this answer says again
    said_here: set[tuple[str, str]] = set()
    for fact, (subject, fact_text), vector in zip(facts, stored, in_order, strict=True):
        about_player = bool(player) and subject == player
        subjects = [player, *names] if about_player else [subject]
        words = (_words(subject), _words(fact_text))
        if words in said_here:
            counts["duplicate"] += 1
            continue
        said_here.add(words)
        close = closest_fact(
            session=session,
            tenant=conversation.tenant,
            scope=FactScope.CONVERSATION,
            scope_ref=str(conversation.id),
            subjects=subjects,
            vector=vector,
            besides=added_here,
        )
        # A fact gossip brought from another conversation's lines is no duplicate: an edit there
        # drops it (forget_read_facts), and this conversation's own would go with it. This one
        # replaces it instead, so the prompt still holds one.
        similarity = close[1] if close is not None else 0.0
        told_elsewhere = close is not None and close[0].source_conversation_id not in (None, conversation.id)
        # A duplicate says the same words. A restatement however close replaces the fact (kept as
        # history): this embedder scores "owes Elara 10 gold" against "20 gold" 0.977, "is alive"
        # against "is dead" 0.970, and a change taken for a duplicate was lost for good (its lines
        # read), the NPC holding the old one.
        same = close is not None and _words(close[0].text) == words[1]
        # The game's fact is canon: one this close is it again, never a copy beside it.
        canon = close is not None and close[0].source == "game"
        again = (same and not told_elsewhere) or (
            canon and similarity >= settings.memory_fact_dedup_similarity
        )
        if close is not None and again:
            confirmed.add(close[0].id)
            counts["duplicate"] += 1
            continue
        # Known to this conversation already in a wider scope (the game's fact for every NPC the player
        # met, gossip that moved this conversation's own, the story's, the world's): no copy, which
        # would take a second of the prompt's few fact slots; never a replacement of it either.
        if not same and known_elsewhere(
            session=session,
            tenant=conversation.tenant,
            player_id=player,
            story=conversation.story,
            subjects=subjects,
            vector=vector,
            similarity=settings.memory_fact_dedup_similarity,
        ):
            counts["duplicate"] += 1
            continue
        (row,) = add_facts(
            session=session,
            facts=[
                NewFact(
                    tenant=conversation.tenant,
                    player_id=conversation.player_id,
                    kind=FactKind.PLAYER if about_player else FactKind(fact.kind),
                    subject=subject,
                    text=fact_text,
                    source=source,
                    importance=fact.importance / 10,
                    scope=FactScope.CONVERSATION,
                    scope_ref=str(conversation.id),
                    embedding=vector,
                    read_from=(conversation.id, *lines),
                )
            ],
        )
        added_here.add(row.id)
        # The game's own facts are canon: dialogue never replaces them.
        if (
            close is not None
            and (similarity >= settings.memory_fact_supersede_similarity or same)
            and not canon
            and close[0].id not in confirmed
        ):
            replaces.append((close[0].id, row.id))
        else:
            counts["added"] += 1
    # In id order, as the facts API supersedes: two writers replacing the same facts never deadlock.
    here = str(conversation.id)
    for old_id, new_id in sorted(replaces):
        if supersede(
            session=session, old_id=old_id, new_id=new_id, scope=FactScope.CONVERSATION, scope_ref=here
        ):
            counts["superseded"] += 1
            continue
        # Replaced meanwhile (the game, another extraction, an earlier fact of this answer): the newer
        # fact stands. Moved out of the conversation by gossip, or deleted: nothing stands against it.
        replaced_by = session.scalar(select(Fact.superseded_by).where(Fact.id == old_id))
        if replaced_by is None or replaced_by in added_here:  # a sibling of this answer replaced it
            counts["added"] += 1
        else:
            supersede(session=session, old_id=new_id, new_id=replaced_by)
            counts["duplicate"] += 1
    # Again after the inserts: a re-embed's swap holding the tables let the reads above pass, then
    # committed while an insert waited for it, and the guard trigger stored that fact's vector NULL.
    _refuse_another_space(session)
    return counts


def _refuse_another_space(session: Any) -> None:
    """EmbedderMismatch (the caller's rollback stores nothing, its lines unread) when this worker's
    embedder is not the stored vectors': a worker of theirs extracts them."""
    if not same_space(session=session):
        raise EmbedderMismatch("the stored vectors moved to another embedder; the facts are left to extract")


def run_extract_job(conversation_id: int, *, generate: GenerateJson | None = None) -> dict[str, int]:
    """Extract facts from the lines not read yet; the counts of lines read, facts added, duplicate
    and superseded, and answers outside the schema (empty when another worker holds the job, its
    conversation is gone, or nothing waits). An answer outside the schema still counts its lines as
    read: retrying the same lines would most likely fail the same way."""
    on_engine = generate is None  # this worker's engine generates: its builder cleans the request
    generate = generate or _engine_generate
    mine = uuid.uuid4()
    with claiming(mine), session_scope() as session:
        token = claim_job(
            session=session,
            conversation_id=conversation_id,
            kind=EXTRACT,
            lease_s=settings.memory_job_lease_s,
            token=mine,
        )
    if token is None:
        return {}
    with released(conversation_id, EXTRACT, token), keeping(conversation_id, EXTRACT, token):
        return _extract_step(conversation_id, token, generate, on_engine=on_engine)


def _extract_step(
    conversation_id: int, token: uuid.UUID, generate: GenerateJson, *, on_engine: bool
) -> dict[str, int]:
    """One stretch of lines read under the job's claim (run_extract_job)."""
    with session_scope() as session:
        conversation = conversation_for_memory(session=session, conversation_id=conversation_id)
        if conversation is None:
            return {}
        after = extracted_through(session=session, conversation_id=conversation_id)
        blind, alone = death_record(session=session, conversation_id=conversation_id, kind=EXTRACT)
        lines = session.execute(
            select(Message.seq, Message.role, Message.content, Message.turn_id, Message.speaker_name)
            .where(Message.conversation_id == conversation_id, Message.seq > after, memory_may_read())
            .order_by(Message.seq)
            .limit(EXTRACT_LINES)
        ).all()
        char, user = conversation.character.name, conversation.player_name
        player_id = conversation.player_id
        members = [m.name for m in members_of(session=session, conversation_id=conversation_id)]
        # Only rejected replies left to read: read past them, or the job stayed due and was sent
        # again at every scheduling to read nothing.
        rejected_through = (
            None
            if lines
            else session.scalar(
                select(func.max(Message.seq)).where(
                    Message.conversation_id == conversation_id, Message.seq > after, ~memory_may_read()
                )
            )
        )
        if rejected_through is not None:
            advance_extract(
                session=session, conversation_id=conversation_id, token=token, through=rejected_through
            )
    if not lines:
        return {}
    builder = loaded_builder(generating=on_engine)
    who = speakers(builder, char, user, members)
    lines = lines_that_fit(lines, who, builder)
    system, body = extract_prompt([_line(r) for r in lines], who)
    if blind >= MEMORY_JOB_DEATHS:  # inside engines that died, once alone too: not again
        logger.warning(
            "conversation %s lines %s-%s read for no facts: their request was inside an engine that died",
            conversation_id,
            lines[0].seq,
            lines[-1].seq,
        )
        raw = '{"facts": []}'
    else:
        raw = generate(system, body, EXTRACT_MAX_TOKENS, FACTS_SCHEMA, alone)
    facts = parse_facts(raw)
    last = lines[-1]
    source = f"turn:{last.turn_id}" if last.turn_id else f"lines:{lines[0].seq}-{last.seq}"

    # Embedded before the store's transaction, which holds the job's row (and, once it writes facts,
    # theirs): a desk change or an erasure waiting on them would wait for the embedder too.
    names = player_names(user, who.user, [char, *members])
    vectors = (
        fact_vectors(as_stored(facts, player_id=player_id, names=names), player_id=player_id)
        if facts
        else None
    )

    def store() -> dict[str, int] | None:
        with session_scope() as session:
            if not advance_extract(
                session=session, conversation_id=conversation_id, token=token, through=last.seq
            ):
                return None  # the claim lapsed: another worker reads these lines
            clear_engine_deaths(session=session, conversation_id=conversation_id, kind=EXTRACT)
            conversation = conversation_for_memory(session=session, conversation_id=conversation_id)
            assert conversation is not None
            return store_extracted(
                session=session,
                conversation=conversation,
                facts=facts or [],
                source=source,
                lines=(lines[0].seq, last.seq),
                names=names,
                vectors=vectors,
            )

    # Its own transaction, run again after a deadlock (facts are locked by the desk's drop of an
    # edited line's, by supersede and gossip): the generation is not thrown away for one.
    counts = again_on_conflict(store, what="an extraction's store")
    if counts is None:
        return {}
    read = {"lines": len(lines), "malformed": int(facts is None), **counts}
    return read | ({"without_model": 1} if blind >= MEMORY_JOB_DEATHS else {})
