"""Prompt building, split by job: `sanitize` (untrusted text made safe), `formats` (per-model rendering
and role-marker escaping), `layout` (the pieces of the system text), `packing` (fitting it all into
the context window by tokens) and `manifest` (token accounting)."""

from worker.prompt.layout import NARRATOR_INSTRUCTIONS, fill_macros
from worker.prompt.packing import BuiltPrompt, PromptBuilder, PromptInput, PromptTooLong, persona_block

__all__ = [
    "NARRATOR_INSTRUCTIONS",
    "BuiltPrompt",
    "PromptBuilder",
    "PromptInput",
    "PromptTooLong",
    "fill_macros",
    "persona_block",
]
