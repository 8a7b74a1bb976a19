"""How much of the prompt's memory budget the summaries not merged may take: past it the two oldest
are merged (db/summaries.py), so that every prompt shows the whole conversation."""

from __future__ import annotations

from core.settings import PROMPT_ITEM_OVERHEAD_TOKENS, settings

# What the prompt's two best facts take of the memory budget, as the packing ranks them right after
# the oldest and the newest summaries (a fact's line: about 20 tokens and its count's overhead).
FACT_ROOM_TOKENS = 32


def summaries_room() -> int:
    """The memory budget's tokens the summaries not merged may take: past it the two oldest are
    merged, so that every prompt shows the whole conversation, coarser as it grows, never its middle
    dropped (it holds at least one summary: the settings check that one fits)."""
    facts = min(2, settings.memory_facts_k) * FACT_ROOM_TOKENS
    one = settings.memory_summary_max_tokens + PROMPT_ITEM_OVERHEAD_TOKENS
    return max(settings.memory_budget_tokens - facts, one)
