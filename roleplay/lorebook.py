"""Lorebook (World Info) activation, server-side, with the reasons recorded.

Semantics (SillyTavern's, as far as the V2/V3 card fields carry them):
- An entry fires when it is enabled and is `constant`, or one of its `keys` occurs in the scanned
  text. Keys are substrings (trimmed; empty ones dropped), or regular expressions when written
  `/pattern/flags` or when the entry has `use_regex` (not on SillyTavern's own entries: it marks
  every exported entry so, and reads only `/…/` keys as patterns); matching ignores case unless
  `case_sensitive`.
- `selective` entries with `secondary_keys` also need their logic to hold: AND_ANY (default: one
  secondary key occurs), AND_ALL, NOT_ANY, NOT_ALL.
- The scanned text is the player's message and the last `scan_depth` history lines; in a recursion
  step, primary keys are read in the entries that fired in the step before, and secondary keys in
  the chat and all recursed so far.
- Recursive scanning: the content of entries that fired is scanned for the keys of the rest, up to
  `max_recursion_steps` rounds (entries with `exclude_recursion` fire only from the chat itself;
  `prevent_recursion` content never triggers others).
- Budget: constant entries first, then higher `priority`, then lower `insertion_order`; entries that
  do not fit `token_budget` are dropped and recorded. Kept entries are inserted in `insertion_order`,
  `before_char` ones before the character sheet, `after_char` ones after it.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from typing import Any, Literal

import regex
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from core.regex_size import MAX_PATTERN_CHARS, size_refusal
from core.text import caseless_keeping_jamo
from core.validation import first_error

logger = logging.getLogger(__name__)

# Regex keys come from uploaded cards: each search gets this long before it counts as a failure of its
# entry (a pattern with catastrophic backtracking must not stall every turn of the worker).
REGEX_TIMEOUT_S = 0.05
# All regex keys of one turn's activation together: past it, entries with regex keys fail unmatched
# (a card of a thousand slow patterns would otherwise cost each turn a thousand timeouts).
REGEX_BUDGET_S = 0.25
# One turn's activation outside its regex searches (plain keys' searches, the loop over entries and
# keys), in the thread's CPU time: a plain key is a substring search, cheap alone, but a card of a
# hundred thousand keys over a recursion step's megabyte of entry text cost every turn of its
# character tens of seconds; past this, entries whose keys were not reached fail.
PLAIN_BUDGET_S = 0.25
# V3 decorators mlchat honours; any other `@@name` line at the start of an entry's content is removed
# from the prompt and listed in the manifest.
HONOURED_DECORATORS = ("@@activate", "@@dont_activate")
# What a card's book may hold (checked at import): each turn of its character scans every entry.
MAX_ENTRIES = 2000
MAX_KEYS_PER_ENTRY = 100  # primary and secondary, each
MAX_ENTRY_CHARS = 50_000
DEFAULT_SCAN_DEPTH = 2
DEFAULT_TOKEN_BUDGET = 512
MAX_RECURSION_STEPS = 3


class SelectiveLogic(IntEnum):
    """SillyTavern's `extensions.selectiveLogic` numbering."""

    AND_ANY = 0
    NOT_ALL = 1
    NOT_ANY = 2
    AND_ALL = 3


class LoreEntry(BaseModel):
    id: int | str
    name: str = ""
    keys: list[str] = Field(default_factory=list)
    secondary_keys: list[str] = Field(default_factory=list)
    selective: bool = False
    selective_logic: SelectiveLogic = SelectiveLogic.AND_ANY
    content: str
    enabled: bool = True
    constant: bool = False
    case_sensitive: bool = False
    use_regex: bool = False
    insertion_order: int = 100
    priority: int = 10
    position: Literal["before_char", "after_char"] = "after_char"
    exclude_recursion: bool = False
    prevent_recursion: bool = False
    # SillyTavern's: fires only in a recursion step (never with recursion off); and its own scan
    # depth in place of the book's.
    delay_until_recursion: bool = False
    scan_depth: int | None = Field(default=None, ge=0)
    ignored_decorators: list[str] = Field(default_factory=list)

    @field_validator("keys", "secondary_keys")
    @classmethod
    def _keys_not_empty(cls, keys: list[str]) -> list[str]:
        """No empty key: it would occur in every text."""
        return [key for key in keys if key.strip()]

    @model_validator(mode="after")
    def _plain_keys_trimmed(self) -> LoreEntry:
        """Plain keys without their outer spaces, as SillyTavern reads them (a `use_regex` entry's
        keys are patterns, whose spaces count)."""
        if not self.use_regex:
            self.keys = [key.strip() for key in self.keys]
            self.secondary_keys = [key.strip() for key in self.secondary_keys]
        return self

    @field_validator("keys", "secondary_keys")
    @classmethod
    def _regex_keys_compile(cls, keys: list[str]) -> list[str]:
        for key in keys:
            parsed = _as_regex(key)
            if parsed is not None:
                _refuse_large(parsed[0], key, "")
                try:
                    regex.compile(parsed[0])
                except regex.error as exc:
                    raise ValueError(f"bad regex key {key!r}: {exc}") from exc
                except RecursionError:
                    raise ValueError(f"bad regex key {key[:40]!r}…: nested too deeply") from None
        return keys

    @model_validator(mode="after")
    def _use_regex_keys_compile(self) -> LoreEntry:
        """With `use_regex`, every key is a pattern: one that does not compile is refused at import,
        not found at every turn."""
        if self.use_regex:
            for name, keys in (("keys", self.keys), ("secondary_keys", self.secondary_keys)):
                for key in keys:
                    if _as_regex(key) is None:
                        _refuse_large(key, key, f"{name}: ")
                        try:
                            regex.compile(key)
                        except regex.error as exc:
                            raise ValueError(f"{name}: bad regex key {key!r} (use_regex): {exc}") from exc
                        except RecursionError:
                            raise ValueError(
                                f"{name}: bad regex key {key[:40]!r}… (use_regex): nested too deeply"
                            ) from None
        return self

    @model_validator(mode="after")
    def _decorators(self) -> LoreEntry:
        """Leading `@@` lines of the content are decorators: honoured ones set the entry's flags, the
        others are kept aside (listed in the manifest); none of them reaches the prompt."""
        lines = self.content.split("\n")
        taken = 0
        while taken < len(lines) and lines[taken].startswith("@@"):
            decorator = lines[taken].strip()
            taken += 1
            name = decorator.split()[0]
            if name == "@@activate":
                self.constant = True
            elif name == "@@dont_activate":
                self.enabled = False
            elif decorator not in self.ignored_decorators:
                self.ignored_decorators.append(decorator)
        if taken:
            self.content = "\n".join(lines[taken:]).strip("\n")
        return self


UNBUDGETED = 1 << 40  # a book's token budget of 0: no limit of its own

# A first part this many characters a token left is enough to tell an entry overflows the budget
# (about four characters a token in the scripts measured; a text of longer tokens is counted whole).
CHARS_COUNTED_PER_TOKEN = 8


class Lorebook(BaseModel):
    name: str = ""
    scan_depth: int = Field(default=DEFAULT_SCAN_DEPTH, ge=0)
    token_budget: int = Field(default=DEFAULT_TOKEN_BUDGET, ge=0)
    recursive_scanning: bool = False
    max_recursion_steps: int = Field(default=MAX_RECURSION_STEPS, ge=0)
    entries: list[LoreEntry] = Field(default_factory=list)

    @classmethod
    def from_character_book(cls, book: dict[str, Any]) -> Lorebook:
        """From a V2/V3 card's `character_book` (unknown fields are ignored here; the card keeps them)."""
        entries = book.get("entries", [])
        if not isinstance(entries, list):
            raise ValueError("entries must be a list")
        if len(entries) > MAX_ENTRIES:
            raise ValueError(f"entries: {len(entries)} of them; the limit is {MAX_ENTRIES}")
        parsed = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise ValueError(f"entries[{i}] must be an object")
            for field_name in ("keys", "secondary_keys"):
                keys = e.get(field_name)
                if isinstance(keys, list) and len(keys) > MAX_KEYS_PER_ENTRY:
                    raise ValueError(
                        f"entries[{i}].{field_name}: {len(keys)} keys; the limit is {MAX_KEYS_PER_ENTRY}"
                    )
            content = e.get("content")
            if isinstance(content, str) and len(content) > MAX_ENTRY_CHARS:
                raise ValueError(
                    f"entries[{i}].content: {len(content)} characters; the limit is {MAX_ENTRY_CHARS}"
                )
            ext = e.get("extensions") or {}
            if not isinstance(ext, dict):
                raise ValueError(f"entries[{i}].extensions must be an object")
            try:
                # A field given as null is the field not given, as SillyTavern reads it (`|| []`).
                parsed.append(
                    LoreEntry(
                        id=_or_default(e.get("id"), i),
                        name=e.get("name") or e.get("comment") or "",
                        keys=_or_default(e.get("keys"), []),
                        secondary_keys=_or_default(e.get("secondary_keys"), []),
                        selective=_or_default(e.get("selective"), False),
                        selective_logic=_or_default(ext.get("selectiveLogic"), 0),
                        content=e["content"],
                        enabled=_or_default(e.get("enabled"), True),
                        constant=_or_default(e.get("constant"), False),
                        case_sensitive=e.get("case_sensitive") or ext.get("case_sensitive") or False,
                        # SillyTavern marks every entry it exports use_regex while its scanner
                        # reads only `/…/flags` keys as patterns: its entries (display_index is its
                        # own) are read as it reads them.
                        use_regex=_or_default(e.get("use_regex"), False) and "display_index" not in ext,
                        insertion_order=_or_default(e.get("insertion_order"), 100),
                        priority=_or_default(e.get("priority"), 10),
                        position=e.get("position") or "after_char",
                        exclude_recursion=_or_default(ext.get("exclude_recursion"), False),
                        prevent_recursion=_or_default(ext.get("prevent_recursion"), False),
                        delay_until_recursion=_delay_level(ext.get("delay_until_recursion")),
                        scan_depth=ext.get("scan_depth"),
                    )
                )
            except KeyError as exc:
                raise ValueError(f"entries[{i}] has no {exc.args[0]!r}") from exc
            except ValidationError as exc:
                raise ValueError(first_error(exc, f"entries[{i}]")) from None
            except ValueError as exc:
                raise ValueError(f"entries[{i}]: {exc}") from exc
        try:
            return cls(
                name=book.get("name") or "",
                scan_depth=_or_default(book.get("scan_depth"), DEFAULT_SCAN_DEPTH),
                token_budget=_or_default(book.get("token_budget"), DEFAULT_TOKEN_BUDGET),
                recursive_scanning=_or_default(book.get("recursive_scanning"), False),
                max_recursion_steps=_or_default(book.get("max_recursion_steps"), MAX_RECURSION_STEPS),
                entries=parsed,
            )
        except ValidationError as exc:
            raise ValueError(first_error(exc)) from None


def _delay_level(value: Any) -> Any:
    """SillyTavern's `delay_until_recursion`: true/false, or a recursion level (1, 2, …): any level
    delays the entry to a recursion step (review: a level refused the whole card)."""
    if value is None:
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 0
    return value


def _or_default(value: Any, default: Any) -> Any:
    """A card's field as read: null is the field not given."""
    return default if value is None else value


def to_character_book(book: Lorebook) -> dict[str, Any]:
    """mlchat's lorebook as a V2/V3 `character_book` (for exporting characters defined in data/)."""
    return {
        "name": book.name,
        "scan_depth": book.scan_depth,
        "token_budget": book.token_budget,
        "recursive_scanning": book.recursive_scanning,
        "max_recursion_steps": book.max_recursion_steps,
        "extensions": {},
        "entries": [
            {
                "id": e.id,
                "name": e.name,
                "keys": e.keys,
                "secondary_keys": e.secondary_keys,
                "selective": e.selective,
                "content": e.content,
                "enabled": e.enabled,
                "constant": e.constant,
                "case_sensitive": e.case_sensitive,
                "use_regex": e.use_regex,
                "insertion_order": e.insertion_order,
                "priority": e.priority,
                "position": e.position,
                "extensions": {
                    "selectiveLogic": int(e.selective_logic),
                    "exclude_recursion": e.exclude_recursion,
                    "prevent_recursion": e.prevent_recursion,
                    "delay_until_recursion": e.delay_until_recursion,
                    **({"scan_depth": e.scan_depth} if e.scan_depth is not None else {}),
                },
            }
            for e in book.entries
        ],
    }


def stored_lorebook(raw: dict[str, Any] | None) -> Lorebook:
    """A stored lorebook as activation reads it: an entry that no longer passes the checks (one added
    after it was stored) is left out and logged, rather than failing every turn of its character."""
    raw = raw or {}
    try:
        return Lorebook.model_validate(raw)
    except ValidationError:
        entries = []
        for i, entry in enumerate(raw.get("entries") or []):
            try:
                entries.append(LoreEntry.model_validate(entry))
            except ValidationError as exc:
                logger.warning("lorebook entries[%d] left out: %s", i, str(exc)[:200])
        try:
            book = Lorebook.model_validate({**raw, "entries": []})
        except ValidationError as exc:  # a book-level field: its defaults, the entries kept
            logger.warning("lorebook settings left at their defaults: %s", str(exc)[:200])
            book = Lorebook()
        return book.model_copy(update={"entries": entries})


@dataclass(frozen=True)
class FiredEntry:
    entry: LoreEntry
    reason: str  # e.g. "key 'dragon' in the player's message", "constant", "recursion step 1: key 'x'"
    content: str  # macros filled
    tokens: int
    # Dropped with the budget spent, its first part alone counted: `tokens` is at least that many.
    partly_counted: bool = False


@dataclass
class Activation:
    kept: list[FiredEntry] = field(default_factory=list)  # in insertion order
    dropped: list[FiredEntry] = field(default_factory=list)  # fired, but over the token budget
    failed: list[tuple[LoreEntry, str]] = field(default_factory=list)  # a regex key timed out: not fired
    room_limits: bool = False  # the prompt's room, smaller than the book's budget, was the limit


class KeyFailed(Exception):
    """A regex key that could not be matched on this turn's text; its entry fails, not the turn."""


class KeyTimeout(KeyFailed):
    """A regex key ran past REGEX_TIMEOUT_S on this turn's text."""

    def __init__(self, key: str) -> None:
        super().__init__(f"regex key {key!r} ran past {REGEX_TIMEOUT_S * 1000:.0f} ms and was stopped")


def _refuse_large(pattern: str, key: str, where: str) -> None:
    """A pattern too long, or whose counted repeats expand too far, is refused before it compiles
    (compiling alone could take minutes and gigabytes; no timeout covers it)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        limit = f"{len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}"
        raise ValueError(f"{where}regex key {key[:40]!r}…: {limit}")
    refusal = _size_refusal(pattern)
    if refusal is not None:
        raise ValueError(f"{where}regex key {key[:40]!r}: {refusal}")


_size_refusal = lru_cache(maxsize=1024)(size_refusal)  # a key is tried on every turn of its character


def _as_regex(key: str) -> tuple[str, str] | None:
    """(pattern, flags) of a key written `/pattern/flags`, read as SillyTavern reads it: flags of
    `gimsuy` only, and no unescaped `/` inside the pattern (`/me/please` is a plain key there, not
    the pattern `me` that fired on nearly every line)."""
    m = re.fullmatch(r"/([\s\S]+?)/([gimsuy]*)", key)
    if m is None or re.search(r"(^|[^\\])/", m.group(1)):
        return None
    return _from_javascript(m.group(1)), m.group(2)


# JavaScript's regex forms the `regex` module spells otherwise (SillyTavern's keys are JavaScript's):
# a named backreference, a code point escape, a control escape, the class of any character, and the
# word, digit and boundary classes, which are ASCII in JavaScript (with `u` too) and Unicode here: in
# Korean a particle follows a name at once ("Luffy는"), so `/\bLuffy\b/` never fired, and `/\b루피\b/`
# fired where SillyTavern's does not (review, stop 75). Any other escape is passed over whole, so
# `\\k<n>` stays an escaped backslash before `k<n>`; `[` and `]` are followed to tell a class apart.
_JS_FORMS = re.compile(r"\\k<(\w+)>|\\u\{([0-9A-Fa-f]{1,6})\}|\\c([A-Za-z])|\[\^\]|\\.|\[|\]", re.DOTALL)
# Outside a class, the regex module's own ASCII flag scoped to the one escape (as short and fast as
# the escape itself: spelled out as lookarounds, a key of 14 `\b` passed the 1,000-character limit
# and searched ten times slower); inside one, the ranges, each ending on a range so a `-` after it
# stays a literal (`[\w-.]`, a name with a hyphen).
_ASCII_OUTSIDE = {escape: f"(?a:{escape})" for escape in ("\\w", "\\W", "\\d", "\\D", "\\b", "\\B")}
_ASCII_INSIDE = {"\\w": "_A-Za-z0-9", "\\d": "0-9"}  # \W and \D in a class stay Unicode (no nested sets)


def _from_javascript(pattern: str) -> str:
    out: list[str] = []
    in_class = False
    at = 0
    for m in _JS_FORMS.finditer(pattern):
        plain = pattern[at : m.start()]  # no escape in it: each is a token of its own
        out.append(plain)
        at = m.end()
        name, code_point, control, whole = m.group(1), m.group(2), m.group(3), m.group(0)
        if name:
            out.append(f"(?P={name})")
        elif code_point:
            out.append(f"\\U{int(code_point, 16):08x}")
        elif control:
            out.append(f"\\x{ord(control) & 31:02x}")
        elif whole == "[^]":
            out.append(r"[\s\S]")
        elif whole in ("[", "]"):
            in_class = whole == "[" or (in_class and whole != "]")
            out.append(whole)
        elif in_class and whole in _ASCII_INSIDE:
            # A `-` before a class escape is a literal in JavaScript; before the ranges this spells,
            # it would make one (`[.-\w]` is '.', '-' and a word character, not '.'..'_'). Read from
            # the pattern's plain text, never from what came out (`[\\-\w]`, `[[-\w]`: review).
            if plain.endswith("-"):
                out[-1] = plain[:-1] + "\\-"
            out.append(_ASCII_INSIDE[whole])
        else:
            out.append(_ASCII_OUTSIDE.get(whole, whole) if not in_class else whole)
    out.append(pattern[at:])
    return "".join(out)


@dataclass
class KeyBudget:
    """One activation's time for its keys: what its regex keys may still spend searching, in seconds
    (the searches' own wall time), and, from its start, the CPU time everything else may take."""

    left: float = field(default_factory=lambda: REGEX_BUDGET_S)
    # This thread's CPU time, not the wall's: chunk threads, the engine loop and the lease keeper
    # share the interpreter, and waiting for them must not fail entries (nor make which lore is in
    # a prompt depend on the load).
    started: float = field(default_factory=time.thread_time)
    regex_cpu: float = 0.0  # the regex searches' share of that CPU time
    # Each key's regex form, parsed once an activation (a key is tried on every source).
    parsed: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    # `{{char}}` and `{{user}}` in keys are filled as in content (SillyTavern fills every key), once.
    fill: Callable[[str], str] = lambda s: s
    filled_keys: dict[str, str] = field(default_factory=dict)

    def plain_spent(self) -> float:
        """The activation's time so far outside regex searches: plain keys, the loop, folding."""
        return time.thread_time() - self.started - self.regex_cpu

    def filled(self, key: str) -> str:
        if key not in self.filled_keys:
            self.filled_keys[key] = self.fill(key) if "{{" in key or "<" in key else key
        return self.filled_keys[key]

    def as_regex(self, key: str) -> tuple[str, str] | None:
        if key not in self.parsed:
            self.parsed[key] = _as_regex(key)
        return self.parsed[key]


@dataclass(frozen=True)
class _Text:
    """A text keys are matched in, normalised and casefolded once (not once per key and entry)."""

    where: str
    text: str
    folded: str

    @classmethod
    def of(cls, where: str, text: str) -> _Text:
        # Normalised as the keys are (_plain_key): text pasted decomposed (NFD, as macOS writes "서울")
        # or in full-width forms ("ｃａｆｅ") still matches the key a writer typed.
        return cls(where, unicodedata.normalize("NFC", text), caseless_keeping_jamo(text))


@lru_cache(maxsize=4096)
def _plain_key(key: str, case_sensitive: bool) -> str:
    """A plain key as the scanned text is normalised: NFC when case counts, else NFKC (bar Korean
    jamo) casefolded."""
    return unicodedata.normalize("NFC", key) if case_sensitive else caseless_keeping_jamo(key)


def _matches(key: str, source: _Text, entry: LoreEntry, budget: KeyBudget) -> bool:
    key = budget.filled(key)
    if not key.strip():  # filled to nothing ({{// …}}, {{trim}}): no key, as an empty one never matches
        return False
    parsed = budget.as_regex(key)
    if parsed is None and not entry.use_regex:
        key = key.strip()  # a plain key trimmed once filled, as SillyTavern trims it
    if parsed is not None or entry.use_regex:
        pattern, flags = parsed if parsed is not None else (key, "")
        if parsed is not None:  # a `/…/` key's flags are its own, as SillyTavern reads it
            re_flags = regex.IGNORECASE if "i" in flags else 0
        else:
            re_flags = 0 if entry.case_sensitive else regex.IGNORECASE
        if "s" in flags:
            re_flags |= regex.DOTALL
        if "m" in flags:
            re_flags |= regex.MULTILINE
        if budget.left <= 0:
            raise KeyFailed(f"the turn's {REGEX_BUDGET_S * 1000:.0f} ms for regex keys ran out")
        try:  # a card stored before sizes were checked at import: never compiled
            _refuse_large(pattern, key, "")
        except ValueError as exc:
            raise KeyFailed(str(exc)) from None
        limit = min(REGEX_TIMEOUT_S, budget.left)
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            return regex.search(pattern, source.text, re_flags, timeout=limit) is not None
        except TimeoutError:
            if limit < REGEX_TIMEOUT_S:
                raise KeyFailed(f"the turn's {REGEX_BUDGET_S * 1000:.0f} ms for regex keys ran out") from None
            raise KeyTimeout(key) from None
        except regex.error as exc:  # a card stored before use_regex keys were checked at import
            raise KeyFailed(f"regex key {key!r} does not compile: {exc}") from None
        except RecursionError:
            raise KeyFailed(f"regex key {key[:40]!r}… is nested too deeply to compile") from None
        finally:
            budget.left -= time.perf_counter() - started
            budget.regex_cpu += time.thread_time() - started_cpu
    if budget.plain_spent() > PLAIN_BUDGET_S:
        raise KeyFailed(f"the turn's {PLAIN_BUDGET_S * 1000:.0f} ms for plain keys ran out")
    plain = _plain_key(key, entry.case_sensitive)
    return plain in source.text if entry.case_sensitive else plain in source.folded


def _secondary_ok(entry: LoreEntry, scanned: Callable[[], _Text], budget: KeyBudget) -> bool:
    if not (entry.selective and entry.secondary_keys):
        return True
    joined = scanned()
    hits = [_matches(k, joined, entry, budget) for k in entry.secondary_keys]
    return {
        SelectiveLogic.AND_ANY: any(hits),
        SelectiveLogic.AND_ALL: all(hits),
        SelectiveLogic.NOT_ANY: not any(hits),
        SelectiveLogic.NOT_ALL: not all(hits),
    }[entry.selective_logic]


def activate(
    book: Lorebook,
    *,
    message: str,
    history: Sequence[str],
    count_tokens: Callable[[str], int],
    fill: Callable[[str], str] = lambda s: s,
    room: int | None = None,
) -> Activation:
    """Which entries fire for this turn, and which of them fit the book's token budget, and `room`
    (the prompt's: no budget a card sets takes more than the context holds).

    A scan depth of N reads N messages, the player's one of them (SillyTavern's and the card spec's
    count; 0 reads none: only constant entries fire), an entry's own depth in place of the book's.
    In a recursion step an entry's keys are read against the chat and everything recursed so far
    (its primary key in the chat, its secondary one in another entry's content fires it there), and
    the entries' content is read filled ({{user}} as the player's name), as SillyTavern reads them."""
    deepest = max([book.scan_depth, *(e.scan_depth or 0 for e in book.entries)])
    # An empty message (a scene's or the narrator's step: no player line) is no message read.
    said = [("the player's message", message)] if message else []
    said += [(f"history line -{i}", line) for i, line in enumerate(reversed(history), 1)]
    chat_said = said[:deepest]
    chat = [_Text.of(where, text) for where, text in chat_said]  # each text prepared once a turn
    candidates = [e for e in book.entries if e.enabled and e.content]
    fired = [(e, "constant") for e in candidates if e.constant]
    waiting = [e for e in candidates if not e.constant]
    activation = Activation()
    budget = KeyBudget(fill=fill)
    last_round = fired + _scan(
        waiting, chat, step=0, failed=activation.failed, budget=budget, depth=book.scan_depth, chat=len(chat)
    )
    fired = list(last_round)
    seen = list(chat)  # what keys are read against in a recursion step: the chat, and all recursed
    for step in range(1, (book.max_recursion_steps if book.recursive_scanning else 0) + 1):
        recursed = [
            _Text.of(f"recursion step {step}: entry {e.id}", fill(e.content))
            for e, _ in last_round
            if not e.prevent_recursion
        ]
        seen += recursed
        last_round = (
            _scan(
                waiting,
                seen,
                step=step,
                failed=activation.failed,
                budget=budget,
                depth=book.scan_depth,
                chat=len(chat),
            )
            if recursed
            else []
        )
        if not last_round:
            break
        fired += last_round
    ranked = sorted(fired, key=lambda f: (not f[0].constant, -f[0].priority, f[0].insertion_order))
    # A budget of 0 is no budget of the book's (some editors write it for "all"): the room limits it.
    book_limit = book.token_budget or UNBUDGETED
    limit = book_limit if room is None else min(book_limit, max(room, 0))
    activation.room_limits = limit < book_limit
    # What one turn reads of the entries, at most: a card of thousands of long entries (or a budget
    # of a billion) had every entry that fired filled, cleaned and tokenised at every turn of its
    # character. Past what is left of the budget a first part of an entry is counted, and once this
    # much text was counted the rest are dropped uncounted.
    allowance = (limit + 1) * CHARS_COUNTED_PER_TOKEN * 4
    short_allowance = allowance  # past it, for entries no longer than the tokens left (they may fit)
    used = 0
    for entry, reason in ranked:
        # Past the allowance an entry no longer than the tokens left is still read (a short one
        # ranked after long ones fits), within an allowance of its own: scripts of more tokens
        # than characters would otherwise have every short entry read and dropped.
        short = allowance <= 0 and len(entry.content) <= limit - used and short_allowance > 0
        content = fill(entry.content) if allowance > 0 or short else entry.content
        reach = len(content) if short else max(allowance, 0)
        head = content[: min((limit - used + 1) * CHARS_COUNTED_PER_TOKEN, reach)]
        tokens = count_tokens(head) if head else 0
        if short:
            short_allowance -= len(head)
        else:
            allowance -= len(head)
        partly = len(head) < len(content) and (tokens > limit - used or allowance <= 0)
        if not partly and len(head) < len(content):
            tokens = count_tokens(content)
            allowance -= len(content) - len(head)
        item = FiredEntry(entry, reason, content, tokens, partly)
        if not partly and used + item.tokens <= limit:
            activation.kept.append(item)
            used += item.tokens
        else:
            activation.dropped.append(item)
    activation.kept.sort(key=lambda f: f.entry.insertion_order)
    return activation


def _scan(
    waiting: list[LoreEntry],
    texts: Sequence[_Text],
    *,
    step: int,
    failed: list[tuple[LoreEntry, str]],
    budget: KeyBudget,
    depth: int,
    chat: int,
) -> list[tuple[LoreEntry, str]]:
    """Entries of `waiting` whose keys occur in `texts` (the chat's `chat` messages first, newest
    first, each entry reading as many as its scan depth, else `depth`; then what recursion added) and whose
    secondary keys hold on the same; they leave `waiting`, and so does an entry whose regex key
    failed (timed out, or did not compile), or whose regex keys come after the turn's time for regex
    keys ran out (recorded in `failed`). Entries delayed until recursion wait out step 0; those
    excluded from it, every later step. Linear in the entries: a book of thousands is scanned once
    per step, its texts casefolded once."""
    # By the chat messages read (at most the chat's: a card's entries of a thousand depths share a
    # few; review), the texts and, made only once a secondary key asks, their join.
    reads: dict[int, tuple[list[_Text], Callable[[], _Text]]] = {}

    def read_at(own: int) -> tuple[list[_Text], Callable[[], _Text]]:
        n = min(own, chat)
        if n not in reads:
            read = [*texts[:n], *texts[chat:]]
            joined: list[_Text] = []

            def scanned() -> _Text:
                if not joined:
                    joined.append(_Text.of("", "\n".join(t.text for t in read)))
                return joined[0]

            reads[n] = read, scanned
        return reads[n]

    hits, left = [], []
    for entry in waiting:
        if (step and entry.exclude_recursion) or (not step and entry.delay_until_recursion):
            left.append(entry)
            continue
        read, scanned = read_at(entry.scan_depth if entry.scan_depth is not None else depth)
        try:
            reason = _first_hit(entry, read, scanned, budget)
        except KeyFailed as exc:
            failed.append((entry, str(exc)))
            continue
        if reason is None:
            left.append(entry)
        else:
            hits.append((entry, reason))
    waiting[:] = left
    return hits


def _first_hit(
    entry: LoreEntry, texts: Sequence[_Text], scanned: Callable[[], _Text], budget: KeyBudget
) -> str | None:
    """Its first primary key's hit, when its secondary keys hold too (read only then: a big book's
    secondary keys cost the turn's key budgets only for entries whose primary key occurs)."""
    for key in entry.keys:
        for source in texts:
            if _matches(key, source, entry, budget):
                return f"key {key!r} in {source.where}" if _secondary_ok(entry, scanned, budget) else None
    return None
