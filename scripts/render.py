"""Print a turn the way the original service did: [Model Prompt], [Model Reply], [Timing ms]."""

from __future__ import annotations

import json

from tasks.producer import TurnView


def render_turn(view: TurnView, title: str = "") -> str:
    """A human-readable block for one finished turn."""
    out = [f"=== {title or view.id} · status={view.status.value} · attempts={view.attempts}"]
    out.append(f"[User Message]\n{view.message}")
    if view.prompt:
        out.append(f"[Model Prompt]\n{view.prompt}")
    if view.reply is not None:
        out.append(f"[Model Reply]\n{view.reply}")
    if view.error:
        out.append(f"[Error]\n{view.error}")
    if view.usage:
        out.append("[Usage]\n" + json.dumps(view.usage, ensure_ascii=False))
    if view.timings:
        out.append("[Timing ms]\n" + json.dumps(view.timings, indent=2))
    return "\n".join(out) + "\n"
