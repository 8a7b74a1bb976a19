"""Roleplay logic with no I/O: character cards, lorebook activation, mood and reply quality."""
