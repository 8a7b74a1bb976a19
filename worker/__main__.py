"""`python -m worker`: a Celery worker for this model's queues: a pool of threads, one engine loop."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import worker_init, worker_shutdown
from celery.worker import state as worker_state

from core.logging import configure_logging
from core.settings import queue_for_model, settings


@worker_init.connect
def _warm_up(**_: object) -> None:
    from db.migrate import SchemaBehind
    from db.vector_space import EmbedderMismatch
    from worker.engine import BadEngineSetting
    from worker.startup import check_and_warm_up

    try:
        check_and_warm_up()
    except (EmbedderMismatch, SchemaBehind, BadEngineSetting) as exc:  # one line, no traceback
        logging.getLogger(__name__).critical("%s", exc)
        sys.exit(2)
    except Exception as exc:  # Celery would log it and run on, with no housekeeping: exit instead
        from db.session import database_away

        away = database_away(exc)
        if away is not None:  # a setting or a server to look at: one line
            logging.getLogger(__name__).critical("the worker could not start: %s", away)
        else:
            logging.getLogger(__name__).critical("the worker could not start", exc_info=True)
        sys.exit(1)
    from tasks.queues import eviction_risk
    from worker.housekeeping import Housekeeper

    risk = eviction_risk()
    if risk is not None:  # said once at start: the operator's setting, not this worker's to change
        logging.getLogger(__name__).warning("%s", risk)
    from services.files import files_dir_problem

    problem = files_dir_problem()
    if problem is not None:  # its housekeeping finalizes batches there: said now, it serves turns on
        logging.getLogger(__name__).warning(
            "batches cannot be finalized by this worker: bad setting: %s", problem
        )
    Housekeeper().start()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from core.metrics import register_queue_depth

        register_queue_depth()
        try:
            start_http_server(settings.metrics_port)
        except OSError as exc:  # another worker on this host has the port: run on, without an endpoint
            logging.getLogger(__name__).warning(
                "metrics endpoint :%d unavailable (%s); set MLCHAT_METRICS_PORT per worker",
                settings.metrics_port,
                exc,
            )


@worker_shutdown.connect
def _flush_streams(**_: object) -> None:
    from worker.lifecycle import flush_stream_events

    flush_stream_events()


def _run_celery(app: Any, args: list[str]) -> int:
    """`celery worker` with `args`; its exit code (non-zero when a bootstep failed, the broker
    unreachable past its retries, which `Restart=on-failure` must see). app.worker_main and app.start
    drop it: click, not standalone, returns the worker's exit code rather than raising it."""
    import click
    from celery.bin.celery import celery as celery_cli

    celery_cli.params[0].default = app
    try:
        code = celery_cli.main(args=args, standalone_mode=False)
    except click.ClickException as exc:  # a bad option or value: click's one line, not a traceback
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 1
    finally:
        celery_cli.params[0].default = None
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Start the worker; extra arguments go to `celery worker`."""
    configure_logging()
    from tasks.app import PREFETCH_PER_THREAD, app
    from tasks.callbacks import CALLBACK_QUEUE

    args = [
        "worker",
        # Threads: vLLM spawns its engine process, which prefork's daemonic children cannot; and every
        # flush's thread feeds the one engine of this process.
        "--pool=threads",
        f"--concurrency={settings.worker_threads}",
        # Callbacks first: "priority" order would starve them behind a bulk backlog; they are few.
        f"--queues={CALLBACK_QUEUE},{settings.queue},{queue_for_model(settings.model, 'bulk')}",
        f"--prefetch-multiplier={PREFETCH_PER_THREAD}",
        f"--hostname=mlchat-{settings.model}@%h",
        # Celery sets the root logger's level from this (its names: WARNING, not WARN).
        f"--loglevel={'WARNING' if settings.log_level == 'WARN' else settings.log_level}",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    code = _run_celery(app, args)
    from worker.engine import engine_dead
    from worker.lifecycle import EXIT_ENGINE_DEAD

    if engine_dead() is not None:
        sys.exit(EXIT_ENGINE_DEAD)  # non-zero, so the supervisor starts a fresh worker
    if isinstance(worker_state.should_stop, int) and worker_state.should_stop:
        sys.exit(worker_state.should_stop)  # EXIT_EMBEDDER_MOVED: restart with the new embedder
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
