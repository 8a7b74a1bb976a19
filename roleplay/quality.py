"""Per-reply quality: scores from vectors and text the batch already has, and the gate built on them.

Scores:
- persona: cosine similarity of the reply to the character's persona (its description and the
  character's lines in the example dialogue), embedded once per character.
- repetition: the share of the reply's word 3-grams that the character already said in the recent
  history of this conversation (0 = all new, 1 = a verbatim repeat).
- self_repetition: the share of the reply's word 3-grams that repeat within the reply itself (a small
  model looping on one sentence scores high).
- language_match: whether the reply is written in the script of the player's message (Hangul,
  Latin, kana, Han…); a message with no letters matches anything.

The gate: each check is a pure function that returns its reason ("<kind>: <detail>") or None, and a
reply is below the bar when any check gives a reason. Kinds: persona, repetition, loop, language,
echo (the reply reproduces the system prompt, the post-history instruction, the character sheet or
a lore entry; the instructions are also compared unit by unit, where a Hangul, Han or kana character
is a unit, since a Korean word carries what several English ones do), truncated (cut at the token
limit mid-sentence), role (the reply speaks as the player or another character, or the narrator
addresses the reader). Thresholds live in `Bar`.
"""

from __future__ import annotations

import threading
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import regex

from core.text import speaker_key

_WORD = regex.compile(r"\w+")
# A unit of the instruction-echo span: one Hangul, Han or kana character, or a word of another script.
_CJK = r"\p{Hangul}\p{Han}\p{Hiragana}\p{Katakana}"
_UNIT = regex.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
# The prompt sections that instruct the model (as opposed to describing the character or the world).
INSTRUCTION_SECTIONS = ("system_prompt", "post-history instruction")
_SENTENCE = regex.compile(r"[^.!?。！？\n]+[.!?。！？]*")
# A reply that ends on one of these (or a closing quote or bracket after one) ended its sentence.
_SENTENCE_END = regex.compile(r"[.!?…~。！？♪)\]*\"'”’」』\p{Emoji_Presentation}]\s*$")
# "Name:" at the start of a line: a script line spoken by someone. The blanks around it stay on its
# line: `\s*` ran over every newline after each line start and back (quadratic: a reply of 8,000
# newlines took 1.8 s, per candidate).
_SPEAKER_LABEL = regex.compile(
    # Marks too (\p{M}): a Hindi or Thai name's vowel signs, a decomposed "Zoë" (review, stop 75).
    r"^[^\S\n]*\**([\p{L}][\p{L}\p{M} .'-]{0,38}?(?: \(player\))?)\**[^\S\n]*[:：]",
    regex.M,
)
_QUOTED = regex.compile(r"\"[^\"]*\"|“[^”]*”|‘[^’]*’|「[^」]*」|『[^』]*』")
_SECOND_PERSON = regex.compile(r"\b(?:you|your|yours|yourself|yourselves)\b|당신|너희", regex.I)
_PLAYER_LABELS = {"user", "player", "you", "{{user}}", "나", "플레이어"}
# Labels that head a line without being a speaker.
_NOT_SPEAKERS = {"note", "tip", "warning", "example", "ps", "p.s", "hint", "참고", "주의"}


@dataclass(frozen=True)
class Bar:
    """Thresholds of the gate (settings MLCHAT_QUALITY_*; calibrated in data/quality_labels/)."""

    min_persona: float = 0.2
    max_repetition: float = 0.3
    echo_span_words: int = 4  # this many consecutive words of an instruction section
    echo_share: float = 0.4  # or this share of the reply's word 3-grams found in one section
    loop_sentence_repeats: int = 2  # the same sentence this many times
    instruction_span_units: int = 4  # this many consecutive units of the system prompt or post-history


@dataclass(frozen=True)
class Quality:
    persona: float
    repetition: float
    self_repetition: float
    language_match: bool
    message_script: str | None
    reply_script: str | None
    echo: EchoMatch | None = None  # the instruction section the reply overlaps most
    truncated: bool = False
    role_break: str | None = None
    sentence_repeats: int = 1  # how often the reply's most repeated sentence occurs
    instruction_echo: EchoMatch | None = None  # the instruction section it overlaps most, in units

    def below(self, bar: Bar) -> list[str]:
        """Why the reply is below the bar; empty when it passes."""
        reasons = []
        if self.echo is not None and self.echo.echoes(bar.echo_span_words, bar.echo_share):
            reasons.append(f"echo: repeats the {self.echo.describe()}")
        elif (
            self.instruction_echo is not None
            and self.instruction_echo.span_words >= bar.instruction_span_units
        ):
            reasons.append(f"echo: repeats the {self.instruction_echo.describe()}")
        if self.self_repetition > bar.max_repetition or self.sentence_repeats >= bar.loop_sentence_repeats:
            reasons.append(
                f"loop: self-repetition {self.self_repetition:.2f}, a sentence {self.sentence_repeats} times"
            )
        if self.repetition > bar.max_repetition:
            reasons.append(f"repetition: {self.repetition:.2f} of its 3-grams said before")
        if self.truncated:
            reasons.append("truncated: cut at the token limit mid-sentence")
        if self.role_break:
            reasons.append(f"role: {self.role_break}")
        if not self.language_match:
            reasons.append(f"language: reply in {self.reply_script}, message in {self.message_script}")
        if self.persona < bar.min_persona:
            reasons.append(f"persona: {self.persona:.2f} < {bar.min_persona}")
        return reasons

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Quality:
        """A stored quality record back (the gate can be re-run on it with another bar)."""
        echo, instruction_echo = data.get("echo"), data.get("instruction_echo")
        return cls(
            data["persona"],
            data["repetition"],
            data["self_repetition"],
            data["language_match"],
            data.get("message_script"),
            data.get("reply_script"),
            echo=EchoMatch(**echo) if echo else None,
            truncated=data.get("truncated", False),
            role_break=data.get("role_break"),
            sentence_repeats=data.get("sentence_repeats", 1),
            instruction_echo=EchoMatch(**instruction_echo) if instruction_echo else None,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "persona": round(self.persona, 4),
            "repetition": round(self.repetition, 4),
            "self_repetition": round(self.self_repetition, 4),
            "language_match": self.language_match,
            "message_script": self.message_script,
            "reply_script": self.reply_script,
            "echo": None if self.echo is None else self.echo.as_json(),
            "truncated": self.truncated,
            "role_break": self.role_break,
            "sentence_repeats": self.sentence_repeats,
            "instruction_echo": None if self.instruction_echo is None else self.instruction_echo.as_json(),
        }


# Every kind a below-bar reason starts with (`Quality.below`), in the order the checks run.
CHECK_KINDS = ("echo", "loop", "repetition", "truncated", "role", "language", "persona")


def reason_kind(reason: str) -> str:
    """The check a below-bar reason comes from ("echo", "loop", …)."""
    return reason.split(":", 1)[0]


def persona_text(description: str, personality: str, examples: Sequence[dict[str, Any]]) -> str:
    """What a reply in character should resemble."""
    lines = [description, personality] + [str(e.get("character", "")) for e in examples]
    return "\n".join(line for line in lines if line)


def score(
    *,
    reply: str,
    message: str,
    reply_vec: Any,
    persona_vec: Any,
    own_recent_lines: Sequence[str],
    finish_reason: str | None = None,
    echo_sources: Sequence[tuple[str, str]] = (),
    speaker: str = "character",
    char_name: str = "",
    user_name: str = "",
    bar: Bar | None = None,
) -> Quality:
    bar = bar or Bar()
    a, b = np.asarray(reply_vec, dtype=np.float32), np.asarray(persona_vec, dtype=np.float32)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    persona = float(a @ b) / denom if denom else 0.0
    said = set()
    for line in own_recent_lines:
        said |= _trigrams(line)
    mine = _trigrams(reply)
    repetition = len(mine & said) / len(mine) if mine else 0.0
    grams = _ngram_list(reply, 3)
    self_repetition = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    message_script, reply_script = dominant_script(message), dominant_script(reply)
    match = same_script(message_script, reply_script)
    return Quality(
        persona,
        repetition,
        self_repetition,
        match,
        message_script,
        reply_script,
        echo=prompt_echo(reply, echo_sources),
        truncated=truncated(reply, finish_reason),
        role_break=role_break(reply, speaker=speaker, char_name=char_name, user_name=user_name),
        sentence_repeats=most_repeated_sentence(reply),
        instruction_echo=instruction_echo(reply, echo_sources),
    )


# --- the checks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoMatch:
    """How much of one instruction section the reply reproduces (the section that overlaps most)."""

    section: str
    span_words: int  # the longest run of consecutive words (units, for instruction_echo) it shares
    span: str
    section_words: int
    share: float  # the share of the reply's word 3-grams found in the section
    reply_trigrams: int

    def echoes(self, span_words: int, share: float) -> bool:
        whole = 3 <= self.section_words == self.span_words  # all of a short section
        return whole or self.span_words >= span_words or (self.reply_trigrams >= 2 and self.share >= share)

    def describe(self) -> str:
        return f"{self.section} ('{self.span}', {self.share:.0%} of its 3-grams)"

    def as_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "span_words": self.span_words,
            "span": self.span,
            "section_words": self.section_words,
            "share": round(self.share, 4),
            "reply_trigrams": self.reply_trigrams,
        }


def prompt_echo(reply: str, sources: Sequence[tuple[str, str]]) -> EchoMatch | None:
    """The instruction section the reply overlaps most (by its longest shared word run, then by the
    share of its 3-grams); None when it shares no word run of two or more with any section."""
    return _best_echo(reply, sources, _WORD)


def instruction_echo(reply: str, sources: Sequence[tuple[str, str]]) -> EchoMatch | None:
    """prompt_echo over the system prompt and the post-history instruction only, counted in units
    (a Hangul, Han or kana character, or a word): "루피의 말투로," is two words but six units of
    "루피의 말투로, 한두 문장의 반말로 대답하세요.", and no line in character repeats them."""
    instructions = [(section, text) for section, text in sources if section in INSTRUCTION_SECTIONS]
    return _best_echo(reply, instructions, _UNIT)


def _best_echo(reply: str, sources: Sequence[tuple[str, str]], token: regex.Pattern[str]) -> EchoMatch | None:
    found = list(token.finditer(reply))
    words = [m.group().casefold() for m in found]
    trigrams = set(_ngram_list(reply, 3))
    best: EchoMatch | None = None
    for section, text in sources:
        section_words, where, section_trigrams = _source_index(text, token)
        length, end = _longest_common_run(words, where)
        if length < 2:
            continue
        shared = trigrams & section_trigrams
        match = EchoMatch(
            section,
            length,
            reply[found[end - length].start() : found[end - 1].end()],
            section_words,
            len(shared) / len(trigrams) if trigrams else 0.0,
            len(trigrams),
        )
        if best is None or (match.span_words, match.share) > (best.span_words, best.share):
            best = match
    return best


SourceIndex = tuple[int, dict[str, list[int]], frozenset[Any]]
# The sections' indexes kept, by the words they hold (about 330 bytes a word): a section names the
# player ({{user}} filled in) and its fired lore, so a popular card's sections are many texts; kept
# by entries alone (1,024 of them) they held hundreds of MB a worker (review, stop 75). A section
# longer than a tenth of the budget is read each time, as cheap as reading the reply it is met with.
SOURCE_WORDS_KEPT = 200_000
_sources: OrderedDict[tuple[str, str], SourceIndex] = OrderedDict()
_sources_words = 0
_sources_lock = threading.Lock()


def _source_index(text: str, token: regex.Pattern[str]) -> SourceIndex:
    """An instruction section as the echo check reads it: its word count, where each word occurs,
    its 3-grams. Keyed by the text itself, so an edited persona is read afresh; the same persona's
    sections, compared with every reply of its character, are read once while the budget holds them."""
    global _sources_words
    key = (text, token.pattern)
    with _sources_lock:
        held = _sources.get(key)
        if held is not None:
            _sources.move_to_end(key)
            return held
    section_words = [w.casefold() for w in token.findall(text)]
    where: dict[str, list[int]] = {}
    for j, word in enumerate(section_words):
        where.setdefault(word, []).append(j)
    index = (len(section_words), where, frozenset(_ngram_list(text, 3)))
    weight = _weight(text, index)
    if weight <= SOURCE_WORDS_KEPT // 10:
        with _sources_lock:
            if key not in _sources:
                _sources[key] = index
                _sources_words += weight
                while _sources_words > SOURCE_WORDS_KEPT:
                    (dropped_text, _), dropped = _sources.popitem(last=False)
                    _sources_words -= _weight(dropped_text, dropped)
    return index


def _weight(text: str, index: SourceIndex) -> int:
    """What a section's index is counted as against the budget: its words, or for a text of few
    words (a map, a status window of symbols) its length in words' worth (review: those counted 0)."""
    return max(1, index[0], len(text) // 6)


def _longest_common_run(a: list[str], where: dict[str, list[int]]) -> tuple[int, int]:
    """(length, end index in a) of the longest run of consecutive words a shares with the text whose
    word positions are `where`. Only matching positions are visited, so it costs what the two texts
    have in common, not len(a) * len(b)."""
    best, best_end = 0, 0
    previous: dict[int, int] = {}
    for i, word in enumerate(a):
        current = {j: previous.get(j - 1, 0) + 1 for j in where.get(word, ())}
        for length in current.values():
            if length > best:
                best, best_end = length, i + 1
        previous = current
    return best, best_end


def truncated(reply: str, finish_reason: str | None) -> bool:
    """Stopped by the token limit before its sentence ended."""
    return finish_reason == "length" and not _SENTENCE_END.search(reply.rstrip())


def role_break(reply: str, *, speaker: str, char_name: str, user_name: str) -> str | None:
    """The reply speaks as the player or as someone else, or (the narrator) addresses the reader.
    Names are compared as the prompt's labels are told apart (core/text.py's speaker_key); a player
    named like the character is labelled apart in the prompt (`Name (player)`), so `Name:` is the
    character's."""
    own = {speaker_key(char_name)} if speaker != "narrator" else set()
    user = speaker_key(user_name)
    player = _PLAYER_LABELS | ({user, f"{user} (player)"} if user_name else set())
    for match in _SPEAKER_LABEL.finditer(reply):
        label = match.group(1).strip()
        folded = speaker_key(label)
        if folded in own:
            continue
        if folded in player:
            return f"speaks as the player ('{label}:')"
        if folded not in own and folded not in _NOT_SPEAKERS and len(label.split()) <= 3:
            return f"speaks as '{label}'"
    if speaker == "narrator":
        unquoted = _QUOTED.sub(" ", reply)
        found = _SECOND_PERSON.search(unquoted)
        if found:
            return f"the narrator addresses the reader ('{found.group(0)}')"
    return None


def most_repeated_sentence(reply: str) -> int:
    """How often the reply's most frequent sentence occurs (1 for a reply that never repeats one)."""
    sentences = [" ".join(_words(s)) for s in _SENTENCE.findall(reply)]
    counts = Counter(s for s in sentences if s)
    return max(counts.values(), default=1)


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def _ngram_list(text: str, n: int) -> list[tuple[str, ...]]:
    words = _words(text)
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _trigrams(text: str) -> set[tuple[str, ...]]:
    return set(_ngram_list(text, 3))


# Japanese writes kana and kanji in one sentence: a text with any kana is "japanese", its kanji
# included; kanji alone may be either language, so "han" matches "japanese" (same_script).
_KANA = ("HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA")  # the last: the long-vowel mark "ー"


def dominant_script(text: str) -> str | None:
    """The script most of the text's letters are written in (from Unicode character names)."""
    counts: Counter[str] = Counter(_script(ch) for ch in text if ch.isalpha())
    if any(counts[kana] for kana in _KANA):
        counts["JAPANESE"] = sum(counts.pop(script, 0) for script in (*_KANA, "HAN"))
    return counts.most_common(1)[0][0].lower() if counts else None


def same_script(a: str | None, b: str | None) -> bool:
    """Whether two dominant scripts match (either unknown: nothing to compare)."""
    return a is None or b is None or a == b or {a, b} == {"han", "japanese"}


@lru_cache(maxsize=4096)
def _script(letter: str) -> str:
    """A letter's script: the first word of its Unicode name (Han for CJK ideographs), after
    HALFWIDTH or FULLWIDTH ("ｱ" is katakana, "ａ" Latin)."""
    words = unicodedata.name(letter, "").split(" ")
    if words[0] in ("HALFWIDTH", "FULLWIDTH") and len(words) > 1:
        words = words[1:]
    script = words[0] or "UNKNOWN"
    return "HAN" if script == "CJK" else script
