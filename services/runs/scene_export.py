"""Export a run's scenes: one transcript per scene, as JSONL (`<name>.scenes.jsonl`) or Markdown
(`<name>.scenes.md`), in custom_id order."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from core.whole_files import replaced_whole
from db.scenes import run_scenes, scene_transcript
from db.session import session_scope
from scenes.transcript import jsonl_line, markdown, md_inline
from services.runs.control import export_stem, require_whole_run, still_whole

SceneFormat = Literal["jsonl", "md"]


# Scenes read at a time: a run of many scenes is never loaded whole.
SCENES_A_PAGE = 200


def export_scenes(ref: str, out_dir: Path, fmt: SceneFormat = "jsonl") -> tuple[Path, int]:
    """Write the run's scene transcripts into out_dir; (the file, how many scenes). Each page of
    scenes is read in a transaction of its own, and the file is put in place whole at the end."""
    written = 0
    with session_scope() as session:
        run = require_whole_run(session, ref)
        session.expunge(run)
        run_id, name = run.id, run.name
    out_dir.mkdir(parents=True, exist_ok=True)  # once the run is found: a mistyped name leaves no folder
    path = out_dir / f"{export_stem(name)}.scenes.{fmt}"
    with replaced_whole(path) as (part,), part.open("w", encoding="utf-8") as handle:
        if fmt == "md":
            handle.write(f"# {md_inline(name)}\n\n")
        after: tuple[str, int] | None = None
        while True:
            with session_scope() as session:
                scenes = run_scenes(session=session, run_id=run_id, after=after, limit=SCENES_A_PAGE)
                for scene in scenes:
                    lines = scene_transcript(session=session, scene_id=scene.id)
                    handle.write(
                        markdown(scene, lines) + "\n" if fmt == "md" else jsonl_line(scene, lines) + "\n"
                    )
            if not scenes:
                break
            written += len(scenes)
            after = (scenes[-1].custom_id or "", scenes[-1].id)
        still_whole(run)
    return path, written
