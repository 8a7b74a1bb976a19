"""Who speaks next in a group conversation: an explicit speaker, a fixed order, natural order
(mentions first, then talkativeness), or a rule list. Pure functions of the scene's state and seed,
so a step picked again after a crash picks the same speaker."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import regex

Strategy = Literal["fixed", "natural", "rules"]
# The narrator as a scene participant: no character row has id 0, and "narrator" is its slug and name.
NARRATOR_ID = 0
NARRATOR_SLUG, NARRATOR_NAME = "narrator", "Narrator"
STRATEGIES: tuple[Strategy, ...] = ("fixed", "natural", "rules")


@dataclass(frozen=True)
class Member:
    """A participant as the picker sees it."""

    character_id: int
    slug: str
    name: str
    position: int
    talkativeness: float = 0.5
    muted: bool = False


def with_narrator(members: Sequence[Member], position: int, talkativeness: float) -> list[Member]:
    """The members and the narrator, who speaks before the member at `position` (after the last
    when none is there), in speaking position."""
    narrator = Member(NARRATOR_ID, NARRATOR_SLUG, NARRATOR_NAME, position, talkativeness)
    ordered = sorted(members, key=lambda m: m.position)
    at = next((i for i, m in enumerate(ordered) if m.position >= position), len(ordered))
    return [*ordered[:at], narrator, *ordered[at:]]


@dataclass(frozen=True)
class Rule:
    """`speaker` speaks after `after` in each round (a precedence, as a rule director states it)."""

    speaker: str
    after: str


class RuleCycle(ValueError):
    """Rules that order a speaker before itself: no round order satisfies them."""


def rule_order(slugs: Sequence[str], rules: Sequence[Rule]) -> list[str]:
    """The round order the rules give: a topological order of the precedences, ties broken by the
    listed order. Raises RuleCycle naming the speakers caught in a cycle, ValueError for a rule that
    names someone not in `slugs`."""
    known = set(slugs)
    for rule in rules:
        for slug in (rule.speaker, rule.after):
            if slug not in known:
                raise ValueError(f"rule names {slug!r}, who is not a participant")
    before: dict[str, set[str]] = {s: set() for s in slugs}
    for rule in rules:
        before[rule.speaker].add(rule.after)
    order: list[str] = []
    left = list(slugs)
    while left:
        ready = next((s for s in left if before[s] <= set(order)), None)
        if ready is None:
            raise RuleCycle(f"rules form a cycle among {', '.join(sorted(left))}")
        order.append(ready)
        left.remove(ready)
    return order


def _speakers(members: Sequence[Member]) -> list[Member]:
    return sorted((m for m in members if not m.muted), key=lambda m: m.position)


def _mentions(text: str, candidates: Sequence[Member]) -> list[Member]:
    """Members named in the text (by name or slug, as whole words), in order of first mention."""
    found: list[tuple[int, Member]] = []
    for member in candidates:
        names = {n for n in (member.name, member.slug) if n}
        pattern = "|".join(regex.escape(n) for n in sorted(names, key=len, reverse=True))
        hit = regex.search(rf"(?<!\w)(?:{pattern})(?!\w)", text, regex.IGNORECASE) if pattern else None
        if hit:
            found.append((hit.start(), member))
    return [m for _, m in sorted(found, key=lambda f: (f[0], f[1].position))]


def next_speaker(
    *,
    strategy: Strategy,
    members: Sequence[Member],
    last_speaker: int | None,
    last_text: str,
    step: int,
    seed: int,
    rules: Sequence[Rule] = (),
    allow_repeat: bool = False,
    answering_player: bool = False,
) -> Member | None:
    """The member who speaks at `step` (1-based), or None when no member may speak (all muted).

    fixed: the next unmuted member after the last speaker in position order. rules: the same over
    the rules' round order. natural: an unmuted member named in the last line (first mention), else
    one drawn by talkativeness from a generator seeded by (seed, step); the last speaker is left out
    unless `allow_repeat` (or nobody else may speak), except as the one a player's line names
    (`answering_player`: the player asked them).
    """
    speakers = _speakers(members)
    if not speakers:
        return None
    if strategy == "rules":
        present = {m.slug for m in members}
        # A member who left takes their rules along: the others' order stands (never an error mid-scene).
        kept = [r for r in rules if r.speaker in present and r.after in present]
        order = rule_order([m.slug for m in members], kept)
        by_slug = {m.slug: m for m in speakers}
        speakers = [by_slug[s] for s in order if s in by_slug]
    if strategy in ("fixed", "rules"):
        ids = [m.character_id for m in speakers]
        if last_speaker in ids:
            return speakers[(ids.index(last_speaker) + 1) % len(speakers)]
        muted = next((m for m in members if m.character_id == last_speaker), None)
        if muted is not None and strategy == "fixed":  # muted since it spoke: the round goes on after it
            return next((m for m in speakers if m.position > muted.position), speakers[0])
        return speakers[0]  # a first step, or the last speaker left the scene: a new round
    eligible = [m for m in speakers if allow_repeat or m.character_id != last_speaker] or speakers
    mentioned = _mentions(last_text, speakers if answering_player else eligible)
    if mentioned:
        return mentioned[0]
    rng = random.Random(f"{seed}:{step}")  # noqa: S311 (a seeded choice, not a secret)
    weights = [m.talkativeness for m in eligible]
    if not any(weights):
        return rng.choice(eligible)
    return rng.choices(eligible, weights=weights)[0]
