"""The kinds of structured reply that are data, not a line of the character: scored, but held by none
of the quality gate's text checks, moving no mood, and left out of a run's quality means. Its own
module, importing nothing: the database layer reads it (db/runs.py)."""

DATA_REPLIES = ("json_schema", "json_object", "regex", "choice")
