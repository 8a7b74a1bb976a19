"""A turn's reply shape in the worker: what vLLM's guided decoding gets for it, what the prompt says
of it, and how a finished reply is read (parsed and checked against its schema; an NPC reply's
`say` becomes the reply text that history, embeddings and the quality gate see)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, TypeVar

from core.json_numbers import UnstorableNumber, loads_finite
from core.settings import settings
from core.text import cut_at_stops, storable_output
from core.versioned_cache import VersionedCache
from db.models import Character, TurnErrorCode
from roleplay.actions import ARG_MAX_CHARS, SAY_MAX_CHARS, Action, card_actions, check_actions, reply_schema
from roleplay.mood import EMOTIONS
from structured.json_text import escape_raw_controls
from structured.spec import outputs_of, pattern_validator, schema_of, structured_outputs_for
from worker.engine_loop import Generation

NPC = "npc"
# Tokens an NPC reply needs beyond its spoken line and its action: the keys and the emotion.
NPC_OVERHEAD_TOKENS = 32
# The prompt room an NPC reply's budget always leaves (persona, actions and message).
MIN_PROMPT_TOKENS = 256
# Languages written in characters of three UTF-8 bytes (U+0800 on: Hangul, kana, Han, Thai, the
# Indic scripts, Georgian, Ethiopic, …), on which a byte-level vocabulary spends up to three tokens
# each (the bundled model about 2.2 a Hangul syllable, 1.7-1.9 a Thai, Tamil, Bengali or Georgian
# letter): their spoken line is measured one character a token, with three tokens a character to
# close it. Counted as Latin text, such a `say` past about half its schema's length could not close
# in its budget and the turn failed `structured_reply_cut` (reviews, stops 75 and 79). A character is
# taken to speak one by its `language` (any spelling: ko, ko-KR, ko_KR, kor, Korean), else by the
# letters its sheet is written in (a card imported from elsewhere has language `en` unless it says
# otherwise).
WIDE_LANGUAGES = frozenset(
    {"ko", "ja", "zh", "kor", "jpn", "zho", "chi", "korean", "japanese", "chinese"}
    | {"th", "tha", "thai", "lo", "lao", "km", "khm", "khmer", "my", "mya", "bur", "burmese"}
    | {"hi", "hin", "hindi", "bn", "ben", "bengali", "ta", "tam", "tamil", "te", "tel", "telugu"}
    | {"kn", "kan", "kannada", "ml", "mal", "malayalam", "mr", "mar", "marathi", "gu", "guj", "gujarati"}
    | {"pa", "pan", "punjabi", "or", "ori", "odia", "si", "sin", "sinhala", "ne", "nep", "nepali"}
    | {"ka", "kat", "geo", "georgian", "am", "amh", "amharic", "bo", "bod", "tib", "tibetan"}
)
WIDE_FROM = 0x800  # the first code point of three UTF-8 bytes


def written_wide(text: str) -> bool:
    """Whether most of the text's letters take three UTF-8 bytes or more."""
    letters = [ch for ch in text if ch.isalpha()]
    return bool(letters) and 2 * sum(ord(ch) >= WIDE_FROM for ch in letters) > len(letters)


_wide: VersionedCache[bool] = VersionedCache(kept=10_000)


def tokens_per_char(character: Character | None) -> int:
    """The tokens an NPC reply's budget allows each character of its spoken line: 3 for a character
    speaking a wide language (WIDE_LANGUAGES, or a sheet written_wide), else 1."""
    if character is None:
        return 1

    def read() -> bool:
        if re.split(r"[-_\s]", (character.language or "").strip().lower())[0] in WIDE_LANGUAGES:
            return True
        parts = (character.name, character.description, character.personality, character.scenario)
        return written_wide(" ".join(p for p in parts if p))

    wide = read() if character.id is None else _wide.get(character.id, character.cache_stamp, read)
    return 3 if wide else 1


@dataclass(frozen=True)
class ReplyShape:
    """How one turn's reply is generated and read."""

    kind: str  # json_schema, json_object, regex, choice, or npc
    outputs: Any  # vLLM's StructuredOutputsParams
    schema: dict[str, Any] | None = None  # checked against each reply (json_schema, npc)
    choices: tuple[str, ...] = ()
    pattern: str = ""  # a regex reply's pattern
    actions: tuple[Action, ...] = ()
    # The fewest tokens the engine may generate for it: an NPC reply's spoken line at one token a
    # character, with room for the JSON around it, so that guided decoding can always close it.
    token_budget: int = 0
    # An NPC reply's `say` is cut at the first of these, as a free-text reply is by the engine's stop
    # strings (the prompt's: the format's turn markers, the player's and in a group each other
    # member's `\n<name>:`), which a JSON reply goes without (scenes review: a member's `say` wrote
    # the others' lines).
    say_stops: tuple[str, ...] = ()

    def max_tokens(self, max_new_tokens: int) -> int:
        """The engine's max_tokens for a turn asking for max_new_tokens: the shape's budget, but never
        so much that no prompt of MIN_PROMPT_TOKENS fits beside it."""
        room = settings.max_model_len - MIN_PROMPT_TOKENS
        return max(max_new_tokens, min(self.token_budget, room))


class BadStructuredReply(Exception):
    """A reply that does not parse or validate (max_tokens cut it, or a stop string did)."""

    def __init__(self, message: str, code: TurnErrorCode) -> None:
        super().__init__(message)
        self.code = code


def shape_of(
    params: dict[str, Any], character: Character, *, speaker: str = "character"
) -> ReplyShape | None:
    """The turn's reply shape: its response_format, else its own actions, else the character's
    declared ones (an NPC reply: never the narrator's); None for free text. `{"type": "npc"}` asks
    for the NPC shape even without declared actions (say and emotion; action always null)."""
    max_new_tokens = int(params["max_new_tokens"])
    fmt = params.get("response_format")
    if fmt is not None and fmt["type"] != NPC:
        return format_shape(params)
    if speaker == "narrator":  # the narrator has no mood and does not act
        return None
    actions = params.get("actions")
    if actions is None:
        actions = declared_actions(character)
    if actions is None:
        if fmt is None:
            return None
        actions = []
    per_char = tokens_per_char(character)
    return npc_shape(json.dumps(actions, sort_keys=True), say_chars(max_new_tokens, per_char), per_char)


def format_shape(params: dict[str, Any]) -> ReplyShape | None:
    """The shape a turn's data response_format asks for (json_schema, json_object, regex, choice);
    None for text, the NPC shape, or none."""
    fmt = params.get("response_format")
    if fmt is None or fmt["type"] in ("text", NPC):
        return None
    return _format_shape(json.dumps(fmt, sort_keys=True))


def reading_shape(params: dict[str, Any]) -> ReplyShape | None:
    """format_shape without its guided-decoding parameters (no engine import): what a reply that
    does not come from the engine, such as a writer's edit, is read and checked by."""
    fmt = params.get("response_format")
    if fmt is None or fmt["type"] in ("text", NPC):
        return None
    return _shape_read_by(fmt, outputs=None)


# {character id: (version, its declared actions as canonical JSON, or None)}: the card is read once
# per version; a version bump (every upsert) reads it again, so a changed declaration takes effect
# at the next turn, and its new schema is a new key in npc_shape's cache and in vLLM's grammar cache.
_declared: VersionedCache[list[dict[str, Any]] | None] = VersionedCache(kept=10_000)


def declared_actions(character: Character) -> list[dict[str, Any]] | None:
    """The character's declared actions (card extension), cached per character version."""

    def read() -> list[dict[str, Any]] | None:
        raw = card_actions(character.card)
        return None if raw is None else [a.model_dump() for a in check_actions(raw, "actions", stored=True)]

    if character.id is None:  # not stored: nothing to key it by
        return read()
    return _declared.get(character.id, character.cache_stamp, read)


def say_chars(max_new_tokens: int, per_char: int = 1) -> int:
    """The spoken line's length limit in an NPC reply's schema, for a turn asking max_new_tokens of a
    character whose characters cost `per_char` tokens (tokens_per_char)."""
    # About three characters a token (one in a wide language), so the line is as long as the turn
    # asked; rounded up to a power of two of tokens, so a handful of schemas (each compiled once by
    # vLLM) serve all turns. A wide language's line holds a third of SAY_MAX_CHARS: its budget, three
    # tokens a character, stays the Latin line's at most (review: 600 Hangul took 1,800 tokens of a
    # 2,048-token context, and the persona no longer fit).
    bucket = 1 << max(max_new_tokens - 1, 1).bit_length()
    return max(16, min(SAY_MAX_CHARS // per_char, bucket * 3 // per_char))


@lru_cache(maxsize=256)
def npc_shape(actions_json: str, say_chars: int = SAY_MAX_CHARS, per_char: int = 1) -> ReplyShape:
    """The NPC reply shape for a declaration (canonical JSON): its schema and guided-decoding
    parameters, built once per declaration."""
    actions = tuple(Action.model_validate(a) for a in json.loads(actions_json))
    schema = reply_schema(list(actions), say_chars)
    arg_tokens = max(
        (len(x.name) + sum(len(n) + (ARG_MAX_CHARS if a.type == "string" and not a.enum else 24)
                           for n, a in x.args.items())
         for x in actions),
        default=0,
    )  # fmt: skip
    return ReplyShape(
        kind=NPC,
        outputs=structured_outputs_for(json_schema=schema),
        schema=schema,
        actions=actions,
        token_budget=say_chars * per_char + NPC_OVERHEAD_TOKENS + arg_tokens,
    )


@lru_cache(maxsize=256)
def _format_shape(fmt_json: str) -> ReplyShape:
    fmt = json.loads(fmt_json)
    return _shape_read_by(fmt, outputs=outputs_of(fmt))


def _shape_read_by(fmt: dict[str, Any], outputs: Any) -> ReplyShape:
    schema = schema_of(fmt) if fmt["type"] == "json_schema" else None
    return ReplyShape(
        kind=fmt["type"],
        outputs=outputs,
        schema=schema,
        choices=tuple(fmt.get("choice", ())),
        pattern=fmt.get("regex", ""),
    )


def actions_prompt(shape: ReplyShape | None, char: str) -> str | None:
    """The prompt section that tells the model its reply shape and the actions it may take (its header
    is the prompt builder's: worker/prompt/layout.py's ACTIONS_HEADER)."""
    if shape is None or shape.kind != NPC:
        return None
    lines = [
        f'{char} answers in JSON: {{"say": what {char} says, "emotion": one of {", ".join(EMOTIONS)}, '
        '"action": null, or one of the actions below as {"name": ..., "args": {...}}}.',
    ]
    lines += [f"- {a.signature()}" + (f": {a.description}" if a.description else "") for a in shape.actions]
    if not shape.actions:
        lines.append("(no actions: action is always null)")
    return "\n".join(lines)


def read_reply(shape: ReplyShape | None, gen: Generation) -> Generation:
    """The generation as the turn keeps it: for a JSON shape, parsed (`structured`) and checked
    against its schema; an NPC reply's text becomes its `say`. BadStructuredReply if it does not
    parse or validate: never stored as if it did."""
    if shape is None:
        return gen
    recheck = _RECHECK_LEFT.set([REGEX_RECHECK_S])
    try:
        return _read(shape, gen)
    finally:
        _RECHECK_LEFT.reset(recheck)


def _read(shape: ReplyShape, gen: Generation) -> Generation:
    if shape.kind == "regex":
        return _read_regex(shape, gen)
    if shape.kind == "choice":
        if gen.text not in shape.choices:
            raise _bad(gen, f"the reply {gen.text[:80]!r} is none of the choices")
        return gen
    try:
        # A string with a length bound, as xgrammar builds it, takes raw control characters (a tab)
        # and no escape: read as JSON they are, written back escaped below (review).
        parsed = loads_finite(gen.text, strict=False)
        value = _storable(parsed)
    except UnstorableNumber as exc:  # `1e999`: the grammar's number syntax allows it, jsonb does not
        raise _bad(gen, f"the reply holds {exc}") from None
    except (ValueError, RecursionError) as exc:  # nested past Python's recursion limit: not readable
        raise _bad(gen, f"the reply is not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if shape.kind == "json_object" and not isinstance(value, dict):
        raise _bad(gen, "the reply is JSON but not an object")
    if shape.schema is not None:
        try:
            error = next(iter(_reply_validator()(shape.schema).iter_errors(value)), None)
        except TimeoutError:  # a `pattern` search ran out (_search)
            raise _bad(gen, _ran_out("its schema's patterns")) from None
        except Exception as exc:  # a schema the checker cannot follow (a $ref under a nested $id)
            raise _bad(gen, f"the reply could not be checked against its schema: {str(exc)[:200]}") from None
        if error is not None:
            raise _bad(gen, f"the reply does not match its schema: {error.message[:200]}")
    if shape.kind == NPC:
        say = cut_at_stops(value["say"], shape.say_stops)
        if say != value["say"]:
            value = {**value, "say": say}
        if not value["say"].strip():  # the schema's minLength lets " " through; a free-text blank fails too
            raise _bad(gen, "the reply's say is blank")
        return dataclasses.replace(gen, text=value["say"], structured=value, emotion=value["emotion"])
    # The reply as a client parses it (a chat completion's content, a batch line's), strict JSON:
    # escaped where it stands, as its stream was (worker/engine.py::stream_hook).
    return dataclasses.replace(gen, text=escape_raw_controls(gen.text), structured=value)


def _storable(value: Any) -> Any:
    """A parsed JSON reply as it can be stored and embedded: strings without NUL (an escaped
    `\\u0000` decodes to one; jsonb and text columns refuse it) and without lone surrogates (an
    escaped `\\ud800` decodes to one; it cannot be encoded as UTF-8); checked against its schema as
    it is kept."""
    if isinstance(value, str):
        return storable_output(value)
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {storable_output(k): _storable(v) for k, v in value.items()}
    return value


def _read_regex(shape: ReplyShape, gen: Generation) -> Generation:
    """A regex reply, kept only if the whole text matches (max_tokens or a stop string can end it
    part-way through the pattern, where the grammar has not finished)."""
    if gen.finish_reason == "length":
        raise _bad(gen, "cut")
    pattern = _compiled(shape.pattern)
    try:
        # A pattern that backtracks (`(a|aa)+!`) can take hours on a reply the grammar let through
        # and a stop string cut: the check gives up, and the turn fails alone.
        matched = pattern is None or (
            _within_time(lambda limit: pattern.fullmatch(gen.text, concurrent=True, timeout=limit))
            is not None
        )
    except TimeoutError:
        raise _bad(gen, _ran_out("the pattern")) from None
    if not matched:
        raise _bad(gen, f"the reply {gen.text[:80]!r} does not match the whole pattern")
    return gen


# Short, and run without the GIL (`concurrent`): the engine loop and the lease keeper are threads of
# this process, and a claim may hold several such candidates. The `regex` module counts it in the
# process's CPU time (clock()), every thread's together, so under load it runs out sooner than it
# reads: a check that runs out is made once more within REGEX_RECHECK_S before the reply is failed
# (a new attempt would regenerate the same reply: its seed is the turn's).
REGEX_CHECK_S = 0.1
REGEX_RECHECK_S = 1.0  # all of one reply's checks made again together (a schema may hold many patterns)

_T = TypeVar("_T")
# What is left of the reply being read's REGEX_RECHECK_S (set by read_reply; unset: a whole one).
_RECHECK_LEFT: ContextVar[list[float] | None] = ContextVar("recheck_left", default=None)


def _within_time(check: Callable[[float], _T]) -> _T:
    """check(limit) within REGEX_CHECK_S, else once more within what is left of the reply's
    REGEX_RECHECK_S; TimeoutError if that runs out too."""
    try:
        return check(REGEX_CHECK_S)
    except TimeoutError:
        left = _RECHECK_LEFT.get() or [REGEX_RECHECK_S]
        if left[0] <= 0:
            raise
        started = time.process_time()  # the clock the limit is counted in
        try:
            return check(left[0])
        finally:
            left[0] -= time.process_time() - started


def _ran_out(what: str) -> str:
    return f"the reply could not be checked against {what} within {REGEX_RECHECK_S} s of CPU time"


@cache
def _reply_validator() -> Any:
    """Draft 2020-12 whose patterns search in the `regex` module within REGEX_CHECK_S
    (structured/spec.py::pattern_validator): a pattern that backtracks held the interpreter for
    hours on a reply the grammar let through, the engine loop and the lease keeper with it. A search
    that runs out raises: the turn fails alone."""
    return pattern_validator(_search)


def _search(pattern: str, text: str) -> bool:
    compiled = _compiled(pattern)
    if compiled is None:  # a syntax the `regex` module reads otherwise: the grammar alone checks it
        return True
    try:
        return _within_time(lambda limit: compiled.search(text, concurrent=True, timeout=limit)) is not None
    except TimeoutError:
        raise TimeoutError(f"a pattern check ran past {REGEX_RECHECK_S} s") from None


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    """The pattern in the `regex` module; None where its syntax differs from xgrammar's (the grammar
    alone checks then)."""
    import regex

    from structured.pattern_reading import FLAGS, as_grammar_reads

    try:
        return regex.compile(as_grammar_reads(pattern), FLAGS)
    except (regex.error, RecursionError):  # groups nested past the parser's recursion: not checked here
        return None


def _bad(gen: Generation, why: str) -> BadStructuredReply:
    if gen.finish_reason == "length":
        return BadStructuredReply(
            # Both requests' names: the one an OpenAI client can send, and the native one (review of
            # error texts: an OpenAI caller was told to send a field its request refuses).
            f"the reply's token limit ended the structured reply before it closed ({gen.completion_tokens} "
            "tokens); raise it (max_tokens or max_completion_tokens in an OpenAI request, max_new_tokens "
            "in a native one)",
            TurnErrorCode.STRUCTURED_REPLY_CUT,
        )
    code = TurnErrorCode.INVALID_STRUCTURED_REPLY
    return BadStructuredReply(f"{why} (finish_reason={gen.finish_reason})", code)
