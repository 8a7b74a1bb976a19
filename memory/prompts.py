"""The memory jobs' prompts are cleaned like a turn's: the prompt builder's cleaner between the two
speakers (the real tokenizer's special tokens broken, the format's role markers escaped) and its
labels for names, in the instructions as in the lines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.prompt.sanitize import Sanitizer


@dataclass(frozen=True)
class Speakers:
    """The two speakers' labels (already clean) and the cleaning of any other text and name."""

    char: str
    user: str
    clean: Callable[[str], str]
    label: Callable[[str], str]


def speakers(builder: Any | None, char_name: str, player_name: str) -> Speakers:
    """Labels and cleaner from `builder` (a PromptBuilder); without one (a script whose generate is
    not this model) only special-token-free scrubbing."""
    if builder is None:
        scrub = Sanitizer(None).scrub
        char, user = Sanitizer(None).speaker_labels(char_name, player_name)
        return Speakers(char, user, scrub, lambda name: Sanitizer(None).label(name, "Someone"))
    char, user = builder.sanitizer.speaker_labels(char_name, player_name)
    clean = builder.cleaner(char, user)
    return Speakers(clean(char), clean(user), clean, builder.cleaner_label(clean))


def loaded_builder() -> Any | None:
    """This worker's prompt builder when its engine is loaded, else None."""
    from worker import engine as engine_module

    if engine_module.get_engine.cache_info().currsize:
        from worker.pipeline import get_prompt_builder

        return get_prompt_builder()
    return None


def dialogue(lines: list[tuple[str, str]], who: Speakers) -> str:
    """(role, content) lines as `Speaker: text`, every part cleaned."""
    names = {"user": who.user, "assistant": who.char, "narrator": who.label("Narrator")}
    return "\n".join(f"{names.get(role) or who.label(role)}: {who.clean(content)}" for role, content in lines)
