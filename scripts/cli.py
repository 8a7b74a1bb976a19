"""`mlchat`: control the embedded services, migrate, seed, run a worker, chat from the shell."""

from __future__ import annotations

import argparse
import json
import sys

from core.logging import configure_logging
from core.settings import settings


def _services(args: argparse.Namespace) -> int:
    from core import embedded

    state = settings.state_dir
    if args.action == "start":
        print("postgres:", embedded.start_postgres(state))
        print("redis:   ", embedded.start_redis(state))
    elif args.action == "stop":
        print("redis stopped" if embedded.stop_redis(state) else "redis was not running")
        print("postgres stopped" if embedded.stop_postgres(state) else "postgres was not running")
    else:
        for status in (embedded.postgres_status(state), embedded.redis_status(state)):
            state_word = "running" if status.running else "stopped"
            print(f"{status.name:9} {state_word:8} pid={status.pid} {status.url or ''}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from db.migrate import downgrade, upgrade

    (downgrade if args.down else upgrade)(args.revision)
    return 0


def _seed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scripts.seed import seed_world

    print(seed_world(Path(args.data)) if args.data else seed_world())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.__main__ import main as worker_main

    worker_main(args.celery_args)
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers)
    return 0


def _run(args: argparse.Namespace) -> int:
    """Bulk runs: submit, status (live progress), list, export, cancel, retry-failed."""
    from pathlib import Path

    from tasks import runs

    if args.action == "submit":
        try:
            sub = runs.submit_run(Path(args.target), name=args.name, skip_bad_lines=args.skip_bad_lines)
        except runs.RunValidationError as exc:
            for err in exc.errors:
                print(f"line {err.line}: {err.reason}", file=sys.stderr)
            print(f"rejected: {len(exc.errors)} bad line(s), nothing enqueued", file=sys.stderr)
            return 2
        for err in sub.skipped_lines:
            print(f"skipped line {err.line}: {err.reason}", file=sys.stderr)
        print(sub.id if sub.created else f"{sub.id} (already submitted; nothing enqueued)")
    elif args.action == "status":
        return _run_progress(args.target, watch=args.watch)
    elif args.action == "list":
        from db.runs import list_runs
        from db.session import session_scope

        with session_scope() as session:
            for run in list_runs(session=session):
                created = f"{run.created_at:%Y-%m-%d %H:%M}"
                print(f"{run.id}  {run.name:30} {run.status.value:12} total={run.total}  {created}")
    elif args.action == "export":
        results, errors, n_ok, n_err = runs.export_run(args.target, Path(args.out))
        print(f"{n_ok} results -> {results}\n{n_err} errors  -> {errors}")
    elif args.action == "cancel":
        print(f"cancelled {runs.cancel(args.target)} queued turn(s); finished results kept")
    elif args.action == "retry-failed":
        print(f"re-sent {runs.retry_failed(args.target)} failed turn(s)")
    return 0


def _run_progress(ref: str, *, watch: bool) -> int:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from db.models import RunStatus
    from tasks.runs import run_state

    state = run_state(ref)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=not watch) as bar:
        task = bar.add_task(state.name, total=state.counts.total or None, rate="")
        started, start_done = time.monotonic(), state.counts.finished
        while True:
            c = state.counts
            rate = (c.finished - start_done) / max(time.monotonic() - started, 1e-6)
            bar.update(
                task,
                completed=c.finished,
                rate=f"{rate:.1f} turns/s",
                description=f"{state.name} [{state.status.value}] ok={c.completed} failed={c.failed}",
            )
            done = state.status in (RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED)
            if not watch or done:
                break
            time.sleep(1.0)
            state = run_state(ref)
    c = state.counts
    print(
        f"{state.id} {state.status.value} total={c.total} completed={c.completed} failed={c.failed} "
        f"cancelled={c.cancelled} queued={c.queued} running={c.running}"
    )
    if state.quality.get("scored"):
        print("quality " + " ".join(f"{k}={v}" for k, v in state.quality.items()))
    if state.error:
        print(state.error)
    return 0


def _chat(args: argparse.Namespace) -> int:
    """Like the original `python -m handler --persona … --message …`, through the real pipeline."""
    from scripts.render import render_turn
    from tasks.producer import enqueue_turns, wait_for_reply

    request = {
        "conversation": args.conversation or f"cli-{args.character}",
        "character": args.character,
        "message": args.message,
        "player_name": args.player_name,
        "params": json.loads(args.params) if args.params else {},
        "speaker": "narrator" if args.narrator else "character",
    }
    if args.inline:
        from worker.inline import answer_now

        (view,) = answer_now([request])
    else:
        (turn_id,) = enqueue_turns([request])
        view = wait_for_reply(turn_id, timeout=args.timeout)
    print(render_turn(view, f"{args.character} · {request['conversation']}"))
    return 0 if view.reply is not None else 1


def _card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tasks.characters import export_card, import_card

    if args.action == "import":
        slug, char_id = import_card(Path(args.target).read_bytes(), args.slug)
        print(f"imported {args.target} as character {slug!r} (id {char_id})")
        return 0
    image = Path(args.image).read_bytes() if args.image else None
    data = export_card(args.target, "png" if args.out.endswith(".png") else "json", image)
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes)")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    import uuid

    from scripts.render import render_manifest
    from tasks.producer import get_turn

    view = get_turn(uuid.UUID(args.turn_id))
    if view is None:
        print(f"no turn {args.turn_id}", file=sys.stderr)
        return 1
    print(json.dumps(view.context, ensure_ascii=False, indent=2) if args.json else render_manifest(view))
    return 0


def _story_event(args: argparse.Namespace) -> int:
    from tasks.characters import add_story_event

    print(add_story_event(args.story, args.text, scene=args.scene, time=args.time))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from tasks.sweeper import resend_stranded

    sent = resend_stranded(older_than_s=args.older_than)
    print(json.dumps(sent) if sent else "nothing stranded")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlchat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("services", help="the embedded PostgreSQL and Redis")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=_services)

    p = sub.add_parser("migrate", help="alembic upgrade (or --down) to a revision")
    p.add_argument("revision", nargs="?", default="head")
    p.add_argument("--down", action="store_true")
    p.set_defaults(func=_migrate)

    p = sub.add_parser("seed", help="load the sample world from data/ (idempotent)")
    p.add_argument("--data", default=None)
    p.set_defaults(func=_seed)

    p = sub.add_parser("worker", help="run a batched GPU worker for MLCHAT_MODEL")
    p.add_argument("celery_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_worker)

    p = sub.add_parser("api", help="serve the HTTP ingest (needs MLCHAT_API_KEYS)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_api)

    p = sub.add_parser("run", help="bulk NPC dialogue runs from a JSONL file")
    p.add_argument("action", choices=["submit", "status", "list", "export", "cancel", "retry-failed"])
    p.add_argument("target", nargs="?", default="", help="the file (submit) or the run's id or name")
    p.add_argument(
        "--name", default=None, help="run name (default: the file's stem); resubmitting is a no-op"
    )
    p.add_argument("--skip-bad-lines", action="store_true", help="enqueue the good lines, report the bad")
    p.add_argument("--watch", action="store_true", help="status: follow until the run finishes")
    p.add_argument("--out", default="exports", help="export: output folder")
    p.set_defaults(func=_run)

    p = sub.add_parser("chat", help="send one message to a character and print prompt, reply, timings")
    p.add_argument("--character", required=True, help="character slug, e.g. luffy")
    p.add_argument("--message", required=True)
    p.add_argument(
        "--conversation", default=None, help="the game's conversation id (default cli-<character>)"
    )
    p.add_argument("--player-name", default="")
    p.add_argument("--params", default=None, help="generation params as JSON, e.g. '{\"seed\": 1}'")
    p.add_argument("--inline", action="store_true", help="run the pipeline in this process, no worker needed")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--narrator", action="store_true", help="address the story's narrator, not the character")
    p.set_defaults(func=_chat)

    p = sub.add_parser("card", help="import a SillyTavern V2/V3 card (JSON or PNG), or export one")
    p.add_argument("action", choices=["import", "export"])
    p.add_argument("target", help="import: the card file; export: the character's slug")
    p.add_argument("--slug", default=None, help="import: the character's slug (default: from its name)")
    p.add_argument("--out", default="card.json", help="export: output file (.json or .png)")
    p.add_argument("--image", default=None, help="export to PNG: the avatar to embed the card in")
    p.set_defaults(func=_card)

    p = sub.add_parser("manifest", help="what went into a turn's prompt, why, and its token counts")
    p.add_argument("turn_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_manifest)

    p = sub.add_parser("story-event", help="append an event to a story (embedded on write)")
    p.add_argument("story")
    p.add_argument("text")
    p.add_argument("--scene", default="")
    p.add_argument("--time", type=int, default=None)
    p.set_defaults(func=_story_event)

    p = sub.add_parser("sweep", help="re-send turns whose queue message was lost (safe any time; cron it)")
    p.add_argument(
        "--older-than", type=float, default=None, help="seconds untouched (default: the visibility timeout)"
    )
    p.set_defaults(func=_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlchat` command."""
    configure_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
