"""Structured replies: a turn's response format (JSON schema, JSON object, regex, choice) and the NPC
reply shape built from declared actions, checked up front and enforced by guided decoding."""
