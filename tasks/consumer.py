"""The worker's Celery consumer: Celery's own, with two changes to how its queues are added and cancelled
at run time (`celery control add_consumer` / `cancel_consumer`, Flower's buttons).

- A cancel also tells the bulk gate (tasks/admission.py): the gate stops consuming the bulk queues
  while the engine is full and consumes them again once it has room. A queue an operator cancels
  meanwhile is not consumed at that moment, so Celery's cancel changes nothing the gate could see:
  without this, the gate would start consuming it again.
- An add selects the queue again. Celery's cancel deselects a queue (the list a reconnect rebuilds
  the consumer from) and its add does not select a queue it already knows, so a queue cancelled and
  added back was consumed until the next broker reconnect, then silently no more.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer

from tasks.admission import bulk_gate


class GatedConsumer(Consumer):  # type: ignore[misc]
    def cancel_task_queue(self, queue: Any) -> None:
        bulk_gate.forget(str(queue))
        super().cancel_task_queue(queue)

    def add_task_queue(self, queue: Any, *args: Any, **options: Any) -> None:
        queues = self.app.amqp.queues
        if queue in queues and queue not in queues.consume_from:
            queues.select_add(queues[queue])
        super().add_task_queue(queue, *args, **options)
