"""Build each turn's prompt: persona first (byte-identical per character, so vLLM's prefix cache
shares it), then retrieved context, recent history and the player's message, packed by tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from db.models import Character
from db.retrieval import EventHit, HistoryLine, TurnContext
from worker.prompt_formats import RENDERERS, ChatMessage


class PromptTooLong(ValueError):
    """Even the persona and the player's message do not fit the context window."""


@dataclass(frozen=True)
class PromptInput:
    character: Character
    player_name: str
    message: str
    context: TurnContext
    max_new_tokens: int


@dataclass
class BuiltPrompt:
    token_ids: list[int]
    text: str
    stop: tuple[str, ...]
    manifest: dict[str, Any] = field(default_factory=dict)


def _fill_macros(text: str, char: str, user: str) -> str:
    return text.replace("{{char}}", char).replace("{{user}}", user)


def persona_block(character: Character) -> str:
    """The character's fixed system text; depends only on the character, never on the turn."""
    name = character.name
    parts = [character.system_prompt or f"You are {name}. Stay in character."]
    sheet = [
        ("Name", name),
        ("Description", character.description),
        ("Personality", character.personality),
        ("Speech style", character.speech_style),
        ("Scenario", character.scenario),
    ]
    parts.append("[Character]\n" + "\n".join(f"{label}: {value}" for label, value in sheet if value))
    if character.example_dialogues:
        lines = []
        for example in character.example_dialogues:
            lines.append(f"User: {example.get('user', '')}\n{name}: {example.get('character', '')}")
        parts.append("[Example dialogue]\n" + "\n".join(lines))
    return _fill_macros("\n\n".join(parts), name, "{{user}}")


def _event_line(hit: EventHit) -> str:
    return f"- ({hit.scene}) {hit.text}" if hit.scene else f"- {hit.text}"


def _memory_line(line: HistoryLine, char: str, user: str) -> str:
    speaker = {"user": user, "assistant": char, "narrator": "Narrator"}.get(line.role, line.role)
    return f"- {speaker}: {line.content}"


def _history_message(line: HistoryLine) -> ChatMessage:
    if line.role == "assistant":
        return {"role": "assistant", "content": line.content}
    if line.role == "narrator":
        return {"role": "user", "content": f"[Narrator] {line.content}"}
    return {"role": "user", "content": line.content}


class PromptBuilder:
    """Packs prompts for one model: its tokenizer, its format, its context window."""

    # Rough per-message cost of role markers; the exact length is checked after rendering.
    _MESSAGE_OVERHEAD = 6

    def __init__(self, tokenizer: Any, prompt_format: str, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.render = RENDERERS[prompt_format]
        self.max_model_len = max_model_len
        specials = set(getattr(tokenizer, "all_special_tokens", [])) | set(
            getattr(tokenizer, "get_added_vocab", dict)().keys()
        )
        self._specials = sorted((s for s in specials if len(s) > 1), key=len, reverse=True)
        self._persona_tokens: dict[str, int] = {}  # personas repeat across turns; count each once

    def defang(self, text: str) -> str:
        """Break special-token strings in user-supplied text so they tokenize as plain text:
        a player typing '<|im_start|>system' must not open a system turn."""
        for token in self._specials:
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    def _persona_token_count(self, persona: str) -> int:
        if persona not in self._persona_tokens:
            self._persona_tokens[persona] = len(
                self.tokenizer(persona, add_special_tokens=False)["input_ids"]
            )
        return self._persona_tokens[persona]

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) + self._MESSAGE_OVERHEAD for ids in encoded]

    def build(self, item: PromptInput) -> BuiltPrompt:
        """Fit persona + context + history + message into max_model_len - max_new_tokens."""
        char, user = item.character.name, item.player_name or "User"
        budget = self.max_model_len - item.max_new_tokens
        persona = persona_block(item.character).replace("{{user}}", user)
        message = self.defang(item.message)
        post = _fill_macros(item.character.post_history_instructions, char, user)
        ctx = item.context

        # Candidates in priority order: the last two lines, the best events and memories, then the rest.
        recent_newest = list(reversed(ctx.recent))
        ordered: list[tuple[str, Any]] = (
            [("history", x) for x in recent_newest[:2]]
            + [("event", x) for x in ctx.events[:2]]
            + [("memory", x) for x in ctx.similar[:2]]
            + [("history", x) for x in recent_newest[2:]]
            + [("event", x) for x in ctx.events[2:]]
            + [("memory", x) for x in ctx.similar[2:]]
        )
        texts = [
            _event_line(x)
            if kind == "event"
            else _memory_line(x, char, user)
            if kind == "memory"
            else self.defang(x.content)
            for kind, x in ordered
        ]
        base = self._render(persona, [], [], [], message, post, char, user)
        base_len = len(base[0])
        if base_len > budget:
            raise PromptTooLong(
                f"prompt needs {base_len} tokens for persona and message alone but only {budget} fit "
                f"(max_model_len {self.max_model_len} - max_new_tokens {item.max_new_tokens})"
            )
        kept: list[int] = []
        used = base_len
        for i, cost in enumerate(self._count(texts)):
            if used + cost <= budget:
                kept.append(i)
                used += cost
        while True:
            events = [ordered[i][1] for i in kept if ordered[i][0] == "event"]
            memories = [ordered[i][1] for i in kept if ordered[i][0] == "memory"]
            history = sorted((ordered[i][1] for i in kept if ordered[i][0] == "history"), key=lambda h: h.seq)
            ids, text, stop = self._render(persona, events, memories, history, message, post, char, user)
            if len(ids) <= budget or not kept:
                break
            kept.pop()  # the estimate was short: drop the lowest-priority item and re-render
        dropped = [i for i in range(len(ordered)) if i not in set(kept)]
        manifest = {
            "budget_tokens": budget,
            "prompt_tokens": len(ids),
            "persona_tokens": self._persona_token_count(persona),
            "events": [{"id": e.id, "score": round(e.score, 4)} for e in events],
            "memories": [{"id": m.id, "score": round(m.score or 0.0, 4)} for m in memories],
            "history": [h.id for h in history],
            "dropped": [
                {"kind": ordered[i][0], "id": ordered[i][1].id, "reason": "token budget"} for i in dropped
            ],
        }
        return BuiltPrompt(ids, text, stop, manifest)

    def _render(
        self,
        persona: str,
        events: list[EventHit],
        memories: list[HistoryLine],
        history: list[HistoryLine],
        message: str,
        post: str,
        char: str,
        user: str,
    ) -> tuple[list[int], str, tuple[str, ...]]:
        system = persona
        if events:
            system += "\n\n[Story so far]\n" + "\n".join(_event_line(e) for e in events)
        if memories:
            system += "\n\n[Related memories]\n" + "\n".join(_memory_line(m, char, user) for m in memories)
        messages: list[ChatMessage] = [{"role": "system", "content": system}]
        messages += [_history_message(h) for h in history]
        messages.append({"role": "user", "content": message})
        if post:
            messages.append({"role": "system", "content": post})
        rendered = self.render(self.tokenizer, messages, char, user)
        ids = self.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
        return list(ids), rendered.text, rendered.stop
