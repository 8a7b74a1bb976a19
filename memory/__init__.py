"""NPC memory beyond the context window: rolling summaries of old lines and facts an NPC may know.

`context` puts them into a batch's retrieved context; `schedule` sends the bulk-lane jobs that
write them after replies are stored; `summarize` and `extract` are those jobs (tasks/memory.py runs
them); `generate` is their one call into the engine. The queries live in db/summaries.py,
db/facts.py and db/memory_jobs.py; the game writes facts through services/facts.py.
"""
