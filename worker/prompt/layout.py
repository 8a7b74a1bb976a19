"""What goes into a prompt's system text, piece by piece: persona (or the narrator's setting), lore,
state, story events, memories. Each piece is (section, item id or None, text); the manifest accounts
for every token by these pieces. No tokenizer here, and no untrusted text leaves without `clean`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import regex

from db.models import Character
from db.retrieval import EventHit, HistoryLine
from roleplay.lorebook import Activation

NARRATOR_INSTRUCTIONS = (
    "You are the narrator of this story. In the third person and in two or three sentences, describe "
    "what happens next, drawing on the story so far and the conversation. Do not speak as {{char}} or "
    "{{user}}, and do not address the reader."
)

# A piece of the prompt the manifest accounts for: (section, item id or None, text).
Piece = tuple[str, Any, str]
Clean = Callable[[str], str]


# SillyTavern's macros as it reads them: {{char}} and {{user}} in any case, and the legacy <BOT>,
# <CHAR> and <USER>; {{original}} (a card's system prompt or post-history instructions written around
# the frontend's own) is the default system prompt in the one, nothing elsewhere. A writer's comment
# `{{// …}}` is nothing (the card spec's MUST: a note such as "she is the villain, never reveal" went
# into every prompt; review), `{{newline}}` a line break, `{{trim}}` nothing.
_MACRO = regex.compile(r"\{\{(char|user|original|newline|trim)\}\}|<(bot|char|user)>", regex.IGNORECASE)
_FILLS = {"newline": "\n", "trim": ""}


CHAR_MACRO = "{{char}}"  # the prompt's own mention of the character, filled with the rest


def default_system_prompt(char: str) -> str:
    return f"You are {char}. Stay in character."


ACTIONS_HEADER = "[Actions]\n"  # over worker/structured.py's actions_prompt, put on after it is cleaned


def fill_macros(text: str, char: str, user: str, original: str = "") -> str:
    def fill(match: regex.Match[str]) -> str:
        name = (match.group(1) or match.group(2)).lower()
        if name in _FILLS:
            return _FILLS[name]
        return user if name == "user" else original if name == "original" else char

    return _MACRO.sub(fill, without_comments(text))


def without_comments(text: str) -> str:
    """The text less its `{{// …}}` comments, in one pass (a pattern's lazy match scanned to the end
    from every `{{//` with no `}}` after it: a card of them held a worker thread for minutes a turn;
    review). An unclosed one is left as written."""
    if "{{//" not in text:
        return text
    kept, at = [], 0
    while (start := text.find("{{//", at)) != -1:
        end = text.find("}}", start + 4)
        if end == -1:
            break
        kept.append(text[at:start])
        at = end + 2
    kept.append(text[at:])
    return "".join(kept)


def persona_pieces(
    character: Character, lore: Activation | None, char: str, user: str, clean: Clean
) -> list[Piece]:
    """The character's system text: system prompt, lore, character sheet, example dialogue."""
    default = default_system_prompt(char)
    # The name goes in by the one fill below ({{char}}), never before it: a card named "{{user}}" was
    # filled again into the player's name ("You are Rowan."). {{original}} is inserted as it is.
    own = character.system_prompt or default_system_prompt(CHAR_MACRO)
    pieces: list[Piece] = [("system_prompt", None, own)]  # filled once, below
    if lore is not None:
        pieces += [("lore", f.entry.id, f.content) for f in lore.kept if f.entry.position == "before_char"]
    sheet = [
        ("Name", CHAR_MACRO),
        ("Description", character.description),
        ("Personality", character.personality),
        ("Speech style", character.speech_style),
        ("Scenario", character.scenario),
    ]
    pieces.append(("character_sheet", None, "\n".join(f"{k}: {v}" for k, v in sheet if v)))
    if lore is not None:
        pieces += [("lore", f.entry.id, f.content) for f in lore.kept if f.entry.position == "after_char"]
    pieces = [(s, i, clean(_filled(s, t, char, user, default))) for s, i, t in pieces]
    pieces = _headed(pieces, "[Character]")
    if character.example_dialogues:
        # The card's lines are cleaned, not the prompt's own labels: a format that escapes the
        # speakers' "Name:" in untrusted text would teach the model "Elara\u200b:" for its own cue.
        lines = [
            f"User: {clean(fill_macros(str(e.get('user', '')), char, user))}\n"
            f"{char}: {clean(fill_macros(str(e.get('character', '')), char, user))}"
            for e in character.example_dialogues
        ]
        pieces.append(("example_dialogue", None, "[Example dialogue]\n" + "\n".join(lines)))
    return pieces


def narrator_pieces(
    character: Character, lore: Activation | None, char: str, user: str, clean: Clean
) -> list[Piece]:
    """The narrator's system text: instructions, the setting, and the world's lore."""
    pieces: list[Piece] = [("system_prompt", None, NARRATOR_INSTRUCTIONS)]
    setting = "\n".join(x for x in (character.scenario, f"Main character: {CHAR_MACRO}") if x)
    pieces.append(("character_sheet", None, setting))
    if lore is not None:  # the world's lore is the narrator's too
        pieces += [("lore", f.entry.id, f.content) for f in lore.kept]
    return _headed([(s, i, clean(_filled(s, t, char, user))) for s, i, t in pieces], "[Setting]")


def _headed(pieces: list[Piece], header: str) -> list[Piece]:
    """The character sheet under its header, put on after the sheet is cleaned: the cleaner breaks a
    section header opening a line of untrusted text, and would break the prompt's own."""
    return [(s, i, f"{header}\n{t}" if s == "character_sheet" else t) for s, i, t in pieces]


def _filled(section: str, text: str, char: str, user: str, default: str = "") -> str:
    # A fired lore entry comes filled already (roleplay/lorebook.py::activate): filled again, a
    # player named "{{char}}" would become the character in it. {{original}} is the default system
    # prompt in the system prompt, nothing elsewhere.
    if section == "lore":
        return text
    return fill_macros(text, char, user, default if section == "system_prompt" else "")


# The system sections' items are one line each: a player's old line brought back as a memory (or a
# fact or summary made from it) holding "\n- Rowan: I owe you 1000 gold.\n[Actions]\n…" would
# otherwise add bullets and section headers of its own to the system message.
def _one_line(text: str) -> str:
    return " ".join(text.split())


def event_line(hit: EventHit, clean: Clean) -> str:
    text = f"- ({hit.scene}) {hit.text}" if hit.scene else f"- {hit.text}"
    return clean(_one_line(text))


def summary_line(summary: Any, clean: Clean) -> str:
    return clean(_one_line(f"- {summary.text}"))


# Who a fact about another player is about, in an NPC's prompt: the game's id for them is never shown,
# and bare, the model would take the fact for one about the player in front of it.
ANOTHER_PLAYER = "someone else"


def fact_line(fact: Any, user: str, clean: Clean) -> str:
    if getattr(fact, "about_player", False):
        subject = user
    elif getattr(fact, "about_other_player", False):
        subject = ANOTHER_PLAYER
    else:
        subject = fact.subject
    return clean(_one_line(f"- ({subject}) {fact.text}" if subject else f"- {fact.text}"))


def memory_line(line: HistoryLine, char: str, user: str, clean: Clean) -> str:
    speaker = {"user": user, "assistant": char, "narrator": "Narrator"}.get(line.role, line.role)
    if line.speaker_name and line.role == "assistant":  # a group's line: whoever said it
        speaker = line.speaker_name
    return clean(_one_line(f"- {speaker}: {line.content}"))


@dataclass(frozen=True)
class Layout:
    """One turn's fixed parts (already clean) and the cleaner for what is added while packing."""

    persona: list[Piece]
    state: list[Piece]
    message: str
    post: str
    char: str
    user: str
    narrator: bool
    clean: Clean
    # A group conversation's turn: the speaking member's character id, and the label maker for the
    # other speakers' names (each name folded onto one line, then cleaned).
    group: bool = False
    speaker_id: int | None = None
    label: Clean = str
    # The message names its speaker itself (a group's "Player: …", a "[… speaks next.]" cue).
    message_labelled: bool = False


def system_pieces(
    layout: Layout,
    events: list[EventHit],
    memories: list[HistoryLine],
    summaries: list[Any] = (),  # type: ignore[assignment]
    facts: list[Any] = (),  # type: ignore[assignment]
) -> list[Piece]:
    """Persona, state, the conversation's summary and the facts the NPC knows, then the retrieved
    story events and memories, with their headers."""
    pieces: list[Piece] = list(layout.persona) + list(layout.state)
    if summaries:
        pieces.append(("summary", None, "[Earlier in this conversation]"))
        pieces += [("summary", s.id, summary_line(s, layout.clean)) for s in summaries]
    if facts:
        pieces.append(("facts", None, f"[What {layout.clean(layout.char)} knows]"))
        pieces += [("facts", f.id, fact_line(f, layout.user, layout.clean)) for f in facts]
    if events:
        pieces.append(("events", None, "[Story so far]"))
        pieces += [("events", e.id, event_line(e, layout.clean)) for e in events]
    if memories:
        pieces.append(("memories", None, "[Related memories]"))
        pieces += [
            ("memories", m.id, memory_line(m, layout.char, layout.user, layout.clean)) for m in memories
        ]
    return pieces


def labelled_in_content(layout: Layout, line: HistoryLine) -> bool:
    """Whether history_message writes this line's speaker into its content ("Name: …", "[Narrator] …"):
    a format that labels each line itself (gpt_oss_text) must not label it again as the player's."""
    return layout.group or layout.narrator or line.role == "narrator"


def history_message(layout: Layout, line: HistoryLine) -> tuple[str, str]:
    """(role, content) of an earlier line of the conversation, as this turn's speaker sees it."""
    content = layout.clean(line.content)  # earlier player lines are player text too
    if layout.group and not layout.narrator:
        # Only the speaker's own lines are its turns; everyone else's come in under their names.
        if line.role == "assistant" and line.speaker_id is not None and line.speaker_id == layout.speaker_id:
            return "assistant", content
        if line.role == "narrator":
            return "user", f"[Narrator] {content}"
        name = layout.user if line.role == "user" else layout.label(line.speaker_name or "Someone")
        return "user", f"{name}: {content}"
    if layout.narrator:
        role = "assistant" if line.role == "narrator" else "user"
        if line.role == "assistant" and line.speaker_name:  # a group's line: whoever said it
            content = f"{layout.label(line.speaker_name)}: {content}"
        elif line.role != "narrator":
            content = f"{layout.char if line.role == 'assistant' else layout.user}: {content}"
        return role, content
    role = "assistant" if line.role == "assistant" else "user"
    if line.role == "narrator":
        content = f"[Narrator] {content}"
    return role, content


def groups(pieces: list[Piece]) -> list[list[Piece]]:
    """System-message pieces grouped into paragraphs: a header and its lines stay together; other
    pieces (persona sections, each lore entry, the state line) are paragraphs of their own."""
    out: list[list[Piece]] = []
    for piece in pieces:
        section, item_id, _ = piece
        if section in ("events", "memories", "summary", "facts") and item_id is not None and out:
            out[-1].append(piece)
        else:
            out.append([piece])
    return out
