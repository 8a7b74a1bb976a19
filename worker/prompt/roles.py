"""Fit a prompt's messages to the roles its chat template accepts.

The layout puts the post-history instruction in a system message after the player's message and
may bring back two user lines in a row (a narrator line, a player line whose reply failed) or open
the history with the character's line. Strict templates (Mistral's, Llama 2's, Gemma's) raise on
such sequences, and some drop a late system message without a word. What a template accepts is
found once, by rendering small probe conversations and checking that every message's text came
through; whatever it refuses is folded away before rendering, keeping every text and its order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex

from worker.prompt.formats import ChatMessage


@dataclass(frozen=True)
class TemplateRoles:
    """Which message sequences a chat template renders with every message's text intact."""

    system: bool = True  # a leading system message
    late_system: bool = True  # a system message after the conversation started
    repeated: bool = True  # two messages of the same role in a row
    assistant_first: bool = True  # an assistant message before any user message


LENIENT = TemplateRoles()


def _probe(*roles: str) -> list[ChatMessage]:
    return [{"role": role, "content": f"probe message {i} ({role})"} for i, role in enumerate(roles)]


def probe_roles(render: Callable[[list[ChatMessage]], str]) -> TemplateRoles:
    """What `render` (the template with a generation prompt) accepts, tried one trait at a time."""

    def accepts(messages: list[ChatMessage]) -> bool:
        try:
            text = render(messages)
        except Exception:  # a template refuses by raising (Jinja's raise_exception)
            return False
        return all(m["content"] in text for m in messages)

    system = accepts(_probe("system", "user", "assistant", "user"))
    lead = ("system",) if system else ()
    return TemplateRoles(
        system=system,
        late_system=system and accepts(_probe(*lead, "user", "assistant", "user", "system")),
        repeated=accepts(_probe(*lead, "user", "user", "assistant", "assistant", "user")),
        assistant_first=accepts(_probe(*lead, "assistant", "user")),
    )


_PUNCTUATION = regex.compile(r"[^\w\s]")


def text_markers(
    render: Callable[[list[ChatMessage]], str], specials: Sequence[str], roles: TemplateRoles
) -> list[str]:
    """The plain-text role markers a chat template writes around messages (Zephyr's `<|user|>`,
    Vicuna's `USER:`, Alpaca's `### Instruction:`), which untrusted text must not hold unbroken:
    the lines between a probe conversation's messages, its special-token strings taken out (the
    sanitiser breaks those), each kept when it holds a mark other than a letter or digit (a role
    word alone, `user` after a special token, marks nothing)."""
    lead = ("system",) if roles.system else ()
    messages = fit_roles(_probe(*lead, "user", "assistant", "user"), roles, "probe")
    try:
        rest = render(messages)
    except Exception:  # a template that refuses even this is refused when a prompt is rendered
        return []
    between = []
    for message in messages:
        before, _, rest = rest.partition(message["content"])
        between.append(before)
    between.append(rest)
    markers: set[str] = set()
    for piece in between:
        for special in specials:
            piece = piece.replace(special, "\n")
        markers |= {line.strip() for line in piece.splitlines() if _PUNCTUATION.search(line)}
    return sorted((m for m in markers if len(m) > 1), key=len, reverse=True)


def fit_roles(messages: list[ChatMessage], roles: TemplateRoles, speaker: str) -> list[ChatMessage]:
    """The messages re-roled and merged so that the template accepts them; unchanged when it
    accepts them as they are. A late system text joins the user message next to it, a leading one
    becomes a user message, an opening assistant line joins the leading system message labelled
    with its `speaker`, and same-role neighbours are merged (paragraphs, in order)."""
    if roles == LENIENT:
        return messages
    out = [dict(m) for m in messages]
    if not roles.late_system:
        for m in out[1:]:
            if m["role"] == "system":
                m["role"] = "user"
    if not roles.system and out and out[0]["role"] == "system":
        out[0]["role"] = "user"
    if not roles.assistant_first:
        first = next((i for i, m in enumerate(out) if m["role"] != "system"), None)
        if first is not None and out[first]["role"] == "assistant":
            if first > 0:  # after the leading system message: becomes part of it
                out[first - 1]["content"] += f"\n\n{speaker}: " + out.pop(first)["content"]
            else:
                out[first]["role"] = "user"
    if not roles.repeated:
        merged: list[ChatMessage] = []
        for m in out:
            if merged and merged[-1]["role"] == m["role"]:
                merged[-1]["content"] += "\n\n" + m["content"]
            else:
                merged.append(m)
        out = merged
    return out
