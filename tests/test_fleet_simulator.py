"""The fleet simulator's guard: it never runs its stand-in workers on configured services."""

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
