"""Scenes: group conversations and NPC-to-NPC scene runs. `speakers` picks who speaks next, `spec`
validates a scene's description, `transcript` writes a scene out for people and machines; the state
(members, steps) lives in db/scenes.py."""
