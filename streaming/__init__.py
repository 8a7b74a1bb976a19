"""Live replies as they are written: the worker publishes each turn's new text to a Redis stream of
its own (publisher.py), any API replica reads it back as Server-Sent Events (reader.py)."""
