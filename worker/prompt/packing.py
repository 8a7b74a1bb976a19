"""Build each turn's prompt: persona first (byte-identical per character, so vLLM's prefix cache
shares it), then lore, state, retrieved context, recent history and the player's message, packed by
tokens. Every piece of text is cleaned on its way in (sanitize.py and the format's escape); the
manifest records what went in, why, and what each part cost in tokens."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.settings import PROMPT_ITEM_OVERHEAD_TOKENS
from core.text import speaker_key
from core.versioned_cache import VersionedCache
from db.models import Character
from db.retrieval import HistoryLine, TurnContext
from roleplay.lorebook import Activation, FiredEntry, Lorebook, activate, stored_lorebook
from roleplay.mood import Mood, describe_toward
from worker.prompt.formats import (
    FORMATS,
    SPEAKER,
    ChatMessage,
    escape_bracket_markers,
    escape_name_markers,
    escape_text_markers,
    escaped_label,
)
from worker.prompt.layout import (
    ACTIONS_HEADER,
    Layout,
    Piece,
    default_system_prompt,
    event_line,
    fact_line,
    fill_macros,
    groups,
    history_message,
    labelled_in_content,
    memory_line,
    narrator_pieces,
    persona_pieces,
    summary_line,
    system_pieces,
)
from worker.prompt.manifest import account
from worker.prompt.roles import LENIENT, fit_roles, probe_roles, text_markers
from worker.prompt.sanitize import Sanitizer


def _escaping_names(clean: Any, names: list[str]) -> Any:
    return lambda text: escape_name_markers(clean(text), names)


_NO_BRACKETS = str.maketrans("[]\uff3b\uff3d\ufe47\ufe48", "()\uff08\uff09()")


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
    system_prompt: str | None = None  # a run's own system prompt in place of the character's
    direction: str | None = None  # the line's direction for the scene, after the persona
    group: Any = None  # a group conversation's GroupView (db/scenes.py): premise and members' names
    regard: dict[int, int] = field(default_factory=dict)  # a member's affinity toward the others, by id
    memory_tokens: int | None = None  # at most this many tokens of summaries and facts (None: no cap)
    actions: str | None = None  # the NPC reply shape and its actions (worker/structured.py)


# Sections of the persona that instruct the model: a reply reproducing one of them leaks the prompt.
ECHO_SECTIONS = ("system_prompt", "character_sheet", "lore")
LOREBOOKS_KEPT = 256  # characters whose validated lorebook a prompt builder keeps (a book: up to MBs)


@dataclass
class BuiltPrompt:
    token_ids: list[int]
    text: str
    stop: tuple[str, ...]
    manifest: dict[str, Any] = field(default_factory=dict)
    # The instruction sections a reply must not reproduce (the quality gate's echo check).
    echo_sources: tuple[tuple[str, str], ...] = ()


def persona_block(character: Character) -> str:
    """The character's fixed system text (no lore, nothing cleaned); depends only on the character."""
    return "\n\n".join(t for _, _, t in persona_pieces(character, None, character.name, "{{user}}", str))


@dataclass
class _Packed:
    """A rendered prompt and the items in it."""

    ids: list[int]
    text: str
    stop: tuple[str, ...]
    pieces: list[Piece]
    offsets: list[int | None]
    events: list[Any]
    memories: list[Any]
    summaries: list[Any]
    facts: list[Any]


def _piece_of(fired: FiredEntry, char: str, user: str, clean: Callable[[str], str]) -> tuple[Any, str]:
    """A fired entry as its persona piece holds it: its id, its text (filled when it fired), cleaned."""
    return fired.entry.id, clean(fired.content)


def _by_rank(
    pieces: list[Any], lore: Activation | None, char: str, user: str, clean: Callable[[str], str]
) -> list[Any]:
    """The persona's lore pieces, best-ranked first, as the book ranked them for its token budget."""
    if lore is None:
        return pieces
    rank: dict[tuple[Any, str], tuple[bool, float, float]] = {}
    for fired in lore.kept:
        entry = fired.entry
        rank.setdefault(
            _piece_of(fired, char, user, clean), (not entry.constant, -entry.priority, entry.insertion_order)
        )
    return sorted(pieces, key=lambda p: rank.get((p[1], p[2]), (True, math.inf, math.inf)))


def _pack(
    ordered: list[tuple[str, Any]],
    costs: list[int],
    memory_tokens: int | None,
    *,
    used: int,
    budget: int | None,
) -> tuple[list[int], set[int]]:
    """The items kept, greedily in priority order: each that fits `budget` (None: no limit) after
    `used` tokens, summaries and facts also within `memory_tokens`; and those the memory cap left out.
    Recent history (newest first) stops at the first line that does not fit: an older line kept past
    it would leave a hole the model cannot see (an answer read as the reply to the line before)."""
    kept: list[int] = []
    over_memory: set[int] = set()  # left out by the memory cap, not the whole budget
    memory_used = 0
    history_ended = False
    for i, cost in enumerate(costs):
        kind = ordered[i][0]
        is_memory = kind in ("summary", "fact")
        if is_memory and memory_tokens is not None and memory_used + cost > memory_tokens:
            over_memory.add(i)
            continue
        if kind == "history" and history_ended:
            continue
        if budget is None or used + cost <= budget:
            kept.append(i)
            used += cost
            memory_used += cost if is_memory else 0
        elif kind == "history":
            history_ended = True
    return kept, over_memory


class PromptBuilder:
    """Packs prompts for one model: its tokenizer, its format, its context window."""

    # Rough per-message cost of role markers; the exact length is checked after rendering.
    _MESSAGE_OVERHEAD = PROMPT_ITEM_OVERHEAD_TOKENS

    def __init__(self, tokenizer: Any, prompt_format: str, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.format = FORMATS[prompt_format]
        self.max_model_len = max_model_len
        self.sanitizer = Sanitizer(tokenizer)
        # The text formats take any sequence of roles; a chat template may refuse some.
        self.roles = LENIENT
        if prompt_format == "chat_template":
            render = lambda messages: self.format.render(tokenizer, messages, "", "").text  # noqa: E731
            self.roles = probe_roles(render)
            # A template whose role markers are plain text (Zephyr's `<|user|>`): escaped as well.
            markers = text_markers(render, self.sanitizer.specials, self.roles)
            if markers:
                escape = self.format.escape
                self.format = dataclasses.replace(
                    self.format, escape=lambda text, c, u: escape_text_markers(escape(text, c, u), markers)
                )
        # {character id: lorebook at its version}, bounded: a card's lorebook can be megabytes, and a
        # worker lives through every character of a large world.
        self._books: VersionedCache[Lorebook] = VersionedCache(kept=LOREBOOKS_KEPT)

    def cleaner(self, char: str, user: str) -> Any:
        """The one cleaning step for every untrusted text of a prompt between these two speakers: no
        special token, no role marker of the format, no line opening as the prompt's own bracketed
        markers ("[Narrator] …", "[Scene direction]", "[… speaks next.]")."""
        escape, scrub = self.format.escape, self.sanitizer.scrub
        return lambda text: escape_bracket_markers(escape(scrub(text), char, user))

    def name_label(self, clean: Callable[[str], str], *request_speakers: str) -> Callable[[str], str]:
        """Another speaker's name as a label: folded onto one line, cleaned like any text (`clean`: a
        name holding another speaker's "Name:" opens no line as theirs), then escaped_label."""
        return lambda name: escaped_label(
            self.format, clean(self.sanitizer.label(name, "Someone")), *request_speakers
        )

    def _history_cost_text(self, layout: Layout, line: Any) -> str:
        """A history line as the prompt holds it, to be counted: under the label a group or narrator
        turn gives it, or the one a format that labels each line writes (gpt_oss_text)."""
        role, content = history_message(layout, line)
        if self.format.labels_lines and not labelled_in_content(layout, line):
            return f"{layout.char if role == 'assistant' else layout.user}: {content}"
        return content

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
            return stored_lorebook(character.lorebook)
        return self._books.get(
            character.id, character.cache_stamp, lambda: stored_lorebook(character.lorebook)
        )

    def _lore(
        self, item: PromptInput, char: str, user: str, clean: Callable[[str], str]
    ) -> Activation | None:
        if not item.character.lorebook:
            return None
        return activate(
            self._lorebook(item.character),
            message=item.message,
            history=[line.content for line in item.context.recent],
            # counted as the prompt holds it: a defanged special token costs more than the raw one
            count_tokens=lambda text: self.count_tokens(clean(text)),
            fill=lambda text: fill_macros(text, char, user),
            room=self.max_model_len - item.max_new_tokens,
        )

    def build(self, item: PromptInput) -> BuiltPrompt:
        """Fit persona + lore + state + context + history + message into max_model_len - max_new_tokens."""
        # The speakers' labels open lines of content ("Rowan: ...") in group and narrator turns: each
        # is escaped like any text, or a name like "### System: obey" would open a turn in SOLAR.
        char, user = self.sanitizer.speaker_labels(item.character.name, item.player_name)
        char, user = escaped_label(self.format, char), escaped_label(self.format, user)
        if item.group is not None:  # the speaking member's own name opens no line as another member's
            others = [n for n in item.group.names if speaker_key(n) != speaker_key(item.character.name)]
            others += ["Narrator"] if item.group.narrator else []
            char = self.sanitizer.among(char, [self.sanitizer.label(n, "Someone") for n in others])
        narrator = item.speaker == "narrator"
        clean = self.cleaner(char, user)
        if item.group is not None:  # no untrusted line may open as any member's (or the player's) turn
            names = [self.sanitizer.label(n, "Someone") for n in item.group.names]
            if item.group.narrator:
                names.append("Narrator")
            user = self.sanitizer.among(user, names)  # nor the player's name as a member's line
            clean = _escaping_names(clean, [char, user, *names])
        if narrator and item.group is None:  # its lines are labelled too: none may open as another's
            clean = _escaping_names(clean, [char, user, "Narrator"])
        budget = self.max_model_len - item.max_new_tokens
        lore = self._lore(item, char, user, clean)
        pieces_of = narrator_pieces if narrator else persona_pieces
        persona = pieces_of(item.character, lore, char, user, clean)
        if item.system_prompt and not narrator:
            original = default_system_prompt(char)
            own = ("system_prompt", None, clean(fill_macros(item.system_prompt, char, user, original)))
            persona = [own if section == "system_prompt" else (section, i, t) for section, i, t in persona]
        direction = item.direction
        if not direction and narrator and item.group is not None:  # the narrator answering a player
            direction = item.group.narrator_instructions
        if direction:  # after the persona, so the persona stays a shared, cached prefix
            text = "[Scene direction]\n" + clean(fill_macros(direction, char, user))
            persona = [*persona, ("direction", None, text)]
        group = item.group if not narrator else None
        label = self.name_label(clean)
        # Members told apart by id: two may share a display name.
        others = (
            [label(n) for n, i in zip(group.names, group.ids, strict=True) if i != item.character.id]
            if group
            else []
        )
        message, message_labelled = item.message, False
        if group is not None:  # after the persona too: the persona stays a shared prefix
            premise = f"{fill_macros(group.premise, char, user)}\n" if group.premise else ""
            scene = f"{premise}Present: {', '.join([char, *others])}. Write only {char}'s next line."
            persona = [*persona, ("scene", None, "[Scene]\n" + clean(scene))]
            toward = [
                describe_toward(char, label(n), item.regard.get(i, 0))
                for n, i in zip(group.names, group.ids, strict=True)
                if i != item.character.id
            ]
            if toward:
                persona = [*persona, ("regard", None, clean("\n".join(toward)))]
            # A bracket in the name would close the cue early ("Narrator] The gate falls. [Bram"
            # opened it as narration): in the cue, the name's brackets are parentheses.
            cued = char.translate(_NO_BRACKETS)
            message = f"{user}: {clean(message)}" if message else f"[{cued} speaks next.]"
            message_labelled = True
        elif narrator and item.group is not None:  # the narrator of a group: the scene and who is in it
            present = ", ".join(label(n) for n in item.group.names)
            premise = f"{fill_macros(item.group.premise, char, user)}\n" if item.group.premise else ""
            scene = f"{premise}Present: {present}."
            persona = [*persona, ("scene", None, "[Scene]\n" + clean(scene))]
            message = clean(message) if message else "[The narrator speaks next.]"
            message_labelled = not item.message
        if item.actions and not narrator:
            persona = [
                *persona,
                ("actions", None, ACTIONS_HEADER + clean(fill_macros(item.actions, char, user))),
            ]
        state = (
            [] if narrator or item.mood is None else [("state", None, clean(item.mood.describe(char, user)))]
        )
        post = "" if narrator else clean(fill_macros(item.character.post_history_instructions, char, user))
        ctx = item.context

        # Candidates in priority order: the last two lines, the best events and memories, then the rest.
        recent_newest = list(reversed(ctx.recent))
        # NPC memory ranks right after them: the oldest summary (the highest level, the only memory of
        # the conversation's start), the newest, the two best facts, then the other summaries newest
        # first. Newest first throughout, three fresh level-0 summaries filled the memory budget and
        # the start of the conversation and the game's facts dropped in and out of the prompt.
        summaries = list(ctx.summaries)  # oldest first
        oldest, newest, middle = summaries[:1], summaries[1:][-1:], list(reversed(summaries[1:-1]))
        ordered: list[tuple[str, Any]] = (
            [("history", x) for x in recent_newest[:2]]
            + [("summary", x) for x in oldest + newest]
            + [("fact", x) for x in ctx.facts[:2]]
            + [("summary", x) for x in middle]
            + [("event", x) for x in ctx.events[:2]]
            + [("memory", x) for x in ctx.similar[:2]]
            + [("history", x) for x in recent_newest[2:]]
            + [("event", x) for x in ctx.events[2:]]
            + [("memory", x) for x in ctx.similar[2:]]
            + [("fact", x) for x in ctx.facts[2:]]
        )
        group_fields: dict[str, Any] = dict(
            group=group is not None,
            speaker_id=item.character.id,
            label=label,
            message_labelled=message_labelled,
        )
        if item.group is None:  # a group's message is cleaned already (a member's under the player's name)
            message = clean(message)
        layout = Layout(persona, state, message, post, char, user, narrator, clean, **group_fields)
        texts = [
            event_line(x, clean)
            if kind == "event"
            else memory_line(x, char, user, clean)
            if kind == "memory"
            else summary_line(x, clean)
            if kind == "summary"
            else fact_line(x, user, clean)
            if kind == "fact"
            # as the prompt holds it: in a group or a narrator turn, under its speaker's label
            else self._history_cost_text(layout, x)
            for kind, x in ordered
        ]
        costs = self._count(texts)
        # Most prompts fit whole: every item the memory cap leaves, rendered once, still leaves room
        # for each item's estimated cost. The persona-and-message prompt is a part of that one (its
        # tokens are no more), so the packing below would keep the same items and render the same
        # prompt: one render and tokenization instead of two.
        kept, over_memory = _pack(ordered, costs, item.memory_tokens, used=0, budget=None)
        whole = sum(costs[i] for i in kept)
        packed = self._render_kept(layout, ordered, kept) if whole <= budget else None
        for_context: set[int] = set()  # lore entries dropped to leave room for the message
        if packed is None or len(packed.ids) + whole > budget:
            first, first_layout = list(kept), layout
            base_len = len(self._render(layout, [], [], [])[0])
            lore_pieces = _by_rank([p for p in persona if p[0] == "lore"], lore, char, user, clean)
            if base_len > budget and lore_pieces:
                # Lore that would leave no room for the message goes, the last-ranked entries first
                # (the book's own order: constant, then priority, then insertion order): the most
                # entries that still fit, found in a few renders rather than one render per entry
                # dropped (a card of ten thousand small constant entries).
                def with_lore(k: int) -> Layout:
                    kept_lore = {id(p) for p in lore_pieces[:k]}
                    pieces = [p for p in persona if p[0] != "lore" or id(p) in kept_lore]
                    return Layout(
                        pieces, state, layout.message, post, char, user, narrator, clean, **group_fields
                    )

                low, high = 0, len(lore_pieces) - 1  # the most that fit lies in [low, high]
                while low < high:
                    mid = (low + high + 1) // 2
                    if len(self._render(with_lore(mid), [], [], [])[0]) <= budget:
                        low = mid
                    else:
                        high = mid - 1
                gone = {id(p) for p in lore_pieces[low:]}  # one pass each, not one per entry
                persona[:] = [p for p in persona if id(p) not in gone]
                if lore is not None:  # the entries of the pieces dropped, by id (ids may repeat)
                    owed = Counter((p[1], p[2]) for p in lore_pieces[low:])
                    keep: list[Any] = []
                    for fired in reversed(lore.kept):
                        if owed[_piece_of(fired, char, user, clean)] > 0:
                            owed[_piece_of(fired, char, user, clean)] -= 1
                            lore.dropped.insert(0, fired)
                            for_context.add(id(fired))
                        else:
                            keep.append(fired)
                    lore.kept[:] = keep[::-1]
                layout = with_lore(low)
                base_len = len(self._render(layout, [], [], [])[0])
            if base_len > budget:
                # A scene's premise is in every prompt of its group: said, so its author knows which
                # of the scene's texts to shorten (every step and line would fail for it alike).
                # So are a line's direction (a chat completion's system messages, up to 20,000
                # characters) and the declared actions: shortening the message changes nothing then.
                premise = item.group.premise if item.group is not None else ""
                shares = [
                    (name, self.count_tokens(clean(fill_macros(text, char, user))))  # as the prompt holds it
                    for name, text in (
                        ("the scene's premise", premise),
                        ("the line's direction", direction or ""),
                        ("the actions", item.actions if item.actions and not narrator else ""),
                    )
                    if text
                ]
                of_them = "; ".join(f"{n} of them {name}" for name, n in shares)
                raise PromptTooLong(
                    f"prompt needs {base_len} tokens for persona and message alone"
                    f"{f' ({of_them})' if of_them else ''} but only "
                    f"{budget} fit (max_model_len {self.max_model_len} - {item.max_new_tokens} tokens kept "
                    "for the reply)"
                )
            kept, over_memory = _pack(ordered, costs, item.memory_tokens, used=base_len, budget=budget)
            if packed is None or kept != first or layout is not first_layout:  # else rendered already
                packed = self._render_kept(layout, ordered, kept)
            while len(packed.ids) > budget and kept:
                kept.pop()  # the estimate was short: drop the lowest-priority item and re-render
                packed = self._render_kept(layout, ordered, kept)
        ids, text, stop, pieces, offsets = packed.ids, packed.text, packed.stop, packed.pieces, packed.offsets
        events, memories, summaries, facts = packed.events, packed.memories, packed.summaries, packed.facts
        dropped = [i for i in range(len(ordered)) if i not in set(kept)]
        manifest = account(
            text, ids, offsets, pieces, budget, lore, item.mood, events, memories, summaries, facts
        )
        manifest["speaker"] = item.speaker
        # The card version the prompt was built from: a card imported while turns waited is used by
        # the turns claimed after it, and this says which ones those were.
        manifest["character_version"] = item.character.version
        manifest["dropped"] = [
            {
                "kind": ordered[i][0],
                "id": ordered[i][1].id,
                "reason": "memory token budget" if i in over_memory else "token budget",
            }
            for i in dropped
        ] + [
            {
                "kind": "lore",
                "id": f.entry.id,
                "name": f.entry.name,
                "reason": "context budget"
                if id(f) in for_context or (lore is not None and lore.room_limits)
                else "lore token budget",
                "tokens": f.tokens,
            }
            | ({"tokens_at_least": True} if f.partly_counted else {})
            for f in (lore.dropped if lore else [])
        ]
        sources = [(s, t) for s, _, t in layout.persona if s in ECHO_SECTIONS and t]
        if layout.post:
            sources.append(("post-history instruction", layout.post))
        if group is not None:  # a member never speaks for another, the player or the narrator
            others = [*others, user, *(["Narrator"] if group.narrator else [])]
            if group.narrator:
                stop = (*stop, "\n[Narrator]")
        elif narrator and item.group is not None:  # the narrator never speaks for a member or the player
            others = [label(n) for n in item.group.names] + [user]
        elif narrator:  # nor, in a one-character conversation, for its character
            others = [char, user]
        stop = stop + tuple(f"\n{name}:" for name in others if f"\n{name}:" not in stop)
        return BuiltPrompt(ids, text, stop, manifest, tuple(sources))

    def _render_kept(self, layout: Layout, ordered: list[tuple[str, Any]], kept: list[int]) -> _Packed:
        """The prompt with these items of `ordered` (indices, in priority order)."""
        # Kept best first, told in the story's order: "[Story so far]" read newest-first retold it
        # backwards (review: the murder before the crowning).
        events = sorted(
            (ordered[i][1] for i in kept if ordered[i][0] == "event"), key=lambda e: (e.time, e.id)
        )
        memories = [ordered[i][1] for i in kept if ordered[i][0] == "memory"]
        summaries = sorted(
            (ordered[i][1] for i in kept if ordered[i][0] == "summary"), key=lambda s: s.first_seq
        )
        facts = [ordered[i][1] for i in kept if ordered[i][0] == "fact"]
        history = sorted((ordered[i][1] for i in kept if ordered[i][0] == "history"), key=lambda h: h.seq)
        ids, text, stop, pieces, offsets = self._render(layout, events, memories, history, summaries, facts)
        return _Packed(ids, text, stop, pieces, offsets, events, memories, summaries, facts)

    def _render(
        self,
        layout: Layout,
        events: list[Any],
        memories: list[HistoryLine],
        history: list[HistoryLine],
        summaries: list[Any] = (),  # type: ignore[assignment]
        facts: list[Any] = (),  # type: ignore[assignment]
    ) -> tuple[list[int], str, tuple[str, ...], list[Piece], list[int | None]]:
        pieces = system_pieces(layout, events, memories, summaries, facts)
        system = "\n\n".join("\n".join(t for _, _, t in group) for group in groups(pieces))
        messages: list[ChatMessage] = [{"role": "system", "content": system}]
        for h in history:
            role, content = history_message(layout, h)
            messages.append({"role": role, "content": content})
            if role == "user" and labelled_in_content(layout, h):
                messages[-1][SPEAKER] = ""
            pieces.append(("history", h.id, content))
        messages.append({"role": "user", "content": layout.message})
        if layout.message_labelled:
            messages[-1][SPEAKER] = ""
        pieces.append(("message", None, layout.message))
        if layout.post:
            messages.append({"role": "system", "content": layout.post})
            pieces.append(("post_history", None, layout.post))
        speaker = "Narrator" if layout.narrator else layout.char
        messages = fit_roles(messages, self.roles, speaker)
        rendered = self.format.render(self.tokenizer, messages, speaker, layout.user)
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
