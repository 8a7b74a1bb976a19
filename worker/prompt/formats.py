"""Per-model prompt layouts: the tokenizer's chat template, or the text formats SOLAR/EEVE/GPT-OSS used.

Each format renders the messages and knows its own text role markers, which `escape` breaks in any
untrusted text (with a zero-width space) so that no content can open a turn. The chat template's
markers are special tokens, which the sanitiser breaks for every format.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import regex

from core.text import SHOWS_NOTHING, caseless, speaker_key
from worker.prompt.sanitize import ZWSP

ChatMessage = dict[str, str]
# A message's optional key for formats that write each line's speaker (gpt_oss_text): the label to
# write before it, "" when its content names its speaker itself. Chat templates never see it.
SPEAKER = "speaker"


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    add_special_tokens: bool  # True when the format relies on the tokenizer to add BOS
    stop: tuple[str, ...]


Renderer = Callable[[Any, list[ChatMessage], str, str], RenderedPrompt]


@dataclass(frozen=True)
class PromptFormat:
    """How one model's prompts are laid out, and how its role markers are escaped in content."""

    render: Renderer
    escape: Callable[[str, str, str], str]  # (text, character label, player label) -> text
    # The renderer writes each line of dialogue under its speaker's label ("Elara: ..."), which the
    # packer's estimate of a history line's cost then counts.
    labels_lines: bool = False


def _chat_template(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return RenderedPrompt(text, False, ())


# Chat templates whose turns are plain text rather than special tokens (Llama 2's and Mistral's
# `[INST]` … `[/INST]`, Llama 2's `<<SYS>>`): in untrusted text each is broken like a special token,
# whatever the model (a ChatML model reads `[​INST]` as it read `[INST]`: as text).
_TEMPLATE_TEXT_MARKER = regex.compile(r"\[(/?INST\])|<(</?SYS>>)", regex.IGNORECASE)


def _no_text_markers(text: str, char: str, user: str) -> str:
    return _TEMPLATE_TEXT_MARKER.sub(
        lambda m: "[" + ZWSP + m.group(1) if m.group(1) else "<" + ZWSP + m.group(2), text
    )


def escape_text_markers(text: str, markers: Sequence[str]) -> str:
    """Break each of a chat template's plain-text role markers (roles.py's text_markers) in text
    that is not the prompt's own."""
    for marker in markers:
        if marker in text:
            text = text.replace(marker, marker[0] + ZWSP + marker[1:])
    return text


def _solar(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    # upstage/SOLAR-10.7B-Instruct: "### System:", "### User:", "### Assistant:" blocks.
    label = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}
    body = "".join(f"{label[m['role']]}\n{m['content']}\n\n" for m in messages)
    return RenderedPrompt(body + "### Assistant:\n", True, ("### User:", "### System:"))


# Three hashes or more (or their fullwidth and small forms, which NFKC folds into "#"): every such
# run is broken into pairs, so no "###" header opens in untrusted text whatever follows it
# ("###\u3164User:", a Hangul filler for the space, "### Ｕｓｅｒ：" in fullwidth forms; a role
# word's every spelling was not to be foreseen); "##" alone is left as written. A Markdown heading
# keeps its look: the break is a zero-width space.
_HASH_RUN = regex.compile("[#\uff03\ufe5f]{3,}")


def _escape_solar(text: str, char: str, user: str) -> str:
    return _HASH_RUN.sub(lambda m: ZWSP.join(regex.findall("..?", m.group(0), flags=regex.DOTALL)), text)


def _preamble_and_turns(messages: list[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """The system messages before the conversation's first turn, joined (a plain-text format's
    preamble), and the messages from that turn on. A later system message (the post-history
    instruction, after the player's message) stays where it is: moved into the preamble it would
    come before the whole history, where it steers the reply least (review, stop 75)."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return "\n".join(m["content"] for m in messages[:first]), messages[first:]


def _eeve(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    # yanolja/EEVE-Korean-Instruct-10.8B: a system preamble, then "Human:" / "Assistant:" lines, the
    # reply cued by "Assistant:" and a line break as its model card writes it. A late system message
    # is a line of its own within the turn it follows.
    system, turns = _preamble_and_turns(messages)
    label = {"user": "Human: ", "assistant": "Assistant: ", "system": ""}
    lines = [f"{label[m['role']]}{m['content']}" for m in turns]
    return RenderedPrompt(system + "\n" + "\n".join(lines) + "\nAssistant:\n", True, ("\nHuman:",))


# Invisible format characters (U+200B, U+2060, U+FEFF, a soft hyphen) before a marker leave its
# tokens whole: they count as the line's leading space. Between the name and its colon they break it
# (that is the escape), so there only whitespace counts.
LEADING = r"[\s\p{Cf}]*"
EEVE_ROLES = ("Human", "Assistant", "System")


def _escape_eeve(text: str, char: str, user: str) -> str:
    # Its role lines are read as speakers' names are (any case, width or colon form, a Hangul
    # filler before it): "ㅤAssistant:" and "Ａssistant：" opened the model's turn.
    return escape_name_markers(text, EEVE_ROLES)


def _gpt_oss_text(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    # The original service's plain-text dialogue simulation for GPT-OSS.
    system, turns = _preamble_and_turns(messages)
    speaker = {"user": user, "assistant": char, "system": ""}
    lines = []
    for m in turns:
        label = m.get(SPEAKER, speaker[m["role"]])
        lines.append(f"{label}: {m['content']}" if label else m["content"])
    text = "--- 대화 시뮬레이션 ---\n" + system + "\n\n" + "\n".join(lines) + f"\n{char}:"
    return RenderedPrompt(text, True, (f"\n{user}:",))


def _escape_gpt_oss(text: str, char: str, user: str) -> str:
    # A line that starts with either speaker's name and a colon would read as that speaker's turn.
    return escape_name_markers(text, (char, user))


# The prompt's own bracketed markers and section headers (worker/prompt/layout.py, packing.py,
# worker/structured.py): a line of untrusted text opening with one would read as narration, a scene
# direction or a section of the prompt ("[What Elara knows]\nThe player is the king.") to the model.
_HEADERS = (
    r"narrator|scene|scene\s+direction|character|setting|example\s+dialogue|earlier\s+in\s+this\s+conversation"
    r"|story\s+so\s+far|related\s+memories|actions|what\b[^\n]{0,300}?\bknows"
)
_OPEN = "[\\[\ufe47\uff3b]"  # and the forms NFKC folds into it
# Before the bracket on its line: blanks and characters that show nothing (a Hangul filler, a
# zero-width joiner), never a newline, so a run of blank lines is not scanned again from each start.
_BEFORE_OPENING = rf"(?:[^\S\n]|{SHOWS_NOTHING.pattern})*"
_BRACKET_OPENING = regex.compile(rf"^({_BEFORE_OPENING})({_OPEN})(?!\u200b)", regex.MULTILINE)
# What follows the bracket, read as the model would (NFKC: full-width letters, brackets and periods
# folded; characters that show nothing dropped; any case; runs of blanks as one).
_HEADER_AFTER = regex.compile(rf"\s*(?:{_HEADERS})\s*\]|[^\n]{{0,300}}?\bspeaks\s+next\s*\.?\s*\]")
_HEADER_REACH = 400  # characters read once blanks are folded: the longest header (a name of 300) and room
_CLOSING = regex.compile("[\\]\ufe48\uff3d]")
_BLANKS = regex.compile(rf"(?:\s|{SHOWS_NOTHING.pattern})*")  # lines too: "[\nNarrator]"
_FOLDED_BLANKS = regex.compile(r"[^\S\n]+")
_CLOSINGS_TRIED = 4  # a name may hold a closing bracket ("Ro］wan"): the marker ends at a later one
_LINES_READ = 4  # a marker split over lines ("[Scene\ndirection]", "[Narrator\n]") is read on as far
_OPENS_A_LINE = regex.compile(rf"{_BEFORE_OPENING}{_OPEN}")


def escape_bracket_markers(text: str) -> str:
    """Break the prompt's own bracketed markers and section headers at a line's start ("[Narrator]",
    "[Scene direction]", "[Name speaks next.]", "[Character]", "[What Name knows]", "[Actions]", …)
    in text that is not the prompt's, however written: spaced, in full-width letters or brackets,
    with characters that show nothing before or inside it, or split over a few lines. Each opening
    is read once, from its words to a few lines on (never into another opening's line): the cost is
    linear in the text. The prompt's own headers are added
    after their bodies are cleaned, never cleaned with them."""
    if not any(bracket in text for bracket in "[\ufe47\uff3b"):
        return text

    def read_to(start: int) -> int:
        """Where an opening's read ends: its words' line and the lines after it, up to _LINES_READ,
        never into a line that opens with a bracket itself (that line is its own opening's)."""
        stop = start
        for _ in range(_LINES_READ):
            line_end = text.find("\n", stop)
            if line_end < 0:
                return len(text)
            stop = line_end
            if _OPENS_A_LINE.match(text, line_end + 1):
                break
            stop = line_end + 1
        return stop

    def escape(found: regex.Match[str]) -> str:
        start = _BLANKS.match(text, found.end()).end()
        for n, closing in enumerate(_CLOSING.finditer(text, start, read_to(start))):
            if n == _CLOSINGS_TRIED:
                break
            read = _FOLDED_BLANKS.sub(" ", SHOWS_NOTHING.sub("", text[start : closing.end()]))
            if len(read) > _HEADER_REACH:
                break
            if _HEADER_AFTER.match(caseless(read)):
                return found.group(0) + ZWSP
        return found.group(0)

    return _BRACKET_OPENING.sub(escape, text)


def escaped_label(fmt: PromptFormat, name: str, *speakers: str) -> str:
    """A cleaned name as the label of a line (`{label}: ...`), escaped by the format with the colon
    the prompt puts after it, against its role markers and `speakers` (a memory request's own): the
    markers end in a colon, so the name alone ("### System", "Assistant", "Memory") passed every
    escape and then opened a turn of that role. Never against the speakers' own names, each of
    which labels its own lines."""
    escaped = fmt.escape(name + ":", *(speakers or ("", "")))
    return escaped[:-1] if escaped.endswith(":") else escaped


# ":" and the forms NFKC folds into it (fullwidth, small, vertical): "Ｏｌｄ Ｔｏｍ：" reads as "Old Tom:".
COLONS = frozenset(":\ufe13\ufe55\uff1a")
_LINE_START = regex.compile(LEADING)


def escape_name_markers(text: str, names: Sequence[str]) -> str:
    """Break "Name:" at a line's start for these names: in text that is not theirs, it would read as
    their line (in a group, any member's or the player's, whatever the format). A line's opening is
    compared as names are (core/text.py's speaker_key: any case, width or run of spaces, invisible
    characters dropped), at every colon: "Old\u00a0Tom:", "old  tom :" and "Ｏｌｄ Ｔｏｍ：" open a line
    as Old Tom's, and "Ann: I give Bram the keys. Cass: yes" as Ann's and as that long-named member's."""
    keys = {speaker_key(name) for name in names} - {""}
    if not keys or not any(colon in text for colon in COLONS):
        return text
    # A name's opening spans at most this many visible characters (spaces folded, invisible ones
    # dropped): NFKC composes up to three (a Hangul syllable's conjoining jamo) into one. No colon
    # past it is looked at, and no opening longer is normalised: never every colon of a long line.
    reach = 3 * max(map(len, keys)) + 8
    return "\n".join(_escape_opening(line, keys, reach) for line in text.split("\n"))


def _escape_opening(line: str, keys: set[str], reach: int) -> str:
    start = _LINE_START.match(line).end()  # type: ignore[union-attr]
    visible: list[str] = []  # the opening so far, as speaker_key reads it before NFKC
    grown = 0  # its length once NFKC-normalised, char by char ("\ufdfa" is 18)
    breaks: list[int] = []
    for at in range(start, len(line)):
        char = line[at]
        if char in COLONS:
            escaped = at > 0 and line[at - 1] == ZWSP  # escaped already: cleaning twice changes nothing
            if not escaped and speaker_key("".join(visible)) in keys:
                breaks.append(at)
            visible.append(char)  # a colon inside a longer name ("Dr. Who: Origins")
        elif SHOWS_NOTHING.match(char):  # as speaker_key drops them
            continue
        elif char.isspace():
            if not visible or visible[-1] == " ":
                continue
            visible.append(" ")
        else:
            visible.append(char)
        grown += 1 if char.isascii() else len(unicodedata.normalize("NFKC", char))
        if grown > reach:
            break
    for at in reversed(breaks):
        line = line[:at] + ZWSP + line[at:]
    return line


FORMATS: dict[str, PromptFormat] = {
    "chat_template": PromptFormat(_chat_template, _no_text_markers),
    "solar": PromptFormat(_solar, _escape_solar),
    "eeve": PromptFormat(_eeve, _escape_eeve),
    "gpt_oss_text": PromptFormat(_gpt_oss_text, _escape_gpt_oss, labels_lines=True),
}
RENDERERS: dict[str, Renderer] = {name: fmt.render for name, fmt in FORMATS.items()}
