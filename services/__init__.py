"""What producers, the HTTP API and the CLI call: enqueue and read turns, bulk runs, characters, the sweeper.

`tasks/` is only the Celery application and the batched task the queue carries; everything a caller
does before or after a message is sent lives here.
"""
