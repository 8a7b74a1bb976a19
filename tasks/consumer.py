"""The worker's Celery consumer: Celery's own, told to tell the bulk gate when an operator cancels a queue.

The gate (tasks/admission.py) stops consuming the bulk queues while the engine is full and consumes
them again once it has room. A queue an operator cancels meanwhile (`celery control
cancel_consumer`, Flower's "cancel consumer") is not consumed at that moment, so Celery's cancel
changes nothing the gate could see: without this, the gate would start consuming it again.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer

from tasks.admission import bulk_gate


class GatedConsumer(Consumer):  # type: ignore[misc]
    def cancel_task_queue(self, queue: Any) -> None:
        bulk_gate.forget(str(queue))
        super().cancel_task_queue(queue)
