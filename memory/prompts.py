"""The memory jobs' prompts are cleaned like a turn's: the prompt builder's cleaner between the two
speakers (the real tokenizer's special tokens broken, the format's role markers escaped) and its
labels for names, in the instructions as in the lines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from worker.prompt.formats import escape_name_markers, escaped_label
from worker.prompt.sanitize import Sanitizer


@dataclass(frozen=True)
class Speakers:
    """The two speakers' labels (already clean) and the cleaning of any other text and name."""

    char: str
    user: str
    clean: Callable[[str], str]
    label: Callable[[str], str]
    members: tuple[str, ...] = ()  # a group's members' labels: speakers of the talk, silent or not

    @property
    def others(self) -> str:
        """Who the player talks with, as the instructions name them: the character, or in a group
        each member (review, stop 75: a group's talk was told as the player's with the lead alone,
        the other members' promises and secrets framed as the lead's)."""
        names = list(dict.fromkeys((self.char, *self.members)))
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# The speakers a memory request is rendered between (memory/generate.py): in a text format such as
# gpt_oss_text, "Memory:" or "User:" opening a line of the dialogue would open a turn of theirs.
REQUEST_SPEAKERS = ("Memory", "User")

# A line of dialogue for a memory job: (role, content) or (role, content, speaker): the speaker's
# name where the line is a group member's (a scene's lines are each member's, not the lead's).
Line = tuple[str, str] | tuple[str, str, str | None]


def speakers(builder: Any | None, char_name: str, player_name: str, members: Sequence[str] = ()) -> Speakers:
    """Labels and cleaner from `builder` (a PromptBuilder); without one (a script whose generate is
    not this model) only special-token-free scrubbing. `members`: a group's members' names, each a
    speaker no line may open as, whether it speaks in the lines read or not."""
    if builder is None:
        scrub = Sanitizer(None).scrub
        char, user = Sanitizer(None).speaker_labels(char_name, player_name)
        label = lambda name: Sanitizer(None).label(name, "Someone")  # noqa: E731
        return Speakers(char, user, scrub, label, tuple(label(m) for m in members))
    char, user = builder.sanitizer.speaker_labels(char_name, player_name)
    turn_clean = builder.cleaner(char, user)

    def clean(text: str) -> str:
        return str(builder.format.escape(turn_clean(text), *REQUEST_SPEAKERS))

    # Labels are escaped against the request's answering speaker alone: a "User:" line inside its
    # user turn opens nothing new, and a player of no name is labelled "User" (escaped, the
    # instructions and any fact's subject copied from them would carry a zero-width space).
    answering = (REQUEST_SPEAKERS[0], "")
    char_label, user_label = (escaped_label(builder.format, clean(name), *answering) for name in (char, user))
    label = builder.name_label(clean, *answering)
    return Speakers(char_label, user_label, clean, label, tuple(label(m) for m in members))


def loaded_builder(*, generating: bool = False) -> Any | None:
    """This worker's prompt builder when its engine is loaded, else None. `generating`: the job
    generates with this worker's engine, so the engine is loaded now (its request then loads it
    anyway) and the request is cleaned with the model's own special tokens, as a turn's is."""
    from worker import engine as engine_module

    if generating or engine_module.get_engine.cache_info().currsize:
        from worker.pipeline import get_prompt_builder

        return get_prompt_builder()
    return None


def dialogue(lines: Sequence[Line], who: Speakers) -> str:
    """Lines as `Speaker: text`, every part cleaned; no text opens a line as any of its speakers."""
    names = {"user": who.user, "assistant": who.char, "narrator": who.label("Narrator")}
    labelled = [(_label(line, names, who), line[1]) for line in lines]
    # any speaker of the talk: a member silent in these lines too ("Cass: I poisoned the well." in a
    # player's line read as Cass's own, and remembered as what Cass said)
    speaking = sorted({*names.values(), *(label for label, _ in labelled), *who.members})
    # A label opens as no other speaker's ("Ann: I give Bram the keys. Cass" is not Ann's line).
    own = {label: Sanitizer.among(label, [s for s in speaking if s != label]) for label in speaking}
    return "\n".join(
        f"{own[label]}: {escape_name_markers(who.clean(text), speaking)}" for label, text in labelled
    )


def _label(line: Line, names: dict[str, str], who: Speakers) -> str:
    role = line[0]
    speaker = line[2] if len(line) > 2 else None
    if speaker and role != "user":  # a group member's line, or the narrator's
        return who.label(speaker)
    return names.get(role) or who.label(role)
