"""Print a turn the way the original service did: [Model Prompt], [Model Reply], [Timing ms]."""

from __future__ import annotations

import json

from core.settings import settings
from services.producer import TurnView


def render_turn(view: TurnView, title: str = "") -> str:
    """A human-readable block for one finished turn."""
    speaker = " · narrator" if view.speaker == "narrator" else ""
    out = [f"=== {title or view.id}{speaker} · status={view.status.value} · attempts={view.attempts}"]
    out.append(f"[User Message]\n{view.message}")
    if view.prompt:
        out.append(f"[Model Prompt]\n{view.prompt}")
    if view.reply is not None:
        out.append(f"[Model Reply]\n{view.reply}")
    if view.structured is not None:  # an NPC's {say, emotion, action}, or the JSON a format asked for
        out.append("[Structured]\n" + json.dumps(view.structured, ensure_ascii=False))
    if view.quality:
        tried = view.quality.get("candidates", 1)
        below = view.quality.get("below_bar") or []
        seed = (view.params or {}).get("seed")
        verdict = "below the bar: " + "; ".join(below) if below else "passes the quality gate"
        out.append(f"[Kept] the best of {tried} candidate(s) (seed {seed}); {verdict}")
    if view.error:
        out.append(f"[Error]\n{view.error}")
    if view.usage:
        out.append("[Usage]\n" + json.dumps(view.usage, ensure_ascii=False))
    if view.context and "sections" in view.context:
        m = view.context
        sections = ", ".join(f"{k} {v}" for k, v in m["sections"].items() if v)
        lore = "; ".join(f"{e['name'] or e['id']} ({e['reason']})" for e in m.get("lore", []))
        out.append(
            f"[Context] {m['prompt_tokens']} tokens: {sections}"
            + (f"\n  lore: {lore}" if lore else "")
            + f"\n  (mlchat manifest {view.id} shows all of it)"
        )
    if view.state:
        before, after = view.state["before"], view.state["after"]
        out.append(
            f"[Mood]\n{before['emotion']} → {after['emotion']}, affinity {before['affinity']} → "
            f"{after['affinity']}" + "".join(f"\n  {note}" for note in view.state["notes"])
        )
    if view.quality:
        out.append("[Quality]\n" + json.dumps(view.quality, ensure_ascii=False))
    if view.timings:
        out.append("[Timing ms]\n" + json.dumps(view.timings, indent=2))
    return "\n".join(out) + "\n"


def render_manifest(view: TurnView) -> str:
    """The context manifest as a table: every section's tokens, what fired and why, what was dropped."""
    m = view.context or {}
    if not m:
        if settings.prompt_retention_days and view.status.value == "done" and view.prompt is None:
            return f"turn {view.id} has no manifest: forgotten past MLCHAT_PROMPT_RETENTION_DAYS"
        return f"turn {view.id} has no manifest yet (status {view.status.value})"
    speaker = m.get("speaker", "character")
    out = [f"turn {view.id} · {speaker} · {m['prompt_tokens']} of {m['budget_tokens']} tokens"]
    out.append("sections:")
    out += [f"  {name:18} {n:6}" for name, n in m["sections"].items()]
    out.append(f"  {'total':18} {sum(m['sections'].values()):6}")
    for entry in m.get("lore", []):
        out.append(f"lore {entry['id']} {entry['name']!r}: {entry['tokens']} tokens, {entry['reason']}")
    for kind, label in (("events", "event"), ("memories", "memory")):
        for item in m.get(kind, []):
            out.append(f"{label} {item['id']}: score {item['score']}, {item['tokens']} tokens")
    out.append(f"history kept: {len(m.get('history', []))} lines")
    for d in m.get("dropped", []):
        out.append(f"dropped {d['kind']} {d['id']}: {d['reason']}")
    return "\n".join(out)
