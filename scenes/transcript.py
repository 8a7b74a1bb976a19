"""A scene written out: one JSON object per scene (its lines with speaker, text, emotion, step and
turn id) for machines, and Markdown for the writers who review it. Scenes stay in mlchat's own
shape: the OpenAI batch format has one request per line and no notion of a scene."""

from __future__ import annotations

from typing import Any

from core.json_lines import one_line_json
from db.models import Scene
from db.scenes import TranscriptLine


def scene_record(scene: Scene, lines: list[TranscriptLine]) -> dict[str, Any]:
    """The scene and its lines as one JSON-ready object."""
    return {
        "custom_id": scene.custom_id,
        "scene_id": scene.id,
        "status": scene.status.value if hasattr(scene.status, "value") else scene.status,
        "ended_reason": scene.ended_reason,
        "premise": scene.premise,
        "steps": scene.steps_done,
        "lines": [
            {
                "step": line.step,
                "speaker": line.speaker,
                "text": line.text,
                "emotion": line.emotion,
                "turn_id": str(line.turn_id) if line.turn_id else None,
            }
            for line in lines
        ],
    }


def jsonl_line(scene: Scene, lines: list[TranscriptLine]) -> str:
    """One line of the JSONL transcript file."""
    return one_line_json(scene_record(scene, lines))  # U+2028 in a line: one JSONL line still


def markdown(scene: Scene, lines: list[TranscriptLine]) -> str:
    """The scene as a writer reads it: a heading, the premise, then each line under its speaker."""
    status = scene.status.value if hasattr(scene.status, "value") else scene.status
    out = [f"## {md_inline(scene.custom_id or f'scene {scene.id}')}", ""]
    if scene.premise:
        out += [f"*{md_inline(scene.premise)}*", ""]
    for line in lines:
        mood = f" _({md_inline(line.emotion)})_" if line.emotion else ""
        step = f"{line.step}. " if line.step is not None else ""
        out.append(f"{step}**{md_inline(line.speaker)}**{mood}: {md_inline(line.text)}")
        out.append("")
    out += [f"_{md_inline(str(status))}: {md_inline(scene.ended_reason or 'open')}_", ""]
    return "\n".join(out)


def md_inline(text: str) -> str:
    """Text kept on its line and inert as Markdown (no heading, list or emphasis of its own)."""
    flat = " ".join(text.split())
    for char in "\\*_`#[]<>|":
        flat = flat.replace(char, "\\" + char)
    return flat
