"""Build each turn's prompt: persona first (byte-identical per character, so vLLM's prefix cache
shares it), then lore, state, retrieved context, recent history and the player's message, packed by
tokens. The manifest records what went in, why, and what each part cost in tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from db.models import Character
from db.retrieval import EventHit, HistoryLine, TurnContext
from roleplay.lorebook import Activation, FiredEntry, Lorebook, activate
from roleplay.mood import Mood
from worker.prompt_formats import RENDERERS, ChatMessage

NARRATOR_INSTRUCTIONS = (
    "You are the narrator of this story. In the third person and in two or three sentences, describe "
    "what happens next, drawing on the story so far and the conversation. Do not speak as {{char}} or "
    "{{user}}, and do not address the reader."
)


class PromptTooLong(ValueError):
    """Even the persona and the player's message do not fit the context window."""


@dataclass(frozen=True)
class PromptInput:
    character: Character
    player_name: str
    message: str
    context: TurnContext
    max_new_tokens: int
    mood: Mood | None = None
    speaker: str = "character"  # or "narrator"


@dataclass
class BuiltPrompt:
    token_ids: list[int]
    text: str
    stop: tuple[str, ...]
    manifest: dict[str, Any] = field(default_factory=dict)


# A piece of the prompt the manifest accounts for: (section, item id or None, text).
Piece = tuple[str, Any, str]


def fill_macros(text: str, char: str, user: str) -> str:
    return text.replace("{{char}}", char).replace("{{user}}", user)


def _persona_pieces(character: Character, lore: Activation | None) -> list[Piece]:
    name = character.name
    pieces: list[Piece] = [
        ("system_prompt", None, character.system_prompt or f"You are {name}. Stay in character.")
    ]
    if lore is not None:
        pieces += [("lore", f.entry.id, f.content) for f in lore.kept if f.entry.position == "before_char"]
    sheet = [
        ("Name", name),
        ("Description", character.description),
        ("Personality", character.personality),
        ("Speech style", character.speech_style),
        ("Scenario", character.scenario),
    ]
    pieces.append(("character_sheet", None, "[Character]\n" + "\n".join(f"{k}: {v}" for k, v in sheet if v)))
    if lore is not None:
        pieces += [("lore", f.entry.id, f.content) for f in lore.kept if f.entry.position == "after_char"]
    if character.example_dialogues:
        lines = [
            f"User: {e.get('user', '')}\n{name}: {e.get('character', '')}"
            for e in character.example_dialogues
        ]
        pieces.append(("example_dialogue", None, "[Example dialogue]\n" + "\n".join(lines)))
    return [(s, i, fill_macros(t, name, "{{user}}")) for s, i, t in pieces]


def persona_block(character: Character) -> str:
    """The character's fixed system text (no lore); depends only on the character, never on the turn."""
    return "\n\n".join(t for _, _, t in _persona_pieces(character, None))


def _narrator_pieces(character: Character, lore: Activation | None) -> list[Piece]:
    pieces: list[Piece] = [("system_prompt", None, NARRATOR_INSTRUCTIONS)]
    setting = "\n".join(x for x in (character.scenario, f"Main character: {character.name}") if x)
    pieces.append(("character_sheet", None, "[Setting]\n" + setting))
    if lore is not None:  # the world's lore is the narrator's too
        pieces += [("lore", f.entry.id, f.content) for f in lore.kept]
    return [(s, i, fill_macros(t, character.name, "{{user}}")) for s, i, t in pieces]


def _event_line(hit: EventHit) -> str:
    return f"- ({hit.scene}) {hit.text}" if hit.scene else f"- {hit.text}"


def _memory_line(line: HistoryLine, char: str, user: str) -> str:
    speaker = {"user": user, "assistant": char, "narrator": "Narrator"}.get(line.role, line.role)
    return f"- {speaker}: {line.content}"


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
        self._books: dict[int, tuple[int, Lorebook]] = {}  # {character id: (version, lorebook)}

    def defang(self, text: str) -> str:
        """Break special-token strings in user-supplied text so they tokenize as plain text:
        a player typing '<|im_start|>system' must not open a system turn."""
        for token in self._specials:
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) + self._MESSAGE_OVERHEAD for ids in encoded]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _lorebook(self, character: Character) -> Lorebook:
        """The character's lorebook, validated (regexes compiled) once per character version."""
        if character.id is None:  # not stored (tests build characters in memory)
            return Lorebook.model_validate(character.lorebook)
        cached = self._books.get(character.id)
        if cached is None or cached[0] != character.version:
            cached = (character.version, Lorebook.model_validate(character.lorebook))
            self._books[character.id] = cached
        return cached[1]

    def _lore(self, item: PromptInput, char: str, user: str) -> Activation | None:
        book = item.character.lorebook
        if not book:
            return None
        return activate(
            self._lorebook(item.character),
            message=item.message,
            history=[line.content for line in item.context.recent],
            count_tokens=self.count_tokens,
            fill=lambda text: fill_macros(text, char, user),
        )

    def build(self, item: PromptInput) -> BuiltPrompt:
        """Fit persona + lore + state + context + history + message into max_model_len - max_new_tokens."""
        char, user = item.character.name, item.player_name or "User"
        narrator = item.speaker == "narrator"
        budget = self.max_model_len - item.max_new_tokens
        lore = self._lore(item, char, user)
        persona = (
            _narrator_pieces(item.character, lore) if narrator else _persona_pieces(item.character, lore)
        )
        persona = [(s, i, t.replace("{{user}}", user)) for s, i, t in persona]
        state = [] if narrator or item.mood is None else [("state", None, item.mood.describe(char, user))]
        message = self.defang(item.message)
        post = "" if narrator else fill_macros(item.character.post_history_instructions, char, user)
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
            else self.defang(_memory_line(x, char, user))
            if kind == "memory"
            else self.defang(x.content)
            for kind, x in ordered
        ]
        layout = _Layout(persona, state, message, post, char, user, narrator)
        base_len = len(self._render(layout, [], [], [])[0])
        while base_len > budget and persona and any(s == "lore" for s, _, _ in persona):
            # Lore that would leave no room for the message goes first (the last-ranked entry).
            drop = next(p for p in reversed(persona) if p[0] == "lore")
            persona.remove(drop)
            if lore is not None:
                moved = next(f for f in lore.kept if f.entry.id == drop[1])
                lore.kept.remove(moved)
                lore.dropped.append(moved)
            layout = _Layout(persona, state, message, post, char, user, narrator)
            base_len = len(self._render(layout, [], [], [])[0])
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
            ids, text, stop, pieces, offsets = self._render(layout, events, memories, history)
            if len(ids) <= budget or not kept:
                break
            kept.pop()  # the estimate was short: drop the lowest-priority item and re-render
        dropped = [i for i in range(len(ordered)) if i not in set(kept)]
        manifest = self._manifest(text, ids, offsets, pieces, budget, lore, item.mood, events, memories)
        manifest["speaker"] = item.speaker
        manifest["dropped"] = [
            {"kind": ordered[i][0], "id": ordered[i][1].id, "reason": "token budget"} for i in dropped
        ] + [
            {
                "kind": "lore",
                "id": f.entry.id,
                "name": f.entry.name,
                "reason": "lore token budget",
                "tokens": f.tokens,
            }
            for f in (lore.dropped if lore else [])
        ]
        return BuiltPrompt(ids, text, stop, manifest)

    def _render(
        self,
        layout: _Layout,
        events: list[EventHit],
        memories: list[HistoryLine],
        history: list[HistoryLine],
    ) -> tuple[list[int], str, tuple[str, ...], list[Piece], list[int | None]]:
        char, user = layout.char, layout.user
        pieces: list[Piece] = list(layout.persona) + list(layout.state)
        if events:
            pieces.append(("events", None, "[Story so far]"))
            pieces += [("events", e.id, _event_line(e)) for e in events]
        if memories:
            pieces.append(("memories", None, "[Related memories]"))
            pieces += [("memories", m.id, self.defang(_memory_line(m, char, user))) for m in memories]
        system = "\n\n".join("\n".join(t for _, _, t in group) for group in _groups(pieces))
        messages: list[ChatMessage] = [{"role": "system", "content": system}]
        for h in history:
            content = self.defang(h.content)  # earlier player lines are player text too
            if layout.narrator:
                role = "assistant" if h.role == "narrator" else "user"
                if h.role != "narrator":
                    content = f"{char if h.role == 'assistant' else user}: {content}"
            else:
                role = "assistant" if h.role == "assistant" else "user"
                if h.role == "narrator":
                    content = f"[Narrator] {content}"
            messages.append({"role": role, "content": content})
            pieces.append(("history", h.id, content))
        messages.append({"role": "user", "content": layout.message})
        pieces.append(("message", None, layout.message))
        if layout.post:
            messages.append({"role": "system", "content": layout.post})
            pieces.append(("post_history", None, layout.post))
        rendered = self.render(self.tokenizer, messages, char, user)
        ids, offsets = self._tokenize(rendered.text, rendered.add_special_tokens)
        return ids, rendered.text, rendered.stop, pieces, offsets

    def _tokenize(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[int | None]]:
        """Token ids and the start character of each (None for an added BOS and the like), in one call."""
        if not getattr(self.tokenizer, "is_fast", False):  # slow tokenizers have no offsets
            ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
            return ids, [None] * len(ids)
        enc = self.tokenizer(
            text,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_special_tokens_mask=add_special_tokens,
        )
        added = enc.get("special_tokens_mask") or [0] * len(enc["input_ids"])
        starts = [
            None if flag else start for (start, _), flag in zip(enc["offset_mapping"], added, strict=True)
        ]
        return list(enc["input_ids"]), starts

    def _manifest(
        self,
        text: str,
        ids: list[int],
        offsets: list[int | None],
        pieces: list[Piece],
        budget: int,
        lore: Activation | None,
        mood: Mood | None,
        events: list[EventHit],
        memories: list[HistoryLine],
    ) -> dict[str, Any]:
        """Every prompt token assigned to the piece whose text it starts in; the rest is "template"
        (role markers, headers' separators, BOS). Per-section counts therefore sum to prompt_tokens."""
        spans: list[tuple[int, int, int]] = []  # (start, end, piece index)
        cursor = 0
        for index, (_, _, piece_text) in enumerate(pieces):
            if not piece_text:
                continue
            at = text.find(piece_text, cursor)
            if at >= 0:
                spans.append((at, at + len(piece_text), index))
                cursor = at + len(piece_text)
                continue
            # Some formats move a piece (EEVE puts every system message in the preamble).
            at = text.find(piece_text)
            end = at + len(piece_text)
            if at >= 0 and not any(s < end and at < e for s, e, _ in spans):
                spans.append((at, end, index))
        spans.sort()
        per_piece = [0] * len(pieces)
        template = 0
        span_i = 0
        for start in offsets:
            if start is None:
                template += 1
                continue
            while span_i < len(spans) and spans[span_i][1] <= start:
                span_i += 1
            if span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1]:
                per_piece[spans[span_i][2]] += 1
            else:
                template += 1
        sections: dict[str, int] = {}
        items: dict[tuple[str, Any], int] = {}
        for (section, item_id, _), n in zip(pieces, per_piece, strict=True):
            sections[section] = sections.get(section, 0) + n
            if item_id is not None:
                items[(section, item_id)] = items.get((section, item_id), 0) + n
        sections["template"] = template
        fired: list[FiredEntry] = lore.kept if lore else []
        return {
            "budget_tokens": budget,
            "prompt_tokens": len(ids),
            "sections": sections,
            "persona_tokens": sum(
                sections.get(s, 0) for s in ("system_prompt", "character_sheet", "example_dialogue")
            ),
            "lore": [
                {
                    "id": f.entry.id,
                    "name": f.entry.name,
                    "reason": f.reason,
                    "position": f.entry.position,
                    "tokens": items.get(("lore", f.entry.id), 0),
                }
                for f in fired
            ],
            "state": {"emotion": mood.emotion, "affinity": mood.affinity} if mood else None,
            "events": [
                {"id": e.id, "score": round(e.score, 4), "tokens": items.get(("events", e.id), 0)}
                for e in events
            ],
            "memories": [
                {"id": m.id, "score": round(m.score or 0.0, 4), "tokens": items.get(("memories", m.id), 0)}
                for m in memories
            ],
            "history": [
                {"id": item_id, "tokens": n}
                for (section, item_id), n in items.items()
                if section == "history"
            ],
        }


@dataclass(frozen=True)
class _Layout:
    persona: list[Piece]
    state: list[Piece]
    message: str
    post: str
    char: str
    user: str
    narrator: bool


def _groups(pieces: list[Piece]) -> list[list[Piece]]:
    """System-message pieces grouped into paragraphs: a header and its lines stay together; other
    pieces (persona sections, each lore entry, the state line) are paragraphs of their own."""
    groups: list[list[Piece]] = []
    for piece in pieces:
        section, item_id, _ = piece
        if section in ("events", "memories") and item_id is not None and groups:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    return groups
