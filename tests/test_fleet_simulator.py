"""The fleet simulator's guard: it never runs its stand-in workers on configured services."""

import os

import pytest

from core.settings import settings
from scripts.fleet_simulator import main


@pytest.mark.parametrize("field, variable", [("database_url", "DATABASE_URL"), ("redis_url", "REDIS_URL")])
def test_the_simulator_refuses_configured_services(monkeypatch, field, variable) -> None:
    # closed ports: were the guard missing, nothing real could be reached or purged
    monkeypatch.setattr(settings, "database_url", None)
    monkeypatch.setattr(settings, "redis_url", None)
    closed = {"database_url": "postgresql://nobody@127.0.0.1:9/none", "redis_url": "redis://127.0.0.1:9/0"}
    monkeypatch.setattr(settings, field, closed[field])
    with pytest.raises(SystemExit, match=f"{variable} set; it runs only on its own embedded services"):
        main(["--workers", "1", "--seconds", "0.1"])


@pytest.mark.parametrize(
    "stand_in", ["scripts.fleet_simulator:StandInGpu", "scripts.bench_overhead:GroupedEngine"]
)
def test_the_benchmarks_stand_in_engines_take_what_the_pipeline_passes_the_engine_loop(stand_in) -> None:
    # A stand-in whose submit lacks an argument the pipeline passes fails every claim of its benchmark,
    # which then reports nothing stored (both did, after the loop's submit gained ends_notice).
    import importlib
    import inspect

    from worker.engine_loop import EngineLoop

    module, name = stand_in.split(":")
    for method in ("submit", "wait"):
        wanted = inspect.signature(getattr(EngineLoop, method)).parameters
        taken = inspect.signature(getattr(getattr(importlib.import_module(module), name), method)).parameters
        keywords = any(p.kind == p.VAR_KEYWORD for p in taken.values())  # takes every keyword argument
        lacking = [
            p
            for p in wanted
            if p not in taken and not (keywords and wanted[p].kind == wanted[p].KEYWORD_ONLY)
        ]
        assert not lacking, f"{stand_in}.{method} lacks {lacking}"


def test_the_knee_skips_a_point_that_did_not_get_its_live_load() -> None:
    """Found in review: at 8 workers the producer (a thread on the same 2 cores) enqueued 475 live
    turns against ~800 at the other points, and the knee was still named from that point."""
    from scripts.fleet_simulator import knee

    def point(workers: int, rate: float, met: bool = True) -> dict:
        return {"workers": workers, "stored_turns_per_s": rate, "offered_live_load_met": met}

    measured = [point(1, 10.3), point(2, 14.9), point(4, 32.8), point(8, 22.5, met=False)]
    assert knee(measured) is None  # no valid point after 4 to show where it flattens
    assert knee(measured[:3] + [point(8, 34.0)]) == 4
    assert knee([point(1, 10.0), point(2, 11.0)]) == 1


@pytest.mark.parametrize("role", ["drive", "worker"])
def test_neither_role_runs_on_configured_services_or_another_state(monkeypatch, tmp_path, role) -> None:
    """Found in review: only the driver was guarded (a worker started by hand would answer real
    queued turns with canned lines), and the guard read the settings before the benchmark's state
    dir was set, so a driver run directly used the project's own state."""
    monkeypatch.setattr(settings, "database_url", "postgresql://nobody@127.0.0.1:9/none")
    monkeypatch.setattr(settings, "redis_url", None)
    with pytest.raises(SystemExit, match="DATABASE_URL set"):
        main([role, "--workers", "1", "--seconds", "0.1"])
    monkeypatch.setattr(settings, "database_url", None)
    monkeypatch.setenv("MLCHAT_STATE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="MLCHAT_STATE_DIR=.* is not the benchmark's own state"):
        main([role, "--workers", "1", "--seconds", "0.1"])


def test_a_worker_the_driver_starts_takes_the_drivers_services(monkeypatch) -> None:
    """Review of the guard above: the driver names its own embedded services to its workers, which
    the guard then refused, every one of them (the fleet benchmark could not start a worker)."""
    import scripts.fleet_simulator as fleet

    started: list[int] = []
    monkeypatch.setattr(settings, "database_url", "postgresql://bench@127.0.0.1:9/mlchat")
    monkeypatch.setenv("MLCHAT_STATE_DIR", str(fleet.BENCH_STATE_DIR))
    monkeypatch.setenv(fleet.DRIVER_MARK, "1234")  # not this process's parent: refused
    monkeypatch.setattr(fleet, "run_worker", lambda index, *rates: started.append(index))
    with pytest.raises(SystemExit, match="DATABASE_URL set"):
        main(["worker", "--index", "3"])
    monkeypatch.setenv(fleet.DRIVER_MARK, str(os.getppid()))  # as the driver sets it for its workers
    main(["worker", "--index", "3"])
    assert started == [3]


def test_a_simulated_worker_gets_every_core_of_a_pinned_driver() -> None:
    """Found in review: after `make bench`'s engine sections the bench process is pinned off the
    engine's core, and the fleet's workers inherited one core of two (their CPU shares doubled)."""
    import subprocess
    import sys

    from scripts.fleet_simulator import spawn
    from worker.cpu_affinity import ORIGINAL_CPUS

    if len(ORIGINAL_CPUS) < 2:
        pytest.skip("one core: nothing to pin off")
    os.sched_setaffinity(0, {min(ORIGINAL_CPUS)})
    try:
        child = spawn(
            [sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"],
            dict(os.environ),
            stdout=subprocess.PIPE,
        )
        out, _ = child.communicate(timeout=60)
    finally:
        os.sched_setaffinity(0, ORIGINAL_CPUS)
    assert int(out) == len(ORIGINAL_CPUS)


def test_the_retrieval_p95_is_interpolated_not_a_rank_low() -> None:
    from scripts.bench_retrieval import p95

    assert p95([float(v) for v in range(1, 31)]) == pytest.approx(28.55)  # the 28th value before


def test_the_sections_that_purge_the_queues_skip_against_configured_services(
    monkeypatch, tmp_path, capsys
) -> None:
    """Found in review: against configured servers the fleet section's guard exited the whole bench
    (the sections after it never ran), and the enqueue section purged the servers' queues first."""
    from db import migrate
    from scripts import bench, seed

    ran: list[str] = []
    monkeypatch.setattr(settings, "database_url", "postgresql://nobody@127.0.0.1:9/none")
    monkeypatch.setattr(bench, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(migrate, "upgrade", lambda: None)
    monkeypatch.setattr(seed, "seed_world", lambda: None)
    monkeypatch.setattr(bench, "machine", lambda: {})
    monkeypatch.setattr(bench, "_run", lambda section, *args: ran.append(section) or {"ran": True})
    bench.main(["--quick", "--only", "enqueue", "fleet", "memory"])
    assert ran == ["memory"]
    out = capsys.readouterr().out
    assert "section enqueue skipped: DATABASE_URL set; it purges the model's queues" in out
    assert "section fleet skipped: DATABASE_URL set" in out
