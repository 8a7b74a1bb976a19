"""`mlchat`: control the embedded services, migrate, seed, run a worker, chat, bulk runs, cards.

Typed sub-commands (Typer). Bad input and known failures end in one line on stderr and a non-zero
exit code, never a traceback: 2 for input that was refused, 1 for an operation that failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

from core.json_lines import one_line_json
from core.logging import configure_logging
from core.processes import alive
from core.settings import settings

if TYPE_CHECKING:
    from services.original_request import StoredInline


# Upper bounds of number options, refused with the option named (review: `sweep --older-than inf`,
# with a lower bound alone, failed every sweep naming nothing; a fact id past a bigint was SQL's error).
LONGEST_S = 10 * 365 * 86400.0  # as the settings' durations: far below any timer's limit
MAX_ID = 2**63 - 1  # a bigint column's

T = TypeVar("T")


app = typer.Typer(
    name="mlchat", help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
services_app = typer.Typer(help="The embedded PostgreSQL and Redis.", no_args_is_help=True)
run_app = typer.Typer(help="Bulk NPC dialogue runs from a JSONL file.", no_args_is_help=True)
card_app = typer.Typer(help="SillyTavern V2/V3 character cards (JSON or PNG).", no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(run_app, name="run")
lora_app = typer.Typer(help="Per-character voices: a LoRA from stored dialogue.", no_args_is_help=True)
app.add_typer(card_app, name="card")
app.add_typer(lora_app, name="lora")
facts_app = typer.Typer(help="Facts NPCs may know about a player (or the world).", no_args_is_help=True)
app.add_typer(facts_app, name="facts")
player_app = typer.Typer(help="What a tenant holds about a player.", no_args_is_help=True)
app.add_typer(player_app, name="player")
history_app = typer.Typer(help="Existing chat logs into conversations.", no_args_is_help=True)
app.add_typer(history_app, name="history")
callbacks_app = typer.Typer(help="Signed completion callbacks.", no_args_is_help=True)
app.add_typer(callbacks_app, name="callbacks")
memory_app = typer.Typer(help="NPC memory jobs (rolling summaries, fact extraction).", no_args_is_help=True)
app.add_typer(memory_app, name="memory")


ExportFormat = Literal["native", "openai"]  # services/runs/export.py
SceneFormat = Literal["jsonl", "md"]  # services/runs/scene_export.py


class Refused(Exception):
    """Input the command refuses; its message is the one line the user sees (exit code 2)."""


class NotReadBack(Exception):
    """An inline turn answered and gone before it was read back: the same command again (exit code 1)."""


def _out(text: str) -> None:
    typer.echo(text)


def _err(text: str) -> None:
    typer.echo(text, err=True)


# --- services, schema, data -------------------------------------------------------------------


@services_app.command("start")
def services_start() -> None:
    """Start the embedded PostgreSQL and Redis (idempotent)."""
    from core import embedded

    _note_external_servers()
    _out(f"postgres: {embedded.start_postgres(settings.state_dir, settings.embedded_pg_shared_buffers)}")
    _out(f"redis:    {embedded.start_redis(settings.state_dir)}")


def _note_external_servers() -> None:
    """A note on stderr for each server a URL names: the embedded one started or shown here is not the
    one mlchat uses (CLI review: their URLs read as the deployment's)."""
    for variable, url in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url)):
        if url:
            _err(f"note: {variable} is set: mlchat uses that server, not the embedded one below")


@services_app.command("stop")
def services_stop() -> None:
    """Stop the embedded services."""
    from core import embedded

    state = settings.state_dir
    try:
        _out("redis stopped" if embedded.stop_redis(state) else "redis was not running")
    except (RuntimeError, OSError) as exc:  # a Redis that would not stop: said, PostgreSQL stopped still
        _err(f"mlchat: {exc}")
        _out("postgres stopped" if embedded.stop_postgres(state) else "postgres was not running")
        raise typer.Exit(1) from None
    _out("postgres stopped" if embedded.stop_postgres(state) else "postgres was not running")


@services_app.command("status")
def services_status() -> None:
    """Show whether the embedded services run, and their URLs."""
    from core import embedded

    _note_external_servers()
    for status in (embedded.postgres_status(settings.state_dir), embedded.redis_status(settings.state_dir)):
        state_word = "running" if status.running else "stopped"
        _out(f"{status.name:9} {state_word:8} pid={status.pid} {status.url or ''}")


@app.command()
def migrate(
    revision: Annotated[str | None, typer.Argument(help="target revision (default: head)")] = None,
    down: Annotated[bool, typer.Option("--down", help="downgrade to the revision")] = False,
) -> None:
    """Alembic upgrade (or --down) to a revision."""
    from alembic.util.exc import CommandError

    from db.migrate import ServerTooOld, current_revision, downgrade, upgrade
    from db.session import get_engine

    if down and revision is None:  # to "head" it would do nothing and say nothing
        raise Refused("migrate --down: name the revision to go down to (e.g. 0042)")
    revision = revision or "head"

    def now() -> str:
        with get_engine().connect() as connection:
            return current_revision(connection) or "none"

    before = now()
    try:
        (downgrade if down else upgrade)(revision)
    except CommandError as exc:  # no such revision, or nothing below it
        raise Refused(f"migrate {revision}: {exc}") from None
    except ServerTooOld as exc:
        raise Refused(str(exc)) from None
    after = now()
    # What it did, in one line (review: applied, at head already and a rollback's database ahead all
    # looked alike, saying nothing)
    _out(f"schema {before} -> {after}" if after != before else f"schema at {after}: nothing to do")


@app.command()
def seed(data: Annotated[Path | None, typer.Option(help="a data folder like data/")] = None) -> None:
    """Load the sample world from data/ (idempotent)."""
    from scripts.seed import seed_world

    _out(json.dumps(dataclasses.asdict(seed_world(data) if data else seed_world())))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run a batched GPU worker for MLCHAT_MODEL; extra arguments go to `celery worker`."""
    from worker.__main__ import main as worker_main

    worker_main(list(ctx.args))


def _empty_metrics_folder(folder: Path) -> None:
    """prometheus_client's own files in the folder removed (it wants the folder empty at start): an
    earlier run's, and this pid's (a container's process is pid 1 each time); a live process's
    beside it (another `mlchat api` given the same folder) are kept (review)."""
    for kind in ("counter", "gauge", "histogram", "summary"):
        for stale in folder.glob(f"{kind}_*.db"):
            pid = stale.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and alive(int(pid)):
                continue
            stale.unlink(missing_ok=True)


@app.command()
def api(
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Serve the HTTP ingest (needs MLCHAT_API_KEYS)."""
    import uvicorn

    if not settings.api_keys:  # create_app refuses too, but inside uvicorn's factory: a traceback
        raise Refused("MLCHAT_API_KEYS: set it (a JSON list of keys) before starting the HTTP ingest")
    from services.files import check_files_dir
    from worker.embedder import device_refusal

    refusal = device_refusal(settings.embedder_device)
    if refusal is not None:  # create_app refuses too, inside uvicorn's factory (each of --workers)
        raise Refused(refusal)

    check_files_dir()  # here too: with --workers, uvicorn restarts a child that exits, for ever
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named is not None and not (Path(named).is_dir() and os.access(named, os.W_OK | os.X_OK)):
        # each process would die importing its metrics (prometheus_client opens its files there)
        raise Refused(f"PROMETHEUS_MULTIPROC_DIR: {named!r} is not a folder this user can write")
    if named is not None:  # an earlier run's values would be summed in (with one process too: review)
        _empty_metrics_folder(Path(named))
    from api.main import SERVER_OPTIONS  # imports the metrics: after the folder is emptied

    if workers == 1:
        uvicorn.run("api.main:create_app", factory=True, host=host, port=port, **SERVER_OPTIONS)  # type: ignore[arg-type]
        return
    # Several processes: the metrics they write go to files a scrape reads together (a fresh folder,
    # unless the operator names one: prometheus_client wants it empty at start).
    with contextlib.ExitStack() as stack:
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlchat-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        uvicorn.run(
            "api.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            **SERVER_OPTIONS,  # type: ignore[arg-type]
        )


@app.command()
def sweep(
    older_than: Annotated[
        float | None,
        typer.Option(min=0, max=LONGEST_S, help="seconds untouched (default: the visibility timeout)"),
    ] = None,
) -> None:
    """Re-send turns and memory jobs whose queue message was lost, close runs whose submission died,
    delete what the retention settings (MLCHAT_*_RETENTION_DAYS) keep no longer, fail the live turns
    of a model no worker has served for MLCHAT_UNSERVED_MODEL_FAIL_S (safe any time)."""
    from db.migrate import check_schema
    from db.session import get_engine
    from memory.schedule import reschedule_stalled
    from services.batches import HousekeepingIncomplete, housekeeping
    from services.lora.registry import remove_superseded
    from services.retention import prune
    from services.sweeper import (
        SweepIncomplete,
        close_abandoned_runs,
        fail_unserved_live_turns,
        resend_stranded,
    )

    # A schema behind this code (a host upgraded before `mlchat migrate`): every step would fail on a
    # column it lacks, each minute (review of a mixed-version fleet). Refused in one line first.
    with get_engine().connect() as connection:
        check_schema(connection)
    # Each step on its own: one that fails (the broker away, say) leaves the others done.
    failed: list[str] = []

    def step(name: str, run: Any) -> Any:
        try:
            return run()
        except SweepIncomplete as exc:
            failed.append(str(exc))
            return exc.sent
        except HousekeepingIncomplete as exc:
            failed.append(str(exc))
            return exc.done
        except Exception as exc:  # the server away is named by its setting, as every command does
            failed.append(f"{name}: {_unreachable(exc)}{_one_line(exc)}")
            # Its traceback where MLCHAT_LOG_LEVEL=DEBUG asks for one (review, stop 76: a step's
            # bug was its one line each minute, and DEBUG showed nothing more).
            logging.getLogger("mlchat.sweep").debug("%s failed", name, exc_info=True)
            return {}

    sent = step("re-sending stranded turns", lambda: resend_stranded(older_than_s=older_than))
    # Said as a step of its own, the others done all the same (lost turns are re-sent whatever it is).
    step("the batch files' folder", _files_dir_usable)
    if sent is None:  # not "nothing stranded": another sweep holds the re-send
        sent = "skipped: another sweep is re-sending stranded turns"
    closed = step("closing abandoned runs", close_abandoned_runs)
    batches = {k: v for k, v in step("batch housekeeping", housekeeping).items() if v}
    memory = step("re-sending stalled memory jobs", reschedule_stalled)
    pruned = {k: v for k, v in step("deleting past retention", prune).items() if v}
    unserved = step("failing live turns of models no worker serves", fail_unserved_live_turns)
    adapters = step("removing superseded adapter copies", remove_superseded)
    done = {"resent": sent, "runs": closed, "batches": batches} | ({"memory_jobs": memory} if memory else {})
    done |= ({"pruned": pruned} if pruned else {}) | ({"unserved": unserved} if unserved else {})
    done |= {"adapter_copies_removed": adapters} if adapters else {}
    if sent or closed or batches or memory or pruned or unserved or adapters or failed:
        _out(json.dumps(done))
    else:
        _out("{}")  # nothing stranded: JSON as every other pass's line (CLI review)
    if failed:
        raise RuntimeError("sweep incomplete: " + "; ".join(failed))


def _files_dir_usable() -> None:
    from services.files import files_dir_problem

    problem = files_dir_problem()
    if problem is not None:
        raise OSError(f"batches cannot be finalized: {problem}")


# --- runs -------------------------------------------------------------------------------------


def _print_submitted(sub: object) -> None:
    from services.runs import SubmittedRun

    assert isinstance(sub, SubmittedRun)
    for err in sub.skipped_lines:
        _err(f"skipped line {err.line}: {err.reason}")
    for refusal in sub.refused:
        _err(f"refused line {refusal['line']}: {refusal['message']}")
    if sub.lines_to_answer == 0:
        raise Refused(
            f"run {sub.name}: no line stored (each was skipped or refused); submit the file again, "
            "mended or with other options, under the same name"
        )
    _out(f"{sub.id}")  # the id alone on stdout, for `id=$(mlchat run submit …)`; the rest on stderr
    if sub.stored or sub.sent or sub.created:
        _err(f"run {sub.name}: {sub.stored} lines stored, {sub.sent} turns sent; status {sub.status.value}")
    else:
        _err(f"run {sub.name}: already submitted; nothing to do, status {sub.status.value}")


@run_app.command("submit")
def run_submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the JSONL file")],
    name: Annotated[str | None, typer.Option(help="run name (default: the file's stem)")] = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="submit the good lines, report the bad")] = False,
    character: Annotated[
        str | None, typer.Option(help="OpenAI-format files: the character of lines that name none")
    ] = None,
    allow_system_prompt: Annotated[
        bool, typer.Option(help="let a line's system prompt replace its character's own")
    ] = False,
    candidates: Annotated[
        int | None,
        typer.Option(min=1, max=8, help="best of n: candidates per line (default MLCHAT_RUN_CANDIDATES)"),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="an API key's tenant: its conversations, and its review keys see it on the desk"),
    ] = None,
) -> None:
    """Validate the whole file (native or OpenAI batch lines), then store and send it; resubmitting
    resumes a submission that died."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from core.settings import TENANT_NAME
    from services import runs
    from services.runs.openai_lines import LineOptions

    if tenant is not None and not (tenant == "" or (len(tenant) <= 64 and TENANT_NAME.fullmatch(tenant))):
        raise Refused(f"--tenant: {tenant[:80]!r} is no tenant's name (letters, digits, '.', '_', '-')")
    if tenant:
        _note_a_tenant_no_key_has(tenant, "no review key sees the run on the desk (a typo?)")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("sending", total=None)
        sub = runs.submit_run(
            file,
            name=name,
            skip_bad_lines=skip_bad_lines,
            progress=lambda stored, sent: bar.update(task, completed=sent, description=f"stored {stored}"),
            options=LineOptions(
                default_character=character, allow_system_prompt=allow_system_prompt, candidates=candidates
            ),
            fields=None if tenant is None else {"tenant": tenant},
        )
    _print_submitted(sub)


@run_app.command("resume")
def run_resume(
    run: Annotated[str, typer.Argument(help="the run's id or name")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="its JSONL file")],
) -> None:
    """Store and send what a failed or interrupted submission left out (the same file)."""
    from services import runs

    _print_submitted(runs.resume(run, file))


@run_app.command("status")
def run_status(
    run: Annotated[str, typer.Argument(help="the run's id or name")],
    watch: Annotated[bool, typer.Option(help="follow until the run finishes")] = False,
) -> None:
    """Status, request counts and quality summary (--watch: a live progress bar, then exit code 0
    when the run completed, 1 when it ended otherwise: failed, cancelled, expired, its submission
    interrupted)."""
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from db.models import RunStatus
    from services.runs import run_state

    state = run_state(run)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    # On stderr, as submit's and lora train's: stdout keeps the status line for scripts.
    with Progress(*columns, transient=not watch, console=Console(stderr=True)) as bar:
        task = bar.add_task(escape(state.name), total=state.turns or None, rate="")
        started, start_done = time.monotonic(), state.counts.finished
        away: list[float] = []  # since when the database has been away, while it is
        while True:
            c = state.counts
            rate = (c.finished - start_done) / max(time.monotonic() - started, 1e-6)
            bar.update(
                task,
                total=state.turns or None,  # its turns, and one a line not stored yet: never runs back
                completed=c.finished + c.refused,
                rate=f"{rate:.1f} turns/s",
                # escaped: rich read "[queued]" as a style and dropped it (CLI review)
                description=escape(f"{state.name} [{state.status.value}] ok={c.completed} failed={c.failed}"),
            )
            if not watch or state.finished or state.interrupted:
                break
            time.sleep(1.0)
            state = _read_through_outage(lambda: run_state(run), state, away)
    c = state.counts
    status = state.status.value + (" (submission interrupted)" if state.interrupted else "")
    _out(
        f"{state.id} {status} total={state.turns} completed={c.completed} failed={c.failed} "
        f"cancelled={c.cancelled} queued={c.queued} running={c.running} unsent={c.unsent} refused={c.refused}"
    )
    if state.quality.get("scored"):
        reasons = state.quality.get("below_bar_reasons") or {}
        summary = {k: v for k, v in state.quality.items() if k != "below_bar_reasons"}
        _out("quality " + " ".join(f"{k}={v}" for k, v in summary.items()))
        if reasons:
            _out("below the bar: " + " ".join(f"{k}={v}" for k, v in reasons.items()))
    if state.error:
        _out(state.error)
    if watch and (state.interrupted or state.status != RunStatus.COMPLETED):
        # A script waiting on --watch tells a run that completed from one that did not by the code.
        raise typer.Exit(1)


# How long `run status --watch` shows the last state read while the database is away: a failover
# or a restart mid-watch is not the run ending otherwise (exit code 1; CLI review).
WATCH_OUTAGE_S = 300.0


def _read_through_outage(read: Callable[[], T], last: T, away: list[float]) -> T:
    """`read()`, or `last` while the database has been away for less than WATCH_OUTAGE_S (`away`
    holds since when, kept across calls)."""
    from db.session import database_away

    try:
        value = read()
    except Exception as exc:
        if database_away(exc) is None:
            raise
        away[:] = away or [time.monotonic()]
        if time.monotonic() - away[0] > WATCH_OUTAGE_S:
            raise
        return last
    away.clear()
    return value


@run_app.command("list")
def run_list(limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50) -> None:
    """The newest runs."""
    from db.runs import list_runs
    from db.session import session_scope

    with session_scope() as session:
        for r in list_runs(session=session, limit=limit):
            made = r.created_at.astimezone(UTC)  # the session's zone otherwise, unnamed (review)
            _out(f"{r.id}  {r.name:30} {r.status.value:12} total={r.total}  {made:%Y-%m-%d %H:%M} UTC")


@run_app.command("export")
def run_export(
    run: Annotated[str, typer.Argument(help="the run's id or name")],
    out: Annotated[Path, typer.Option(file_okay=False, help="output folder")] = Path("exports"),
    format: Annotated[
        ExportFormat, typer.Option("--format", help="native lines, or OpenAI Batch API output lines")
    ] = "native",
    alternatives: Annotated[
        bool, typer.Option(help="native lines: each reply's other candidates (best of n), for writers")
    ] = False,
) -> None:
    """<name>.results.jsonl and <name>.errors.jsonl (keyed by custom_id, in input order; a retried
    line where its retry was numbered). A run not finished yet exports the lines finished so far, and
    says so on stderr, as it says which lines of its file a stopped submission never stored."""
    from services.runs import export_run, run_state

    if alternatives and format != "native":  # OpenAI's output lines have no place for them
        raise Refused("--alternatives: native lines only (--format native)")
    before = run_state(run)
    results, errors, n_ok, n_err = export_run(run, out, format, alternatives=alternatives)
    _out(f"{n_ok} results -> {results}\n{n_err} errors  -> {errors}")
    # A run its submission failed still answers the turns it sent (bulk runs review); those it never
    # sent wait for a resume, said below with the lines never stored.
    left = before.counts.total - before.counts.finished if not before.finished else before.counts.underway
    if left:
        _err(
            f"run {before.name} is {before.status.value}: {left} line(s) not finished were left out; "
            "export again once it ends"
        )
    if before.never_stored:  # a cancel or failure during the submission (CLI review: said nowhere)
        _err(
            f"run {before.name} is {before.status.value}: {before.never_stored} line(s) of its file were "
            "never stored (its submission stopped) and are not in the export"
        )
    reasons = before.quality.get("below_bar_reasons")
    if reasons:
        _out("below the bar: " + " ".join(f"{k}={v}" for k, v in reasons.items()))


@run_app.command("scenes")
def run_scenes(
    run: Annotated[str, typer.Argument(help="the run's id or name")],
    out: Annotated[Path, typer.Option(file_okay=False, help="output folder")] = Path("exports"),
    format: Annotated[
        SceneFormat, typer.Option("--format", help="jsonl: one scene per line; md: for writers")
    ] = "jsonl",
) -> None:
    """Each scene's transcript (speaker, text, emotion, step, turn ids), as JSONL or Markdown."""
    from services.runs import run_state
    from services.runs.scene_export import export_scenes

    before = run_state(run)
    path, n = export_scenes(run, out, format)
    _out(f"{n} scenes -> {path}")
    if not before.finished or before.counts.underway:  # as `run export` says it
        _err(
            f"run {before.name} is {before.status.value}: its scenes are exported as far as they went, and"
            " scenes stored while the export ran may be left out; export again once it ends"
        )


@run_app.command("cancel")
def run_cancel(run: Annotated[str, typer.Argument(help="the run's id or name")]) -> None:
    """Cancel the run's queued turns; finished results are kept. A finished run is left as it is."""
    from services.runs import cancel

    outcome = cancel(run)
    if not outcome.changed:
        _out(f"run is {outcome.before.value}: nothing to cancel")
        return
    kept = "finished results kept"
    _out(f"cancelled {outcome.cancelled_turns} queued turn(s); {kept}; run {outcome.after.value}")


@run_app.command("retry-failed")
def run_retry_failed(run: Annotated[str, typer.Argument(help="the run's id or name")]) -> None:
    """Send the run's failed turns again with fresh attempts."""
    from services.runs import retry_failed

    _out(f"re-sent {retry_failed(run)} failed turn(s)")


# --- turns, cards, stories -------------------------------------------------------------------


def _read_capped(path: Path, limit: int, setting: str, *, bound: int | None = None) -> bytes:
    """A file read whole, or Refused when longer than `limit` bytes, named by its setting (a pipe,
    /dev/stdin, reads as one; /dev/zero is cut at the bound). `bound`: the setting's own value, when
    `limit` is what other files of the same request left of it."""
    with path.open("rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        together = "" if bound in (None, limit) else " with the request's other files"
        raise Refused(f"{path}: longer{together} than {setting} ({bound or limit:,} bytes); nothing stored")
    return raw


class _Budget:
    """The bytes one request's files may still hold together: MLCHAT_API_MAX_BODY_BYTES, as the same
    request over HTTP (one body), not that much for each of its files."""

    def __init__(self) -> None:
        self.left = settings.api_max_body_bytes

    def read(self, path: Path) -> bytes:
        raw = _read_capped(path, self.left, "MLCHAT_API_MAX_BODY_BYTES", bound=settings.api_max_body_bytes)
        self.left -= len(raw)
        return raw


def _read_json(path: Path, budget: _Budget | None = None) -> object:
    """A JSON file within one request's MLCHAT_API_MAX_BODY_BYTES (as the same request over HTTP: the
    bytes `budget` has left, shared by the request's files), or Refused naming the file and the
    line."""
    raw = (budget or _Budget()).read(path)
    try:
        return json.loads(raw.decode("utf-8").removeprefix("\ufeff"))  # a Windows editor's BOM
    except UnicodeDecodeError as exc:
        raise Refused(f"{path}: not UTF-8 text (byte {exc.start}); nothing stored") from None
    except json.JSONDecodeError as exc:
        raise Refused(f"{path}: line {exc.lineno}: not JSON ({exc.msg}); nothing stored") from None
    except (ValueError, RecursionError) as exc:  # too deep, or a number too long to read
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise Refused(f"{path}: not JSON that can be read ({reason}); nothing stored") from None


def _store_original(
    files: dict[str, Path | None], others: Path | None, fields: dict[str, Any], *, send: bool
) -> tuple[dict[str, Any], uuid.UUID]:
    """The original service's inline files stored (persona, history, story; a replay stores nothing
    new), then the turn (sent to the workers when `send`, streamed then unless best of n): the turn
    request and its id. A bad file is refused naming the file and the field."""
    from services.original_request import (
        HistoryMoved,
        InlineRefused,
        read_request,
        store_and_enqueue,
        turn_request,
    )

    payload: dict[str, Any] = {}
    budget = _Budget()
    if others is not None:
        doc = _read_json(others, budget)
        if not isinstance(doc, dict):
            raise Refused(f"{others}: must be a JSON object (the rest of a request); nothing stored")
        payload.update(doc)
    payload.update({part: _read_json(path, budget) for part, path in files.items() if path is not None})
    given = {k: v for k, v in fields.items() if v}
    from_others = set(payload) - set(given) - {part for part, path in files.items() if path is not None}
    payload.update(given)
    try:
        # --inline answers here, with this process's model; else any the deployment serves.
        request = read_request(payload, models=None if send else [settings.model])
        stream = send and (request.turn.params.n or 1) == 1  # best of n is judged whole, never streamed
        with _one_request():
            stored, turn_id = store_and_enqueue(request, send=send, stream=stream, on_stored=_say_stored)
    except HistoryMoved:  # an erasure committed between the request's reads: busy, exit code 1
        raise
    except InlineRefused as exc:
        # A "request" error names its field first ("gen_config.temperature: ..."): the file it came from.
        key = exc.part if exc.part != "request" else re.split(r"[.\[:]", str(exc), maxsplit=1)[0]
        source = files.get(exc.part) or (others if key in from_others else None)
        raise Refused(f"{source}: {exc}; nothing stored" if source else f"{exc}; nothing stored") from None
    return turn_request(request, stored).model_dump(exclude_none=True) | {"stream": stream}, turn_id


def _say_stored(stored: StoredInline) -> None:
    """What an original request stored, said before its turn is stored (which may still fail)."""
    verb = "stored" if stored.character_written else "unchanged"
    story = f"; story {stored.story} ({stored.story_events_stored} events stored)" if stored.story else ""
    _err(
        f"persona: character {stored.character!r} v{stored.character_version} ({verb}){story}; "
        f"history: {stored.lines_imported} line(s) imported into conversation {stored.conversation}"
    )


@app.command()
def chat(
    message: Annotated[str, typer.Option()],
    character: Annotated[str | None, typer.Option(help="character slug, e.g. luffy")] = None,
    conversation: Annotated[str | None, typer.Option(help="the game's conversation id")] = None,
    player_name: str = "",
    params: Annotated[
        str | None, typer.Option(help="generation params as JSON, e.g. '{\"seed\": 1}'")
    ] = None,
    inline: Annotated[bool, typer.Option(help="run the pipeline in this process, no worker needed")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=1, max=LONGEST_S, help="seconds to wait for a worker's reply (default 300)"),
    ] = None,
    narrator: Annotated[bool, typer.Option(help="address the story's narrator, not the character")] = False,
    persona: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="the original service's persona JSON"),
    ] = None,
    chat_history: Annotated[
        Path | None,
        typer.Option(
            "--chat_history",
            "--chat-history",
            exists=True,
            dir_okay=False,
            readable=True,
            help="the original service's history JSON (with --persona)",
        ),
    ] = None,
    story: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="the original service's story JSON"),
    ] = None,
    others: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="the rest of an original request"),
    ] = None,
) -> None:
    """Send one message to a character, print the reply as it is written, then prompt, reply and timings.

    With --persona (and --chat_history, --story, --others: the original service's files), the persona
    is stored as a character and the history and story with it, as the original handler took them."""
    from scripts.render import render_turn
    from services.producer import enqueue_turns, wait_for_reply

    try:
        parsed = json.loads(params) if params else {}
    except json.JSONDecodeError as exc:
        raise Refused(f"--params: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # a number too long to read, or nested too deeply
        raise Refused(f"--params: cannot be read ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(parsed, dict):
        raise Refused("--params: must be a JSON object")
    if inline and timeout is not None:  # it was taken and never applied: the turn ran to its end
        raise Refused("--timeout: waits for a worker's reply; --inline answers here, to the end")
    speaker = "narrator" if narrator else "character"
    if persona or chat_history or story or others:
        if character:
            raise Refused("--character: the persona file is the character; leave --character out")
        if persona is None and others is None:
            raise Refused("--persona: missing (the original service's persona JSON)")
        files = {"persona": persona, "chat_history": chat_history, "story": story}
        fields = {"message": message, "conversation": conversation, "player_name": player_name}
        # --narrator when given; else the --others file's speaker, if it names one
        said = {"speaker": speaker} if narrator else {}
        request, turn_id = _store_original(files, others, fields | {"params": parsed} | said, send=not inline)
        character = str(request["character"])
    elif character is None:
        raise Refused("--character: missing (or --persona with the original service's files)")
    else:
        turn_id = None
        request = {
            "conversation": conversation or f"cli-{character}",
            "character": character,
            "message": message,
            "player_name": player_name,
            "params": parsed,
            "speaker": speaker,
        }
    if inline:
        from worker.inline import answer_now, answer_stored

        with _one_request():
            answered = answer_stored([turn_id]) if turn_id is not None else answer_now([request])
        if not answered:  # removed before it could be read back
            raise NotReadBack("the turn ran but could not be read back; send it again")
        (view,) = answered
    else:
        if turn_id is None:  # best of n is judged whole, never streamed
            request["stream"] = (request.get("params") or {}).get("n", 1) == 1
            with _one_request():
                (turn_id,) = enqueue_turns([request])
        timeout = 300.0 if timeout is None else timeout
        deadline = time.monotonic() + timeout  # printing and waiting share it
        if request["stream"]:
            _print_as_written(turn_id, timeout)
        view = wait_for_reply(turn_id, timeout=max(0.0, deadline - time.monotonic()))
    _out(render_turn(view, f"{character} · {request['conversation']}"))
    if view.reply is None:
        raise typer.Exit(1)


@contextlib.contextmanager
def _one_request() -> Iterator[None]:
    """A refusal of the one request `chat` sends, by its fields alone (a list's "item 0" is noise)."""
    from services.producer import TurnRejected

    try:
        yield
    except TurnRejected as exc:
        raise Refused("; ".join(f"{e.field}: {e.reason}" for e in exc.errors)) from None


def _print_as_written(turn_id: uuid.UUID, timeout: float) -> None:
    """Print the turn's reply as the worker writes it (its stream), until the turn ends or `timeout`
    s pass; a stream that cannot be read is left for the stored turn, read after it."""
    import asyncio

    from redis.exceptions import RedisError

    from services.producer import TurnView, get_turn
    from streaming.reader import turn_events

    async def read() -> TurnView:
        view = get_turn(turn_id)
        assert view is not None
        return view

    async def follow() -> None:
        async for event in turn_events(turn_id, read):
            if event.kind == "delta":
                typer.echo(event.data["text"], nl=False)
            elif event.data.get("code") == "restarted":
                typer.echo("\n[the reply is being written again]")
        typer.echo("")

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout))
    except TimeoutError:
        typer.echo("")
    except (RedisError, OSError) as exc:
        typer.echo(f"\n[cannot read the reply as it is written ({exc}); waiting for the stored reply]")


@card_app.command("import")
def card_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the card file")],
    slug: Annotated[str | None, typer.Option(help="the character's slug (default: from its name)")] = None,
) -> None:
    """Import a V2/V3 card (JSON or PNG) as a character."""
    from services.characters import import_card

    with file.open("rb") as f:  # one byte past the limit tells; /dev/zero is never read whole
        stored = import_card(f.read(settings.card_max_bytes + 1), slug)
    verb = "imported" if stored.created else "updated"
    _out(f"{verb} {file} as character {stored.slug!r} (id {stored.id})")


@card_app.command("export")
def card_export(
    slug: Annotated[str, typer.Argument(help="the character's slug")],
    out: Annotated[Path, typer.Option(dir_okay=False, help="output file (.json or .png)")] = Path(
        "card.json"
    ),
    image: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="PNG export: the avatar to embed the card in"),
    ] = None,
) -> None:
    """Export a character as a card (the imported card as it was, unknown fields included)."""
    from core.whole_files import replaced_whole
    from services.characters import export_card

    png = out.suffix.lower() == ".png"
    if image is not None and not png:
        raise Refused(f"--image: a PNG export's avatar; --out {out} is not a .png file")
    data = export_card(
        slug,
        "png" if png else "json",
        _read_capped(image, settings.card_max_bytes, "MLCHAT_CARD_MAX_BYTES") if image else None,
    )
    if out.is_symlink() or (out.exists() and not out.is_file()):  # /dev/stdout, a pipe, a link: as named
        out.write_bytes(data)
        _err(f"wrote {out} ({len(data)} bytes)")  # never into what may be stdout itself
        return
    with replaced_whole(out) as (part,):  # a file written whole or not at all (Ctrl-C, a full disk)
        part.write_bytes(data)
    _out(f"wrote {out} ({len(data)} bytes)")


@app.command()
def manifest(
    turn_id: Annotated[str, typer.Argument(help="the turn's id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """What went into a turn's prompt, why, and its token counts."""
    from scripts.render import render_manifest
    from services.producer import get_turn

    try:
        parsed = uuid.UUID(turn_id)
    except ValueError:
        raise Refused(f"turn id: {turn_id!r} is not a UUID") from None
    view = get_turn(parsed)
    if view is None:
        raise Refused(f"turn id: no turn {turn_id}")
    if as_json and not view.context:  # not yet, or forgotten: said, not `null` (CLI review)
        _err(f"mlchat: {render_manifest(view)}")
        raise typer.Exit(1)
    _out(json.dumps(view.context, ensure_ascii=False, indent=2) if as_json else render_manifest(view))


@app.command("story-event")
def story_event(
    story: str,
    text: str,
    scene: str = "",
    time: Annotated[int | None, typer.Option(help="story time (default: the last event's)")] = None,
) -> None:
    """Append an event to a story (embedded on write)."""
    from services.characters import add_story_event

    _out(json.dumps(add_story_event(story, text, scene=scene, time=time)[0]))


@memory_app.command("retry")
def memory_retry() -> None:
    """Give the memory jobs given up (MLCHAT_MEMORY_JOB_MAX_FAILURES failures in a row) another go."""
    from memory.schedule import retry_given_up_jobs

    jobs = retry_given_up_jobs()
    for conversation, kind, error in jobs:
        _out(f"conversation {conversation}: {kind} (last error: {error or 'none recorded'})")
    _out(f"{len(jobs)} memory job(s) given another go")


# --- NPC memory: facts ---------------------------------------------------------------------------

FactScopeName = Literal["conversation", "met", "story", "world"]
FactKindName = Literal["player", "world", "npc"]


@callbacks_app.command("secret")
def callbacks_secret(
    tenant: Annotated[str, typer.Option(help="an API key's tenant ('' for the CLI's own)")] = "",
) -> None:
    """Print the secret a tenant's callbacks are signed with, for its receivers to check them."""
    from services.callbacks import previous_tenant_secret, tenant_secret

    if settings.callback_secret is None:
        raise Refused("callbacks are off: set MLCHAT_CALLBACK_SECRET")
    _note_a_tenant_no_key_has(tenant, "its secret all the same:")
    _out(tenant_secret(tenant))
    previous = previous_tenant_secret(tenant)
    if previous is not None:
        _err(f"note: while MLCHAT_CALLBACK_SECRET_PREVIOUS is set, callbacks are also signed with {previous}")


# Said after a command that read or wrote a tenant no API key has (done all the same).
_NO_KEY_READS_IT = "done in it all the same (a typo?)"


def _note_a_tenant_no_key_has(tenant: str, going_on: str) -> None:
    """A note on stderr when `tenant` is no API key's: a typo reads or writes a tenant no key sees (an
    erasure deleting nothing said it deleted nothing, exit 0: CLI review). Not refused: a tenant
    whose keys are gone still has its data to erase, export or train on."""
    if tenant and tenant not in {key.tenant_id for key in settings.api_keys}:
        _err(f"note: no key of MLCHAT_API_KEYS has the tenant {tenant!r}; {going_on}")


@facts_app.command("add")
def facts_add(
    player: Annotated[str, typer.Argument(help="the game's player id")],
    text: Annotated[str, typer.Argument(help="the fact, one short statement")],
    kind: FactKindName = "player",
    subject: Annotated[str | None, typer.Option(help="who or what it is about (default: the player)")] = None,
    importance: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    scope: Annotated[FactScopeName, typer.Option(help="which NPCs may know it")] = "met",
    conversation: Annotated[str | None, typer.Option(help="the conversation (scope conversation)")] = None,
    story: Annotated[str | None, typer.Option(help="the story, location or faction (scope story)")] = None,
    supersedes: Annotated[int | None, typer.Option(help="the id of a current fact this one replaces")] = None,
    tenant: Annotated[str, typer.Option(help="the API key's tenant ('' for the CLI's own)")] = "",
) -> None:
    """Tell NPCs a fact about a player (embedded on write); prints its id."""
    from services.facts import FactIn, FactRefused, write_facts

    fact = FactIn.model_validate(
        {
            "text": text,
            "kind": kind,
            "subject": subject,
            "importance": importance,
            "scope": scope,
            "conversation": conversation,
            "story": story,
            "supersedes": supersedes,
        }
    )
    try:
        (stored,) = write_facts(tenant, player, [fact])
    except FactRefused as exc:  # one fact: its option, without the batch's index
        raise Refused(f"{exc.field.removeprefix('facts[0].')}: {exc.reason}") from None
    _note_a_tenant_no_key_has(tenant, _NO_KEY_READS_IT)
    _out(str(stored.id))


FACTS_PAGE = 500  # facts read at a time by `facts list`: a player's whole history is never held at once


@facts_app.command("list")
def facts_list(
    player: Annotated[str, typer.Argument(help="the game's player id")],
    history: Annotated[bool, typer.Option(help="superseded facts too")] = False,
    tenant: str = "",
) -> None:
    """A player's facts, one JSON object a line, oldest first (read a page at a time, each page as it
    stands when read: a fact replaced meanwhile may be listed with its replacement)."""
    from services.facts import FactRefused, list_player_facts

    after = 0
    while True:
        try:
            page = list_player_facts(tenant, player, history=history, after=after, limit=FACTS_PAGE)
        except FactRefused as exc:
            raise Refused(str(exc)) from None
        for fact in page:
            _out(one_line_json(fact.model_dump(mode="json")))
        if len(page) < FACTS_PAGE:
            _note_a_tenant_no_key_has(tenant, _NO_KEY_READS_IT)
            return
        after = page[-1].id


@facts_app.command("move")
def facts_move(
    player: Annotated[str, typer.Argument(help="the game's player id")],
    fact_id: Annotated[int, typer.Argument(min=1, max=MAX_ID, help="the fact's id")],
    scope: Annotated[FactScopeName, typer.Option(help="the scope it reaches now")],
    conversation: str | None = None,
    story: str | None = None,
    told_by: Annotated[str, typer.Option(help="who spread it (a character slug)")] = "",
    tenant: str = "",
) -> None:
    """Gossip: a fact reaches another scope's NPCs; the move is recorded."""
    from services.facts import FactMoveIn, FactNotFound, FactRefused, gossip

    move = FactMoveIn.model_validate(
        {"scope": scope, "conversation": conversation, "story": story, "told_by": told_by}
    )
    try:
        fact, moves, _ = gossip(tenant, player, fact_id, move)
    except FactRefused as exc:
        raise Refused(str(exc)) from None
    except FactNotFound as exc:
        raise Refused(str(exc)) from None
    _out(f"fact {fact.id}: now {fact.scope} {fact.scope_ref}".rstrip() + f" ({len(moves)} move(s))")


@player_app.command("erase")
def player_erase(
    player: Annotated[str, typer.Argument(help="the game's player id")],
    conversation: Annotated[
        list[str] | None,
        typer.Option(help="a conversation of the player's that records no player id (repeatable)"),
    ] = None,
    tenant: Annotated[str, typer.Option(help="the API key's tenant ('' for the CLI's own)")] = "",
) -> None:
    """Delete the player's conversations (those recorded with its id, and those named; their turns,
    lines, summaries, scenes, reviews) and the facts about the player, in one transaction; prints
    what was deleted as JSON. Refused, deleting nothing, while a turn of the player is queued or
    running."""
    from services.erasure import erase

    erased = erase(tenant, player, conversation or [])
    _note_a_tenant_no_key_has(tenant, _NO_KEY_READS_IT)
    _out(json.dumps({"player": player, **vars(erased)}))


@history_app.command("import")
def history_import(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the chat log")],
    conversation: Annotated[
        str, typer.Option(help="the conversation's id (made if new, appended to if not)")
    ],
    character: Annotated[str, typer.Option(help="the character's slug")],
    format: Annotated[
        Literal["sillytavern", "openai", "original"],
        typer.Option(
            help="sillytavern: chat JSONL; openai: messages JSON; original: the original service's history"
        ),
    ] = "sillytavern",
    player: Annotated[str, typer.Option(help="the game's player id")] = "",
    player_name: Annotated[str | None, typer.Option(help="default: the log's user name")] = None,
    tenant: str = "",
) -> None:
    """Import a chat log into a conversation (embedded in batches; all or nothing)."""
    from memory.history_import import HistoryRefused, import_history

    try:
        raw = _read_capped(path, settings.history_max_bytes, "MLCHAT_HISTORY_MAX_BYTES").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        conv_id, first, last, skipped = import_history(
            raw,
            format,
            conversation=conversation,
            character=character,
            player_id=player,
            player_name=player_name,
            tenant=tenant,
        )
    except HistoryRefused as exc:
        raise Refused(f"{path}: {exc}; nothing stored") from None
    _note_a_tenant_no_key_has(tenant, _NO_KEY_READS_IT)
    plural = "s" if skipped != 1 else ""
    left_out = (
        f" ({skipped} message{plural} left out: system, developer, tool and empty ones)" if skipped else ""
    )
    if last < first:
        _out(f"conversation {conversation} ({conv_id}): holds every line of {path} already; nothing imported")
    else:
        _out(f"conversation {conversation} ({conv_id}): lines {first}-{last} imported{left_out}")


@app.command()
def reembed(
    chunk: Annotated[int, typer.Option(min=1, help="rows per transaction")] = 512,
    missing: Annotated[
        bool,
        typer.Option(
            "--missing",
            help="only the rows with no vector (another embedder's writes, history seeded without "
            "vectors), with the stored vectors' own embedder, in place",
        ),
    ] = False,
) -> None:
    """Embed every message, story event and fact again with MLCHAT_EMBEDDER (resumable; the new
    vectors replace the old all at once at the end); --missing: only the rows without a vector."""
    from memory.reembed import reembed as run
    from memory.reembed import reembed_missing

    def shown(table: str, last_id: int) -> None:
        _err(f"{table}: through id {last_id}")

    if missing:
        filled = reembed_missing(chunk=chunk, on_chunk=shown)
        _out(", ".join(f"{table} {n}" for table, n in filled.items()) + f" filled with {settings.embedder}")
        return
    swapped = run(chunk=chunk, on_chunk=shown)
    _out(", ".join(f"{table} {n}" for table, n in swapped.items()) + f" re-embedded with {settings.embedder}")


# --- LoRA voices ------------------------------------------------------------------------------


@lora_app.command("dataset")
def lora_dataset(
    character: Annotated[str, typer.Argument(help="the character's slug")],
    out: Annotated[Path, typer.Option(file_okay=False, help="output folder")],
    run: Annotated[str | None, typer.Option(help="only this run's turns (id or name)")] = None,
    min_persona: Annotated[
        float | None,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="persona score at least this (default MLCHAT_QUALITY_MIN_PERSONA)",
        ),
    ] = None,
    validation_share: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.1,
    tenant: Annotated[
        str, typer.Option(help="whose conversations: an API key's tenant ('' for the CLI's own)")
    ] = "",
) -> None:
    """The character's kept replies (none below the bar) and card examples, as prompt/completion JSONL:
    one tenant's conversations only (a prompt holds its players' history and names)."""
    from services.lora.dataset import export_dataset

    report = export_dataset(
        character, out, run=run, min_persona=min_persona, validation_share=validation_share, tenant=tenant
    )
    _note_a_tenant_no_key_has(tenant, _NO_KEY_READS_IT)
    _out(json.dumps(report.manifest, ensure_ascii=False, indent=2))


@lora_app.command("train")
def lora_train(
    dataset: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a `lora dataset` folder")],
    out: Annotated[Path, typer.Option(file_okay=False, help="the adapter's folder")],
    rank: Annotated[int, typer.Option(min=1)] = 8,
    alpha: Annotated[int, typer.Option(min=1)] = 16,
    target_modules: Annotated[str, typer.Option(help="comma-separated")] = "q_proj,k_proj,v_proj,o_proj",
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    learning_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 2e-4,
    max_steps: Annotated[int | None, typer.Option(min=1, help="stop after this many steps")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    max_length: Annotated[int, typer.Option(min=16)] = 1024,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads on a CPU")] = None,
    evaluate: Annotated[bool, typer.Option(help="the gate on held-out prompts, with and without it")] = True,
) -> None:
    """Fine-tune a LoRA (PEFT) on the served model, loss on the replies only; saves it with its config."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from services.lora.train import TrainConfig, train_adapter

    if rank > settings.max_lora_rank:  # else `lora register` refuses it, after the training
        raise Refused(
            f"--rank: {rank} is over MLCHAT_MAX_LORA_RANK ({settings.max_lora_rank}): the workers' engine"
            " could not load the adapter; train a smaller rank, or raise the setting for every worker"
        )
    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    if not modules:  # else PEFT refuses it only after the base model has loaded
        raise Refused(f"--target-modules: {target_modules!r} names no module (e.g. q_proj,v_proj)")
    config = TrainConfig(
        rank=rank,
        alpha=alpha,
        target_modules=modules,
        epochs=epochs,
        learning_rate=learning_rate,
        max_steps=max_steps,
        batch_size=batch_size,
        max_length=max_length,
        threads=threads,
        evaluate=evaluate,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training", total=None)

        def progress(step: int, steps: int, loss: float) -> None:
            bar.update(task, total=steps, completed=step, description=f"training (loss {loss:.3f})")
            if not console.is_terminal and (step % 10 == 0 or step == steps):  # a log has no live bar
                console.print(f"step {step}/{steps} loss {loss:.3f}")

        report = train_adapter(dataset, out, config, progress)
    _out(f"adapter -> {report.adapter_dir} ({report.steps} steps, {report.seconds} s) {report.losses}")
    if report.evaluation and "error" in report.evaluation:  # saved, but nobody checked it: not a pass
        _err(f"mlchat: the adapter is saved, but its evaluation failed: {report.evaluation['error']}")
        raise typer.Exit(1)
    if report.evaluation:
        _out("held-out prompts, the quality gate: " + json.dumps(report.evaluation, ensure_ascii=False))


@lora_app.command("register")
def lora_register(
    character: Annotated[str, typer.Argument(help="the character's slug")],
    adapter: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a `lora train` folder")],
    tenant: Annotated[
        str | None,
        typer.Option(help="the tenant whose turns it answers (default: whose dialogue trained it)"),
    ] = None,
    every_tenant: Annotated[
        bool, typer.Option(help="serve an adapter trained on one tenant's dialogue to every tenant")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(help="the model whose turns it answers (default: the one it was trained on)"),
    ] = None,
) -> None:
    """Make the adapter the character's voice (a new version); workers with MLCHAT_ENABLE_LORA serve it,
    to the turns of the tenant whose dialogue trained it alone, on the model it was trained on."""
    from services.lora.registry import register

    done = register(character, adapter, tenant=tenant, every_tenant=every_tenant, model=model)
    _note_a_tenant_no_key_has(done.tenant or "", "its turns alone are answered by the adapter (a typo?)")
    whose = "every tenant" if done.tenant is None else f"tenant {done.tenant!r}"
    _out(f"{done.slug}@v{done.version} -> {done.path} (answers {whose}'s turns on {done.model})")


@lora_app.command("unregister")
def lora_unregister(character: Annotated[str, typer.Argument(help="the character's slug")]) -> None:
    """Take the character's adapter off: its turns are answered by the base model from the next claim
    (register it, or another, again to give its voice back)."""
    from services.lora.registry import unregister

    version = unregister(character)
    if version is None:
        _out(f"{character}: no adapter registered (its turns are answered by the base model)")
    else:
        _out(f"{character}@v{version} taken off: its turns are answered by the base model")


# --- entry point ------------------------------------------------------------------------------


def _refusals() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "your input was refused" (a name that finds nothing included): one
    line, exit code 2."""
    from pydantic import ValidationError

    from db.runs import NotRetryable, RunConflict, RunDeleting
    from db.turns import IdempotencyConflict
    from db.vector_space import EmbedderMismatch
    from roleplay.cards import CardError
    from scripts.seed import SeedError
    from services.characters import CharacterNotFound, ReservedStory
    from services.erasure import ErasureRefused
    from services.lora.files import BadLoraFile
    from services.lora.registry import TrainedForAModel, TrainedOnATenant
    from services.producer import TurnRejected
    from services.runs import EmptyFile, RunNotFound, RunValidationError
    from services.runs.submit import NotARegularFile
    from services.runs.validate import SubmissionRefused

    return (
        SubmissionRefused,
        RunNotFound,
        CharacterNotFound,
        NotARegularFile,
        Refused,
        ErasureRefused,
        SeedError,
        TurnRejected,
        RunValidationError,
        EmptyFile,
        RunConflict,
        NotRetryable,
        RunDeleting,  # half deleted past retention: no run to export, resume or submit again
        IdempotencyConflict,
        CardError,
        ValidationError,
        EmbedderMismatch,
        BadLoraFile,
        TrainedOnATenant,
        TrainedForAModel,
        ReservedStory,
    )


def _busy() -> tuple[type[BaseException], ...]:
    """What another process held for the moment (a lock, the player's turns in flight): exit code 1, a
    failed operation to send again, not 2, refused input (review of error texts: a script retrying
    on 1 gave up on these for good)."""
    from db.erasure import PlayerBusy
    from db.world import StoryBusy
    from memory.reembed import ReembedBusy
    from services.erasure import ErasureContended
    from services.original_request import HistoryMoved
    from services.runs import RunBusy

    return (ErasureContended, PlayerBusy, RunBusy, StoryBusy, ReembedBusy, HistoryMoved, NotReadBack)


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    from services.runs import RunValidationError

    if isinstance(exc, RunValidationError):
        for err in exc.errors:
            _err(f"line {err.line}: {err.reason}")
        listed = f" (the first {len(exc.errors):,} listed)" if exc.count > len(exc.errors) else ""
        return f"rejected: {exc.count:,} bad line(s){listed}, nothing stored"
    if isinstance(exc, ValidationError):  # the place and message, without pydantic's "Value error, "
        from core.validation import first_error

        return first_error(exc)
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _unreachable(exc: BaseException) -> str:
    """The setting to look at when `exc` is a server away (its text names hosts, not the variable)."""
    from kombu.exceptions import OperationalError as BrokerAway
    from redis.exceptions import ConnectionError as RedisAway

    from db.session import DATABASE_AWAY, database_away

    causes = [exc, exc.__cause__]
    if database_away(exc) is not None:
        return f"{DATABASE_AWAY}: "
    if any(isinstance(c, (BrokerAway, RedisAway)) for c in causes):
        return "the broker is unreachable (REDIS_URL; unset: the embedded server): "
    return ""


INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlchat` command; returns the exit code."""
    configure_logging(tracebacks=False)  # a failure is one line, the logs' included
    if argv is None and threading.current_thread() is threading.main_thread():
        # `timeout`, systemd, a Kubernetes Job and `docker stop` stop a command with SIGTERM: it goes
        # the way of Ctrl-C (a submission's private copy and a `.part` file removed, an inline turn
        # cancelled), not killed mid-write (CLI review). A worker or API installs its own handler.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        _err("aborted")
        return INTERRUPTED
    except typer.TyperException as exc:  # usage errors: Typer's own message, exit code 2
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            _err(f"mlchat: {exc}")
        return int(getattr(exc, "exit_code", 2))
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError  # the database away or refusing: one line, exit 1

        if isinstance(exc, _refusals()):
            _err(f"mlchat: {_one_line(exc)}")
            return 2
        if isinstance(exc, _busy()):  # nothing wrong with the input: the same command later does it
            _err(f"mlchat: {_one_line(exc)}")
            return 1
        from kombu.exceptions import KombuError  # the broker away: one line too
        from psycopg import Error as PsycopgError  # the embedded server's own set-up, outside SQLAlchemy
        from redis.exceptions import RedisError

        one_line = (KeyError, LookupError, ValueError, OSError, RuntimeError, SQLAlchemyError)
        one_line += (KombuError, RedisError, PsycopgError, subprocess.SubprocessError)
        if isinstance(exc, one_line):
            _err(f"mlchat: {_unreachable(exc)}{_one_line(exc)}")
            return 1
        raise
    if result == INTERRUPTED:  # Typer turns Ctrl-C into this exit code, silently
        _err("mlchat: interrupted; what was stored is kept (a run submitted again resumes)")
    _streams_told()
    return int(result) if isinstance(result, int) else 0


def _streams_told() -> None:
    """What a command queued for streams (the ends of turns a sweep failed or a cancel ended) sent
    before the process exits: the publisher's thread is a daemon (review: readers waited for their
    status check)."""
    from streaming.publisher import flush_if_started

    if not flush_if_started(5.0):
        _err("mlchat: warning: some streams' ends were not sent; their readers learn at their next check")


if __name__ == "__main__":
    sys.exit(main())
